"""`lowrank compress`: factor a checkpoint's linear layers and save the smaller model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..calibration import text_windows
from ..checkpoint import check_output_dir, save_compressed
from ..compress import compress_model, needs_statistics
from ..factorize import METHODS
from ..loading import DEFAULT_MODEL, load_model
from ..planner import check_ratio
from .common import DTYPES, model_options, quiet_option, resolve_device, silence_transformers, text_options


def default_output(model: str, ratio: float, method: str) -> str:
    stem = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return f"{stem}-{method}-r{ratio:g}"


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
              help="Fraction of the target layers' parameters to keep, in (0, 1]. Ranks follow SVD-LLM's "
                   "uniform rule k = ⌊ratio·mn/(m+n)⌋; a matrix stays dense where that saves nothing.")
@click.option("--method", type=click.Choice(METHODS), default="whiten", show_default=True,
              help="whiten: truncation-aware whitening (SVD-LLM); asvd: activation-scaled SVD; svd: plain SVD "
                   "(needs no calibration text).")
@text_options("Default: Hamlet, bundled with lowrank.", flag="--calib")
@click.option("--samples", type=int, default=64, show_default=True, help="Calibration windows to draw at random.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for choosing the calibration windows.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration windows per forward pass.")
@click.option("--round-to", type=int, default=1, show_default=True,
              help="Round every rank down to a multiple of this (e.g. 8 for tensor cores).")
@click.option("--include", default=None, help="Regex: factor only modules whose name matches (default: every "
              "linear layer in the transformer blocks).")
@click.option("--exclude", default=None, help="Regex: never factor modules whose name matches.")
@click.option("-o", "--output", default=None,
              help="Output folder. Default: ./<model>-<method>-r<ratio>.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@model_options
@quiet_option
@silence_transformers
def command(model, ratio, method, texts, samples, seq_len, seed, batch_size, round_to, include, exclude, output,
            overwrite, dtype, device, tokenizer_source, trust_remote_code, allow_pickle, quiet):
    """Compress MODEL (default: smollm2-135m) by low-rank factorization and save it.

    MODEL is a built-in name (smollm2-135m), a model folder, a .gguf file, a compressed
    lowrank folder or a Hugging Face hub id. The output folder reloads with lowrank.load() or
    transformers' from_pretrained() once lowrank is imported.
    """
    check_ratio(ratio)
    output = output or default_output(model, ratio, method)
    check_output_dir(output, overwrite)
    device = resolve_device(device)
    started = time.perf_counter()
    loaded = load_model(model, dtype=DTYPES[dtype], device=device, trust_remote_code=trust_remote_code,
                        allow_pickle=allow_pickle, tokenizer_source=tokenizer_source)
    windows = None
    if needs_statistics(method):
        windows = text_windows(loaded.tokenizer, list(texts), samples, seq_len, seed)
    plan = compress_model(loaded.model, ratio=ratio, method=method, windows=windows, include=include,
                          exclude=exclude, round_to=round_to, batch_size=batch_size, progress=not quiet,
                          source=model)
    plan.options.update({"samples": samples if windows is not None else 0, "seq_len": seq_len, "seed": seed,
                         "calibration": list(map(str, texts)) or ["bundled:hamlet"]})
    save_compressed(loaded.model, loaded.tokenizer, plan, output, overwrite=overwrite)
    if not quiet:
        click.echo(describe(plan))
        click.echo(f"saved {output} in {time.perf_counter() - started:.1f} s")
    else:
        click.echo(json.dumps({"output": output, **plan.summary()}))
