"""The recovery training loop in memory (lowrank.training): schedule, data order, what trains, resuming."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from helpers import make_tiny_model, random_windows
from lowrank.checkpoint import load_compressed, save_compressed
from lowrank.compression import compress_model
from lowrank.model_info import count_parameters
from lowrank.config import RecoveryConfig
from lowrank.distill import recovery_loss
from lowrank.errors import LowrankError
from lowrank.layers import LowRankLinear
from lowrank.training import (batch_indices, factor_layers, learning_rate, parameter_groups, ranks_of, recover,
                              training_batch)


pytestmark = pytest.mark.usefixtures("one_thread")


def compressed_pair(arch: str = "llama", ratio: float = 0.4):
    """A dense tiny model (the teacher) and a plain-SVD compressed copy of it."""
    dense = make_tiny_model(arch)
    student = copy.deepcopy(dense)
    compress_model(student, ratio=ratio, method="svd", progress=False)
    return dense, student


def mean_loss(model, windows, teacher=None, kind="ce") -> float:
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
        teacher_logits = teacher(input_ids=windows, use_cache=False).logits if teacher is not None else None
        return float(recovery_loss(kind, logits, windows, teacher_logits, temperature=1.0))


@torch.no_grad()
def sample_from(model, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """`n` sequences of `length` tokens sampled from the model's own distribution."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 1), 5)
    while ids.shape[1] < length:
        probs = torch.softmax(model(input_ids=ids).logits[:, -1], dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


def factor_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- pure pieces ------------------------------------------------------------------------------

def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    lrs = [learning_rate(s, 1.0, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[4 + 8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(20, 1.0, 4, 20, 0.1) == pytest.approx(0.1)
    assert learning_rate(0, 2e-4, 0, 10, 0.0) == pytest.approx(2e-4)


def test_batches_cover_every_window_once_per_epoch_in_a_seeded_order():
    n, bs = 10, 3  # 3 batches per epoch, one window left out each epoch
    epoch0 = torch.cat([batch_indices(i, n, bs, seed=7) for i in range(3)])
    epoch1 = torch.cat([batch_indices(i, n, bs, seed=7) for i in range(3, 6)])
    assert len(set(epoch0.tolist())) == 9 and len(set(epoch1.tolist())) == 9
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(batch_indices(4, n, bs, seed=7), batch_indices(4, n, bs, seed=7))
    assert not torch.equal(batch_indices(0, n, bs, seed=7), batch_indices(0, n, bs, seed=8))


def test_sentence_batches_are_visited_whole_once_per_epoch_in_a_seeded_order():
    """An encoder's data is a list of equal-length batches: each step takes one whole batch, every batch once an epoch."""
    batches = [torch.full((rows, length), length) for rows, length in ((3, 5), (1, 9), (2, 7), (4, 6))]
    epoch0 = [training_batch(batches, step, batch_size=16, seed=2) for step in range(4)]
    epoch1 = [training_batch(batches, step, batch_size=16, seed=2) for step in range(4, 8)]
    shapes = sorted(tuple(b.shape) for b in batches)
    assert sorted(tuple(b.shape) for b in epoch0) == sorted(tuple(b.shape) for b in epoch1) == shapes
    assert [b.shape for b in epoch0] != [b.shape for b in epoch1]  # a fresh order every epoch
    assert [b.shape for b in epoch0] == [training_batch(batches, s, 16, seed=2).shape for s in range(4)]
    windows = random_windows(10, 4)  # windows: the same batches as batch_indices picks
    assert torch.equal(training_batch(windows, 4, 3, seed=7), windows[batch_indices(4, 10, 3, seed=7)])


@pytest.mark.parametrize("relative", [False, True])
def test_relative_learning_rates_move_every_tensor_by_the_same_fraction_of_its_size(relative):
    """Adam's first step moves each coordinate by exactly its group's rate: lr (absolute) or lr × the tensor's RMS."""
    _, student = compressed_pair()
    layer = next(iter(factor_layers(student).values()))
    with torch.no_grad():  # the same product, factors 2500× apart in scale (as whitened factors can be)
        layer.down.weight.mul_(50.0)
        layer.up.weight.div_(50.0)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    params = {name: p for name, p in student.named_parameters() if name.endswith(("down.weight", "up.weight"))}
    rms = {name: float(p.detach().pow(2).mean().sqrt()) for name, p in params.items()}
    groups = parameter_groups(params, relative)
    assert [g["scale"] for g in groups] == ([pytest.approx(r) for r in rms.values()] if relative else [1.0])
    config = RecoveryConfig(loss="ce", steps=1, warmup=0, lr=1e-3, batch_size=4, relative_lr=relative,
                            checkpoint_every=0)
    recover(student, random_windows(8, 16, seed=3), config, progress=False)
    after = dict(student.named_parameters())
    for name in params:
        step = float((after[name].detach() - before[name]).abs().max())
        assert step == pytest.approx(1e-3 * (rms[name] if relative else 1.0), rel=1e-2)


# ---- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["factors", "lora"])
def test_recovery_lowers_the_training_loss_and_keeps_ranks_and_parameter_count(mode):
    _, student = compressed_pair()
    train = random_windows(16, 24, seed=1)
    ranks, n_params = ranks_of(student), count_parameters(student)
    frozen_before = {k: v.clone() for k, v in student.state_dict().items() if ".down." not in k and ".up." not in k
                     or k.endswith("bias")}
    loss_before = mean_loss(student, train)
    config = RecoveryConfig(mode=mode, loss="ce", steps=25, lr=1e-2, warmup=2, batch_size=4, seed=0)
    result = recover(student, train, config, progress=False)
    assert result.steps == 25 and result.tokens == 25 * 4 * 24
    assert mean_loss(student, train) < loss_before - 0.05
    assert ranks_of(student) == ranks and count_parameters(student) == n_params
    assert all(type(m).__name__ == "Linear" for layer in factor_layers(student).values() for m in (layer.down, layer.up))
    after = student.state_dict()
    assert set(after) == set(factor_state(student))  # no adapter tensors left behind
    for name, value in frozen_before.items():  # only the factor weights moved
        assert torch.equal(after[name], value), name
    assert all(p.requires_grad for p in student.parameters())


def test_distillation_pulls_the_student_towards_the_teacher():
    dense, student = compressed_pair()
    train = random_windows(16, 24, seed=1)
    kl_before = mean_loss(student, train, dense, kind="distill")
    config = RecoveryConfig(loss="distill", steps=20, lr=1e-2, warmup=2, batch_size=4, temperature=1.0)
    recover(student, train, config, teacher=dense, progress=False)
    assert mean_loss(student, train, dense, kind="distill") < 0.7 * kl_before
    with pytest.raises(LowrankError, match="teacher"):
        recover(copy.deepcopy(student), train, config, progress=False)


@pytest.mark.parametrize("mode", ["factors", "lora"])
def test_two_runs_with_one_seed_give_identical_weights(mode):
    _, student = compressed_pair()
    train = random_windows(12, 16, seed=3)
    config = RecoveryConfig(mode=mode, loss="ce", steps=6, lr=5e-3, batch_size=4, grad_accum=2, seed=5)
    first, second = copy.deepcopy(student), copy.deepcopy(student)
    recover(first, train, config, progress=False)
    recover(second, train, config, progress=False)
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.down.weight"],
                           student.state_dict()["model.layers.0.mlp.up_proj.down.weight"])


def test_gradient_checkpointing_trains_the_same_weights():
    _, student = compressed_pair()
    train = random_windows(8, 16, seed=3)
    plain, checkpointed = copy.deepcopy(student), copy.deepcopy(student)
    recover(plain, train, RecoveryConfig(loss="ce", steps=4, lr=5e-3, batch_size=4), progress=False)
    recover(checkpointed, train, RecoveryConfig(loss="ce", steps=4, lr=5e-3, batch_size=4,
                                                gradient_checkpointing=True), progress=False)
    a, b = plain.state_dict(), checkpointed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not checkpointed.is_gradient_checkpointing


def test_the_best_weights_by_eval_are_kept_and_training_stops_when_eval_stops_improving():
    _, student = compressed_pair()
    original = factor_state(student)
    train, held_out = random_windows(16, 24, seed=1), random_windows(4, 24, seed=2)
    # A learning rate far too high wrecks the model at once: eval never improves on step 0.
    config = RecoveryConfig(loss="ce", steps=40, lr=3.0, warmup=0, clip=0, batch_size=4, eval_every=2, patience=2)
    result = recover(student, train, config, eval_windows=held_out, progress=False)
    assert result.stopped_early and result.steps == 4
    assert result.best_step == 0 and result.after == pytest.approx(result.before)
    restored = student.state_dict()
    assert all(torch.equal(restored[k], original[k]) for k in original)
    evals = [r for r in result.history if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4] and evals[1]["eval_ppl"] > evals[0]["eval_ppl"]


def test_a_sensible_run_improves_held_out_perplexity_and_logs_every_step(tmp_path):
    dense, student = compressed_pair()
    text = sample_from(dense, n=20, length=24)  # text the dense model finds likely
    train, held_out = text[:16], text[16:]
    config = RecoveryConfig(loss="distill", steps=12, lr=1e-2, warmup=2, batch_size=4, eval_every=4)
    result = recover(student, train, config, eval_windows=held_out, teacher=dense, log_path=tmp_path / "log.jsonl",
                     progress=False)
    assert result.after < result.before
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["event"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in lines if r["event"] == "eval"] == [0, 4, 8, 12]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in lines if r["event"] == "train")


class Interrupt:
    """Raise KeyboardInterrupt in the forward pass after `calls` forwards, as Ctrl-C would."""

    def __init__(self, model, calls: int):
        self.left = calls
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.left -= 1
        if self.left < 0:
            self.handle.remove()
            raise KeyboardInterrupt


@pytest.mark.parametrize("mode", ["factors", "lora"])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, mode):
    _, student = compressed_pair()
    train = random_windows(12, 16, seed=3)
    config = RecoveryConfig(mode=mode, loss="ce", steps=8, lr=5e-3, batch_size=4, checkpoint_every=3, seed=1)
    straight = copy.deepcopy(student)
    recover(straight, train, config, progress=False)

    interrupted = copy.deepcopy(student)
    Interrupt(interrupted, calls=7)  # steps 1-7 complete, Ctrl-C arrives in step 8
    with pytest.raises(KeyboardInterrupt):
        recover(interrupted, train, config, checkpoint_dir=tmp_path / "ckpt", log_path=tmp_path / "log.jsonl",
                progress=False)
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["state"]["step"] == 6  # the last good checkpoint, not the interrupted step 7
    resumed = copy.deepcopy(student)  # a fresh process would reload the untouched input
    result = recover(resumed, train, config, checkpoint_dir=tmp_path / "ckpt", resume=True,
                     log_path=tmp_path / "log.jsonl", progress=False)
    assert result.steps == 8
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # step 7 from the dead run was dropped, then redone

    with pytest.raises(LowrankError, match="lr"):
        other = RecoveryConfig(**{**config.to_dict(), "lr": 1e-3})
        recover(copy.deepcopy(student), train, other, checkpoint_dir=tmp_path / "ckpt", resume=True, progress=False)
    with pytest.raises(LowrankError, match="other text"):
        recover(copy.deepcopy(student), random_windows(12, 16, seed=4), config, checkpoint_dir=tmp_path / "ckpt",
                resume=True, progress=False)


def test_lora_recovery_saves_plain_factors_that_reload_with_the_same_outputs(tmp_path):
    dense, student = compressed_pair()
    plan = compress_model(copy.deepcopy(dense), ratio=0.4, method="svd", progress=False)
    train = random_windows(12, 16, seed=3)
    recover(student, train, RecoveryConfig(mode="lora", loss="ce", steps=5, lr=1e-2, batch_size=4), progress=False)
    save_compressed(student, None, plan, tmp_path / "out")
    reloaded = load_compressed(tmp_path / "out")
    assert ranks_of(reloaded) == ranks_of(student)
    assert all(isinstance(m, LowRankLinear) for m in factor_layers(reloaded).values())
    ids = random_windows(2, 16, seed=9)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)


def test_a_model_without_factors_is_refused():
    with pytest.raises(LowrankError, match="compress it first"):
        recover(make_tiny_model("llama"), random_windows(8, 16), RecoveryConfig(loss="ce", steps=1), progress=False)
