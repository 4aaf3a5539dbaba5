"""The theory of the three truncations, checked on random data in float64."""

import pytest
import torch

from lowrank.factorize import (asvd_factors, factorize, gram_svdvals, output_error, svd_factors, top_singular,
                               whiten_factors, whitened_singular_values, whitening)


def correlated_inputs(n_tokens=400, dim=24, seed=0):
    """Inputs with very unequal channel scales and correlations, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    scales = torch.logspace(-2, 1, dim, dtype=torch.float64)
    return (torch.randn(n_tokens, dim, generator=g, dtype=torch.float64) * scales) @ mixing


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 24, generator=g, dtype=torch.float64)
    x = correlated_inputs()
    return weight, x, x.T @ x


def all_methods(weight, x, gram, rank):
    return {
        "svd": svd_factors(weight, rank),
        "asvd": asvd_factors(weight, x.abs().mean(0), rank),
        "whiten": whiten_factors(weight, gram, rank),
    }


def relative_output_error(weight, approx, x):
    return float(torch.linalg.norm((weight - approx) @ x.T) / torch.linalg.norm(weight @ x.T))


def test_full_rank_reproduces_wx(problem):
    weight, x, gram = problem
    for method, factors in all_methods(weight, x, gram, 16).items():
        assert factors.down.shape == (16, 24) and factors.up.shape == (16, 16)
        assert relative_output_error(weight, factors.matrix(), x) < 1e-6, method


@pytest.mark.parametrize("rank", [1, 3, 8, 12, 15])
def test_whiten_has_least_output_error(problem, rank):
    weight, x, gram = problem
    errors = {m: output_error(weight, f.matrix(), gram) for m, f in all_methods(weight, x, gram, rank).items()}
    assert errors["whiten"] <= errors["svd"] * (1 + 1e-9)
    assert errors["whiten"] <= errors["asvd"] * (1 + 1e-9)


@pytest.mark.parametrize("rank", [1, 5, 10, 15])
def test_whiten_error_is_sum_of_dropped_whitened_sigma_squared(problem, rank):
    weight, x, gram = problem
    # Exact without the ridge; with the default ridge (1e-6 of the mean eigenvalue) nearly so.
    sigma = whitened_singular_values(weight, gram, damping=0.0)
    measured = float(torch.linalg.norm((weight - whiten_factors(weight, gram, rank, damping=0.0).matrix()) @ x.T) ** 2)
    assert measured == pytest.approx(float((sigma[rank:] ** 2).sum()), rel=1e-9)
    damped = float(torch.linalg.norm((weight - whiten_factors(weight, gram, rank).matrix()) @ x.T) ** 2)
    assert damped == pytest.approx(measured, rel=0.05)


def test_whiten_gap_is_large_on_skewed_inputs(problem):
    """Not just ≤: on inputs with skewed scales, whitening is far better than plain SVD."""
    weight, x, gram = problem
    factors = all_methods(weight, x, gram, 6)
    assert output_error(weight, factors["whiten"].matrix(), gram) < 0.5 * output_error(weight, factors["svd"].matrix(), gram)


def test_svd_is_the_frobenius_optimum(problem):
    weight, _, _ = problem
    s = torch.linalg.svdvals(weight)
    approx = svd_factors(weight, 5).matrix()
    assert float(torch.linalg.norm(weight - approx) ** 2) == pytest.approx(float((s[5:] ** 2).sum()), rel=1e-9)


def test_whitening_of_singular_gram_is_finite():
    x = correlated_inputs(n_tokens=10, dim=24)  # 10 tokens: Gram of rank 10 in 24 dims
    gram = x.T @ x
    white = whitening(gram)
    assert torch.isfinite(white.root).all() and torch.isfinite(white.inverse).all()
    weight = torch.randn(8, 24, dtype=torch.float64)
    factors = whiten_factors(weight, gram, 8)
    assert torch.isfinite(factors.matrix()).all()
    # Full rank still reproduces W on every input, seen or not.
    assert torch.allclose(factors.matrix(), weight, atol=1e-6)


def test_factors_are_balanced(problem):
    weight, _, gram = problem
    f = whiten_factors(weight, gram, 6)
    up_norms = torch.linalg.norm(f.up, dim=0)
    # √σ split: each column of up has norm √σᵢ
    sigma = whitened_singular_values(weight, gram)[:6]
    assert torch.allclose(up_norms, sigma.sqrt(), rtol=1e-6)


def test_dispatch_errors():
    weight = torch.randn(4, 4)
    with pytest.raises(Exception, match="needs calibration"):
        factorize("whiten", weight, 2)
    with pytest.raises(Exception, match="unknown method"):
        factorize("qr", weight, 2)


def test_asvd_beats_svd_on_skewed_channels():
    """ASVD's home ground: uncorrelated input channels of very different scales."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 24, generator=g, dtype=torch.float64)
    x = torch.randn(400, 24, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 24, dtype=torch.float64)
    gram = x.T @ x
    for rank in (2, 6, 10):
        svd_error = output_error(weight, svd_factors(weight, rank).matrix(), gram)
        asvd_error = output_error(weight, asvd_factors(weight, x.abs().mean(0), rank).matrix(), gram)
        assert asvd_error < 0.5 * svd_error


