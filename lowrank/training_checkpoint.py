"""A recovery run's resumable checkpoint: trainable tensors, AdamW moments and best weights.

Tensors go to safetensors and the counters to JSON, in one folder replaced by an atomic rename.
A checkpoint continues only the run that made it: same trajectory options, same training data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_output_dir
from .config import RecoveryConfig
from .errors import LowrankError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1

#: Options that define the optimisation trajectory: a resumed run must use the same values.
TRAJECTORY_FIELDS = ("mode", "loss", "steps", "lr", "relative_lr", "min_lr_ratio", "warmup", "weight_decay",
                     "batch_size", "grad_accum", "seq_len", "clip", "temperature", "distill_weight", "lora_rank",
                     "lora_alpha", "seed")


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short fingerprint of a tensor's values (to check that a resumed run trains on the same data)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in params.items()}


@torch.no_grad()
def restore(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(params) - set(values))
    if missing:
        raise LowrankError(f"the checkpoint lacks {missing[0]}; it belongs to another model or --mode, drop --resume")
    for name, p in params.items():
        p.copy_(values[name].to(device=p.device, dtype=p.dtype))


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
