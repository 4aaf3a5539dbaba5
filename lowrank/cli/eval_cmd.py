"""`lowrank eval`: perplexity on text, agreement with the dense model (--against), zero-shot tasks (--tasks).

The options' defaults are the EvalConfig's; the command builds it and calls lowrank.api.evaluate,
lowrank.api.compare and lowrank.api.evaluate_tasks.
"""

from __future__ import annotations

import json

import click

from ..agreement import agreement_table
from ..api import compare, evaluate, evaluate_tasks, plan_source
from ..fileio import atomic_write_text
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
@click.option("--against", "--reference", "against", default=DEFAULTS.against, is_flag=False, flag_value="plan",
              metavar="DENSE",
              help="Also compare with the dense model DENSE on the same windows (top-1 agreement, KL, greedy "
                   "generation); --against alone uses the source recorded in the folder's plan. An encoder is "
                   "always compared with its dense model (default: the plan's source) on the text's sentences. "
                   "--reference is an alias.")
@click.option("--prompts", type=int, default=DEFAULTS.prompts, show_default=True,
              help="With --against: greedy-generation prompts (the first tokens of the first N windows).")
@click.option("--prompt-tokens", type=int, default=DEFAULTS.prompt_tokens, show_default=True,
              help="With --against: tokens per prompt.")
@click.option("--generated-tokens", type=int, default=DEFAULTS.generated_tokens, show_default=True,
              help="With --against: greedy tokens that must all match for a prompt to agree.")
@click.option("--tasks", multiple=True, default=DEFAULTS.tasks, metavar="A,B",
              help="lm-evaluation-harness zero-shot tasks, comma-separated (arc_easy,piqa,hellaswag,winogrande); "
                   "needs pip install 'lowrank[eval]'.")
@click.option("--task-path", type=click.Path(), default=DEFAULTS.task_path,
              help="A folder of your own lm-eval task YAML files (lm-eval's include_path).")
@click.option("--task-limit", type=int, default=DEFAULTS.task_limit, help="Only the first N examples of each task.")
@click.option("--max-sentences", type=int, default=DEFAULTS.max_sentences,
              help="Encoders: use only the first N sentences of the text (default: all).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the result as JSON to this file.")
@model_options
@quiet_option
@silence_transformers
def command(model, texts, seq_len, max_windows, batch_size, against, prompts, prompt_tokens, generated_tokens, tasks,
            task_path, task_limit, max_sentences, json_out, dtype, device, tokenizer_source,
            trust_remote_code, allow_pickle, quiet):
    """Perplexity of MODEL (built-in name, folder, .gguf, compressed folder or hub id) on text.

    The text is cut into non-overlapping windows of --seq-len tokens, each scored on its own.
    With --against, the dense model is scored on the same windows and compared token by token.
    An encoder (BERT, a sentence encoder) is compared with its dense model (--against) on the text's
    sentences instead: cosine of the pooled embeddings, self-retrieval, MLM perplexity where it has a head.
    """
    tasks = [name.strip() for value in tasks for name in value.split(",") if name.strip()]
    config = EvalConfig(texts=list(texts), seq_len=seq_len, max_windows=max_windows, batch_size=batch_size,
                        dtype=dtype, device=device, against=against, prompts=prompts, prompt_tokens=prompt_tokens,
                        generated_tokens=generated_tokens, tasks=tasks, task_path=task_path, task_limit=task_limit,
                        max_sentences=max_sentences)
    loading = dict(tokenizer=tokenizer_source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    task_results = evaluate_tasks(model, config, **loading) if tasks else None
    if against is not None:
        result = compare(model, config, progress=not quiet, **loading)
    else:
        result = evaluate(model, config, progress=not quiet, **loading)
    record = {"model": model, "texts": list(map(str, texts)) or ["bundled:macbeth"], **result.to_dict(),
              "config": config.to_dict()}
    if against is not None:
        record["against"] = dense = plan_source(model) if against == "plan" else against
    if task_results is not None:
        record["tasks"] = task_results
    if json_out:
        atomic_write_text(json_out, json.dumps(record, indent=2) + "\n")
    if isinstance(result, EncoderAgreement):
        mlm = f", MLM perplexity {result.mlm_perplexity:.3f}" if result.mlm_perplexity is not None else ""
        click.echo(f"embedding cosine mean {result.mean_cosine:.4f} min {result.min_cosine:.4f}, self-retrieval "
                   f"top-1 {result.top1:.4f} recall@10 {result.recall_at_10:.4f} over {result.sentences} sentences{mlm}")
        return
    if against is not None:
        click.echo(agreement_table(result, name=model, dense_name=f"{dense} (dense)"))
        click.echo(f"over {result.tokens:,} tokens ({result.windows} windows of {result.seq_len}); generation: "
                   f"{result.prompts} prompts of {result.prompt_tokens} tokens, {result.generated_tokens} greedy tokens")
    else:
        click.echo(f"perplexity {result.perplexity:.3f} over {result.tokens:,} tokens "
                   f"({result.windows} windows of {result.seq_len})")
    for task, metrics in (task_results or {}).items():
        click.echo(f"{task}: " + ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items())))
