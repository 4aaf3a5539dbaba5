"""How much each matrix's output error moves the model's loss: the output Fisher, from a few backward passes.

For a target y = W x, perturbing its outputs by e_t raises the calibration loss by about
½ Σ_t (g_t · e_t)², where g_t = ∂loss/∂y_t (the Fisher, or Gauss-Newton, approximation of the
second-order term; the first-order term averages out at a trained model). Collecting
F = Σ_t g_t g_tᵀ for every target therefore prices any output error: truncating direction j of the
whitened SVD W·S = Σ σⱼ uⱼ vⱼᵀ costs about ½ σⱼ² · uⱼᵀ F uⱼ / N (inputs and output gradients taken
as independent, as in K-FAC). One backward pass per batch measures every matrix at once: seconds,
where ASVD's sensitivity search truncates each matrix in turn and re-evaluates the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import model_device
from .errors import LowrankError
from .model_info import is_causal_lm, without_cache
from .targets import Target


@dataclass
class OutputFisher:
    """Σ_t g_t g_tᵀ (float64) of the loss gradient w.r.t. one module's output, over `tokens` tokens."""

    matrix: torch.Tensor
    tokens: int = 0

    @property
    def mean(self) -> torch.Tensor:
        """The per-token Fisher F / N."""
        return self.matrix / max(self.tokens, 1)


def direction_costs(fisher: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """uⱼᵀ F uⱼ for every column uⱼ of `directions` (out × r): the loss price of unit error along uⱼ."""
    directions = directions.to(torch.float64)
    return ((fisher.to(torch.float64) @ directions) * directions).sum(0)


def measure_output_fisher(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, OutputFisher]:
    """Backpropagate the next-token loss of `windows` and accumulate every target's output Fisher.

    Parameters are frozen during the passes (no weight gradients are formed; only activations
    carry gradients), then restored. The model is left exactly as it was.
    """
    if not is_causal_lm(model):
        raise LowrankError(f"the sensitivity strategy needs a causal language model, and {type(model).__name__} "
                           "is not one; use --strategy global")
    if windows.shape[1] < 2:
        raise LowrankError("sensitivity needs windows of at least 2 tokens; raise --seq-len")
    device = model_device(model)
    fishers = {t.name: OutputFisher(torch.zeros(t.out_features, t.out_features, dtype=torch.float64))
               for t in targets}
    handles = []

    def watch(name: str):
        def hook(module, args, output):
            if not output.requires_grad:
                return

            def accumulate(grad):
                flat = grad.detach().reshape(-1, grad.shape[-1]).float()
                fishers[name].matrix += (flat.T @ flat).to(device="cpu", dtype=torch.float64)
                fishers[name].tokens += flat.shape[0]

            output.register_hook(accumulate)

        return hook

    def make_differentiable(module, args, output):
        return output.requires_grad_(True)

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(make_differentiable))
        for target in targets:
            handles.append(model.get_submodule(target.name).register_forward_hook(watch(target.name)))
        with torch.enable_grad():
            for batch in tqdm(windows.split(batch_size), desc="Sensitivity", unit="batch", disable=not progress):
                batch = batch.to(device)
                logits = model(input_ids=batch, **without_cache(model)).logits
                loss = nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)
    for name, fisher in fishers.items():
        if not torch.isfinite(fisher.matrix).all():
            raise LowrankError(f"the loss gradient at {name} is NaN or Inf; check the model and calibration text")
    return fishers
