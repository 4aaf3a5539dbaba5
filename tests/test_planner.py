"""The planner: strategies, the greedy allocator, plans as files, and the CLI around them.

The planner is pure (numbers in, ranks out), so most tests feed it hand-made spectra; the model-facing
half (calibration, Fisher, spectra) is tested in test_profiling.py and test_sensitivity.py.
"""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FUZZ, assert_valid_plan, make_tiny_model, random_windows, run_cli, smollm2_calibration
from lowrank.budget import Budget, RankLimits
from lowrank.checkpoint import read_plan
from lowrank.compression import compress_model
from lowrank.model_info import count_parameters
from lowrank.model_planning import plan_model
from lowrank.errors import BudgetError, LowrankError
from lowrank.layers import LowRankLinear
from lowrank.ranks import saves_parameters
from lowrank.plan import Plan
from lowrank.planner import (STRATEGIES, allocate, direction_loss, lower_hull, matrix_options, plan_targets,
                             plan_uniform, smallest_allowance)
from lowrank.profile import MatrixProfile
from lowrank.profiling import profile_model
from lowrank.targets import Target, find_targets

SHAPES = [(8, 12), (12, 8), (16, 16), (6, 20), (10, 10)]


def spectrum(shape, sigma, price=None) -> MatrixProfile:
    """A matrix's planning spectrum σ (and loss prices), as a profile would hold it."""
    price = None if price is None else torch.as_tensor(np.asarray(price, dtype=np.float64))
    return MatrixProfile("m", tuple(shape), torch.as_tensor(np.asarray(sigma, dtype=np.float64)), price=price)


def problem(seed: int, count: int = 4):
    """Random targets with decreasing whitened spectra and positive Fisher weights."""
    rng = np.random.default_rng(seed)
    targets, spectra = [], {}
    for i in range(count):
        m, n = SHAPES[(seed + i) % len(SHAPES)]
        energy = np.sort(rng.gamma(0.5, 1.0, min(m, n)) * 10 ** rng.uniform(-3, 3))[::-1]
        target = Target(f"layers.{i}.proj", m, n, False)
        targets.append(target)
        spectra[target.name] = spectrum((m, n), np.sqrt(energy), rng.uniform(0.01, 5.0, min(m, n)))
    return targets, spectra


def rank_key(plan):
    """Ranks with dense as infinity, for monotonicity comparisons."""
    return {name: math.inf if p.rank is None else p.rank for name, p in plan.items()}


def total_loss(plan, spectra, strategy):
    loss = 0.0
    for name, p in plan.items():
        if p.rank is not None:
            loss += direction_loss(spectra[name], strategy)[p.rank:].sum()
    return loss


# ---- properties (hypothesis) -------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0.0, 1.0), strategy=st.sampled_from(STRATEGIES),
       round_to=st.sampled_from([1, 2, 4]))
def test_budget_is_respected(seed, fraction, strategy, round_to):
    targets, spectra = problem(seed)
    limits = RankLimits(round_to=round_to)
    dense = sum(t.params for t in targets)
    smallest = smallest_allowance(targets, limits, [])
    allowance = int(smallest + fraction * (dense - smallest))
    plan = allocate(targets, allowance, strategy, spectra, limits)
    assert sum(p.params for p in plan.values()) <= allowance
    for p in plan.values():
        assert p.rank is None or (p.rank % round_to == 0 and saves_parameters(p.rank, *p.shape))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), low=st.floats(0.0, 1.0), high=st.floats(0.0, 1.0),
       strategy=st.sampled_from(["global", "sensitivity", "energy"]))
def test_larger_budget_never_shrinks_a_rank(seed, low, high, strategy):
    targets, spectra = problem(seed, count=5)
    low, high = sorted((low, high))
    smallest = smallest_allowance(targets, RankLimits(), [])
    dense = sum(t.params for t in targets)
    small = rank_key(allocate(targets, int(smallest + low * (dense - smallest)), strategy, spectra))
    large = rank_key(allocate(targets, int(smallest + high * (dense - smallest)), strategy, spectra))
    assert all(large[name] >= small[name] for name in small)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0.05, 1.0), strategy=st.sampled_from(STRATEGIES))
