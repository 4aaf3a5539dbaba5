"""`lowrank compress`: factor a checkpoint's linear layers and save the smaller model.

The options' defaults are the CompressConfig's and CalibrationConfig's; the command builds those
configs and calls lowrank.api.compress, the entry point the Python API and recipes use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .. import distributed
from ..api import compress
from ..config import CalibrationConfig, CompressConfig
from ..factorize import METHODS
from ..loading import DEFAULT_MODEL
from ..planner import DEFAULT_STRATEGY, STRATEGIES
from ..refinement import LOSSES
from .common import calibration_options, model_options, nproc_option, quiet_option, silence_transformers

#: The configs this command builds; every option is one of their fields, except the CLI_ONLY ones.
CONFIGS = (CompressConfig, CalibrationConfig)
#: Options that are not config fields: where to read and write, and how loudly.
CLI_ONLY = ("model", "output", "overwrite", "quiet", "tokenizer_source", "trust_remote_code", "allow_pickle", "resume",
            "nproc")
DEFAULTS = CompressConfig()


def default_output(model: str, ratio: "float | str", method: str) -> str:
    stem = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    label = f"r{ratio:g}" if isinstance(ratio, float) else ratio
    return f"{stem}-{method}-{label}"


def describe(plan) -> str:
    s = plan.summary()
    lines = [
        f"target layers: {s['target_params_dense']:,} → {s['target_params']:,} parameters "
        f"(ratio {s['target_ratio']:.4f}; {s['modules_factored']}/{s['modules']} matrices factored)",
    ]
    if s["model_params_dense"] is not None:
        lines.append(f"whole model:   {s['model_params_dense']:,} → {s['model_params']:,} parameters "
                     f"(ratio {s['model_ratio']:.4f})")
    return "\n".join(lines)


@click.command("compress")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--ratio", type=float, default=DEFAULTS.ratio, show_default=True,
              help="Fraction of the target layers' parameters to keep, in (0, 1]: the budget when --budget "
                   "is not given. With --strategy uniform, ranks follow SVD-LLM's rule k = ⌊ratio·mn/(m+n)⌋.")
@click.option("--budget", default=DEFAULTS.budget, metavar="BUDGET",
              help="Parameter budget, overriding --ratio: 0.6 (fraction of the target layers), model:0.7 "
                   "(fraction of the whole model) or a count of the whole model's parameters such as 90M.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=DEFAULTS.strategy,
              help="How the planner spends the budget (see `lowrank plan --help`): uniform (SVD-LLM), energy, "
                   "global (relative whitened error), sensitivity (loss-weighted, a few backward passes). "
                   f"[default: {DEFAULT_STRATEGY} with --method whiten on a causal LM, uniform otherwise]")
@click.option("--plan", "plan", default=DEFAULTS.plan, type=click.Path(dir_okay=False),
              help="A plan file from `lowrank plan` (ranks per module); replaces --ratio, --budget and --strategy.")
@click.option("--method", type=click.Choice(METHODS), default=DEFAULTS.method, show_default=True,
              help="whiten: truncation-aware whitening (SVD-LLM); asvd: activation-scaled SVD; svd: plain SVD "
                   "(needs no calibration text).")
@calibration_options()
@click.option("--round-to", type=str, default=DEFAULTS.round_to, show_default=True, metavar="N|auto",
              help="Round every rank down to a multiple of this (e.g. 8 for tensor cores); auto: the multiple the "
                   "--device's matmuls like, timed once on it (8 on CUDA), stored in the plan.")
@click.option("--include", default=DEFAULTS.include, help="Regex: factor only modules whose name matches (default: every "
              "linear layer in the transformer blocks).")
@click.option("--exclude", default=DEFAULTS.exclude, help="Regex: never factor modules whose name matches.")
@click.option("--sequential/--one-shot", default=DEFAULTS.sequential, show_default=True,
              help="sequential: factor one transformer block at a time, each from the inputs the already-compressed "
                   "blocks produce (corrects the error as it flows through depth; one block on the device at a "
                   "time). one-shot: every layer's statistics from the dense model.")
@click.option("--update/--no-update", default=DEFAULTS.update,
              help="With --sequential: refit each layer's second factor by ridge least squares against the dense "
                   "block's outputs (SVD-LLM's parameter update). Default: on with --sequential.")
@click.option("--plan-samples", type=int, default=DEFAULTS.plan_samples, show_default=True, metavar="N",
              help="With --sequential: the planner profiles only the first N calibration windows (its dense Grams "
                   "and spectra); the compression itself calibrates on all of them (0: plan on all).")
@click.option("--update-samples", type=int, default=DEFAULTS.update_samples, show_default=True, metavar="N",
              help="With --update: the least-squares refit fits on the first N calibration windows, so the "
                   "compressed block's extra pass runs on them alone (0: all of them).")
@click.option("--sensitivity-samples", type=int, default=DEFAULTS.sensitivity_samples, show_default=True,
              metavar="N", help="With the sensitivity planner: calibration windows backpropagated to price each "
                                "direction's loss (the first N of those the planner profiles; causal LMs only, an "
                                "encoder prices every calibration sentence by its embedding).")
@click.option("--refine-steps", type=int, default=DEFAULTS.refine_steps, show_default=True,
              help="With --sequential: after each block is factored (and updated), this many Adam steps on its "
                   "factors so that its output matches the dense block's on the dense path's inputs (0: off).")
@click.option("--refine-lr", type=float, default=DEFAULTS.refine_lr, show_default=True,
              help="Learning rate of the block refinement, relative to each tensor's size: each moves about this "
                   "fraction of its RMS per step.")
@click.option("--refine-share", type=float, default=DEFAULTS.refine_share, show_default=True,
              help="Fraction of the calibration batches each refinement step trains on, in (0, 1].")
@click.option("--refine-norms/--no-refine-norms", default=DEFAULTS.refine_norms, show_default=True,
              help="Let the block refinement also train the block's biases and norm weights.")
@click.option("--refine-dense/--no-refine-dense", default=DEFAULTS.refine_dense, show_default=True,
              help="Let the block refinement also train the block's linear layers that the plan kept dense "
                   "(ranks and parameter counts stay as planned).")
@click.option("--refine-holdout", type=float, default=DEFAULTS.refine_holdout, show_default=True,
              help="Fraction of the calibration batches the block refinement never trains on, in [0, 1): each block "
                   "keeps the step with the lowest error on them, and stops when it no longer falls (0: none).")
@click.option("--refine-refit", type=int, default=DEFAULTS.refine_refit, show_default=True, metavar="ROUNDS",
              help="With --update: refit both factors of every layer in closed form against the dense block "
                   "(reduced-rank regression), this many rounds, instead of the second factor alone (0: off).")
@click.option("--refine-loss", type=click.Choice(LOSSES), default=DEFAULTS.refine_loss, show_default=True,
              help="What the block refinement fits: token: each token's squared error relative to the dense token's "
                   "size (what the next block's norm sees); mse: the plain mean squared error.")
@click.option("--stream/--no-stream", default=DEFAULTS.stream,
              help="Read the checkpoint (safetensors folder, .gguf file or hub id) block by block from disk and write "
                   "the output shard by shard: memory holds one block, its statistics and the calibration activations "
                   "(docs/scale.md). Same factors as without it. Default: off, unless --offload-dir, --max-memory or "
                   "--save-dtype asks for it.")
@click.option("--offload-dir", default=DEFAULTS.offload_dir, type=click.Path(file_okay=False),
              help="With --stream: spill calibration activations to this folder once memory would run out.")
@click.option("--max-memory", default=DEFAULTS.max_memory, metavar="SIZE",
              help="With --stream: memory the run may use, e.g. 8GB (default: what the machine has free now); "
                   "a run estimated above it is refused before it starts.")
@click.option("--max-shard-size", default=DEFAULTS.max_shard_size, show_default=True, metavar="SIZE",
              help="Largest output weight file; bigger models are sharded with an index file.")
@click.option("--save-dtype", type=click.Choice(("source", "float32", "float16", "bfloat16")),
              default=DEFAULTS.save_dtype, show_default=True,
              help="With --stream: dtype of the saved weights (source: the checkpoint's own; the math runs in "
                   "float32/float64 either way).")
@click.option("--resume", is_flag=True,
              help="With --stream: continue an interrupted run from its last finished block (kept in "
                   ".<output>.partial beside the output, checked against the inputs).")
@click.option("-o", "--output", default=None,
              help="Output folder. Default: ./<model>-<method>-r<ratio>.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@model_options
@nproc_option
@quiet_option
@silence_transformers
def command(model, ratio, budget, strategy, plan, method, texts, samples, seq_len, seed, batch_size, round_to, include,
            exclude, sequential, update, plan_samples, update_samples, sensitivity_samples, refine_steps, refine_lr, refine_share, refine_norms, refine_dense,
            refine_holdout, refine_refit, refine_loss, stream, offload_dir, max_memory, max_shard_size, save_dtype, resume, output,
            overwrite, dtype, device, tokenizer_source, trust_remote_code, allow_pickle, nproc, quiet):
    """Compress MODEL (default: smollm2-135m) by low-rank factorization and save it.

    MODEL is a built-in name (smollm2-135m), a model folder, a .gguf file, a compressed
    lowrank folder or a Hugging Face hub id. The output folder reloads with lowrank.load() or
    transformers' from_pretrained() wherever lowrank is installed.
    """
    if nproc is not None and nproc > 1:  # start torchrun with this same command on `nproc` ranks
        return distributed.launch(nproc, distributed.strip_option(click.get_current_context().obj["argv"], "--nproc"))
    config = CompressConfig(method=method, ratio=ratio, budget=budget, strategy=strategy, plan=plan, include=include,
                            exclude=exclude, round_to=round_to, sequential=sequential, update=update, plan_samples=plan_samples,
                            update_samples=update_samples, sensitivity_samples=sensitivity_samples,
                            refine_steps=refine_steps, refine_lr=refine_lr, refine_share=refine_share,
                            refine_norms=refine_norms, refine_dense=refine_dense, refine_holdout=refine_holdout,
                            refine_refit=refine_refit, refine_loss=refine_loss,
                            batch_size=batch_size, device=device, dtype=dtype, stream=stream, offload_dir=offload_dir,
                            max_memory=max_memory, max_shard_size=max_shard_size, save_dtype=save_dtype)
    calibration = CalibrationConfig(texts=list(texts), samples=samples, seq_len=seq_len, seed=seed)
    output = output or default_output(model, "planned" if plan or budget else ratio, method)
    started = time.perf_counter()
    result = compress(model, config, calibration, output=output, tokenizer=tokenizer_source, overwrite=overwrite,
                      trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=not quiet, resume=resume)
    if not distributed.is_writer():
        return 0
    if not quiet:
        click.echo(describe(result))
        click.echo(f"saved {output} in {time.perf_counter() - started:.1f} s")
    else:
        click.echo(json.dumps({"output": output, **result.summary()}))
