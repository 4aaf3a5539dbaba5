"""The recovery training loop: fine-tune a compressed model's factors in memory.

Only the factors of the `LowRankLinear` layers train (directly, or through LoRA adapters on
them that are merged back), so ranks and parameter counts never change; everything else is
frozen. The loss is next-token cross-entropy, distillation from the dense teacher, or both
(see `distill`). AdamW with linear warmup and a cosine decay, gradient accumulation, clipping,
gradient checkpointing and autocast on GPU. A held-out perplexity picks the best weights and
stops training when it stops improving. The data order is a pure function of (seed, step), so
a run resumed from its checkpoint (training_checkpoint) sees the same batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .model_info import count_parameters
from .config import RecoveryConfig
from .distill import HIDDEN_LOSSES, embedding_loss, hidden_state_loss, recovery_loss
from .encoders import embed, last_hidden_state
from .errors import LowrankError
from .evaluation import perplexity
from .layers import LowRankLinear
from .refinement import relative_groups
from .training_checkpoint import (TrainingState, check_resumable, load_checkpoint, read_checkpoint_state, restore,
                                  save_checkpoint, snapshot, tensor_digest)
from .training_log import TrainingLog
from .model_info import without_cache

log = logging.getLogger(__name__)


@dataclass
class RecoveryResult:
    """What a run did: steps, tokens, time, perplexity before/after and the history of every step."""

    steps: int
    tokens: int
    seconds: float
    before: float | None
    after: float | None
    best_step: int | None
    stopped_early: bool
    history: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

# ---- pure pieces ------------------------------------------------------------------------------

def learning_rate(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then a cosine from `peak` down to `peak·min_ratio` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(micro_step: int, n_windows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices of micro-batch `micro_step`: a fresh seeded shuffle every epoch, last partial batch dropped."""
    per_epoch = n_windows // batch_size
    epoch, position = divmod(micro_step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_windows, generator=generator)
    return order[position * batch_size:(position + 1) * batch_size]


#: Training data: windows (n, seq_len) of token ids, or an encoder's sentences as equal-length batches (b, L).
TrainingData = torch.Tensor | list[torch.Tensor]


def training_batch(data: TrainingData, micro_step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The token ids of micro-batch `micro_step`: `batch_size` windows, or one whole sentence batch; either way
    a fresh seeded order every epoch, so the batch is a pure function of (seed, step)."""
    if isinstance(data, torch.Tensor):
        return data[batch_indices(micro_step, data.shape[0], batch_size, seed)]
    epoch, position = divmod(micro_step, len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return data[int(order[position])]


def data_digest(data: TrainingData) -> str:
    """A fingerprint of the training data (shapes and values), checked when a run resumes."""
    if isinstance(data, torch.Tensor):
        return tensor_digest(data)
    shapes = torch.tensor([list(batch.shape) for batch in data], dtype=torch.long)
    return tensor_digest(torch.cat([shapes.flatten()] + [batch.flatten() for batch in data]))


def check_training_data(data: TrainingData, batch_size: int) -> None:
    """Refuse data too small for one batch, in one line."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.shape[0] < batch_size:
            raise LowrankError(f"the training text gives {data.shape[0]} windows of {data.shape[-1]} tokens, fewer "
                               f"than --batch-size {batch_size}; give more text or lower --seq-len/--batch-size")
    elif not data or any(batch.ndim != 2 or batch.shape[0] < 1 for batch in data):
        raise LowrankError("the training text gives no sentence batches; give more text")

# ---- what trains ------------------------------------------------------------------------------

def factor_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every LowRankLinear of the model, by dotted name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def ranks_of(model: nn.Module) -> dict[str, int]:
    return {name: layer.rank for name, layer in factor_layers(model).items()}


def freeze_all_but_factors(model: nn.Module) -> None:
    """requires_grad only on the `down`/`up` weights of every LowRankLinear (biases and the rest frozen)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in factor_layers(model).values():
        layer.down.weight.requires_grad_(True)
        layer.up.weight.requires_grad_(True)


def attach_lora(model: nn.Module, rank: int, alpha: float):
    """Wrap every factor (`down` and `up`) in a peft LoRA adapter; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    names = [f"{name}.{part}" for name in factor_layers(model) for part in ("down", "up")]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=names)
    with warnings.catch_warnings():  # peft asks transformers about a renamed attribute
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_groups(params: dict[str, nn.Parameter], relative: bool) -> list[dict]:
    """The optimizer's groups, each with the `scale` its learning rate is multiplied by: one group at the
    absolute rate, or (relative) one per tensor at its initial RMS, so every tensor moves by about the same
    fraction of its own size per step (whitened factors differ in scale by 50×; refinement.relative_groups)."""
    if not relative:
        return [{"params": list(params.values()), "scale": 1.0}]
    return [{"params": group["params"], "scale": group["lr"]} for group in relative_groups(list(params.values()), 1.0)]