def test_planning_is_deterministic(seed, fraction, strategy):
    targets, spectra = problem(seed)
    allowance = int(fraction * sum(t.params for t in targets))
    try:
        first = allocate(targets, allowance, strategy, spectra)
    except BudgetError:
        return
    again_targets, again_spectra = problem(seed)
    assert allocate(again_targets, allowance, strategy, again_spectra) == first


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0.1, 0.9))
def test_greedy_is_within_one_purchase_of_the_optimum(seed, fraction):
    """Greedy on convex hulls is optimal for the budget it spends before the last segment (Lagrangian bound)."""
    targets, spectra = problem(seed, count=3)
    limits = RankLimits(round_to=2)
    options = [matrix_options(t.shape, limits, direction_loss(spectra[t.name], "global")) for t in targets]
    allowance = int(fraction * sum(t.params for t in targets))
    if allowance < sum(o.costs[0] for o in options):
        return
    plan = allocate(targets, allowance, "global", spectra, limits)
    greedy = total_loss(plan, spectra, "global")
    largest_step = max(int(np.diff(o.costs[lower_hull(o.costs, o.losses)]).max()) for o in options)

    def optimum(budget):
        best = math.inf
        for choice in itertools.product(*(range(len(o.ranks)) for o in options)):
            if sum(o.costs[i] for o, i in zip(options, choice)) <= budget:
                best = min(best, sum(o.losses[i] for o, i in zip(options, choice)))
        return best

    assert greedy >= optimum(allowance) - 1e-12
    assert greedy <= optimum(allowance - largest_step) + 1e-12


# ---- strategies ------------------------------------------------------------------------------

def test_uniform_matches_svd_llm_rule():
    targets, _ = problem(0, count=5)
    for ratio in (0.3, 0.6, 0.8):
        assert allocate(targets, int(ratio * sum(t.params for t in targets)), "uniform",
                        budget=Budget.parse(str(ratio))) == plan_uniform(targets, ratio)


def test_energy_keeps_the_same_whitened_energy_everywhere():
    targets, spectra = problem(3, count=5)
    plan = allocate(targets, int(0.5 * sum(t.params for t in targets)), "energy", spectra)
    kept, below = [], []
    for name, p in plan.items():
        share = np.cumsum(direction_loss(spectra[name], "energy"))
        kept.append(1.0 if p.rank is None else share[p.rank - 1])
        if p.rank is not None and p.rank > 1:
            below.append(share[p.rank - 2])
    assert min(kept) >= max(below)  # one threshold τ separates every matrix's rank from the rank below it


def test_global_keeps_a_matrix_dense_when_that_removes_the_most_loss():
    """Two identical flat spectra and half the budget: one dense matrix beats two half-rank ones."""
    targets = [Target("a", 16, 16, False), Target("b", 16, 16, False)]
    spectra = {t.name: spectrum((16, 16), np.ones(16)) for t in targets}
    allowance = 256 + 32  # one dense matrix and a rank-1 one
    plan = allocate(targets, allowance, "global", spectra)
    assert sorted([p.rank for p in plan.values()], key=str) == [1, None]
    uniform = allocate(targets, allowance, "uniform")
    assert total_loss(plan, spectra, "global") < total_loss(uniform, spectra, "global")


def test_global_normalizes_scales_but_sensitivity_prices_them():
    """Global ignores a matrix's absolute scale; sensitivity follows the measured price of its errors."""
    targets = [Target("a", 16, 16, False), Target("b", 16, 16, False)]
    sigma = 0.7 ** (np.arange(16) / 2)
    scaled = {"a": spectrum((16, 16), sigma, np.full(16, 1.0)),  # b's errors are 32² = 1024 times a's
              "b": spectrum((16, 16), 32 * sigma, np.full(16, 1.0))}
    same = {"a": spectrum((16, 16), sigma), "b": spectrum((16, 16), sigma)}
    allowance = 8 * 32
    assert allocate(targets, allowance, "global", scaled) == allocate(targets, allowance, "global", same)
    priced = allocate(targets, allowance, "sensitivity", scaled)
    assert rank_key(priced)["b"] > rank_key(priced)["a"]


def test_overrides_fix_ranks_and_still_respect_the_budget():
    targets, spectra = problem(1, count=5)
    names = [t.name for t in targets]
    overrides = {r"layers\.0\.": 2, r"layers\.1\.": "dense", r"layers\.2\.": 0.5}
    allowance = int(0.6 * sum(t.params for t in targets))
    plan = allocate(targets, allowance, "global", spectra, overrides=overrides)
    assert plan[names[0]].rank == 2 and plan[names[1]].rank is None
    assert plan[names[2]].rank == plan_uniform([targets[2]], 0.5)[names[2]].rank
    assert sum(p.params for p in plan.values()) <= allowance
    with pytest.raises(BudgetError, match="matches no target"):
        allocate(targets, allowance, "global", spectra, overrides={"nothing": 4})


