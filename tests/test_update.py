"""The closed-form update: `refit_up` is the ridge least-squares solution."""

import torch

from lowrank.factorize import whiten_factors
from lowrank.update import refit_up


def test_refit_up_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    x_dense = torch.randn(300, 12, generator=g, dtype=torch.float64)
    x_comp = x_dense + 0.3 * torch.randn(300, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(7, 12, generator=g, dtype=torch.float64)
    down = torch.randn(4, 12, generator=g, dtype=torch.float64)
    up = refit_up(weight, down, x_comp.T @ x_comp, x_dense.T @ x_comp, ridge=0.0)
    codes = x_comp @ down.T  # (tokens, k)
    expected = torch.linalg.lstsq(codes, x_dense @ weight.T).solution.T
    assert torch.allclose(up, expected, atol=1e-8)
    # Without `cross`, the target is W applied to the compressed inputs themselves.
    up_own = refit_up(weight, down, x_comp.T @ x_comp, None, ridge=0.0)
    assert torch.allclose(up_own, torch.linalg.lstsq(codes, x_comp @ weight.T).solution.T, atol=1e-8)


def test_refit_up_leaves_whitened_truncation_unchanged_on_its_own_inputs():
    """Whitened truncation's `up` is already the least-squares optimum for its `down` and Gram matrix."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 10, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 10, dtype=torch.float64)
    weight = torch.randn(6, 10, generator=g, dtype=torch.float64)
    factors = whiten_factors(weight, x.T @ x, 3, damping=0.0)
    assert torch.allclose(refit_up(weight, factors.down, x.T @ x, ridge=0.0), factors.up, atol=1e-8)


