"""Experiment (issue 17, stop 25): block refinement whose loss weighs each output direction by the loss Fisher.

    python benchmarks/probe_fisher_refinement.py /tmp/smollm2-st --ratio 0.6 -o DIR [--damping 0.1] [--steps 16]
    lowrank eval DIR --max-windows 40

The default compress with `--refine-steps N`, except for the refinement's loss. Before compressing, the
dense model's next-token loss is backpropagated on the sensitivity planner's windows (the first 8 of the
calibration, in batches of 4, with its own `backward_next_token`), and at each block's output the Fisher F = Σ_t (r_t·g_t)(r_t·g_t)ᵀ is summed,
r_t being the token's RMS (the token loss divides each token's error by it). The loss of block l is then
mean_t e_tᵀ M_l e_t / hidden, with e_t the token's error over r_t and M_l = F_l / mean diag F_l + δ·I
rescaled to mean diagonal 1: with M_l = I it is the token loss exactly. M_l is a second-order estimate
of how much the rest of the network turns the block's error into loss. Not kept in the package: it did not
help (reports/refinement.md, stop 25). It replaces `refinement.block_loss` and wraps
`compression.refine_block` from outside, so the package itself runs as released.
"""

from __future__ import annotations

import lowrank  # noqa: F401  (first: it sets OPENBLAS_THREAD_TIMEOUT before SciPy starts its OpenBLAS)

import argparse

import torch
import transformers

import lowrank.compression as compression
import lowrank.refinement as refinement
from lowrank import CompressConfig
from lowrank.calibration import first_windows, text_windows, window_batches
from lowrank.config import CalibrationConfig
from lowrank.loading import load_tokenizer
from lowrank.model_info import frozen_in_eval
from lowrank.profiling import DEFAULT_SENSITIVITY_SAMPLES
from lowrank.sensitivity import backward_next_token


def block_output_fishers(model: torch.nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Σ_t (r_t·g_t)(r_t·g_t)ᵀ at each decoder block's output, from the next-token loss on `windows`
    (the sensitivity planner's backward pass, in its batches of 4)."""
    layers = model.model.layers
    hidden = model.config.hidden_size
    fishers = [torch.zeros(hidden, hidden, dtype=torch.float64) for _ in layers]

    def watch(index: int):
        def hook(module, args, output):
            states = output[0] if isinstance(output, tuple) else output
            rms = states.detach().pow(2).mean(-1, keepdim=True).sqrt()

            def accumulate(grad):
                scaled = (grad * rms).reshape(-1, hidden).double()
                fishers[index].add_(scaled.T @ scaled)
            states.register_hook(accumulate)
        return hook

    with frozen_in_eval(model):
        handles = [layer.register_forward_hook(watch(i)) for i, layer in enumerate(layers)]
        handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
        try:
            with torch.enable_grad():
                for batch in window_batches(windows, 4):
                    backward_next_token(model, batch, torch.Generator())
        finally:
            for handle in handles:
                handle.remove()
    return fishers


def metric_of(fisher: torch.Tensor, damping: float) -> torch.Tensor:
    """F / mean diag F + δ·I, rescaled to mean diagonal 1 (so that I gives the token loss)."""
    metric = fisher / fisher.diagonal().mean() + damping * torch.eye(fisher.shape[0], dtype=torch.float64)
    return (metric / metric.diagonal().mean()).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--ratio", type=float, required=True)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()

    calibration = CalibrationConfig()
    tokenizer = load_tokenizer(args.folder, None, False)
    windows = text_windows(tokenizer, list(calibration.texts), calibration.samples, calibration.seq_len,
                           calibration.seed)
    dense = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    fishers = block_output_fishers(dense, first_windows(windows, DEFAULT_SENSITIVITY_SAMPLES))
    # a block is recognized by its input norm's weights, which refinement does not train by default
    metrics = {layer.input_layernorm.weight.detach().numpy().tobytes(): metric_of(f, args.damping)
               for layer, f in zip(dense.model.layers, fishers)}
    if len(metrics) != len(fishers):
        raise SystemExit("two blocks share their norm weights; this probe cannot tell them apart")
    del dense

    current: dict[str, torch.Tensor | None] = {"metric": None}
    released_refine_block = compression.refine_block

    def refine_block(dense_outputs, block, *rest, **options):
        current["metric"] = metrics[block.input_layernorm.weight.detach().numpy().tobytes()]
        try:
            return released_refine_block(dense_outputs, block, *rest, **options)
        finally:
            current["metric"] = None

    def fisher_loss(output: torch.Tensor, target: torch.Tensor, loss: str = "token") -> torch.Tensor:
        target = target.to(output.device).float()
        scale = target.pow(2).mean(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny).sqrt()
        error = (output.float() - target) / scale
        return ((error @ current["metric"].to(error.device)) * error).mean()

    compression.refine_block = refine_block
    refinement.block_loss = fisher_loss
    plan = lowrank.compress(args.folder, CompressConfig(ratio=args.ratio, refine_steps=args.steps),
                            output=args.output, progress=False)
    print("block errors (before, after, step kept):", list(plan.options.get("refine_errors", {}).values()))


if __name__ == "__main__":
    main()
