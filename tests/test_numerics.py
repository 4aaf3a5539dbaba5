"""Numerical safety: whitening on singular and badly conditioned Gram matrices, low-precision models.

The yardstick for every whitening test is the optimum: no rank-k W′ has a smaller output error
trace((W−W′) G (W−W′)ᵀ) than Σ_{i>k} σᵢ(W·G^½)² (Eckart–Young on W·G^½), computed here
independently by an eigendecomposition in float64.

Cross-cutting (tests/ mirrors lowrank/ otherwise): factorize, calibration and compression
together, on statistics built to be singular, badly conditioned or in low precision.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import CAUSAL_ARCHITECTURES, make_tiny_model, random_windows
from lowrank import factorize
from lowrank.calibration import ActivationStats, add_gram_
from lowrank.compression import apply_plan, compress_model
from lowrank.errors import LowrankError
from lowrank.factorize import (DEFAULT_DAMPING, RIDGE_RETRIES, cholesky_in_place, output_error, svd_factors,
                               whiten_factors, whitened_singular_values, whitening)
from lowrank.layers import LowRankLinear
from lowrank.plan import ModulePlan, Plan
from lowrank.targets import weight_matrix


def optimal_error(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[float, float]:
    """(the smallest rank-`rank` output error, the total output energy ‖W·G^½‖²_F)."""
    values, vectors = torch.linalg.eigh(gram.double())
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    sigma = torch.linalg.svdvals(weight.double() @ root)
    return float((sigma[rank:] ** 2).sum()), float((sigma ** 2).sum())


def random_weight(out_features: int = 24, in_features: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gram_with_spectrum(eigenvalues: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Q diag(λ) Qᵀ for a random orthogonal Q: a Gram matrix with exactly the given spectrum."""
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * eigenvalues.double()) @ q.T


def activations_gram(n_tokens: int, dim: int, rank: int | None = None, scales=None, seed: int = 2) -> torch.Tensor:
    """XᵀX of random activations, optionally of rank `rank` and with per-channel `scales`."""
    generator = torch.Generator().manual_seed(seed)
    if rank is None:
        x = torch.randn(n_tokens, dim, generator=generator, dtype=torch.float64)
    else:
        x = torch.randn(n_tokens, rank, generator=generator, dtype=torch.float64) @ torch.randn(
            rank, dim, generator=generator, dtype=torch.float64)
    if scales is not None:
        x = x * scales
    return x.T @ x


def check_whitening_is_sound(weight: torch.Tensor, gram: torch.Tensor, rank: int, slack: float = 1e-5) -> None:
    """Finite S and S⁻¹, S S⁻¹ = I, and whitened truncation within `slack`·energy of the optimum."""
    white = whitening(gram)
    assert torch.isfinite(white.root).all() and torch.isfinite(white.inverse).all()
    identity = torch.eye(gram.shape[0], dtype=torch.float64)
    assert torch.allclose(white.root @ white.inverse, identity, atol=1e-6)
    factors = whiten_factors(weight, gram, rank)
    assert torch.isfinite(factors.down).all() and torch.isfinite(factors.up).all()
    assert factors.down.shape == (rank, weight.shape[1]) and factors.up.shape == (weight.shape[0], rank)
    error = output_error(weight, factors.matrix(), gram)
    best, energy = optimal_error(weight, gram, rank)
    assert best - 1e-9 * energy <= error <= best + slack * energy, (error, best, energy)


@pytest.mark.parametrize("rank", [4, 12, 20])
def test_exactly_singular_gram(rank):
    """Fewer tokens than channels: G = XᵀX has 10 zero eigenvalues (in exact arithmetic)."""
    weight, gram = random_weight(), activations_gram(n_tokens=22, dim=32)
    assert torch.linalg.matrix_rank(gram) == 22
    check_whitening_is_sound(weight, gram, rank)


def test_rank_deficient_inputs_are_reproduced_exactly():
    """Inputs living in an 8-dimensional subspace: rank 8 already reaches zero output error."""
    weight, gram = random_weight(), activations_gram(n_tokens=500, dim=32, rank=8)
    check_whitening_is_sound(weight, gram, rank=8)
    factors = whiten_factors(weight, gram, 8)
    _, energy = optimal_error(weight, gram, 8)
    assert output_error(weight, factors.matrix(), gram) < 1e-5 * energy
    # plain SVD ignores the subspace and pays for it
    assert output_error(weight, svd_factors(weight, 8).matrix(), gram) > 0.1 * energy


def test_dead_input_channels():
    """Channels that are always zero give zero rows and columns in G."""
    scales = torch.ones(32, dtype=torch.float64)
    scales[::3] = 0.0
    check_whitening_is_sound(random_weight(), activations_gram(400, 32, scales=scales), rank=10)


