"""`lowrank report`: what a compressed checkpoint kept (ranks, parameters, method, budget, configs, perplexity).

The perplexity options' defaults are the EvalConfig's; the command calls lowrank.api.report.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..api import report
from ..config import EvalConfig
from .common import model_options, quiet_option, silence_transformers, text_options

#: Perplexity settings shared with `lowrank eval` (report's --text has no default: no text, no perplexity).
EVAL = EvalConfig()


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
    output = output or f"{Path(folder.rstrip('/')).name}-report"
    config = EvalConfig(texts=list(texts), seq_len=seq_len, max_windows=max_windows, batch_size=batch_size,
                        dtype=dtype, device=device) if texts else None
    data = report(folder, config, output=output, source=source, before=not no_before, overwrite=overwrite,
                  tokenizer=tokenizer_source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                  progress=not quiet)
    ppl, summary = data["perplexity"], data["summary"]
    if quiet:
        click.echo(json.dumps({"output": output, **summary, "perplexity": ppl}))
        return
    click.echo(f"{data['method']}, {data['strategy']}: {summary['target_params_dense']:,} → "
               f"{summary['target_params']:,} target parameters ({summary['modules_factored']}/{summary['modules']} "
               "factored)")
    if ppl is not None:
        before = "n/a" if ppl["before"] is None else f"{ppl['before']:.3f}"
        click.echo(f"perplexity before {before}, after {ppl['after']:.3f}")
    for section, settings in (data["config"] or {}).items():
        if isinstance(settings, dict):
            click.echo(f"{section} config: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "version"))
    click.echo(f"wrote {output}/report.md")
