"""Plans: fuzzing `Plan.from_dict` with Hypothesis.

A plan file is edited by hand, so `Plan.from_dict` meets every kind of garbage. Whatever it is
given, it either returns a valid Plan or raises LowrankError; never a TypeError, KeyError or a
Plan that breaks later.
"""

from __future__ import annotations

import copy

from hypothesis import given
from hypothesis import strategies as st

from helpers import FUZZ, assert_valid_plan
from lowrank.errors import LowrankError
from lowrank.plan import PLAN_FORMAT, PLAN_VERSION, Plan

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
    assert_valid_plan(plan)
    assert {name: m.rank for name, m in plan.modules.items()} == {n: e["rank"] for n, e in data["modules"].items()}


@FUZZ
@given(mutated_plan_dicts())
def test_mutated_plans_are_parsed_or_refused(data):
    plan = parse(data)
    if plan is not None:
        assert_valid_plan(plan)


@FUZZ
@given(json_values)
def test_arbitrary_json_is_parsed_or_refused(data):
    plan = parse(data)
    if plan is not None:
        assert_valid_plan(plan)


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