def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype to autocast the forward pass to, or None for plain float32."""
    if precision == "float32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda":
        raise LowrankError(f"precision {precision} autocast is for GPUs; use float32 on {device.type}")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]

# ---- the training loop ------------------------------------------------------------------------

def data_parallel(model: nn.Module, config: RecoveryConfig) -> nn.Module:
    """`model` wrapped in DistributedDataParallel on several ranks (each takes its share of every batch)."""
    if not distributed.active():
        return model
    if config.batch_size % distributed.world_size():
        raise LowrankError(f"--batch-size {config.batch_size} does not split evenly over {distributed.world_size()} "
                           "ranks; make it a multiple of the number of ranks")
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def synchronizing(trainer: nn.Module, last_micro_step: bool):
    """DDP sums gradients over the ranks on the last micro-step only (no_sync before it)."""
    if isinstance(trainer, nn.parallel.DistributedDataParallel) and not last_micro_step:
        return trainer.no_sync()
    return contextlib.nullcontext()


def batch_loss(model: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, config: RecoveryConfig) -> torch.Tensor:
    """The training loss of one micro-batch: on logits for language models, on hidden states for encoders."""
    if config.loss == "embedding":  # the pooled sentence embeddings, as the model pools
        with torch.no_grad():
            target = embed(teacher, ids)
        return embedding_loss(embed(model, ids), target)
    if config.loss in HIDDEN_LOSSES:
        with torch.no_grad():
            teacher_states = last_hidden_state(teacher, ids, hidden_states=True)
        states = last_hidden_state(model, ids, hidden_states=True)
        chosen = slice(1, None) if config.hidden_layers == "all" else slice(-1, None)  # [0] is the embeddings
        return hidden_state_loss(config.loss, states[chosen], teacher_states[chosen])
    teacher_logits = None
    if config.needs_teacher:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, **without_cache(teacher)).logits
    logits = model(input_ids=ids, **without_cache(getattr(model, "module", model))).logits  # module: under DDP
    return recovery_loss(config.loss, logits, ids, teacher_logits, config.temperature, config.distill_weight)


def deterministic_student(config: RecoveryConfig) -> bool:
    """Train an encoder in eval mode (no dropout): its teacher is deterministic, so dropout in the student
    only adds noise (MiniLM's 10% is larger than the compression error it learns to undo). Gradient
    checkpointing needs train mode, and language models keep it (their numbers must not move)."""
    return config.loss in HIDDEN_LOSSES and not config.gradient_checkpointing


def _evaluate(model: nn.Module, windows: torch.Tensor, config: RecoveryConfig) -> float:
    return perplexity(model, windows, batch_size=config.eval_batch_size, progress=False).perplexity


def recover(
    model: nn.Module,
    train_windows: TrainingData,
    config: RecoveryConfig | None = None,
    *,
    eval_windows: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    log_path: str | Path | None = None,
    progress: bool = True,
) -> RecoveryResult:
    """Fine-tune the factors of compressed `model` in place on `train_windows`: (n, seq_len) token ids, or
    an encoder's sentences as a list of equal-length batches (lowrank.sentences.sentence_batches).

    The model keeps its ranks and parameter count; with eval windows it ends holding the best
    weights seen. In LoRA mode the adapters are merged into the factors before returning.
    """
    config = config or RecoveryConfig()
    config.validate()
    if config.needs_teacher and teacher is None:
        raise LowrankError(f"--loss {config.loss} needs a teacher (the dense model); pass --teacher or use --loss ce")
    if not isinstance(train_windows, torch.Tensor):  # every rank needs its share of every sentence batch
        train_windows = [batch for batch in train_windows if batch.shape[0] >= distributed.world_size()]
    check_training_data(train_windows, config.batch_size)
    ranks_before, params_before = ranks_of(model), count_parameters(model)
    if not ranks_before:
        raise LowrankError("the model has no low-rank layers to recover; compress it first with `lowrank compress`")
    device = next(model.parameters()).device
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(config.seed)
    peft_model = None
    if config.mode == "lora":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        peft_model = attach_lora(model, config.lora_rank, config.lora_alpha)
    else:
        freeze_all_but_factors(model)
    params = trainable_parameters(model)
    trainer = data_parallel(model, config)  # the model itself with one process, DDP with several
    optimizer = torch.optim.AdamW(parameter_groups(params, config.relative_lr), lr=config.lr,
                                  weight_decay=config.weight_decay)
    digest = data_digest(train_windows)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    state, best = TrainingState(), None
    if resume:
        if checkpoint_dir is None:
            raise LowrankError("resume needs a checkpoint folder")
        check_resumable(read_checkpoint_state(checkpoint_dir), config, digest, checkpoint_dir)
        state, best = load_checkpoint(checkpoint_dir, params, optimizer)
        torch.manual_seed(config.seed + state.step)
        log.info("resumed from %s at step %d", checkpoint_dir, state.step)
    if teacher is not None:
        teacher.eval()  # its logits are computed under no_grad; its own flags stay as they are
    amp = autocast_dtype(device, config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    training_log = TrainingLog(log_path if distributed.is_writer() else None, keep_until_step=state.step if resume else 0)
    bar = tqdm(total=config.steps, initial=state.step, desc="Recovering", unit="step", disable=not progress)
    stopped_early = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    started = time.perf_counter() - state.seconds

    def record(entry: dict) -> None:
        state.history.append(entry)
        training_log.write(entry)

    def evaluate_now() -> bool:
        """Evaluate, track the best weights; True when patience is exhausted."""
        nonlocal best
        ppl = _evaluate(model, eval_windows, config)
        model.train(not deterministic_student(config))
        improved = state.best_ppl is None or ppl < state.best_ppl
        if improved:
            state.best_ppl, state.best_step, state.evals_since_best = ppl, state.step, 0
            best = snapshot(params)
        else:
            state.evals_since_best += 1
        record({"event": "eval", "step": state.step, "eval_ppl": ppl, "eval_nll": math.log(ppl), "best": improved})
        bar.set_postfix_str(f"eval ppl {ppl:.2f}", refresh=False)
        return config.patience > 0 and state.evals_since_best >= config.patience

    try:
        model.train(not deterministic_student(config))
        if eval_windows is not None and state.step == 0:
            evaluate_now()
            state.before = state.best_ppl
        while state.step < config.steps:
            step_started = time.perf_counter()
            lr = learning_rate(state.step, config.lr, config.warmup, config.steps, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["scale"]
            step_loss, step_tokens = 0.0, 0
            for micro in range(config.grad_accum):
                batch = training_batch(train_windows, state.step * config.grad_accum + micro, config.batch_size,
                                       config.seed)
                step_tokens += batch.numel()
                ids = distributed.my_share(batch).to(device)  # this rank's part of the batch
                with synchronizing(trainer, micro == config.grad_accum - 1):
                    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        loss = batch_loss(trainer, teacher, ids, config) / config.grad_accum
                    scaler.scale(loss).backward()
                step_loss += float(loss.detach())
                del loss
            step_loss = distributed.mean_over_ranks(step_loss)
            if not math.isfinite(step_loss):
                raise LowrankError(f"the training loss became {step_loss} at step {state.step + 1}; lower --lr")
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.clip if config.clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += step_tokens
            state.seconds = time.perf_counter() - started
            speed = step_tokens / max(time.perf_counter() - step_started, 1e-9)
            record({"event": "train", "step": state.step, "loss": step_loss, "lr": lr, "grad_norm": float(norm),
                    "tokens": state.tokens, "tokens_per_s": speed, "seconds": state.seconds})
            log.debug("finished step %d, loss %.4f", state.step, step_loss)
            bar.set_postfix({"loss": f"{step_loss:.3f}", "tok/s": f"{speed:.0f}"}, refresh=False)
            bar.update()
            due = config.eval_every and state.step % config.eval_every == 0 and state.step < config.steps
            if eval_windows is not None and due and evaluate_now():
                stopped_early = True
                break
            if checkpoint_dir and config.checkpoint_every and state.step % config.checkpoint_every == 0 \
                    and distributed.is_writer():
                save_checkpoint(checkpoint_dir, state, config, params, optimizer, best, digest)
        if eval_windows is not None and not stopped_early:
            evaluate_now()
        if best is not None and state.best_step != state.step:
            restore(params, best)
    finally:
        bar.close()
        training_log.close()
        if config.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
    if peft_model is not None:
        merged = peft_model.merge_and_unload()
        if merged is not model:  # peft edits the model in place; merging hands back the same object
            raise LowrankError("peft returned a different model after merging; this peft version is not supported")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, True))
    if ranks_of(model) != ranks_before or count_parameters(model) != params_before:
        raise LowrankError("recovery changed the model's ranks or parameter count; this is a bug, please report it")
    return RecoveryResult(steps=state.step, tokens=state.tokens, seconds=state.seconds, before=state.before,
                          after=state.best_ppl if eval_windows is not None else None, best_step=state.best_step,
                          stopped_early=stopped_early, history=state.history)
