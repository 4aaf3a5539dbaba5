"""`lowrank eval`: perplexity of a dense or compressed model on text.

The options' defaults are the EvalConfig's; the command builds it and calls lowrank.api.evaluate.
"""

from __future__ import annotations

import json

import click

from ..api import evaluate
from ..checkpoint import atomic_write_text
from ..config import EvalConfig
from ..encoder_eval import EncoderAgreement
from .common import model_options, quiet_option, silence_transformers, text_options

#: The config this command builds; every option is one of its fields, except the CLI_ONLY ones.
CONFIGS = (EvalConfig,)
#: Options that are not config fields: the model, the JSON copy of the result, loading switches, how loudly.
CLI_ONLY = ("model", "json_out", "quiet", "tokenizer_source", "trust_remote_code", "allow_pickle")
DEFAULTS = EvalConfig()


@click.command("eval")
@click.argument("model")
@text_options("Default: Macbeth, bundled with lowrank (never used for calibration).")
@click.option("--seq-len", type=int, default=DEFAULTS.seq_len, show_default=True, help="Tokens per evaluation window.")
@click.option("--max-windows", type=int, default=DEFAULTS.max_windows,
              help="Evaluate only the first N windows (default: all of the text).")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True, help="Windows per forward pass.")
@click.option("--reference", default=DEFAULTS.reference, metavar="MODEL",
              help="Encoders: the dense model to compare embeddings with (default: the source in the folder's plan).")
@click.option("--max-sentences", type=int, default=DEFAULTS.max_sentences,
              help="Encoders: use only the first N sentences of the text (default: all).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the result as JSON to this file.")
@model_options
@quiet_option
@silence_transformers
def command(model, texts, seq_len, max_windows, batch_size, reference, max_sentences, json_out, dtype, device,
            tokenizer_source, trust_remote_code, allow_pickle, quiet):
    """Perplexity of MODEL (built-in name, folder, .gguf, compressed folder or hub id) on text.

    The text is cut into non-overlapping windows of --seq-len tokens, each scored on its own.
    An encoder (BERT, a sentence encoder) is compared with its dense --reference on the text's
    sentences instead: cosine of the pooled embeddings, self-retrieval, MLM perplexity where it has a head.
    """
    config = EvalConfig(texts=list(texts), seq_len=seq_len, max_windows=max_windows, batch_size=batch_size,
                        dtype=dtype, device=device, reference=reference, max_sentences=max_sentences)
    result = evaluate(model, config, tokenizer=tokenizer_source, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle, progress=not quiet)
    record = {"model": model, "texts": list(map(str, texts)) or ["bundled:macbeth"], **result.to_dict(),
              "config": config.to_dict()}
    if json_out:
        atomic_write_text(json_out, json.dumps(record, indent=2) + "\n")
    if isinstance(result, EncoderAgreement):
        mlm = f", MLM perplexity {result.mlm_perplexity:.3f}" if result.mlm_perplexity is not None else ""
        click.echo(f"embedding cosine mean {result.mean_cosine:.4f} min {result.min_cosine:.4f}, self-retrieval "
                   f"top-1 {result.top1:.4f} recall@10 {result.recall_at_10:.4f} over {result.sentences} sentences{mlm}")
        return
    click.echo(f"perplexity {result.perplexity:.3f} over {result.tokens:,} tokens "
               f"({result.windows} windows of {result.seq_len})")
