"""Rank arithmetic: the break-even rank, what a rank costs, SVD-LLM's uniform rank and its rounding."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import FUZZ
from lowrank.errors import BudgetError
from lowrank.ranks import break_even_rank, check_ratio, kept_params, round_rank, saves_parameters, uniform_rank


@pytest.mark.parametrize("m, n", [(48, 48), (96, 48), (576, 1536), (7, 3), (1, 1)])
def test_break_even_rank_is_the_first_rank_that_saves_nothing(m, n):
    k = break_even_rank(m, n)
    assert not saves_parameters(k, m, n)
    assert k == 1 or saves_parameters(k - 1, m, n)


def test_kept_params_counts_factors_until_dense_is_cheaper():
    assert kept_params(12, 48, 48) == 12 * 96
    assert kept_params(24, 48, 48) == 48 * 48  # 24·96 = 2304 = 48·48: factoring saves nothing
    assert kept_params(100, 576, 1536) == 100 * (576 + 1536)


def test_uniform_rank_follows_svd_llm_and_rounds_down():
    assert uniform_rank(576, 576, 0.8) == int(0.8 * 576 * 576 // 1152) == 230
    assert uniform_rank(576, 576, 0.8, round_to=8) == 224
    assert uniform_rank(4, 4, 0.01) == 1  # never below 1
    assert uniform_rank(16, 16, 0.1, round_to=8) == 8  # never below round_to
    assert round_rank(17, 8) == 16
    with pytest.raises(BudgetError, match="--round-to must be a positive integer"):
        round_rank(5, 0)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_check_ratio_refuses_values_outside_zero_one(ratio):
    with pytest.raises(BudgetError, match="outside \\(0, 1\\]"):
        check_ratio(ratio)
    assert check_ratio(1.0) == 1.0


@FUZZ
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_check_ratio_accepts_exactly_the_unit_interval(ratio):
    inside = not math.isnan(ratio) and 0.0 < ratio <= 1.0
    try:
        assert check_ratio(ratio) == ratio and inside
    except BudgetError as exc:
        assert not inside and "\n" not in str(exc)
