"""`lowrank recover`: fine-tune a compressed checkpoint's factors to win back its accuracy.

The options' defaults are the RecoveryConfig's; the command builds it and calls lowrank.api.recover.
"""

from __future__ import annotations

import json
import time

import click

from .. import distributed
from ..api import recover
from ..config import DEFAULT_LR, MODES, PRECISIONS, RecoveryConfig
from ..config_base import DTYPE_NAMES
from ..distill import HIDDEN_LAYERS, LOSSES
from ..recovery import RecoveryPaths
from ..training_checkpoint import read_checkpoint_state
from .common import EXIT_INTERRUPTED, nproc_option, quiet_option, silence_transformers

#: The config this command builds; every option is one of its fields, except the CLI_ONLY ones.
CONFIGS = (RecoveryConfig,)
#: Options that are not config fields: the input, the training text, where to write, resuming, how loudly.
CLI_ONLY = ("folder", "data", "output", "resume", "overwrite", "quiet", "nproc")
DEFAULTS = RecoveryConfig()


def interrupted_message(paths: RecoveryPaths) -> str:
    """What an interrupted run left behind, and how to continue it."""
    if paths.checkpoint.is_dir():
        try:
            step = read_checkpoint_state(paths.checkpoint)["state"]["step"]
            return (f"interrupted; {paths.output} was not written. The checkpoint at step {step} is in "
                    f"{paths.checkpoint}: rerun the same command with --resume to continue")
        except Exception:  # a damaged checkpoint is reported by --resume itself
            pass
    return f"interrupted; {paths.output} was not written and the input is untouched"


@click.command("recover")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data", multiple=True, required=True, metavar="PATH|DATASET",
              help="Training text: .txt files, folders of them, hf:PATH[:CONFIG[:SPLIT]] or wikitext2. Repeat for several.")
@click.option("--eval", "eval_texts", multiple=True, default=DEFAULTS.eval_texts, metavar="PATH|DATASET",
              help="Held-out text for perplexity before, during and after training; picks the best weights. "
                   "Default: none (the final weights are kept).")
@click.option("--eval-windows", type=int, default=DEFAULTS.eval_windows, show_default=True,
              help="Use only the first N windows of the --eval text (0: all of it).")
@click.option("-o", "--output", required=True, help="Output folder for the recovered checkpoint.")
@click.option("--mode", type=click.Choice(MODES), default=DEFAULTS.mode, show_default=True,
              help="factors: train the factors themselves; lora: train LoRA adapters on them (peft), merged "
                   "back into plain factors before saving. Ranks and parameter counts never change.")
@click.option("--loss", type=click.Choice(LOSSES), default=DEFAULTS.loss, show_default=True,
              help="ce: next-token cross-entropy; distill: KL to the dense teacher's logits; both: their mix. "
                   "Encoders: cosine (1 − cosine) or mse between the teacher's and the model's hidden states, "
                   "or embedding: 1 − cosine between their pooled sentence embeddings.")
@click.option("--hidden-layers", type=click.Choice(HIDDEN_LAYERS), default=DEFAULTS.hidden_layers, show_default=True,
              help="With --loss cosine or mse: match the teacher's last layer, or all of its layers.")
@click.option("--teacher", default=DEFAULTS.teacher,
              help="Dense model to distil from. Default: the source model recorded in FOLDER's plan.")
@click.option("--temperature", type=float, default=DEFAULTS.temperature, show_default=True,
              help="Distillation temperature (the KL is scaled by T²).")
@click.option("--distill-weight", type=float, default=DEFAULTS.distill_weight, show_default=True,
              help="With --loss both: weight of the distillation term (1 − this weights the cross-entropy).")
@click.option("--lora-rank", type=int, default=DEFAULTS.lora_rank, show_default=True, help="LoRA adapter rank (--mode lora).")
@click.option("--lora-alpha", type=float, default=DEFAULTS.lora_alpha, show_default=True, help="LoRA scaling alpha (--mode lora).")
@click.option("--steps", type=int, default=DEFAULTS.steps, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=float, default=RecoveryConfig.lr,
              help=f"Peak learning rate. Default: {DEFAULT_LR['factors']:g} for factors, {DEFAULT_LR['lora']:g} for lora.")
@click.option("--relative-lr/--absolute-lr", "relative_lr", default=DEFAULTS.relative_lr, show_default=True,
              help="Relative: each factor's rate is --lr × its own RMS, so a `down` of RMS 0.02 and an `up` of RMS 1 "
                   "both move by the same fraction of their size (whitened factors differ in scale by 50×).")
@click.option("--warmup", type=int, default=DEFAULTS.warmup, show_default=True,
              help="Linear warmup steps; a cosine decay to 10% of --lr follows.")
