"""`lowrank eval`: perplexity of a dense or compressed model on text."""

from __future__ import annotations

import json

import click

from ..calibration import text_windows
from ..checkpoint import atomic_write_text
from ..evaluate import perplexity
from ..loading import load_model
from ..verify import check_finite_weights
from .common import DTYPES, model_options, quiet_option, resolve_device, silence_transformers, text_options


@click.command("eval")
@click.argument("model")
@text_options("Default: Macbeth, bundled with lowrank (never used for calibration).")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per evaluation window.")
@click.option("--max-windows", type=int, default=None,
              help="Evaluate only the first N windows (default: all of the text).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per forward pass.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the result as JSON to this file.")
@model_options
@quiet_option
@silence_transformers
def command(model, texts, seq_len, max_windows, batch_size, json_out, dtype, device, tokenizer_source,
            trust_remote_code, allow_pickle, quiet):
    """Perplexity of MODEL (built-in name, folder, .gguf, compressed folder or hub id) on text.

    The text is cut into non-overlapping windows of --seq-len tokens, each scored on its own.
    """
    loaded = load_model(model, dtype=DTYPES[dtype], device=resolve_device(device),
                        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                        tokenizer_source=tokenizer_source)
    check_finite_weights(loaded.model)
    windows = text_windows(loaded.tokenizer, list(texts), None, seq_len, what="evaluation", default="macbeth")
    if max_windows is not None:
        windows = windows[:max_windows]
    result = perplexity(loaded.model, windows, batch_size=batch_size, progress=not quiet)
    record = {"model": model, "texts": list(map(str, texts)) or ["bundled:macbeth"], **result.to_dict()}
    if json_out:
        atomic_write_text(json_out, json.dumps(record, indent=2) + "\n")
    click.echo(f"perplexity {result.perplexity:.3f} over {result.tokens:,} tokens "
               f"({result.windows} windows of {result.seq_len})")
