"""`lowrank compress`: factor a checkpoint's linear layers and save the smaller model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..calibration import text_windows
from ..checkpoint import check_output_dir, check_output_spares_input, save_compressed
from ..compress import compress_model, needs_statistics
from ..errors import LowrankError
from ..factorize import METHODS
from ..loading import DEFAULT_MODEL, load_model
from ..plan import Plan
from ..planner import DEFAULT_STRATEGY, STRATEGIES, check_ratio, default_strategy
from .common import DTYPES, calibration_options, model_options, quiet_option, resolve_device, silence_transformers


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
@click.option("--ratio", type=float, default=0.8, show_default=True,
              help="Fraction of the target layers' parameters to keep, in (0, 1]: the budget when --budget "
                   "is not given. With --strategy uniform, ranks follow SVD-LLM's rule k = ⌊ratio·mn/(m+n)⌋.")
@click.option("--budget", default=None, metavar="BUDGET",
              help="Parameter budget, overriding --ratio: 0.6 (fraction of the target layers), model:0.7 "
                   "(fraction of the whole model) or a count of the whole model's parameters such as 90M.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None,
              help="How the planner spends the budget (see `lowrank plan --help`): uniform (SVD-LLM), energy, "
                   "global (relative whitened error), sensitivity (loss-weighted, a few backward passes). "
                   f"[default: {DEFAULT_STRATEGY} with --method whiten on a causal LM, uniform otherwise]")
@click.option("--plan", "plan_file", default=None, type=click.Path(dir_okay=False),
              help="A plan file from `lowrank plan` (ranks per module); replaces --ratio, --budget and --strategy.")
@click.option("--method", type=click.Choice(METHODS), default="whiten", show_default=True,
              help="whiten: truncation-aware whitening (SVD-LLM); asvd: activation-scaled SVD; svd: plain SVD "
                   "(needs no calibration text).")
@calibration_options()
@click.option("--round-to", type=int, default=1, show_default=True,
              help="Round every rank down to a multiple of this (e.g. 8 for tensor cores).")
@click.option("--include", default=None, help="Regex: factor only modules whose name matches (default: every "
              "linear layer in the transformer blocks).")
@click.option("--exclude", default=None, help="Regex: never factor modules whose name matches.")
@click.option("--sequential/--one-shot", default=True, show_default=True,
              help="sequential: factor one transformer block at a time, each from the inputs the already-compressed "
                   "blocks produce (corrects the error as it flows through depth; one block on the device at a "
                   "time). one-shot: every layer's statistics from the dense model.")
@click.option("--update/--no-update", default=None,
              help="With --sequential: refit each layer's second factor by ridge least squares against the dense "
                   "block's outputs (SVD-LLM's parameter update). Default: on with --sequential.")
@click.option("-o", "--output", default=None,
              help="Output folder. Default: ./<model>-<method>-r<ratio>.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@model_options
@quiet_option
@silence_transformers
def command(model, ratio, budget, strategy, plan_file, method, texts, samples, seq_len, seed, batch_size, round_to, include, exclude,
            sequential, update, output, overwrite, dtype, device, tokenizer_source, trust_remote_code, allow_pickle, quiet):
    """Compress MODEL (default: smollm2-135m) by low-rank factorization and save it.

    MODEL is a built-in name (smollm2-135m), a model folder, a .gguf file, a compressed
    lowrank folder or a Hugging Face hub id. The output folder reloads with lowrank.load() or
    transformers' from_pretrained() once lowrank is imported.
    """
    check_ratio(ratio)
    if plan_file and budget:
        raise LowrankError("--plan already fixes every rank; drop --budget (or drop --plan to plan inline)")
    plan = Plan.load(plan_file) if plan_file else None
    output = output or default_output(model, "planned" if plan or budget else ratio, method)
    check_output_dir(output, overwrite)
    check_output_spares_input(output, model)
    device = resolve_device(device)
    started = time.perf_counter()
    sequential = sequential and needs_statistics(method)  # svd uses no statistics: nothing to sequence
    compute_device = device
    if sequential:
        device = "cpu"  # the model waits on CPU; blocks visit compute_device one at a time
    loaded = load_model(model, dtype=DTYPES[dtype], device=device, trust_remote_code=trust_remote_code,
                        allow_pickle=allow_pickle, tokenizer_source=tokenizer_source)
    strategy = strategy or default_strategy(method, loaded.model)
    windows = None
    if needs_statistics(method) or (plan is None and strategy == "sensitivity"):
        windows = text_windows(loaded.tokenizer, list(texts), samples, seq_len, seed)
    plan = compress_model(loaded.model, ratio=ratio, budget=budget, strategy=strategy, plan=plan,
                          method=method, windows=windows, include=include,
                          exclude=exclude, round_to=round_to, batch_size=batch_size, progress=not quiet,
                          source=model, sequential=sequential, update=update, device=compute_device)
    plan.options.update({"samples": samples if windows is not None else 0, "seq_len": seq_len, "seed": seed,
                         "calibration": list(map(str, texts)) or ["bundled:hamlet"]})
    save_compressed(loaded.model, loaded.tokenizer, plan, output, overwrite=overwrite)
    if not quiet:
        click.echo(describe(plan))
        click.echo(f"saved {output} in {time.perf_counter() - started:.1f} s")
    else:
        click.echo(json.dumps({"output": output, **plan.summary()}))