@pytest.mark.parametrize("condition", [1e12, 1e16, 1e24])
def test_badly_conditioned_gram(condition):
    """Spectra spanning 12, 16 and 24 orders of magnitude (Cholesky in float64 cannot see the bottom)."""
    eigenvalues = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 32, dtype=torch.float64)
    check_whitening_is_sound(random_weight(), gram_with_spectrum(eigenvalues), rank=12)


@pytest.mark.parametrize("scale", [1e-150, 1e-30, 1e30, 1e150])
def test_gram_scale_does_not_matter(scale):
    """Activations of any magnitude: damping is relative, so the factors do not change with the scale."""
    weight, gram = random_weight(), activations_gram(300, 32, scales=torch.logspace(-3, 3, 32, dtype=torch.float64))
    reference = whiten_factors(weight, gram, 12).matrix()
    scaled = whiten_factors(weight, gram * scale, 12).matrix()
    assert torch.isfinite(scaled).all()
    assert torch.allclose(scaled, reference, rtol=1e-6, atol=1e-9 * reference.abs().max())


def test_gram_slightly_indefinite_from_rounding():
    """Accumulated rounding can leave tiny negative eigenvalues; they must not turn into NaN."""
    eigenvalues = torch.cat([torch.logspace(0, -8, 28, dtype=torch.float64), torch.full((4,), -1e-14)])
    gram = gram_with_spectrum(eigenvalues)
    assert torch.linalg.eigvalsh(gram).min() < 0
    check_whitening_is_sound(random_weight(), gram, rank=12)
    assert torch.isfinite(whitened_singular_values(random_weight(), gram)).all()


def float32_gram_of_few_tokens(n: int = 256, tokens: int = 128, outlier: float = 100.0, seed: int = 0) -> torch.Tensor:
    """XᵀX as calibration sums it (float32 products of 32-token batches, float64 sums) for fewer tokens
    than channels, one direction 100 × the others as in LLM activations: singular, and its rounding
    leaves eigenvalues about −1.7e-6 × the mean eigenvalue, below the ridge δ = 1e-6 × it."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    scales = torch.ones(n, dtype=torch.float64)
    scales[0] = outlier
    x = ((torch.randn(tokens, n, generator=generator, dtype=torch.float64) * scales) @ basis).float()
    gram = torch.zeros(n, n, dtype=torch.float64)
    for batch in x.split(32):
        add_gram_(gram, batch)
    return gram


def test_a_singular_float32_gram_is_whitened_by_cholesky_with_a_larger_ridge(monkeypatch):
    """Where δ does not cover the rounding, Cholesky with 10 δ does: no eigendecomposition (ten times the
    flops), and the truncation is the optimum's, as with the eigendecomposition's root."""
    gram = float32_gram_of_few_tokens()
    symmetric, scale = (gram + gram.T) / 2, gram.diagonal().mean()
    plain = symmetric.clone()
    plain.diagonal().add_(DEFAULT_DAMPING * scale)
    assert cholesky_in_place(plain) is None  # the case at hand: the ridge δ alone fails
    calls = []
    eigh = factorize.symmetric_eigh
    monkeypatch.setattr(factorize, "symmetric_eigh", lambda *a, **k: calls.append(1) or eigh(*a, **k))
    white = whitening(gram)
    assert white.lower is not None and not calls
    retried = symmetric.clone()
    retried.diagonal().add_(RIDGE_RETRIES[0] * DEFAULT_DAMPING * scale)
    expected = torch.linalg.cholesky(retried)
    assert torch.allclose(white.lower, expected, rtol=0, atol=1e-12 * expected.abs().max())
    whitening(gram, damping=0.0)  # no ridge asked for: no larger one tried either
    assert len(calls) == 1
    monkeypatch.setattr(factorize, "RIDGE_RETRIES", ())
    eigen = whitening(gram)  # what whitening did before the retries: the eigendecomposition's root
    assert eigen.lower is None and len(calls) == 2
    weight = random_weight(96, 256)
    for rank in (8, 32, 64):
        best, energy = optimal_error(weight, gram, rank)  # plain SVD is 0.14–0.79 × energy above it
        for root in (white, eigen):
            error = output_error(weight, whiten_factors(weight, gram, rank, white=root).matrix(), gram)
            assert abs(error - best) <= 1e-6 * energy, (rank, error, best, energy)


def test_cholesky_retries_stop_at_the_largest_ridge_allowed(monkeypatch):
    """Eigenvalues of −0.0057 × the mean: only a ridge of 1e-2 would let Cholesky through, above
    MAX_RETRY_RIDGE (1e-3), so retries go up to it and the eigendecomposition takes over; a damping of
    1e-2 asked for is used as it is."""
    gram = gram_with_spectrum(torch.cat([torch.ones(28), torch.full((4,), -0.005)]))
    scale = float(gram.diagonal().mean())
    tried = []
    cholesky = factorize.cholesky_in_place

    def watched(matrix):
        tried.append(round(float((matrix.diagonal() - gram.diagonal()).mean()) / scale, 9))
        return cholesky(matrix)

    monkeypatch.setattr(factorize, "cholesky_in_place", watched)
    for damping, ridges, path in ((1e-6, [1e-6, 1e-5, 1e-4, 1e-3], "eigh"), (1e-4, [1e-4, 1e-3], "eigh"),
                                  (1e-2, [1e-2], "cholesky")):
        tried.clear()
        white = whitening(gram, damping=damping)
        assert tried == ridges, damping
        assert (white.lower is None) == (path == "eigh"), damping
        assert torch.isfinite(white.inverse).all()


def test_no_ridge_on_a_singular_gram_gives_the_optimum_not_nan():
    """damping 0 (a recipe's `compress.damping: 0`) on fewer tokens than channels: zero scales, so S⁻¹ is
    the pseudo-inverse, and the truncation is the optimum on what calibration saw (it was NaN)."""
    weight, gram = random_weight(), activations_gram(n_tokens=22, dim=32)
    white = whitening(gram, damping=0.0)
    assert white.lower is None and int((white.scales == 0).sum()) > 0  # the eigendecomposition, zero scales
    root, inverse = white.root, white.inverse
    assert torch.isfinite(inverse).all()
    assert torch.allclose(root @ inverse @ root, root, atol=1e-9 * root.abs().max())  # a pseudo-inverse
    for rank in (4, 12, 20):
        factors = whiten_factors(weight, gram, rank, white=white)
        assert torch.isfinite(factors.down).all() and torch.isfinite(factors.up).all()
        best, energy = optimal_error(weight, gram, rank)
        error = output_error(weight, factors.matrix(), gram)
        assert abs(error - best) <= 1e-9 * energy, (rank, error, best)


def test_a_model_compresses_without_a_ridge_on_too_few_tokens():
    """The whole pipeline at damping 0 on 16 tokens (singular Grams everywhere): finite factors, and
    logits that still follow the dense model's."""
    model = make_tiny_model("llama")
    dense = copy.deepcopy(model)
    windows = random_windows(2, 8)
    compress_model(model, ratio=0.6, windows=windows, damping=0.0, progress=False)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        logits, reference = model(windows).logits, dense(windows).logits
    assert torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0) > 0.999


