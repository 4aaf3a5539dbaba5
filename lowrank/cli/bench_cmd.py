"""`lowrank bench`: inference speed of a compressed folder against its dense model, on this machine.

The options' defaults are the BenchConfig's; the command builds it and calls lowrank.bench.benchmark.
"""

from __future__ import annotations

import json

import click

from ..bench import benchmark
from ..fileio import atomic_write_text
from ..config import BenchConfig
from .common import quiet_option, silence_transformers

#: The config this command builds; every option is one of its fields, except the CLI_ONLY ones.
CONFIGS = (BenchConfig,)
#: Options that are not config fields.
CLI_ONLY = ("folder", "json_out", "quiet", "tokenizer_source")
DEFAULTS = BenchConfig()


@click.command("bench")
@click.argument("folder", type=click.Path(file_okay=False, path_type=str))
@click.option("--against", default=DEFAULTS.against, metavar="DENSE",
              help="The dense model to compare with (default: the source recorded in FOLDER's plan).")
@click.option("--batch-sizes", "batch_sizes", default=",".join(DEFAULTS.batch_sizes), show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--seq-len", type=int, default=DEFAULTS.seq_len, show_default=True, help="Prompt tokens (prefill).")
@click.option("--new-tokens", type=int, default=DEFAULTS.new_tokens, show_default=True,
              help="Greedy tokens decoded after the prompt, with the KV cache.")
@click.option("--repeats", type=int, default=DEFAULTS.repeats, show_default=True,
              help="Timed runs per measurement; the median is reported.")
@click.option("--warmup", type=int, default=DEFAULTS.warmup, show_default=True, help="Untimed runs first.")
@click.option("--memory/--no-memory", default=DEFAULTS.memory, show_default=True,
              help="Measure peak memory (a fresh child process per model).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=DEFAULTS.dtype,
              show_default=True, help="Precision of both models.")
@click.option("--device", default=DEFAULTS.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=DEFAULTS.threads,
              help="CPU threads for torch (default: torch's own). With 1, CPU times are the computing thread's CPU "
                   "time, which other processes on a shared machine do not inflate.")
@click.option("--predict/--no-predict", default=DEFAULTS.predict, show_default=True,
              help="Also time the plan's matmuls alone, dense and factored, for the predicted prefill ratio.")
@click.option("--tokenizer", "tokenizer_source", default=None, help="Tokenizer folder or hub id, if FOLDER has none.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write every measurement as JSON to this file.")
@quiet_option
@silence_transformers
def command(folder, against, batch_sizes, seq_len, new_tokens, repeats, warmup, memory, dtype, device, threads,
            predict, tokenizer_source, json_out, quiet):
    """Prefill latency, decode tokens/s, peak memory and weight-file size: compressed FOLDER against dense.

    Both models run on the same device in the same process, alternating run by run; times are
    medians of --repeats runs after --warmup runs (CUDA events on a GPU).
    """
    config = BenchConfig(against=against, batch_sizes=batch_sizes.split(","), seq_len=seq_len, new_tokens=new_tokens,
                         repeats=repeats, warmup=warmup, memory=memory, dtype=dtype, device=device, threads=threads,
                         predict=predict)
    record = benchmark(folder, config, tokenizer=tokenizer_source, progress=not quiet)
    if json_out:
        atomic_write_text(json_out, json.dumps(record, indent=2) + "\n")
    click.echo(record["table"])
    macs = record["linear_macs_per_token"]
    click.echo(f"linear layers below the head: {macs['dense']:,} → {macs['compressed']:,} multiply-adds per token "
               f"(predicted speed-up of those layers ×{record['predicted_linear_speedup']:.2f})")
    for row in record.get("predicted") or []:
        click.echo(f"batch {row['batch_size']}: prefill predicted ×{row['predicted_prefill_ratio']:.3f} of dense "
                   f"(linear layers ×{row['linear_ratio']:.3f}, from their timings), measured "
                   f"×{row['measured_prefill_ratio']:.3f}")
    click.echo(f"{record['device']}, {record['threads']} threads ({record['clock']}), {dtype}; medians of {repeats} "
               f"runs after {warmup} warm-up; prompt {seq_len} tokens, {new_tokens} decoded")
