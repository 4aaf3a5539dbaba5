"""Recovery: fine-tune a compressed model's factors to win back what truncation cost.

Only the factors of the `LowRankLinear` layers train (directly, or through LoRA adapters on
them that are merged back), so ranks and parameter counts never change; everything else is
frozen. The loss is next-token cross-entropy, distillation from the dense teacher, or both
(see `distill`). AdamW with linear warmup and a cosine decay, gradient accumulation, clipping,
gradient checkpointing and autocast on GPU. A held-out perplexity picks the best weights and
stops training when it stops improving.

A run is resumable: every `checkpoint_every` steps the trainable tensors, AdamW's moments and
the best weights go to safetensors, and the counters to JSON, in one folder replaced by an
atomic rename. The data order is a pure function of (seed, step), so a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import atomic_output_dir, atomic_write_text
from .compress import count_parameters
from .distill import LOSSES, recovery_loss
from .errors import LowrankError
from .evaluate import perplexity
from .layers import LowRankLinear

log = logging.getLogger(__name__)

MODES = ("factors", "lora")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
CHECKPOINT_FORMAT = 1
#: Peak learning rates that work without tuning: the factors themselves move gently, LoRA adapters start at zero.
DEFAULT_LR = {"factors": 1e-4, "lora": 1e-3}

#: Options that define the optimisation trajectory: a resumed run must use the same values.
TRAJECTORY_FIELDS = ("mode", "loss", "steps", "lr", "min_lr_ratio", "warmup", "weight_decay", "batch_size",
                     "grad_accum", "seq_len", "clip", "temperature", "distill_weight", "lora_rank", "lora_alpha",
                     "seed")


@dataclass
class RecoveryConfig:
    """Every knob of a recovery run; the defaults suit a small model on a CPU."""

    mode: str = "factors"          # "factors": train the factors; "lora": LoRA adapters on them, merged after
    loss: str = "distill"          # "ce", "distill" (KL to the dense teacher) or "both"
    steps: int = 200               # optimizer steps
    lr: float = 1e-4               # peak learning rate
    min_lr_ratio: float = 0.1      # the cosine decays to lr·min_lr_ratio
    warmup: int = 10               # linear warmup steps
    weight_decay: float = 0.0
    batch_size: int = 4            # windows per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step
    seq_len: int = 256             # tokens per training window
    clip: float = 1.0              # max gradient norm (0: no clipping)
    temperature: float = 1.0       # distillation temperature
    distill_weight: float = 0.5    # weight of the distillation term when loss="both"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    eval_every: int = 0            # evaluate every N steps (0: only before and after)
    eval_batch_size: int = 4
    patience: int = 0              # stop after N evaluations without improvement (0: never)
    checkpoint_every: int = 0      # write a checkpoint every N steps (0: never)
    gradient_checkpointing: bool = False
    precision: str = "auto"        # autocast: auto = bfloat16/float16 on CUDA, float32 on CPU
    seed: int = 0

    def validate(self) -> None:
        """Raise a one-line LowrankError naming the first bad option."""
        if self.mode not in MODES:
            raise LowrankError(f"unknown --mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.loss not in LOSSES:
            raise LowrankError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.precision not in PRECISIONS:
            raise LowrankError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise LowrankError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise LowrankError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        for name in ("warmup", "eval_every", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise LowrankError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LowrankError(f"--lr must be a positive number, got {self.lr}")
        if self.clip < 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise LowrankError("--clip and weight decay must be ≥ 0 and min_lr_ratio in [0, 1]")
        if self.temperature <= 0:
            raise LowrankError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.distill_weight <= 1:
            raise LowrankError(f"--distill-weight must lie in [0, 1], got {self.distill_weight}")

    @property
    def needs_teacher(self) -> bool:
        return self.loss in ("distill", "both")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RecoveryConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short fingerprint of a tensor's values (to check that a resumed run trains on the same data)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


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


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in params.items()}


@torch.no_grad()
def restore(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(params) - set(values))
    if missing:
        raise LowrankError(f"the checkpoint lacks {missing[0]}; it belongs to another model or --mode, drop --resume")
    for name, p in params.items():
        p.copy_(values[name].to(device=p.device, dtype=p.dtype))


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype to autocast the forward pass to, or None for plain float32."""
    if precision == "float32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda":
        raise LowrankError(f"precision {precision} autocast is for GPUs; use float32 on {device.type}")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


# ---- checkpoints ------------------------------------------------------------------------------