@click.option("--weight-decay", type=float, default=DEFAULTS.weight_decay, show_default=True, help="AdamW weight decay.")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True, help="Windows per micro-batch (an encoder: sentences of one length per batch, at most this many).")
@click.option("--grad-accum", type=int, default=DEFAULTS.grad_accum, show_default=True,
              help="Micro-batches accumulated per optimizer step.")
@click.option("--seq-len", type=int, default=DEFAULTS.seq_len, show_default=True, help="Tokens per training window (an encoder trains on whole sentences, [CLS] … [SEP], cut at this length).")
@click.option("--clip", type=float, default=DEFAULTS.clip, show_default=True, help="Max gradient norm (0: no clipping).")
@click.option("--eval-every", type=int, default=DEFAULTS.eval_every, show_default=True,
              help="Evaluate on --eval every N steps (0: only before and after).")
@click.option("--patience", type=int, default=DEFAULTS.patience, show_default=True,
              help="Stop after N evaluations without improvement (0: never stop early).")
@click.option("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every, show_default=True,
              help="Save a resumable checkpoint to OUTPUT.checkpoint every N steps (0: never). It is removed "
                   "once OUTPUT is saved.")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT.checkpoint (same options and data).")
@click.option("--gradient-checkpointing", is_flag=True, default=DEFAULTS.gradient_checkpointing,
              help="Recompute activations in the backward pass: less memory, about a third more time.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULTS.precision, show_default=True,
              help="Autocast of the training forward pass: auto = bfloat16 (or float16) on CUDA, float32 on CPU.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="Seed for the data order and LoRA init.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=DEFAULTS.dtype, show_default=True,
              help="Precision the model is loaded, trained and saved in.")
@click.option("--device", default=DEFAULTS.device, show_default=True, help="Where to run: auto (CUDA if available), cpu, cuda, ...")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@nproc_option
@quiet_option
@silence_transformers
def command(folder, data, eval_texts, eval_windows, output, mode, loss, hidden_layers, teacher, temperature, distill_weight, lora_rank,
            lora_alpha, steps, lr, relative_lr, warmup, weight_decay, batch_size, grad_accum, seq_len, clip, eval_every, patience,
            checkpoint_every, resume, gradient_checkpointing, precision, seed, dtype, device, overwrite, nproc, quiet):
    """Fine-tune the factors of the compressed checkpoint FOLDER on --data text and save it to -o.

    Only the low-rank factors train (or LoRA adapters on them), so the output has the same ranks
    and parameter count. A JSON-lines log (OUTPUT.train.jsonl) and a loss curve (OUTPUT.loss.png)
    are written beside the output. Ctrl-C leaves the last checkpoint; --resume continues it.
    """
    if nproc is not None and nproc > 1:  # start torchrun with this same command on `nproc` ranks (DDP)
        return distributed.launch(nproc, distributed.strip_option(click.get_current_context().obj["argv"], "--nproc"))
    config = RecoveryConfig(
        mode=mode, loss=loss, hidden_layers=hidden_layers, steps=steps, lr=lr, relative_lr=relative_lr, warmup=warmup, weight_decay=weight_decay, batch_size=batch_size,
        grad_accum=grad_accum, seq_len=seq_len, clip=clip, temperature=temperature, distill_weight=distill_weight,
        lora_rank=lora_rank, lora_alpha=lora_alpha, teacher=teacher, eval_texts=list(eval_texts),
        eval_windows=eval_windows, eval_every=eval_every, patience=patience, checkpoint_every=checkpoint_every,
        gradient_checkpointing=gradient_checkpointing, precision=precision, seed=seed, dtype=dtype, device=device,
    )
    paths = RecoveryPaths.beside(output)
    started = time.perf_counter()
    try:
        result = recover(folder, config, list(data), output=output, resume=resume, overwrite=overwrite,
                         progress=not quiet)
    except KeyboardInterrupt:
        click.echo(f"error: {interrupted_message(paths)}", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    if not distributed.is_writer():
        return
    summary = {"output": str(output), "steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 1),
               "eval_ppl_before": result.before, "eval_ppl_after": result.after, "best_step": result.best_step,
               "stopped_early": result.stopped_early, "log": str(paths.log), "plot": str(paths.plot)}
    if quiet:
        click.echo(json.dumps(summary))
        return
    if result.before is not None:
        click.echo(f"held-out perplexity {result.before:.3f} → {result.after:.3f} (best at step {result.best_step})")
    stop = " (stopped early)" if result.stopped_early else ""
    click.echo(f"{result.steps} steps, {result.tokens:,} tokens{stop}; saved {output} in "
               f"{time.perf_counter() - started:.1f} s; log {paths.log}, loss curve {paths.plot}")