def test_gram_without_any_signal_is_an_error_not_nan():
    with pytest.raises(LowrankError, match="only zero inputs"):
        whitening(torch.zeros(8, 8, dtype=torch.float64), name="model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gram_is_an_error_naming_the_layer(bad):
    gram = activations_gram(100, 8)
    gram[2, 3] = bad
    with pytest.raises(LowrankError, match="model.layers.0.mlp.up_proj"):
        whitening(gram, name="model.layers.0.mlp.up_proj")


# ---- low precision --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("arch", CAUSAL_ARCHITECTURES)
def test_low_precision_models_compress_and_run(arch, dtype):
    """fp16/bf16 models: statistics and factors in float32/64, factors cast to the model's dtype."""
    reference = make_tiny_model(arch)
    model = copy.deepcopy(reference).to(dtype)
    windows = random_windows(8, 24)
    plan = compress_model(model, ratio=0.8, method="whiten", windows=windows, progress=False)
    assert plan.factored
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == len(plan.factored)
    assert all(p.dtype == dtype for layer in layers for p in layer.parameters())
    with torch.no_grad():
        logits = model(input_ids=windows[:2]).logits
        dense_logits = reference(input_ids=windows[:2]).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    # the compressed low-precision model still tracks the dense float32 one
    error = (logits.float() - dense_logits).norm() / dense_logits.norm()
    assert error < 0.5, float(error)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_factor_math_runs_in_float64_then_casts(dtype):
    """Each factor equals the float64 SVD of the (low-precision) weight, cast once at the end."""
    model = make_tiny_model("llama").to(dtype)
    name = "model.layers.0.mlp.gate_proj"
    weight = weight_matrix(model.get_submodule(name)).detach().clone()
    plan = compress_model(model, ratio=0.6, method="svd", progress=False)
    layer = model.get_submodule(name)
    expected = svd_factors(weight, plan.factored[name])
    assert torch.equal(layer.down.weight, expected.down.to(dtype))
    assert torch.equal(layer.up.weight, expected.up.to(dtype))


def test_factors_that_overflow_fp16_are_an_error_not_inf():
    """Factors scaled by a whitening S⁻¹ of 1e13 cannot be stored in fp16 (max 65504): refuse instead of saving Inf."""
    model = make_tiny_model("llama").to(torch.float16)
    name = "model.layers.0.mlp.gate_proj"
    dim = model.get_submodule(name).in_features
    stats = ActivationStats.empty(dim)
    stats.update(torch.randn(200, dim, dtype=torch.float64) * 1e-14)  # tiny inputs: S⁻¹ ~ 1e13
    plan = Plan(modules={name: ModulePlan((96, dim), 8)}, method="whiten")
    with pytest.raises(LowrankError, match=f"factoring {name} produced NaN or Inf"):
        apply_plan(model, plan, {name: stats}, progress=False)
