"""Sequential compression plans from its first --plan-samples windows (lowrank.calibration.planning_windows).

The planner's profile (dense Grams, whitened spectra, prices) is the single largest stage of the default
compress; sequential compression calibrates again on every window, block by block, so the plan alone
reads the subset. These tests pin down which windows each path profiles.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_windows, save_tiny_model

import lowrank
from lowrank.calibration import planning_windows
from lowrank.config import CompressConfig
from lowrank.errors import LowrankError
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


def _reference_ranks(model, windows) -> dict[str, int]:
    plan, _ = plan_model(model, find_targets(model), 0.6, "sensitivity", windows=windows, progress=False)
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
