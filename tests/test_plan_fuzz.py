"""Fuzzing plan parsing (and the uniform planner) with Hypothesis.

A plan file is edited by hand, so `Plan.from_dict` meets every kind of garbage. Whatever it is
given, it either returns a valid Plan or raises LowrankError; never a TypeError, KeyError or a
Plan that breaks later.
"""

from __future__ import annotations

import copy
import json
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lowrank.errors import BudgetError, LowrankError
from lowrank.ranks import saves_parameters
from lowrank.plan import PLAN_FORMAT, PLAN_VERSION, Plan
from lowrank.planner import plan_uniform
from lowrank.ranks import check_ratio
from lowrank.targets import Target

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

names = st.from_regex(r"model\.layers\.[0-9]\.(self_attn|mlp)\.[a-z]_proj", fullmatch=True)


@st.composite
def module_entries(draw):
    out_features, in_features = draw(st.integers(1, 4096)), draw(st.integers(1, 4096))
    rank = draw(st.none() | st.integers(1, min(out_features, in_features)))
    return {"shape": [out_features, in_features], "rank": rank}


@st.composite
def valid_plan_dicts(draw):
    """Dictionaries as `Plan.to_dict` writes them, with every optional key present or not."""
    data = {"modules": draw(st.dictionaries(names, module_entries(), min_size=1, max_size=6))}
    optional = {
        "format": st.just(PLAN_FORMAT), "version": st.integers(0, PLAN_VERSION),
        "method": st.sampled_from(["whiten", "asvd", "svd"]), "strategy": st.text(max_size=10),
        "budget": st.dictionaries(st.text(max_size=6), json_scalars, max_size=3), "source": st.none() | st.text(max_size=10),
        "tool_version": st.none() | st.text(max_size=6),
        "options": st.dictionaries(st.text(max_size=6), json_scalars, max_size=3),
        "model_params": st.none() | st.integers(1, 10**12), "summary": st.dictionaries(st.text(max_size=6), json_scalars),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            data[key] = draw(strategy)
    return data


@st.composite
def mutated_plan_dicts(draw):
    """A valid plan dictionary with one to three keys deleted, replaced by junk or added."""
    data = copy.deepcopy(draw(valid_plan_dicts()))
    for _ in range(draw(st.integers(1, 3))):
        module = draw(st.sampled_from(sorted(data["modules"]))) if isinstance(data.get("modules"), dict) and data["modules"] else None
        action = draw(st.sampled_from(["drop", "junk", "add", "module-junk", "module-drop", "module-add", "modules-junk"]))
        if action == "drop" and data:
            data.pop(draw(st.sampled_from(sorted(data))))
        elif action == "junk" and data:
            data[draw(st.sampled_from(sorted(data)))] = draw(json_values)
        elif action == "add":
            data[draw(st.text(max_size=8))] = draw(json_values)
        elif action == "modules-junk":
            data["modules"] = draw(json_values)
        elif module is not None and isinstance(data["modules"][module], dict):
            entry = data["modules"][module]
            if action == "module-junk":
                entry[draw(st.sampled_from(["shape", "rank"]))] = draw(json_values)
            elif action == "module-drop":
                entry.pop(draw(st.sampled_from(["shape", "rank"])), None)
            else:
                entry[draw(st.text(max_size=6))] = draw(json_values)
    return data


def assert_valid(plan: Plan) -> None:
    """Everything later code relies on: sane shapes and ranks, typed fields, a JSON round trip."""
    assert isinstance(plan, Plan) and plan.modules
    for name, module in plan.modules.items():
        assert isinstance(name, str)
        out_features, in_features = module.shape
        for size in module.shape:
            assert type(size) is int and size > 0
        if module.rank is not None:
            assert type(module.rank) is int and 1 <= module.rank <= min(out_features, in_features)
    assert isinstance(plan.method, str) and isinstance(plan.strategy, str)
    assert isinstance(plan.budget, dict) and isinstance(plan.options, dict)
    assert plan.model_params is None or type(plan.model_params) is int
    summary = plan.summary()
    assert summary["modules"] == len(plan.modules) and summary["target_params_dense"] > 0
    text = json.dumps(plan.to_dict())
    again = Plan.from_dict(json.loads(text))
    assert again.modules == plan.modules and again.method == plan.method


def parse(data) -> Plan | None:
    try:
        return Plan.from_dict(data)
    except LowrankError as exc:
        assert str(exc) and "\n" not in str(exc)  # one line for the CLI
        return None


@FUZZ
@given(valid_plan_dicts())
def test_valid_plans_parse_and_round_trip(data):
    plan = Plan.from_dict(data)
    assert_valid(plan)
    assert {name: m.rank for name, m in plan.modules.items()} == {n: e["rank"] for n, e in data["modules"].items()}


@FUZZ
@given(mutated_plan_dicts())
def test_mutated_plans_are_parsed_or_refused(data):
    plan = parse(data)
    if plan is not None:
        assert_valid(plan)


@FUZZ
@given(json_values)
def test_arbitrary_json_is_parsed_or_refused(data):
    plan = parse(data)
    if plan is not None:
        assert_valid(plan)


@FUZZ
@given(valid_plan_dicts(), st.sampled_from(["rank", "shape"]))
def test_impossible_ranks_are_refused(data, field):
    """A rank above min(out, in), or a shape shrunk below the rank, never gets through."""
    name = sorted(data["modules"])[0]
    entry = data["modules"][name]
    out_features, in_features = entry["shape"]
    if field == "rank":
        entry["rank"] = min(out_features, in_features) + 1
    else:
        entry["rank"] = entry["rank"] or 2
        entry["shape"] = [entry["rank"] - 1 or 1, in_features] if entry["rank"] > 1 else [1, 1]
        if entry["rank"] <= min(entry["shape"]):
            return
    assert parse(data) is None


# ---- the uniform planner --------------------------------------------------------------------------

targets_lists = st.lists(
    st.builds(lambda i, m, n, b: Target(f"layers.{i}.proj", m, n, b),
              st.integers(0, 10**6), st.integers(1, 3000), st.integers(1, 3000), st.booleans()),
    min_size=1, max_size=8, unique_by=lambda t: t.name)


@FUZZ
@given(targets_lists, st.floats(min_value=1e-6, max_value=1.0), st.integers(1, 64))
def test_uniform_plans_are_valid_and_within_budget(targets, ratio, round_to):
    modules = plan_uniform(targets, ratio, round_to)
    plan = Plan(modules=modules)
    assert_valid(plan)
    for target in targets:
        module = modules[target.name]
        assert module.shape == target.shape
        if module.rank is not None:
            assert saves_parameters(module.rank, *target.shape)  # a factored matrix always saves parameters
    assert plan.target_params <= plan.target_params_dense


@FUZZ
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_check_ratio_accepts_exactly_the_unit_interval(ratio):
    inside = not math.isnan(ratio) and 0.0 < ratio <= 1.0
    try:
        assert check_ratio(ratio) == ratio and inside
    except BudgetError as exc:
        assert not inside and "\n" not in str(exc)


# ---- budgets ------------------------------------------------------------------------------------------

budget_texts = st.one_of(
    st.text(max_size=14),
    st.builds(lambda scope, number, suffix: f"{scope}{number}{suffix}",
              st.sampled_from(["", "target:", "model:", "Model: ", "layers:"]),
              st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**13)).map(str),
              st.sampled_from(["", "K", "M", "B", "g", "T", "X", " "])),
)


def parse_budget(text):
    from lowrank.budget import Budget

    try:
        return Budget.parse(text)
    except BudgetError as exc:
        assert "\n" not in str(exc)
        return None


@FUZZ
@given(budget_texts)
def test_budget_text_is_parsed_or_refused(text):
    """Any --budget text gives a finite Budget of a known scope and kind, or a BudgetError; nothing else."""
    budget = parse_budget(text)
    if budget is not None:
        assert budget.scope in ("target", "model") and budget.kind in ("fraction", "count")
        assert math.isfinite(budget.value) and budget.value >= 0
        if budget.kind == "fraction":
            assert 0 < budget.value <= 1


@FUZZ
@example("0K")
@example("0.001953125")
@example("0.001K")
@given(budget_texts)
def test_budget_is_positive_and_its_text_reads_back(text):
    """Found by fuzzing: every accepted budget keeps at least one parameter, and `text` is canonical."""
    from lowrank.budget import Budget

    budget = parse_budget(text)
    if budget is not None:
        assert budget.value > 0
        assert Budget.parse(budget.text) == budget
