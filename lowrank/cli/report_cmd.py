"""`lowrank report`: what a compressed checkpoint kept (ranks, parameters, method, budget, perplexity)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..calibration import text_windows
from ..checkpoint import check_output_dir, check_output_spares_input, is_compressed_folder, read_plan
from ..config import EvalConfig, read_config_record
from ..errors import LowrankError
from ..evaluate import perplexity
from ..loading import load_model
from ..report import write_compressed_report
from .common import DTYPES, model_options, quiet_option, resolve_device, silence_transformers, text_options

#: Perplexity settings shared with `lowrank eval` (report's --text has no default: no text, no perplexity).
EVAL = EvalConfig()


def measure_perplexity(folder: str, source: str | None, texts: list[str], seq_len: int, max_windows: int | None,
                       batch_size: int, load_kwargs: dict, progress: bool) -> dict:
    """Perplexity of the source model (before) and of the compressed folder (after), on the same windows."""
    after_model = load_model(folder, **load_kwargs)
    windows = text_windows(after_model.tokenizer, texts, None, seq_len, what="evaluation", default="macbeth")
    if max_windows is not None:
        windows = windows[:max_windows]
    after = perplexity(after_model.model, windows, batch_size=batch_size, progress=progress)
    del after_model
    before = None
    if source is not None:
        try:
            before_model = load_model(source, **load_kwargs)
        except LowrankError as exc:
            raise LowrankError(f"cannot load the source model recorded in the plan ({exc}); "
                               "pass --source with its path or name") from None
        before = perplexity(before_model.model, windows, batch_size=batch_size, progress=progress).perplexity
    return {"texts": texts or ["bundled:macbeth"], "seq_len": after.seq_len, "windows": after.windows,
            "tokens": after.tokens, "before": before, "after": after.perplexity}


@click.command("report")
@click.argument("folder", type=click.Path(file_okay=False))
@text_options("Default: none, and no perplexity is measured. The bundled Macbeth is "
              "lowrank/data/texts/macbeth.txt.")
@click.option("--source", default=None,
              help="The uncompressed model for 'perplexity before' (default: plan.source recorded at compression).")
@click.option("--no-before", is_flag=True, help="Measure only the compressed model's perplexity.")
@click.option("--seq-len", type=int, default=EVAL.seq_len, show_default=True, help="Tokens per evaluation window.")
@click.option("--max-windows", type=int, default=EVAL.max_windows,
              help="Evaluate only the first N windows (default: all of the text).")
@click.option("--batch-size", type=int, default=EVAL.batch_size, show_default=True, help="Windows per forward pass.")
@click.option("-o", "--output", default=None, help="Report folder. Default: ./<folder>-report.")
@click.option("--overwrite", is_flag=True, help="Replace the report folder if it exists.")
@model_options
@quiet_option
@silence_transformers
def command(folder, texts, source, no_before, seq_len, max_windows, batch_size, output, overwrite, dtype, device,
            tokenizer_source, trust_remote_code, allow_pickle, quiet):
    """Report on a compressed lowrank FOLDER: ranks per module, parameters, method, budget, the configs used.

    With --text, also the perplexity of the source model (before) and of FOLDER (after) on the
    same windows of that text.
    """
    if not is_compressed_folder(folder):
        raise LowrankError(f"{folder} is not a compressed lowrank folder (no lowrank_plan.json); "
                           "make one with `lowrank compress`, or use `lowrank analyze` on a dense model")
    output = output or f"{Path(folder.rstrip('/')).name}-report"
    check_output_dir(output, overwrite)
    check_output_spares_input(output, folder)
    plan, _ = read_plan(folder)
    config = read_config_record(folder)
    ppl = None
    if texts:
        load_kwargs = {"dtype": DTYPES[dtype], "device": resolve_device(device), "tokenizer_source": tokenizer_source,
                       "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
        before_source = None if no_before else (source or plan.source)
        ppl = measure_perplexity(folder, before_source, list(map(str, texts)), seq_len, max_windows, batch_size,
                                 load_kwargs, progress=not quiet)
    write_compressed_report(plan, folder, output, overwrite=overwrite, perplexity=ppl, config=config)
    if quiet:
        click.echo(json.dumps({"output": output, **plan.summary(), "perplexity": ppl}))
        return
    summary = plan.summary()
    click.echo(f"{plan.method}, {plan.strategy}: {summary['target_params_dense']:,} → {summary['target_params']:,} "
               f"target parameters ({summary['modules_factored']}/{summary['modules']} factored)")
    if ppl is not None:
        before = "n/a" if ppl["before"] is None else f"{ppl['before']:.3f}"
        click.echo(f"perplexity before {before}, after {ppl['after']:.3f}")
    for section, settings in config.items():
        if isinstance(settings, dict):
            click.echo(f"{section} config: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "version"))
    click.echo(f"wrote {output}/report.md")