@pytest.mark.parametrize("shape", [(40, 40), (24, 64), (64, 24), (3, 96)])
def test_gram_singular_values_match_an_svd(shape):
    """σ from the smaller Gram's eigenvalues: descending, σ² exact to ~ε·σ₁², tall and wide alike."""
    generator = torch.Generator().manual_seed(7)
    stack = torch.randn(5, *shape, generator=generator, dtype=torch.float64)
    if shape[0] <= shape[1]:
        stack[0, 0, :] = 0.0  # a rank-deficient member: one zero row of a wide matrix…
    else:
        stack[0, :, 0] = 0.0  # …or one zero column of a tall one
    sigma = gram_svdvals(stack)
    reference = torch.linalg.svdvals(stack)
    assert sigma.shape == reference.shape == (5, min(shape))
    assert torch.all(sigma[:, :-1] >= sigma[:, 1:])
    top = reference[:, :1]
    assert ((sigma ** 2 - reference ** 2).abs() / top ** 2).max() < 1e-13
    assert ((sigma - reference).abs() / top).max() < 1e-7
    assert sigma[0, -1] == 0  # the zeroed row's or column's singular value


def test_gram_singular_values_of_a_constructed_matrix():
    """U diag(σ) Vᵀ with orthonormal U, V gives back exactly σ (to the Gram route's precision)."""
    generator = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(50, 6, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 6, generator=generator, dtype=torch.float64))
    known = torch.tensor([9.0, 5.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    sigma = gram_svdvals(u @ torch.diag(known) @ v.T)
    assert torch.allclose(sigma[:6], known, rtol=1e-12)
    assert torch.all(sigma[6:] == 0)  # the 24 zero singular values fall below the rounding floor


def test_whitening_cache_computes_one_whitening_per_shared_input():
    from lowrank.calibration import ActivationStats
    from lowrank.factorize import WhiteningCache

    generator = torch.Generator().manual_seed(3)
    shared, alone = ActivationStats.empty(5), ActivationStats.empty(5)
    shared.update(torch.randn(40, 5, generator=generator, dtype=torch.float64))
    alone.update(torch.randn(40, 5, generator=generator, dtype=torch.float64))
    cache = WhiteningCache(damping=0.0)
    first = cache.get(shared, "q")
    assert cache.get(shared, "k") is first  # q and k read one input: one whitening
    other = cache.get(alone, "o")
    assert other is not first
    torch.testing.assert_close(other.root @ other.root.T, alone.gram, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(7, 12), (12, 7), (9, 9)])
def test_top_singular_equals_the_svd(shape):
    """The eigh route gives the SVD's σ and, up to sign, its leading vectors; A ≈ U diag(σ) Vᵀ at full k."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -3, shape[1], dtype=torch.float64))
    u, s, vh = top_singular(a)
    u_ref, s_ref, vh_ref = torch.linalg.svd(a, full_matrices=False)
    assert torch.allclose(s, s_ref, rtol=1e-10, atol=1e-12)
    signs = torch.sign((u * u_ref).sum(0))
    assert torch.allclose(u * signs, u_ref, atol=1e-8)
    assert torch.allclose(vh * signs[:, None], vh_ref, atol=1e-8)
    assert torch.allclose((u * s) @ vh, a, atol=1e-12)
    u3, s3, vh3 = top_singular(a, 3)
    assert u3.shape == (shape[0], 3) and vh3.shape == (3, shape[1]) and torch.allclose(s3, s_ref[:3], rtol=1e-12)


def test_top_singular_zeroes_directions_below_rounding_and_truncation_falls_back_to_the_svd():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 8, generator=g, dtype=torch.float64)
    u, s, vh = top_singular(a)  # rank 3: five σ are rounding noise; tall, so U = A V / σ is the divided side
    assert (s[3:] == 0).all() and (u[:, 3:] == 0).all() and torch.isfinite(vh).all()
    u, s, vh = top_singular(a.T)  # wide: Vᵀ = Uᵀ A / σ is
    assert (s[3:] == 0).all() and (vh[3:] == 0).all() and torch.isfinite(u).all()
    factors = svd_factors(a, 8)  # every direction asked for: the fallback SVD keeps the result finite and exact
    assert torch.isfinite(factors.up).all() and torch.allclose(factors.matrix(), a, atol=1e-12)
