"""The closed-form update: `refit_up` is the ridge least-squares solution."""

import torch

from lowrank.factorize import whiten_factors
from lowrank.update import refit_both, refit_up


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




def _regression_data(seed: int):
    g = torch.Generator().manual_seed(seed)
    x_dense = torch.randn(400, 12, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 12, dtype=torch.float64)
    x_comp = x_dense + 0.3 * torch.randn(400, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 12, generator=g, dtype=torch.float64)
    return x_dense, x_comp, weight


def test_refit_both_is_the_reduced_rank_regression():
    """Classical reduced-rank regression: project the least-squares fit onto the top-k directions of its outputs."""
    x_dense, x_comp, weight = _regression_data(2)
    target = x_dense @ weight.T  # (tokens, out)
    full = torch.linalg.lstsq(x_comp, target).solution.T  # M̂ (out, in)
    _, _, vh = torch.linalg.svd(x_comp @ full.T, full_matrices=False)
    projector = vh[:4].T @ vh[:4]  # (out, out) onto the top-4 output directions of the fitted values
    factors = refit_both(weight, x_comp.T @ x_comp, x_dense.T @ x_comp, 4, ridge=0.0)
    assert factors.down.shape == (4, 12) and factors.up.shape == (9, 4)
    assert torch.allclose(factors.matrix(), projector @ full, atol=1e-8)


def test_refit_both_beats_refitting_up_alone_and_matches_whitening_on_its_own_inputs():
    x_dense, x_comp, weight = _regression_data(3)
    gram, cross = x_comp.T @ x_comp, x_dense.T @ x_comp

    def error(matrix):
        return (x_dense @ weight.T - x_comp @ matrix.T).pow(2).sum().item()

    for rank in (1, 3, 6):
        down = whiten_factors(weight, gram, rank, damping=0.0).down
        up_only = refit_up(weight, down, gram, cross, ridge=0.0) @ down
        both = refit_both(weight, gram, cross, rank, ridge=0.0).matrix()
        assert error(both) < error(up_only) * (1 - 1e-6)
    own = refit_both(weight, gram, gram, 3, ridge=0.0).matrix()  # target W·X_c: plain whitened truncation
    assert torch.allclose(own, whiten_factors(weight, gram, 3, damping=0.0).matrix(), atol=1e-8)