@dataclass
class TrainingState:
    """The counters of a run, saved as JSON in every checkpoint."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    before: float | None = None
    best_ppl: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    history: list[dict] = field(default_factory=list)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    tensors = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"{names[id(param)]}::{key}"] = value.detach().cpu().contiguous()
    return tensors


def save_checkpoint(folder: Path, state: TrainingState, config: RecoveryConfig, params: dict[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer, best: dict[str, torch.Tensor] | None, data_digest: str) -> None:
    """Write the resumable state to `folder` atomically: tensors as safetensors, counters as JSON."""
    from safetensors.torch import save_file

    names = {id(p): name for name, p in params.items()}
    with atomic_output_dir(folder, overwrite=True) as tmp:
        save_file({n: t.contiguous() for n, t in snapshot(params).items()}, str(tmp / "trainable.safetensors"))
        save_file(_optimizer_tensors(optimizer, names), str(tmp / "optimizer.safetensors"))
        if best is not None:
            save_file({n: t.contiguous() for n, t in best.items()}, str(tmp / "best.safetensors"))
        record = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "data": data_digest, "state": asdict(state)}
        (tmp / "state.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("saved a checkpoint at step %d in %s", state.step, folder)  # the Ctrl-C tests wait for it


def read_checkpoint_state(folder: Path) -> dict:
    """The JSON record of a checkpoint folder, or a one-line error saying why it cannot be resumed."""
    path = Path(folder) / "state.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LowrankError(f"no checkpoint at {folder} to resume from; run without --resume") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise LowrankError(f"checkpoint {path} is unreadable ({exc}); delete {folder} and run without --resume") from None
    if record.get("format") != CHECKPOINT_FORMAT:
        raise LowrankError(f"checkpoint {folder} has format {record.get('format')!r}; delete it and start again")
    return record


def check_resumable(record: dict, config: RecoveryConfig, data_digest: str, folder: Path) -> None:
    """A checkpoint continues only the run that made it: same trajectory options, same training data."""
    saved = record.get("config", {})
    for name in TRAJECTORY_FIELDS:
        if saved.get(name) != getattr(config, name):
            flag = name.replace("_", "-")
            raise LowrankError(f"checkpoint {folder} was made with {flag}={saved.get(name)!r} but this run asks for "
                               f"{getattr(config, name)!r}; use the same options to resume, or drop --resume")
    if record.get("data") != data_digest:
        raise LowrankError(f"checkpoint {folder} was trained on other text; pass the same --data and --seq-len, "
                           "or drop --resume")


def load_checkpoint(folder: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer
                    ) -> tuple[TrainingState, dict[str, torch.Tensor] | None]:
    """Put a checkpoint's weights and optimizer moments back; return its counters and best weights."""
    from safetensors.torch import load_file

    record = read_checkpoint_state(folder)
    restore(params, load_file(str(folder / "trainable.safetensors")))
    moments = load_file(str(folder / "optimizer.safetensors"))
    state_dict = optimizer.state_dict()
    order = list(params)  # the optimizer was built from params.values(), in this order
    state_dict["state"] = {}
    for index, name in enumerate(order):
        entry = {key.split("::", 1)[1]: value for key, value in moments.items() if key.split("::", 1)[0] == name}
        if entry:
            state_dict["state"][index] = entry
    optimizer.load_state_dict(state_dict)
    best_path = folder / "best.safetensors"
    best = load_file(str(best_path)) if best_path.is_file() else None
    return TrainingState(**record["state"]), best


# ---- the log and the plot ---------------------------------------------------------------------

class TrainingLog:
    """One JSON object per line and event (train step or eval), flushed as it happens."""

    def __init__(self, path: Path | None, keep_until_step: int = 0):
        self.path = Path(path) if path else None
        self.handle = None
        if self.path is None:
            return
        kept = []
        if keep_until_step > 0 and self.path.is_file():  # a resumed run drops what came after its checkpoint
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.handle:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()
            self.handle = None


