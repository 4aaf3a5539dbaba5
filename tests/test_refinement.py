"""Block refinement (lowrank.refinement): Adam steps on a block's factors against the dense block's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY_ARCHITECTURES, interrupt_compress_pass_at, make_tiny_model, random_windows, save_tiny_model

import lowrank
from lowrank.block_capture import capture_block_inputs, run_block
from lowrank.block_source import BlockSource
from lowrank.checkpoint import load_compressed
from lowrank.compression import compress_model, compress_sequential
from lowrank.model_planning import uniform_plan
from lowrank.config import CompressConfig
from lowrank.errors import LowrankError
from lowrank.layers import LowRankLinear
from lowrank.model_info import count_parameters
from lowrank.profiling import targets_of
from lowrank.refinement import (PATIENCE, RefineOptions, batch_schedule, block_loss, check_interval, holdout_split, refine_block, relative_groups,
                                trainable_parameters)
from lowrank.stream_memory import estimate
from lowrank.targets import find_block_list, find_targets

pytestmark = pytest.mark.usefixtures("one_thread")

REFINE = RefineOptions(steps=30, lr=1e-2, share=0.5, holdout=0.0)  # measured on its own windows: none held out


def _compress(model, windows, refine=None, ratio=0.5):
    plan = uniform_plan(model, find_targets(model), ratio)
    return compress_sequential(model, plan, windows, batch_size=2, update=True, progress=False, refine=refine)


@torch.no_grad()
def _last_block_error(dense, compressed, windows) -> float:
    """‖dense last block output − compressed last block output‖² over the windows, computed block by block from scratch."""
    captured = capture_block_inputs(dense, windows, batch_size=2)
    _, dense_blocks = find_block_list(dense)
    _, compressed_blocks = find_block_list(compressed)
    total = 0.0
    for b, (h_dense, h_comp) in enumerate(zip(captured.hidden, captured.hidden)):
        for i, (block_d, block_c) in enumerate(zip(dense_blocks, compressed_blocks)):
            call = captured.calls[i][b]
            h_dense, h_comp = run_block(block_d, h_dense, call, "cpu"), run_block(block_c, h_comp, call, "cpu")
        total += (h_dense - h_comp).pow(2).sum().item()
    return total


def _ranks(model) -> dict[str, int]:
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_refinement_lowers_the_block_output_error_and_keeps_ranks(arch):
    dense = make_tiny_model(arch)
    windows = random_windows(8, 24)
    plain, refined = copy.deepcopy(dense), copy.deepcopy(dense)
    _compress(plain, windows)
    plan = _compress(refined, windows, REFINE)
    assert _ranks(plain) == _ranks(refined) and _ranks(refined)
    assert count_parameters(plain) == count_parameters(refined)
    error_plain = _last_block_error(dense, plain, windows)
    error_refined = _last_block_error(dense, refined, windows)
    assert error_refined < 0.9 * error_plain, (error_plain, error_refined)
    errors = plan.options["refine_errors"]
    assert len(errors) == len(find_block_list(dense)[1])
    assert all(after < before and best > 0 for before, after, best in errors.values())
    assert plan.options["refine"] == {"steps": 30, "lr": 1e-2, "share": 0.5, "train_norms": False,
                                      "train_dense": False, "seed": 0, "holdout": 0.0, "refit_rounds": 0,
                                      "loss": "token"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_steps_is_bit_identical_to_no_refinement(arch):
    dense = make_tiny_model(arch)
    windows = random_windows(8, 24)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    _compress(a, windows)
    plan = _compress(b, windows, RefineOptions(steps=0, lr=5.0))
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert "refine" not in plan.options and "refine_errors" not in plan.options


def test_only_factors_train_unless_norms_are_asked_for():
    dense = make_tiny_model("llama")
    windows = random_windows(8, 24)
    factors_only, with_norms = copy.deepcopy(dense), copy.deepcopy(dense)
    _compress(factors_only, windows, REFINE)
    _compress(with_norms, windows, RefineOptions(steps=30, lr=1e-2, share=0.5, train_norms=True, holdout=0.0))
    dense_state, state, state_norms = dense.state_dict(), factors_only.state_dict(), with_norms.state_dict()
    norm_keys = [k for k in dense_state if "norm" in k]
    assert norm_keys
    assert all(torch.equal(state[k], dense_state[k]) for k in dense_state if k in state)  # norms, embeddings
    assert any(not torch.equal(state_norms[k], dense_state[k]) for k in norm_keys if ".layers." in k)
    assert all(p.requires_grad for p in factors_only.parameters())  # the flags are given back


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dense_layers_train_only_when_asked_and_keep_their_shape(arch):
    """A plan that keeps the MLPs dense: --refine-dense moves them too, and the error ends lower than factors alone."""
    dense = make_tiny_model(arch)
    windows = random_windows(8, 24)
    plan = uniform_plan(dense, find_targets(dense), 0.5)
    kept = [name for name in plan.modules if "mlp" in name]
    for name in kept:
        plan.modules[name].rank = None
    results = {}
    for train_dense in (False, True):
        model = copy.deepcopy(dense)
        compress_sequential(model, copy.deepcopy(plan), windows, batch_size=2, update=True, progress=False,
                            refine=RefineOptions(steps=30, lr=1e-2, share=0.5, train_dense=train_dense, holdout=0.0))
        moved = [name for name in kept
                 if not torch.equal(model.get_submodule(name).weight, dense.get_submodule(name).weight)]
        assert all(model.get_submodule(name).weight.shape == dense.get_submodule(name).weight.shape for name in kept)
        assert moved == (kept if train_dense else [])
        assert count_parameters(model) == count_parameters(compress_reference(dense, plan, windows))
        results[train_dense] = _last_block_error(dense, model, windows)
    assert results[True] < results[False]


def compress_reference(dense, plan, windows):
    model = copy.deepcopy(dense)
    compress_sequential(model, copy.deepcopy(plan), windows, batch_size=2, update=True, progress=False)
    return model


def test_trainable_parameters_are_the_factors():
    dense = make_tiny_model("gpt2")
    model = copy.deepcopy(dense)
    _compress(model, random_windows(8, 24))
    block = find_block_list(model)[1][0]
    factors = trainable_parameters(block)
    layers = [m for m in block.modules() if isinstance(m, LowRankLinear)]
    assert len(factors) == 2 * len(layers)
    assert {id(p) for p in factors} == {id(w) for m in layers for w in (m.down.weight, m.up.weight)}
    more = trainable_parameters(block, train_norms=True)
    assert len(more) > len(factors) and {id(p) for p in factors} <= {id(p) for p in more}
    assert trainable_parameters(block, train_dense=True) == factors  # every linear layer of this block is factored


def test_a_step_that_makes_the_block_worse_is_undone():
    """With a wild learning rate the error ends higher than it began: the block gets its factors back."""
    dense = make_tiny_model("llama")
    windows = random_windows(8, 24)
    plain, wild = copy.deepcopy(dense), copy.deepcopy(dense)
    _compress(plain, windows)
    plan = _compress(wild, windows, RefineOptions(steps=3, lr=100.0, share=0.5))
    assert any(before == after and best == 0 for before, after, best in plan.options["refine_errors"].values())
    state_plain, state_wild = plain.state_dict(), wild.state_dict()
    assert all(torch.equal(state_plain[k], state_wild[k]) for k in state_plain)


def test_refine_block_direct_call_and_distributed_hook():
    """refine_block on one block: the averaging hook sees every gradient and both errors."""
    dense = make_tiny_model("qwen2")
    windows = random_windows(8, 24)
    model = copy.deepcopy(dense)
    _compress(model, windows)
    captured = capture_block_inputs(dense, windows, batch_size=2)
    dense_block, block = find_block_list(dense)[1][0], find_block_list(model)[1][0]
    calls = captured.calls[0]
    with torch.no_grad():
        targets = [run_block(dense_block, h, c, "cpu") for h, c in zip(captured.hidden, calls)]
    seen = []
    options = RefineOptions(steps=4, lr=1e-2, share=0.5, holdout=0.0)  # no held-out batch: all of them decide
    result = refine_block(targets, block, captured.hidden, calls, options, average=lambda t: seen.append(t.shape))
    n_params = len(trainable_parameters(block))
    assert len(seen) == 4 * n_params + 2  # every gradient of every step, and the errors before and after
    with torch.no_grad():
        after = sum(block_loss(run_block(block, h, c, "cpu"), t, "token").item()
                    for h, c, t in zip(captured.hidden, calls, targets)) / len(targets)
    assert result.after == pytest.approx(after, rel=1e-5) and result.after < result.before
    assert refine_block(targets, block, captured.hidden, calls, RefineOptions()) is None  # steps 0: nothing


def test_held_out_batches_pick_the_step_and_stop_training():
    """Held-out targets that the unrefined block already meets exactly: no step can beat it, so the block gets
    its factors back although its training batches' error fell, and training stops after `PATIENCE` looks
    without a new best. With the dense block's outputs as held-out targets, a later step is kept."""
    dense = make_tiny_model("gpt2")
    windows = random_windows(32, 24)
    model = copy.deepcopy(dense)
    compress_sequential(model, uniform_plan(model, find_targets(model), 0.5), windows, batch_size=4, update=True,
                        progress=False)
    captured = capture_block_inputs(dense, windows, batch_size=4)
    dense_block, block = find_block_list(dense)[1][0], find_block_list(model)[1][0]
    calls = captured.calls[0]
    options = RefineOptions(steps=16, lr=1e-2, share=0.5, holdout=0.25)
    training, held = holdout_split(len(calls), options.holdout)
    assert held == [3, 7] and training == [0, 1, 2, 4, 5, 6]
    with torch.no_grad():
        targets = [run_block(dense_block, h, c, "cpu") for h, c in zip(captured.hidden, calls)]
        met = list(targets)
        for b in held:  # already met by the unrefined block
            met[b] = run_block(block, captured.hidden[b], calls[b], "cpu")
    state = {k: v.clone() for k, v in block.state_dict().items()}
    gradients = []
    params = trainable_parameters(block)
    result = refine_block(met, block, captured.hidden, calls, options,
                          average=lambda t: gradients.append(t) if t.dim() else None)
    assert result.best_step == 0 and not result.kept and result.after == result.before == 0.0
    assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())
    assert len(gradients) == check_interval(16) * PATIENCE * len(params)  # PATIENCE looks, then it stopped
    result = refine_block(targets, block, captured.hidden, calls, options)
    assert result.kept and result.best_step > 0 and result.after < result.before


