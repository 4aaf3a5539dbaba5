"""`lowrank analyze`: the spectra of a model's matrices, written as a report folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .. import distributed
from ..calibration import collect_stats, text_windows, warn_if_thin
from ..fileio import check_output_dir, check_output_spares_input
from ..folder_format import is_compressed_folder
from ..folder_profile import has_safetensors, profile_folder
from ..errors import LowrankError
from ..loading import DEFAULT_MODEL, load_model
from ..report import write_analysis_report
from ..profile import Profile
from ..profiling import profile_model, targets_of
from ..targets import name_filter
from ..config import CalibrationConfig
from ..config_base import resolve_device
from ..stream_analyze import analyze_streamed
from .common import DTYPES, calibration_options, model_options, nproc_option, quiet_option, silence_transformers


def default_output(model: str, whitened: bool) -> str:
    stem = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return f"{stem}-analysis" + ("-whitened" if whitened else "")


def describe(analysis: Profile) -> str:
    """A short per-type table for the terminal."""
    whitened = analysis.whitened
    lines = [f"{len(analysis.matrices)} matrices, {analysis.target_params:,} parameters; "
             f"mean rank fraction for 90/95/99% energy ({'whitened' if whitened else 'weights'}):"]
    for kind in analysis.kinds:
        group = [m for m in analysis.matrices if m.kind == kind]
        fractions = []
        for level in ("0.9", "0.95", "0.99"):
            fractions.append(sum(m.stats(whitened).rank_for_energy[level] / m.max_rank for m in group) / len(group))
        lines.append(f"  {kind:<28} ×{len(group):<4} " + "  ".join(f"{100 * f:5.1f}%" for f in fractions))
    return "\n".join(lines)


@click.command("analyze")
@click.argument("model", required=False)
@click.option("--profile", "profile_file", default=None, metavar="FILE",
              help="Report from this saved profile (`lowrank profile`) instead of measuring MODEL: no model is loaded.")
@calibration_options("Default: none, and the analysis uses the weights alone (data-free).")
@click.option("--include", default=None, help="Regex: analyze only modules whose name matches (default: every "
              "linear layer in the transformer blocks).")
@click.option("--exclude", default=None, help="Regex: skip modules whose name matches.")
@click.option("-o", "--output", default=None,
              help="Report folder (report.md, report.json, PNG plots). Default: ./<model>-analysis[-whitened].")
@click.option("--overwrite", is_flag=True, help="Replace the report folder if it exists.")
@click.option("--stream", is_flag=True, help="With --calib: read the checkpoint one block at a time (folder, .gguf "
              "or hub id), as `compress --stream` does; the model is never whole in memory.")
@click.option("--offload-dir", default=None, metavar="DIR",
              help="With --stream: spill calibration activations to this folder once memory would run out.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="With --stream: memory the run may use, e.g. 8GB (default: what the machine has free now).")
@model_options
@nproc_option
@quiet_option
@silence_transformers
def command(model, profile_file, texts, samples, seq_len, seed, batch_size, include, exclude, output, overwrite, stream,
            offload_dir, max_memory, dtype, device, tokenizer_source, trust_remote_code, allow_pickle, nproc, quiet):
    """Analyze the singular-value spectra of MODEL's matrices (default: smollm2-135m) and write a report.

    With --profile FILE (from `lowrank profile`) the report comes from that saved profile, without
    loading any model.

    MODEL is a built-in name, a model folder, a .gguf file, a compressed lowrank folder or a hub id.
    Without --calib the analysis is data-free: σ(W) only, and a folder with safetensors weights is
    read one tensor at a time without building the model. With --calib it also computes the
    whitened spectra σ(W·S), whose squares are the output error each dropped direction costs.
    With --calib --stream the checkpoint is read one block at a time (docs/scale.md).
    """
    if nproc is not None and nproc > 1:  # start torchrun with this same command on `nproc` ranks
        return distributed.launch(nproc, distributed.strip_option(click.get_current_context().obj["argv"], "--nproc"))
    started = time.perf_counter()
    if (offload_dir or max_memory) and not stream:
        raise LowrankError(f"{'--offload-dir' if offload_dir else '--max-memory'} applies to a streamed analysis; "
                           "add --stream")
    if stream and (profile_file is not None or not texts):
        raise LowrankError("--stream streams the calibration pass: pass --calib TEXT (without --calib the analysis "
                           "of a folder already reads one tensor at a time), or drop --stream")
    if distributed.init_from_environment():  # under torchrun: calibration split across the ranks
        quiet = quiet or not distributed.is_writer()
    if profile_file is not None:
        if model is not None or texts:
            raise LowrankError("--profile reports on a saved profile; drop MODEL and --calib, or drop --profile")
        analysis = Profile.load(profile_file)
        if include or exclude:
            wanted = name_filter(include, exclude)
            analysis = Profile([m for m in analysis.matrices if wanted(m.name)], source=analysis.source,
                               whitened=analysis.whitened, options=analysis.options, model_params=analysis.model_params)
        output = output or default_output(Path(profile_file).stem, analysis.whitened)
        check_output_dir(output, overwrite)
        check_output_spares_input(output, profile_file)
        write_analysis_report(analysis, output, overwrite=overwrite)
        finish(analysis, output, quiet, started)
        return
    model = model or DEFAULT_MODEL
    whitened = bool(texts)
    output = output or default_output(model, whitened)
    check_output_dir(output, overwrite)
    check_output_spares_input(output, model)
    if stream:
        analysis = analyze_streamed(model, CalibrationConfig(texts=list(texts), samples=samples, seq_len=seq_len,
                                                             seed=seed), tokenizer=tokenizer_source, include=include,
                                    exclude=exclude, batch_size=batch_size, device=resolve_device(device),
                                    offload_dir=offload_dir, max_memory=max_memory,
                                    trust_remote_code=trust_remote_code, progress=not quiet)
    elif not whitened and (is_compressed_folder(model) or has_safetensors(model)):
        analysis = profile_folder(model, include, exclude, progress=not quiet, trust_remote_code=trust_remote_code,
                                  source=model)
    else:
        loaded = load_model(model, dtype=DTYPES[dtype], device=resolve_device(device),
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                            tokenizer_source=tokenizer_source, need_tokenizer=whitened)
        targets = targets_of(loaded.model, include, exclude)
        stats = None
        if whitened:
            windows = text_windows(loaded.tokenizer, list(texts), samples, seq_len, seed)
            warn_if_thin(windows, targets)
            stats = collect_stats(loaded.model, targets, windows, batch_size=batch_size, progress=not quiet)
        analysis = profile_model(loaded.model, targets, stats, progress=not quiet, source=model)
        if whitened:
            analysis.options.update({"calibration": list(map(str, texts)), "samples": samples, "seq_len": seq_len,
                                     "seed": seed})
    with distributed.agreement("saving"):
        if distributed.is_writer():
            write_analysis_report(analysis, output, overwrite=overwrite)
    if distributed.is_writer():
        finish(analysis, output, quiet, started)


def finish(analysis: Profile, output: str, quiet: bool, started: float) -> None:
    """Print what was written: a JSON line with --quiet, else the per-type table."""
    if quiet:
        click.echo(json.dumps({"output": output, "matrices": len(analysis.matrices), "whitened": analysis.whitened}))
    else:
        click.echo(describe(analysis))
        click.echo(f"wrote {output}/report.md in {time.perf_counter() - started:.1f} s")
