"""LowRankLinear and the break-even rule."""

import pytest
import torch

from lowrank.factorize import Factors
from lowrank.layers import LowRankLinear
from lowrank.ranks import break_even_rank, saves_parameters, uniform_rank
from lowrank.planner import plan_uniform
from lowrank.targets import Target


def test_forward_is_up_down_plus_bias():
    down, up, bias = torch.randn(3, 10), torch.randn(7, 3), torch.randn(7)
    layer = LowRankLinear.from_factors(Factors(down=down, up=up), bias=bias)
    x = torch.randn(5, 10)
    assert torch.allclose(layer(x), x @ (up @ down).T + bias, atol=1e-5)
    assert torch.allclose(layer.merged_weight(), up @ down)
    assert sum(p.numel() for p in layer.parameters()) == 3 * (7 + 10) + 7


def test_rank_bounds():
    with pytest.raises(ValueError):
        LowRankLinear(10, 7, 8)


@pytest.mark.parametrize("m, n", [(576, 576), (1536, 576), (192, 576), (7, 3)])
def test_break_even(m, n):
    k = break_even_rank(m, n)
    assert not saves_parameters(k, m, n)
    assert saves_parameters(k - 1, m, n)


def test_uniform_rank_formula_and_rounding():
    assert uniform_rank(576, 576, 0.8) == int(0.8 * 576 * 576 // 1152) == 230
    assert uniform_rank(1536, 576, 0.6) == int(0.6 * 1536 * 576 // 2112) == 251
    assert uniform_rank(1536, 576, 0.6, round_to=8) == 248
    assert uniform_rank(192, 576, 0.8) == 115


def test_uniform_plan_keeps_dense_where_nothing_is_saved():
    targets = [Target("a", 576, 576, False), Target("b", 4, 4, False)]
    full = plan_uniform(targets, 1.0)
    assert full["a"].rank is None and full["b"].rank is None  # ratio 1 saves nothing anywhere
    half = plan_uniform(targets, 0.5)
    assert half["a"].rank == 144 and half["a"].params == 144 * 1152
    assert half["b"].rank == 1
