"""`lowrank profile`: measure a model once and save its Profile, for `plan --profile` and `analyze --profile`.

A stage of its own, not an option of `plan`: profiling is the slow step (calibration forward
passes, a few backward passes for the loss prices, one SVD per matrix), planning the fast one, and
a profile serves every budget and strategy as well as the analyzer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..api import calibration_windows
from ..calibration import warn_if_thin
from ..config import CalibrationConfig
from ..errors import LowrankError
from ..loading import DEFAULT_MODEL, load_model
from ..profiling import DEFAULT_SENSITIVITY_SAMPLES, profile_with_calibration, targets_of
from ..config_base import resolve_device
from .common import DTYPES, calibration_options, model_options, quiet_option, silence_transformers


def check_profile_output(output: Path, overwrite: bool) -> None:
    """Refuse an -o that exists (without --overwrite), is a folder, or sits in a missing folder."""
    if output.is_dir():
        raise LowrankError(f"{output} is a folder; -o names the profile file to write")
    if output.exists() and not overwrite:
        raise LowrankError(f"{output} already exists; pass --overwrite to replace it or choose another -o")
    if not output.resolve().parent.is_dir():
        raise LowrankError(f"the folder {output.resolve().parent} for {output.name} does not exist; create it first")


@click.command("profile")
@click.argument("model", default=DEFAULT_MODEL)
@calibration_options()
@click.option("--sensitivity-samples", type=int, default=DEFAULT_SENSITIVITY_SAMPLES, show_default=True,
              help="Calibration windows backpropagated to price each direction's error in loss (causal LMs; an "
                   "encoder prices every calibration sentence by its embedding).")
@click.option("--data-free", is_flag=True,
              help="No calibration text: plain σ(W) only (enough for the uniform, energy and global strategies "
                   "with --method svd).")
@click.option("--include", default=None, help="Regex: profile only modules whose name matches (default: every "
              "linear layer in the transformer blocks).")
@click.option("--exclude", default=None, help="Regex: leave out modules whose name matches.")
@click.option("-o", "--output", default="profile.safetensors", show_default=True,
              help="Profile file to write (safetensors: vectors plus a JSON header).")
@click.option("--overwrite", is_flag=True, help="Replace the profile file if it exists.")
@model_options
@quiet_option
@silence_transformers
def command(model, texts, samples, seq_len, seed, batch_size, sensitivity_samples, data_free, include, exclude,
            output, overwrite, dtype, device, tokenizer_source, trust_remote_code, allow_pickle, quiet):
    """Measure MODEL (default: smollm2-135m) once: every target matrix's spectra and loss prices.

    `lowrank plan --profile FILE --budget B` then plans any budget in milliseconds without loading
    the model, and `lowrank analyze --profile FILE` reports on the same numbers.
    """
    output = Path(output)
    check_profile_output(output, overwrite)
    if data_free and texts:
        raise LowrankError("--data-free and --calib contradict each other; drop one")
    started = time.perf_counter()
    loaded = load_model(model, dtype=DTYPES[dtype], device=resolve_device(device), trust_remote_code=trust_remote_code,
                        allow_pickle=allow_pickle, tokenizer_source=tokenizer_source, need_tokenizer=not data_free)
    calibration = CalibrationConfig(texts=list(texts), samples=samples, seq_len=seq_len, seed=seed)
    windows = None if data_free else calibration_windows(loaded.model, loaded.tokenizer, calibration, batch_size)
    if windows is not None:
        warn_if_thin(windows, targets_of(loaded.model, include, exclude))
    prices = True  # next-token prices for a causal LM, sentence-embedding prices for an encoder
    profile = profile_with_calibration(loaded.model, windows, include=include, exclude=exclude, prices=prices,
                                       batch_size=batch_size, sensitivity_samples=sensitivity_samples,
                                       progress=not quiet, source=model)
    if windows is not None:
        profile.options.update({"samples": samples, "seq_len": seq_len, "seed": seed,
                                "calibration": list(map(str, texts)) or ["bundled:hamlet"]})
    profile.save(output)
    summary = {"output": str(output), "matrices": len(profile.matrices), "whitened": profile.whitened,
               "priced": profile.priced, "seconds": round(time.perf_counter() - started, 1)}
    if quiet:
        click.echo(json.dumps(summary))
    else:
        measured = ("whitened spectra and loss prices" if profile.priced else
                    "whitened spectra" if profile.whitened else "plain spectra")
        click.echo(f"profiled {len(profile.matrices)} matrices ({measured}); wrote {output} in "
                   f"{summary['seconds']:.1f} s")
