"""A recovery run's checkpoint: weights, AdamW moments and counters round-trip; only the same run resumes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from lowrank.config import RecoveryConfig
from lowrank.errors import LowrankError
from lowrank.training_checkpoint import (CHECKPOINT_FORMAT, TRAJECTORY_FIELDS, TrainingState, check_resumable,
                                         load_checkpoint, read_checkpoint_state, restore, save_checkpoint,
                                         snapshot, tensor_digest)

#: A value different from the default for every trajectory option.
CHANGED = {"mode": "lora", "loss": "ce", "steps": 201, "lr": 1e-3, "relative_lr": True, "min_lr_ratio": 0.2, "warmup": 11,
           "weight_decay": 0.01, "batch_size": 5, "grad_accum": 2, "seq_len": 128, "clip": 0.5, "temperature": 2.0,
           "distill_weight": 0.25, "lora_rank": 8, "lora_alpha": 16.0, "seed": 1}


def trainable(seed: int) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3, bias=False))
    return model, dict(model.named_parameters())


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 6, generator=generator)).square().mean().backward()
        optimizer.step()


def test_save_then_load_restores_weights_moments_counters_and_best(tmp_path):
    model, params = trainable(0)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    train_steps(model, optimizer, 3)
    best = {name: t * 2 for name, t in snapshot(params).items()}
    state = TrainingState(step=3, tokens=45, seconds=1.5, before=9.0, best_ppl=8.5, best_step=2,
                          history=[{"event": "train", "step": 3, "loss": 0.25}])
    save_checkpoint(tmp_path / "ckpt", state, RecoveryConfig(), params, optimizer, best, "digest")

    other, other_params = trainable(1)  # other weights, a fresh optimizer without moments
    other_optimizer = torch.optim.AdamW(other_params.values(), lr=1e-2, weight_decay=0.1)
    loaded_state, loaded_best = load_checkpoint(tmp_path / "ckpt", other_params, other_optimizer)

    assert loaded_state == state
    assert loaded_best.keys() == best.keys() and all(torch.equal(loaded_best[n], best[n]) for n in best)
    for name, p in params.items():
        assert torch.equal(other_params[name], p)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(other_optimizer.state[other_params[name]][key], optimizer.state[p][key]), (name, key)
    train_steps(model, optimizer, 2, seed=8)  # both continue to the same weights, bit for bit
    train_steps(other, other_optimizer, 2, seed=8)
    assert all(torch.equal(other_params[name], p) for name, p in params.items())


def test_a_checkpoint_without_best_weights_loads_none(tmp_path):
    model, params = trainable(0)
    optimizer = torch.optim.AdamW(params.values())
    save_checkpoint(tmp_path / "ckpt", TrainingState(step=0), RecoveryConfig(), params, optimizer, None, "d")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "optimizer.safetensors", "state.json", "trainable.safetensors"]
    assert load_checkpoint(tmp_path / "ckpt", params, torch.optim.AdamW(params.values()))[1] is None


def test_every_trajectory_option_is_checked_and_named_by_its_flag(tmp_path):
    assert set(CHANGED) == set(TRAJECTORY_FIELDS)
    record = {"format": CHECKPOINT_FORMAT, "config": RecoveryConfig().to_dict(), "data": "abc"}
    check_resumable(record, RecoveryConfig(), "abc", tmp_path)  # the same run resumes
    check_resumable(record, dataclasses.replace(RecoveryConfig(), eval_every=5, checkpoint_every=3), "abc", tmp_path)
    for name, value in CHANGED.items():
        flag = name.replace("_", "-")
        with pytest.raises(LowrankError, match=f"was made with {flag}=.* but this run asks for {value!r}"):
            check_resumable(record, dataclasses.replace(RecoveryConfig(), **{name: value}), "abc", tmp_path)


def test_other_training_data_is_refused(tmp_path):
    record = {"format": CHECKPOINT_FORMAT, "config": RecoveryConfig().to_dict(), "data": "abc"}
    with pytest.raises(LowrankError, match="was trained on other text; pass the same --data and --seq-len"):
        check_resumable(record, RecoveryConfig(), "abd", tmp_path)


def test_tensor_digest_tells_values_apart():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest(a) == tensor_digest(a.clone()) == tensor_digest(a.t().contiguous().t())
    b = a.clone()
    b[2, 3] += 1
    assert tensor_digest(b) != tensor_digest(a) and len(tensor_digest(a)) == 16


def test_unreadable_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(LowrankError, match="no checkpoint at .* to resume from; run without --resume"):
        read_checkpoint_state(tmp_path / "absent")
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(LowrankError, match="is unreadable .*; delete .* and run without --resume"):
        read_checkpoint_state(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT + 1}))
    with pytest.raises(LowrankError, match=f"has format {CHECKPOINT_FORMAT + 1}; delete it and start again"):
        read_checkpoint_state(tmp_path)


def test_restore_refuses_a_checkpoint_of_other_parameters():
    _, params = trainable(0)
    values = snapshot(params)
    del values["1.weight"]
    with pytest.raises(LowrankError, match=r"the checkpoint lacks 1\.weight; it belongs to another model or --mode"):
        restore(params, values)
