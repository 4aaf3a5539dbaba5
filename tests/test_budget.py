"""Budgets, rank limits and overrides: parsing, the allowance they give, and what they reject."""

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import FUZZ
from lowrank.budget import Budget, Override, RankLimits, _round_up, format_count, parse_count, parse_overrides
from lowrank.errors import BudgetError
from lowrank.ranks import saves_parameters


@pytest.mark.parametrize("text, scope, kind, value", [
    ("0.6", "target", "fraction", 0.6),
    ("target:0.6", "target", "fraction", 0.6),
    ("model:0.7", "model", "fraction", 0.7),
    ("1", "target", "fraction", 1.0),
    ("90M", "model", "count", 90_000_000),
    ("1.2B", "model", "count", 1_200_000_000),
    ("500k", "model", "count", 500_000),
    ("123456", "model", "count", 123456),
    ("target:40M", "target", "count", 40_000_000),
    ("model:90M", "model", "count", 90_000_000),
])
def test_budget_forms(text, scope, kind, value):
    budget = Budget.parse(text)
    assert (budget.scope, budget.kind, budget.value) == (scope, kind, value)
    assert Budget.parse(budget.text) == budget


@pytest.mark.parametrize("text", ["0", "-0.5", "nan", "inf", "lots", "layer:0.5", "90Q", "target:", ""])
def test_bad_budgets_are_rejected(text):
    with pytest.raises(BudgetError):
        Budget.parse(text)


def test_allowance_of_each_form():
    target, model = 1_000_000, 1_500_000  # 500k parameters outside the targets
    assert Budget.parse("0.6").allowance(target, model) == 600_000
    assert Budget.parse("model:0.7").allowance(target, model) == 1_050_000 - 500_000
    assert Budget.parse("1.2M").allowance(target, model) == 700_000
    assert Budget.parse("target:300K").allowance(target, model) == 300_000
    with pytest.raises(BudgetError, match="whole model"):
        Budget.parse("model:0.7").allowance(target, None)


@given(st.floats(min_value=1e-6, max_value=1e12, allow_nan=False), st.integers(1, 6))
def test_round_up_never_names_a_smaller_budget(value, digits):
    text = _round_up(value, digits)
    assert float(text) >= value * (1 - 1e-12)


@given(st.integers(min_value=1, max_value=10**12))
def test_counts_round_trip_within_rounding(count):
    assert math.isclose(parse_count(format_count(count)), count, rel_tol=1e-3)


def test_rank_limits_list_only_ranks_that_save_parameters():
    limits = RankLimits(min_rank=3, max_rank=None, round_to=4)
    ranks = limits.ranks((48, 96))
    assert ranks[0] == 4 and all(k % 4 == 0 for k in ranks)
    assert all(saves_parameters(k, 48, 96) for k in ranks)
    assert not saves_parameters(ranks[-1] + 4, 48, 96)
    assert limits.allows_dense()
    capped = RankLimits(max_rank=10)
    assert capped.ranks((48, 96))[-1] == 10 and not capped.allows_dense()


@pytest.mark.parametrize("kwargs", [{"round_to": 0}, {"min_rank": 0}, {"min_rank": 8, "max_rank": 4}])
def test_bad_rank_limits(kwargs):
    with pytest.raises(BudgetError):
        RankLimits(**kwargs)


def test_overrides_parse_ranks_fractions_and_dense():
    parsed = parse_overrides([r"mlp\.down=64", "q_proj=0.5", "layers\\.0\\.=dense"])
    assert [(o.pattern, o.rank) for o in parsed] == [(r"mlp\.down", 64), ("q_proj", 0.5), ("layers\\.0\\.", "dense")]
    assert parsed[0].matches("model.layers.3.mlp.down_proj") and not parsed[0].matches("model.layers.3.mlp.up_proj")
    assert parsed[1].matches("model.layers.3.self_attn.q_proj")
    assert parse_overrides({"a=b": 8})[0].pattern == "a=b"  # dict form keeps '=' inside the regex


@pytest.mark.parametrize("text", ["noequals", "=5", "x=0", "x=1.5", "x=many", "(=4"])
def test_bad_overrides(text):
    with pytest.raises(BudgetError):
        Override.parse(text)


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