def test_token_loss_weighs_each_token_by_its_own_size():
    """A token 100× larger than the rest dominates plain MSE; the token loss scores each token's relative error."""
    target = torch.ones(1, 4, 8)
    target[0, 0] *= 100.0
    output = target.clone()
    output[0, 0] += 1.0  # 1% error on the big token
    output[0, 1] += 0.5  # 50% error on a small one
    assert block_loss(output, target, "mse").item() == pytest.approx((8 * 1.0 + 8 * 0.25) / 32)
    assert block_loss(output, target, "token").item() == pytest.approx((8 * 1e-4 + 8 * 0.25) / 32)
    assert block_loss(target, target, "token").item() == 0.0


def test_holdout_split_spreads_the_held_out_batches():
    assert holdout_split(8, 0.125) == ([0, 1, 2, 3, 4, 5, 6], [7])
    assert holdout_split(16, 0.25)[1] == [3, 7, 11, 15]
    assert holdout_split(4, 0.01) == ([0, 1, 2], [3])  # at least one
    assert holdout_split(1, 0.5) == ([0], [])  # a single batch trains; its error decides
    assert holdout_split(5, 0.0) == ([0, 1, 2, 3, 4], [])
    assert holdout_split(2, 0.9) == ([0], [1])  # at least one batch trains