def test_max_rank_factors_everything_and_round_to_is_honoured():
    targets, spectra = problem(2, count=5)
    plan = allocate(targets, sum(t.params for t in targets), "global", spectra,
                    RankLimits(min_rank=2, max_rank=4, round_to=2))
    assert all(p.rank in (2, 4) for p in plan.values())


def test_infeasible_budget_names_the_smallest_feasible_one():
    targets, spectra = problem(4)
    model_params = sum(t.params for t in targets) + 1000
    limits = RankLimits(min_rank=3)
    for spec in ("0.01", "model:0.05", "500"):
        with pytest.raises(BudgetError, match=r"smallest feasible plan keeps [\d,]+ target parameters") as info:
            allocate(targets, Budget.parse(spec).allowance(sum(t.params for t in targets), model_params), "global",
                     spectra, limits, budget=Budget.parse(spec), model_params=model_params)
        suggested = str(info.value).split("pass at least --budget ")[1].split(",")[0]
        allowance = Budget.parse(suggested).allowance(sum(t.params for t in targets), model_params)
        allocate(targets, allowance, "global", spectra, limits)  # the suggestion is feasible
    smallest = smallest_allowance(targets, limits, [])
    allocate(targets, smallest, "global", spectra, limits)
    with pytest.raises(BudgetError):
        allocate(targets, smallest - 1, "global", spectra, limits)


# ---- profile → plan on a (tiny) model ----------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_build_plan_records_budget_ratios_and_reloads(strategy, tmp_path):
    model = make_tiny_model("llama")
    targets = find_targets(model)
    windows = random_windows(4, 16)
    plan, stats = plan_model(model, targets, "model:0.8", strategy, windows=windows, batch_size=2,
                             sensitivity_samples=2, progress=False)
    assert (stats is None) == (strategy == "uniform")
    assert plan.strategy == strategy and plan.budget["spec"] == "model:0.8"
    assert plan.model_ratio <= 0.8 and plan.target_ratio < 1
    assert plan.model_params == count_parameters(model)
    assert plan.options["planning_seconds"] >= 0
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.modules == plan.modules and again.budget == plan.budget
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["summary"]["model_ratio"] <= 0.8 and "target_ratio" in data["summary"]


def test_compress_with_a_strategy_calibrates_once_and_follows_the_plan():
    model = make_tiny_model("llama")
    calls = []
    model.model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    windows = random_windows(4, 16)
    plan = compress_model(model, ratio=0.5, strategy="global", windows=windows, batch_size=2, progress=False,
                          sequential=False)
    assert len(calls) == 2  # one-shot: two calibration batches, shared by planning and factoring
    assert plan.strategy == "global" and plan.target_ratio <= 0.5
    for name, rank in plan.factored.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == rank
    for name in set(plan.modules) - set(plan.factored):
        assert isinstance(model.get_submodule(name), torch.nn.Linear)


# ---- CLI ---------------------------------------------------------------------------------------