def plot_history(history: list[dict], path: Path, title: str = "recovery") -> None:
    """Training loss per step and held-out perplexity per evaluation, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("event") == "train"]
    evals = [(r["step"], r["eval_ppl"]) for r in history if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), color="tab:blue", linewidth=1, label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:red", label="held-out perplexity")
        ax2.set_ylabel("held-out perplexity")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# ---- the training loop ------------------------------------------------------------------------

def _evaluate(model: nn.Module, windows: torch.Tensor, config: RecoveryConfig) -> float:
    return perplexity(model, windows, batch_size=config.eval_batch_size, progress=False).perplexity


def recover(
    model: nn.Module,
    train_windows: torch.Tensor,
    config: RecoveryConfig | None = None,
    *,
    eval_windows: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    log_path: str | Path | None = None,
    progress: bool = True,
) -> RecoveryResult:
    """Fine-tune the factors of compressed `model` in place on `train_windows` (n, seq_len) token ids.

    The model keeps its ranks and parameter count; with eval windows it ends holding the best
    weights seen. In LoRA mode the adapters are merged into the factors before returning.
    """
    config = config or RecoveryConfig()
    config.validate()
    if config.needs_teacher and teacher is None:
        raise LowrankError(f"--loss {config.loss} needs a teacher (the dense model); pass --teacher or use --loss ce")
    if train_windows.ndim != 2 or train_windows.shape[0] < config.batch_size:
        raise LowrankError(f"the training text gives {train_windows.shape[0]} windows of {train_windows.shape[-1]} tokens, "
                           f"fewer than --batch-size {config.batch_size}; give more text or lower --seq-len/--batch-size")
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
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    data_digest = tensor_digest(train_windows)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    state, best = TrainingState(), None
    if resume:
        if checkpoint_dir is None:
            raise LowrankError("resume needs a checkpoint folder")
        check_resumable(read_checkpoint_state(checkpoint_dir), config, data_digest, checkpoint_dir)
        state, best = load_checkpoint(checkpoint_dir, params, optimizer)
        torch.manual_seed(config.seed + state.step)
        log.info("resumed from %s at step %d", checkpoint_dir, state.step)
    if teacher is not None:
        teacher.eval()  # its logits are computed under no_grad; its own flags stay as they are
    amp = autocast_dtype(device, config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    tokens_per_step = config.batch_size * config.grad_accum * train_windows.shape[1]
    training_log = TrainingLog(log_path, keep_until_step=state.step if resume else 0)
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
        model.train()
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
        model.train()
        if eval_windows is not None and state.step == 0:
            evaluate_now()
            state.before = state.best_ppl
        while state.step < config.steps:
            step_started = time.perf_counter()
            lr = learning_rate(state.step, config.lr, config.warmup, config.steps, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for micro in range(config.grad_accum):
                index = batch_indices(state.step * config.grad_accum + micro, train_windows.shape[0],
                                      config.batch_size, config.seed)
                ids = train_windows[index].to(device)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    teacher_logits = None
                    if config.needs_teacher:
                        with torch.no_grad():
                            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                    logits = model(input_ids=ids, use_cache=False).logits
                    loss = recovery_loss(config.loss, logits, ids, teacher_logits, config.temperature,
                                         config.distill_weight) / config.grad_accum
                scaler.scale(loss).backward()
                step_loss += float(loss.detach())
                del logits, teacher_logits, loss
            if not math.isfinite(step_loss):
                raise LowrankError(f"the training loss became {step_loss} at step {state.step + 1}; lower --lr")
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.clip if config.clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += tokens_per_step
            state.seconds = time.perf_counter() - started
            speed = tokens_per_step / max(time.perf_counter() - step_started, 1e-9)
            record({"event": "train", "step": state.step, "loss": step_loss, "lr": lr, "grad_norm": float(norm),
                    "tokens": state.tokens, "tokens_per_s": speed, "seconds": state.seconds})
            log.debug("finished step %d, loss %.4f", state.step, step_loss)
            bar.set_postfix({"loss": f"{step_loss:.3f}", "tok/s": f"{speed:.0f}"}, refresh=False)
            bar.update()
            due = config.eval_every and state.step % config.eval_every == 0 and state.step < config.steps
            if eval_windows is not None and due and evaluate_now():
                stopped_early = True
                break
            if checkpoint_dir and config.checkpoint_every and state.step % config.checkpoint_every == 0:
                save_checkpoint(checkpoint_dir, state, config, params, optimizer, best, data_digest)
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


# ---- a compressed folder in, a recovered folder out -------------------------------------------

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
    """Every non-overlapping window of `seq_len` tokens of the training text, in order."""
    from .calibration import load_text, token_windows, tokenize

    if not texts:
        raise LowrankError("recovery needs training text; pass --data with .txt files or a folder")
    return token_windows(tokenize(tokenizer, load_text(list(texts))), None, seq_len, what="training")


def recover_folder(
    folder: str | Path,
    output: str | Path,
    data: list[str | Path],
    config: RecoveryConfig | None = None,
    *,
    eval_texts: list[str | Path] | None = None,
    eval_windows: int | None = 16,
    teacher: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> RecoveryResult:
    """Recover the compressed checkpoint in `folder` on `data` text and save it to `output`.

    The teacher defaults to the dense model recorded in the folder's plan. The checkpoint, the
    JSON-lines log and the loss-curve PNG go beside `output`; the checkpoint is removed once the
    output is saved. A failed run keeps its log only when it leaves a checkpoint to resume.
    """
    from .calibration import text_windows
    from .checkpoint import check_output_dir, check_output_spares_input, is_compressed_folder, read_plan, save_compressed
    from .loading import load_model

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
    loaded = load_model(str(folder), dtype=dtype, device=device)
    train = training_windows(loaded.tokenizer, data, config.seq_len)
    held_out = None
    if eval_texts:
        held_out = text_windows(loaded.tokenizer, list(eval_texts), None, config.seq_len, what="evaluation")
        held_out = held_out[:eval_windows] if eval_windows else held_out
    teacher_model = None
    if config.needs_teacher:
        source = teacher or plan.source
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
            "config": config.to_dict(), "data": list(map(str, data)), "eval": list(map(str, eval_texts or [])),
            "steps": result.steps, "tokens": result.tokens, "eval_ppl_before": result.before,
            "eval_ppl_after": result.after, "best_step": result.best_step, "stopped_early": result.stopped_early,
        }
        save_compressed(loaded.model, loaded.tokenizer, recovered_plan, output, overwrite=overwrite)
    except BaseException:
        if not paths.checkpoint.is_dir():  # nothing to resume, so the log describes no output: remove it
            paths.log.unlink(missing_ok=True)
        raise
    plot_history(result.history, paths.plot, title=f"recovery of {Path(folder).name} ({config.mode}, {config.loss})")
    shutil.rmtree(paths.checkpoint, ignore_errors=True)
    return result
