"""Which calibration windows each stage of sequential compression reads (lowrank.calibration).

The planner profiles the first --plan-samples windows (dense Grams, whitened spectra, prices) and
backpropagates the first --sensitivity-samples of them for its prices, the least-squares update fits on
the first --update-samples, and the block statistics use every window.
The profile and the update's extra pass of the compressed block were the stages these cut short
(reports/speed-notes.md); these tests pin down which windows each path reads.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import random_windows, save_tiny_model

import lowrank
from lowrank import compression
from lowrank.calibration import leading_batches, leading_windows, planning_windows
from lowrank.checkpoint import load_compressed
from lowrank.config import CompressConfig
from lowrank.errors import LowrankError
from lowrank.layers import LowRankLinear
from lowrank.model_planning import plan_model
from lowrank.targets import find_targets

SUBSET = 3


def test_planning_windows_are_the_first_rows_or_all():
    windows = random_windows(12, 24)
    assert torch.equal(planning_windows(windows, SUBSET), windows[:SUBSET])
    assert planning_windows(windows, 0) is windows  # 0: all of them
    assert planning_windows(windows, 99).shape == windows.shape
    sentences = [torch.ones(4, 5, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)]
    assert planning_windows(sentences, 1) is sentences  # an encoder's few sentence batches: all kept


def test_negative_plan_samples_is_refused_with_the_flag():
    with pytest.raises(LowrankError, match="--plan-samples must be at least 0"):
        CompressConfig(plan_samples=-1)


def _reference_ranks(model, windows, **options) -> dict[str, int]:
    plan, _ = plan_model(model, find_targets(model), 0.6, "sensitivity", windows=windows, progress=False, **options)
    return plan.factored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan-samples") / "src"
    model = save_tiny_model(folder, "llama")
    windows = random_windows(12, 24)
    subset, every = _reference_ranks(model, windows[:SUBSET]), _reference_ranks(model, windows)
    assert subset != every  # else these tests could not tell which windows were profiled
    return folder, windows, subset, every


@pytest.mark.parametrize("stream", [False, True])
def test_sequential_compress_plans_from_the_first_windows(tmp_path, tiny, stream):
    folder, windows, subset, every = tiny
    plan = lowrank.compress(folder, CompressConfig(ratio=0.6, plan_samples=SUBSET, stream=stream), windows,
                            output=tmp_path / "out", progress=False)
    assert plan.factored == subset
    assert plan.options["plan_samples"] == SUBSET and plan.options["samples"] == 12


def test_plan_samples_zero_plans_from_every_window(tmp_path, tiny):
    folder, windows, subset, every = tiny
    plan = lowrank.compress(folder, CompressConfig(ratio=0.6, plan_samples=0), windows, output=tmp_path / "out",
                            progress=False)
    assert plan.factored == every and plan.options["plan_samples"] == 12


def test_dry_run_plans_what_compress_would(tiny):
    folder, windows, subset, every = tiny
    plan = lowrank.compress(folder, CompressConfig(ratio=0.6, plan_samples=SUBSET), windows, dry_run=True,
                            progress=False)
    assert plan.factored == subset


def test_one_shot_profiles_every_window(tmp_path, tiny):
    """One-shot factoring reuses the profile's statistics, so it must not thin them."""
    folder, windows, subset, every = tiny
    plan = lowrank.compress(folder, CompressConfig(ratio=0.6, plan_samples=SUBSET, sequential=False), windows,
                            output=tmp_path / "out", progress=False)
    assert plan.factored == every and "plan_samples" not in plan.options


def test_sensitivity_samples_below_one_is_refused_with_the_flag():
    with pytest.raises(LowrankError, match="--sensitivity-samples must be at least 1, got 0"):
        CompressConfig(sensitivity_samples=0)


@pytest.fixture(scope="module")
def one_window_prices(tiny):
    """The ranks planned when the prices come from the first window alone; not those of the default's windows."""
    folder, windows, subset, every = tiny
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    one = _reference_ranks(model, windows, sensitivity_samples=1)
    assert one != every  # else the tests below could not tell how many windows were backpropagated
    return one


@pytest.mark.parametrize("stream", [False, True])
def test_compress_prices_directions_on_the_first_sensitivity_windows(tmp_path, tiny, one_window_prices, stream):
    folder, windows, subset, every = tiny
    config = CompressConfig(ratio=0.6, plan_samples=0, sensitivity_samples=1, stream=stream)
    plan = lowrank.compress(folder, config, windows, output=tmp_path / "out", progress=False)
    assert plan.factored == one_window_prices
    assert plan.options["sensitivity_samples"] == 1
    dry = lowrank.compress(folder, config, windows, dry_run=True, progress=False)
    assert dry.factored == one_window_prices


def test_sensitivity_samples_count_within_the_planning_windows(tmp_path, tiny):
    """With --plan-samples 3, at most those 3 windows are backpropagated, on both paths, and the plan says so."""
    folder, windows, subset, every = tiny
    for stream in (False, True):
        plan = lowrank.compress(folder, CompressConfig(ratio=0.6, plan_samples=SUBSET, stream=stream), windows,
                                output=tmp_path / str(stream), progress=False)
        assert plan.factored == subset and plan.options["sensitivity_samples"] == SUBSET


def test_leading_batches_hold_the_first_windows():
    windows = random_windows(12, 24)
    assert leading_batches(windows, 4, 6) == 2 and leading_windows(windows, 4, 6) == 8  # whole batches
    assert leading_batches(windows, 4, 0) == 3 and leading_windows(windows, 4, 0) == 12  # 0: all
    assert leading_batches(windows, 4, 99) == 3
    sentences = [torch.ones(4, 5, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)]
    assert leading_batches(sentences, 4, 1) == 2  # an encoder's sentence batches: all


def test_negative_update_samples_is_refused_with_the_flag():
    with pytest.raises(LowrankError, match="--update-samples must be at least 0"):
        CompressConfig(update_samples=-1)


def test_update_fits_on_the_leading_batches_in_memory_and_streamed(tmp_path, tiny, monkeypatch):
    folder, windows, subset, every = tiny
    fitted: list[int] = []
    original = compression.update_block
    monkeypatch.setattr(compression, "update_block",
                        lambda dense, block, factored, hidden, *a, **k: fitted.append(len(hidden)) or
                        original(dense, block, factored, hidden, *a, **k))
    config = CompressConfig(ratio=0.6, batch_size=4, update_samples=3, plan_samples=0)
    plans = {stream: lowrank.compress(folder, config.replace(stream=stream), windows, output=tmp_path / str(stream),
                                      progress=False) for stream in (False, True)}
    assert fitted and set(fitted) == {1}  # 3 windows: the first batch of 4, every block, both paths
    assert all(plan.options["update_samples"] == 4 for plan in plans.values())
    every_window = lowrank.compress(folder, config.replace(update_samples=0), windows, output=tmp_path / "all",
                                    progress=False)
    assert every_window.options["update_samples"] == 12 and set(fitted[-1:]) == {3}
    first, streamed, full = (load_compressed(tmp_path / name) for name in ("False", "True", "all"))
    products = {name: m.merged_weight() for name, m in first.named_modules() if isinstance(m, LowRankLinear)}
    for name, module in streamed.named_modules():
        if isinstance(module, LowRankLinear):
            assert torch.allclose(module.merged_weight(), products[name], atol=1e-5, rtol=0), name
    assert any(not torch.allclose(m.merged_weight(), products[n], atol=1e-4, rtol=0)
               for n, m in full.named_modules() if isinstance(m, LowRankLinear))  # the subset is what was fitted