def test_plan_then_compress_with_the_plan(tiny_model_folder, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    code, stdout, _ = run_cli(capsys, "plan", tiny_model_folder, "--budget", "0.5", "--strategy", "global",
                          "--samples", "4", "--seq-len", "32", "--override", r"layers\.0\.self_attn\.q_proj=4",
                          "-o", plan_file, "--quiet")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["strategy"] == "global" and summary["target_ratio"] <= 0.5
    plan = Plan.load(plan_file)
    assert plan.modules["model.layers.0.self_attn.q_proj"].rank == 4

    code, _, stderr = run_cli(capsys, "plan", tiny_model_folder, "-o", plan_file)
    assert code == 1 and "--overwrite" in stderr

    code, stdout, _ = run_cli(capsys, "compress", tiny_model_folder, "--plan", plan_file, "--samples", "4",
                          "--seq-len", "32", "-o", tmp_path / "out", "--quiet")
    assert code == 0
    saved, _ = read_plan(tmp_path / "out")
    assert saved.modules == plan.modules and saved.strategy == "global"


def test_compress_plans_inline_with_a_strategy_and_budget(tiny_model_folder, tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "compress", tiny_model_folder, "--strategy", "sensitivity", "--budget", "model:0.8",
                          "--samples", "4", "--seq-len", "32", "-o", tmp_path / "out", "--quiet")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["model_ratio"] <= 0.8
    assert read_plan(tmp_path / "out")[0].strategy == "sensitivity"


def test_plan_reports_an_infeasible_budget_in_one_line(tiny_model_folder, tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "plan", tiny_model_folder, "--budget", "0.001", "--strategy", "global",
                               "-o", tmp_path / "p.json")
    assert code == 1 and not (tmp_path / "p.json").exists()
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "pass at least --budget target:0.0" in lines[0]


def test_plan_help_explains_every_option(capsys):
    code, stdout, _ = run_cli(capsys, "plan", "--help")
    assert code == 0
    for option in ("--budget", "--strategy", "--calib", "--override", "--min-rank", "--max-rank", "--round-to",
                   "--sensitivity-samples", "--output", "--quiet", "model:0.7", "90M"):
        assert option in stdout


# ---- the real model ------------------------------------------------------------------------

@pytest.mark.slow
def test_sensitivity_plan_on_smollm2(smollm2):
    """Output Fisher and whitened spectra of all 210 SmolLM2 matrices, then two budgets, in well under a minute.

    It plans on the dense model and compresses nothing, so the shared compression (conftest) has no part here.
    """
    model = smollm2.model
    targets = find_targets(model)
    windows = smollm2_calibration(smollm2.tokenizer)
    plan, stats = plan_model(model, targets, "0.6", "sensitivity", windows=windows, sensitivity_samples=2,
                             batch_size=2, progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert 0.59 <= plan.target_ratio <= 0.6 and len(plan.modules) == 210
    ranks = {p.rank for p in plan.modules.values()}
    assert len(ranks) > 20  # ranks differ across matrices, unlike uniform's handful of shapes
    profile = profile_model(model, targets, stats)
    spectra = {m.name: m for m in profile.matrices}
    larger = plan_targets(targets, count_parameters(model), "0.8", "global", spectra=spectra)
    smaller = plan_targets(targets, count_parameters(model), "0.6", "global", spectra=spectra)
    assert smaller.target_ratio <= 0.6 < larger.target_ratio <= 0.8
    for name, p in smaller.modules.items():
        big = larger.modules[name].rank
        assert big is None or (p.rank is not None and p.rank <= big)


def test_default_strategy_is_sensitivity_for_whitened_models_causal_or_encoders():
    from lowrank.planner import default_strategy

    assert default_strategy("whiten", make_tiny_model("llama")) == "sensitivity"
    assert default_strategy("whiten", make_tiny_model("bert")) == "sensitivity"  # embedding prices: best on MiniLM
    assert default_strategy("svd", make_tiny_model("llama")) == "uniform"
    assert default_strategy("asvd") == "uniform"


def test_plan_from_a_profile_for_method_svd_uses_plain_singular_values():
    from lowrank.planner import plan_profile
    from lowrank.profile import Profile

    a = MatrixProfile("a", (16, 16), torch.ones(16, dtype=torch.float64), whitened=0.5 ** torch.arange(16.0).double(),
                      price=torch.ones(16, dtype=torch.float64))
    b = MatrixProfile("b", (16, 16), 0.5 ** torch.arange(16.0).double(), whitened=torch.ones(16, dtype=torch.float64),
                      price=torch.ones(16, dtype=torch.float64))
    profile = Profile([a, b], whitened=True, model_params=1000)
    whiten = plan_profile(profile, "0.5", "global")
    svd = plan_profile(profile, "0.5", "global", method="svd")
    # whitened: a's energy is concentrated (cheap to truncate), b's flat; plain σ: the other way round
    assert rank_key(whiten.modules)["b"] > rank_key(whiten.modules)["a"]
    assert rank_key(svd.modules)["a"] > rank_key(svd.modules)["b"]
    with pytest.raises(LowrankError, match="prices belong to whitened directions"):
        plan_profile(profile, "0.5", "sensitivity", method="svd")


# ---- the uniform planner, fuzzed --------------------------------------------------------------------------

targets_lists = st.lists(
    st.builds(lambda i, m, n, b: Target(f"layers.{i}.proj", m, n, b),
              st.integers(0, 10**6), st.integers(1, 3000), st.integers(1, 3000), st.booleans()),
    min_size=1, max_size=8, unique_by=lambda t: t.name)


@FUZZ
@given(targets_lists, st.floats(min_value=1e-6, max_value=1.0), st.integers(1, 64))
def test_uniform_plans_are_valid_and_within_budget(targets, ratio, round_to):
    modules = plan_uniform(targets, ratio, round_to)
    plan = Plan(modules=modules)
    assert_valid_plan(plan)
    for target in targets:
        module = modules[target.name]
        assert module.shape == target.shape
        if module.rank is not None:
            assert saves_parameters(module.rank, *target.shape)  # a factored matrix always saves parameters
    assert plan.target_params <= plan.target_params_dense