def test_learning_rate_is_relative_to_each_tensor():
    small, large, zero = (torch.nn.Parameter(torch.full((3, 4), v)) for v in (0.02, 2.0, 0.0))
    groups = relative_groups([small, large, zero], 1e-3)
    assert [g["lr"] for g in groups] == pytest.approx([2e-5, 2e-3, 1e-3])
    assert [g["params"][0] is p for g, p in zip(groups, (small, large, zero))] == [True] * 3


def test_batch_schedule_visits_every_batch_before_repeating():
    schedule = batch_schedule(8, RefineOptions(steps=6, share=0.25))
    assert all(len(step) == 2 for step in schedule)
    flat = [b for step in schedule for b in step]
    assert sorted(flat[:8]) == list(range(8)) and sorted(flat[8:]) == sorted(set(flat[8:]))
    assert [len(step) for step in batch_schedule(3, RefineOptions(steps=4, share=0.01))] == [1, 1, 1, 1]
    assert batch_schedule(8, RefineOptions(steps=6, share=0.25, seed=1)) != schedule


@pytest.mark.parametrize("options, message", [
    (dict(steps=-1), "--refine-steps"), (dict(steps=2, lr=0.0), "--refine-lr"),
    (dict(steps=2, lr=float("nan")), "--refine-lr"), (dict(steps=2, share=0.0), "--refine-share"),
    (dict(steps=2, share=1.5), "--refine-share"), (dict(holdout=1.0), "--refine-holdout"),
    (dict(holdout=-0.1), "--refine-holdout"), (dict(refit_rounds=-1), "--refine-refit"),
    (dict(refit_rounds=1.5), "--refine-refit"), (dict(loss="l1"), "--refine-loss"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(LowrankError, match=message):
        RefineOptions(**options)


def test_config_carries_the_options_and_refuses_one_shot():
    config = CompressConfig(refine_steps=5, refine_lr=2e-4, refine_share=0.5, refine_norms=True, refine_dense=True,
                            refine_holdout=0.25, refine_refit=2, refine_loss="mse")
    assert config.refinement() == RefineOptions(steps=5, lr=2e-4, share=0.5, train_norms=True, train_dense=True,
                                                holdout=0.25, refit_rounds=2, loss="mse")
    assert CompressConfig.from_dict(config.to_dict()) == config
    with pytest.raises(LowrankError, match="--sequential"):
        CompressConfig(refine_steps=5, sequential=False)
    with pytest.raises(LowrankError, match="--refine-share"):
        CompressConfig(refine_share=2.0)
    with pytest.raises(LowrankError, match="--update"):
        CompressConfig(refine_refit=1, update=False)
    with pytest.raises(LowrankError, match="--sequential"):
        compress_model(make_tiny_model("llama"), ratio=0.5, windows=random_windows(4, 8), sequential=False,
                       refine=RefineOptions(steps=2), progress=False)


def test_streamed_refinement_equals_in_memory(tmp_path):
    save_tiny_model(tmp_path / "src", "llama")
    windows = random_windows(12, 24)
    config = CompressConfig(refine_steps=10, refine_lr=1e-2, refine_share=0.5, refine_holdout=0.0)
    memory = lowrank.compress(tmp_path / "src", config, windows, output=tmp_path / "mem", progress=False)
    source = BlockSource(tmp_path / "src")
    est = estimate(source, targets_of(source.model), windows, True, 8, refine=True)
    limit = f"{est.total(0) + 1000}B"  # room for everything but the boundary activations: both streams spill
    streamed = lowrank.compress(tmp_path / "src", config.replace(stream=True, offload_dir=str(tmp_path / "spill"),
                                                                 max_memory=limit), windows,
                                output=tmp_path / "str", progress=False)
    assert streamed.options["refine"] == memory.options["refine"]
    assert streamed.options["refine_errors"].keys() == memory.options["refine_errors"].keys()
    a, b = load_compressed(tmp_path / "mem"), load_compressed(tmp_path / "str")
    for (name, x), (_, y) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert torch.allclose(x, y, atol=1e-5, rtol=0), name
    plain = lowrank.compress(tmp_path / "src", CompressConfig(), windows, output=tmp_path / "plain", progress=False)
    assert plain.factored == memory.factored
    c = load_compressed(tmp_path / "plain")
    assert any(not torch.allclose(x, y, atol=1e-5) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_memory_estimate_counts_the_dense_stream(tmp_path):
    save_tiny_model(tmp_path / "src", "llama")
    windows = random_windows(12, 24)
    source = BlockSource(tmp_path / "src")
    plain = estimate(source, targets_of(source.model), windows, True, 8)
    refined = estimate(source, targets_of(source.model), windows, True, 8, refine=True, batch_size=8)
    per_level = windows.numel() * source.config.hidden_size * 4
    assert refined.boundaries_compress == plain.boundaries_compress + 2 * per_level
    assert refined.refinement > 3 * refined.block and plain.refinement == 0
    assert refined.compress_peak == plain.compress_peak + 2 * per_level + refined.refinement


def test_streamed_refinement_resumes_with_both_streams(tmp_path, monkeypatch):
    """An interrupted streamed run with refinement resumes from the saved boundary (compressed and dense)."""
    save_tiny_model(tmp_path / "src", "llama")
    windows = random_windows(12, 24)
    config = CompressConfig(stream=True, max_shard_size="30KB", refine_steps=6, refine_lr=1e-2)
    lowrank.compress(tmp_path / "src", config, windows, output=tmp_path / "whole", progress=False)
    loads = interrupt_compress_pass_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        lowrank.compress(tmp_path / "src", config, windows, output=tmp_path / "out", progress=False)
    loads.clear()
    lowrank.compress(tmp_path / "src", config, windows, output=tmp_path / "out", progress=False, resume=True)
    assert loads == [1]
    whole, resumed = load_compressed(tmp_path / "whole").state_dict(), load_compressed(tmp_path / "out").state_dict()
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_refitting_both_factors_lowers_the_error_and_keeps_ranks(arch):
    """--refine-refit: the update refits both factors (reduced-rank regression); same ranks, lower block error."""
    dense = make_tiny_model(arch)
    windows = random_windows(8, 24)
    plain, refit = copy.deepcopy(dense), copy.deepcopy(dense)
    _compress(plain, windows)
    plan = _compress(refit, windows, RefineOptions(refit_rounds=2))
    assert _ranks(plain) == _ranks(refit) and count_parameters(plain) == count_parameters(refit)
    moved = [name for name, m in refit.named_modules() if isinstance(m, LowRankLinear)
             and not torch.equal(m.down.weight, plain.get_submodule(name).down.weight)]
    assert moved and len(moved) == len(_ranks(refit))  # `down` is refitted too, in every layer
    assert _last_block_error(dense, refit, windows) < _last_block_error(dense, plain, windows)
    assert plan.options["refine"]["refit_rounds"] == 2 and "refine_errors" not in plan.options
