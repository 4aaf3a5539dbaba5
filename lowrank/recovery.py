"""Recovery of a saved folder: load it and its teacher, train (lowrank.training), save the result.

The checkpoint, the JSON-lines log and the loss-curve PNG go beside the output folder.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .calibration import load_text, text_windows, token_windows, tokenize
from .encoders import is_encoder
from .sentences import sentence_batches
from .checkpoint import read_plan, save_compressed
from .fileio import check_output_dir, check_output_spares_input
from .folder_format import is_compressed_folder
from .config import CONFIG_FILE, RecoveryConfig, read_config_record
from .config_base import resolve_device, torch_dtype
from .distill import HIDDEN_LOSSES
from .errors import LowrankError
from .loading import load_model
from .training import RecoveryResult, recover
from .training_log import plot_history

log = logging.getLogger(__name__)


@dataclass
class RecoveryPaths:
    """Where a run writes, all beside the output folder: checkpoint, JSON-lines log, loss-curve PNG."""

    output: Path
    checkpoint: Path
    log: Path
    plot: Path

    @classmethod
    def beside(cls, output: str | Path) -> "RecoveryPaths":
        out = Path(output)
        return cls(out, out.with_name(out.name + ".checkpoint"), out.with_name(out.name + ".train.jsonl"),
                   out.with_name(out.name + ".loss.png"))


def training_windows(tokenizer, texts: list[str | Path], seq_len: int) -> torch.Tensor:
    """Every non-overlapping window of `seq_len` tokens of the training text, in order (a language model's)."""
    if not texts:
        raise LowrankError("recovery needs training text; pass --data with .txt files or a folder")
    return token_windows(tokenize(tokenizer, load_text(list(texts))), None, seq_len, what="training")


def training_sentences(tokenizer, texts: list[str | Path], config: RecoveryConfig) -> list[torch.Tensor]:
    """An encoder's training data: every sentence of the text as the encoder sees one ([CLS] … [SEP], at most
    `seq_len` tokens), in equal-length batches of up to `batch_size` (no padding; lowrank.sentences). The
    evaluation embeds sentences, so training on windows that cross sentence borders trains the wrong inputs."""
    if not texts:
        raise LowrankError("recovery needs training text; pass --data with .txt files or a folder")
    return sentence_batches(tokenizer, load_text(list(texts)), token_budget=None, max_length=config.seq_len,
                            batch_size=config.batch_size, seed=config.seed, what="training")


def recover_folder(
    folder: str | Path,
    output: str | Path,
    data: list[str | Path],
    config: RecoveryConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    extra_files: dict[str, str] | None = None,
) -> RecoveryResult:
    """Recover the compressed checkpoint in `folder` on `data` text and save it to `output`.

    The teacher defaults to the dense model recorded in the folder's plan. The checkpoint, the
    JSON-lines log and the loss-curve PNG go beside `output`; the checkpoint is removed once the
    output is saved. A failed run keeps its log only when it leaves a checkpoint to resume.
    The output's lowrank_config.json holds the folder's own configs plus this run's.
    """

    config = config or RecoveryConfig()
    config.validate()
    if not is_compressed_folder(folder):
        raise LowrankError(f"{folder} is not a compressed lowrank folder; make one with `lowrank compress`")
    paths = RecoveryPaths.beside(output)
    check_output_dir(output, overwrite)
    check_output_spares_input(output, folder)  # before training, not after it
    if resume and not paths.checkpoint.is_dir():
        raise LowrankError(f"no checkpoint at {paths.checkpoint} to resume from; run without --resume")
    if not resume and paths.checkpoint.is_dir():
        log.warning("%s holds an earlier run's checkpoint, which this run replaces; pass --resume to continue it",
                    paths.checkpoint)
    plan, _ = read_plan(folder)
    dtype, device = torch_dtype(config.dtype), resolve_device(config.device)
    loaded = load_model(str(folder), dtype=dtype, device=device)
    if is_encoder(loaded.model):
        if config.loss not in HIDDEN_LOSSES:
            raise LowrankError(f"{folder} is an encoder, which has no next-token logits for --loss {config.loss}; pass "
                               "--loss embedding (recipes/minilm-l6.yaml has the settings that work)")
        train = training_sentences(loaded.tokenizer, data, config)
    else:
        train = training_windows(loaded.tokenizer, data, config.seq_len)
    held_out = None
    if config.eval_texts:
        held_out = text_windows(loaded.tokenizer, list(config.eval_texts), None, config.seq_len, what="evaluation")
        held_out = held_out[:config.eval_windows] if config.eval_windows else held_out
    teacher_model = None
    if config.needs_teacher:
        source = config.teacher or plan.source
        if not source:
            raise LowrankError(f"{folder}'s plan records no source model to distil from; pass --teacher MODEL")
        teacher_model = load_model(source, dtype=dtype, device=device, need_tokenizer=False).model
        if teacher_model.config.vocab_size != loaded.model.config.vocab_size:
            raise LowrankError(f"teacher {source} has vocabulary {teacher_model.config.vocab_size} but the model has "
                               f"{loaded.model.config.vocab_size}; pass the dense model it was compressed from")
    try:
        result = recover(loaded.model, train, config, eval_windows=held_out, teacher=teacher_model,
                         checkpoint_dir=paths.checkpoint if config.checkpoint_every or resume else None, resume=resume,
                         log_path=paths.log, progress=progress)
        recovered_plan = copy.deepcopy(plan)
        recovered_plan.options["recovery"] = {
            "config": config.to_dict(), "data": list(map(str, data)), "eval": list(map(str, config.eval_texts)),
            "steps": result.steps, "tokens": result.tokens, "eval_ppl_before": result.before,
            "eval_ppl_after": result.after, "best_step": result.best_step, "stopped_early": result.stopped_early,
        }
        record = read_config_record(folder)
        record["recover"] = {**config.to_dict(), "data": list(map(str, data))}
        with distributed.agreement("saving"):  # rank 0 writes; the others learn whether it could
            if distributed.is_writer():
                save_compressed(loaded.model, loaded.tokenizer, recovered_plan, output, overwrite=overwrite,
                                extra_files={CONFIG_FILE: json.dumps(record, indent=2) + "\n", **(extra_files or {})})
    except BaseException:
        if not paths.checkpoint.is_dir() and distributed.is_writer():  # nothing to resume: the log describes no output
            paths.log.unlink(missing_ok=True)
        raise
    if distributed.is_writer():
        plot_history(result.history, paths.plot, title=f"recovery of {Path(folder).name} ({config.mode}, {config.loss})")
        shutil.rmtree(paths.checkpoint, ignore_errors=True)
    return result
