"""Spectrum metrics against closed forms, and batched singular values against full SVDs."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank import spectrum
from lowrank.errors import LowrankError
from lowrank.spectrum import (batched_svdvals, effective_rank, energy_curve, factored_svdvals, rank_for_energy,
                              split_name, stable_rank, truncation_loss)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q


def with_singular_values(values: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """U diag(values) Vᵀ with random orthonormal U (rows×r) and V (cols×r)."""
    r = len(values)
    return orthonormal(rows, r, seed) @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ orthonormal(cols, r, seed + 1).T


# ---- closed forms ------------------------------------------------------------------------------------------
def test_known_spectrum_gives_known_energy_effective_and_stable_rank():
    weight = with_singular_values([4.0, 3.0, 2.0, 1.0], 7, 5)  # fifth singular value is 0
    sigma = batched_svdvals([weight])[0]
    assert torch.allclose(sigma, torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12)
    # energy Σσ² = 30: cumulative 16, 25, 29, 30, 30
    expected_energy = torch.tensor([16, 25, 29, 30, 30], dtype=torch.float64) / 30
    assert torch.allclose(energy_curve(sigma), expected_energy, atol=1e-12)
    assert torch.allclose(truncation_loss(sigma), torch.tensor([1, 14 / 30, 5 / 30, 1 / 30, 0, 0], dtype=torch.float64),
                          atol=1e-12)
    p = [0.4, 0.3, 0.2, 0.1]  # σ / Σσ
    assert effective_rank(sigma) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-12)
    assert effective_rank(sigma) == pytest.approx(3.5961, abs=1e-4)
    assert stable_rank(sigma) == pytest.approx(30 / 16, rel=1e-12)
    assert rank_for_energy(sigma, 0.90) == 3  # 29/30 = 0.967 ≥ 0.9 > 25/30
    assert rank_for_energy(sigma, 0.95) == 3
    assert rank_for_energy(sigma, 0.99) == 4  # 29/30 < 0.99
    assert rank_for_energy(sigma, 25 / 30) == 2  # exactly reaching the fraction counts


def test_flat_spectrum_has_full_effective_and_stable_rank():
    n = 20
    sigma = batched_svdvals([3.0 * orthonormal(n, n, seed=3)])[0]
    assert effective_rank(sigma) == pytest.approx(n, rel=1e-9)
    assert stable_rank(sigma) == pytest.approx(n, rel=1e-9)
    assert rank_for_energy(sigma, 0.95) == 19  # ⌈0.95·20⌉
    assert energy_curve(sigma)[9] == pytest.approx(0.5, abs=1e-12)


def test_rank_one_matrix_has_rank_one_everywhere():
    u = torch.randn(30, 1, dtype=torch.float64)
    v = torch.randn(1, 12, dtype=torch.float64)
    sigma = batched_svdvals([u @ v])[0]
    assert effective_rank(sigma) == pytest.approx(1.0, abs=1e-6)
    assert stable_rank(sigma) == pytest.approx(1.0, abs=1e-9)
    assert all(rank_for_energy(sigma, level) == 1 for level in (0.9, 0.95, 0.99))
    assert sigma[0] == pytest.approx(float(u.norm() * v.norm()), rel=1e-12)


def test_geometric_spectrum_energy_curve_matches_closed_form():
    q, n = 0.8, 16
    values = [q**i for i in range(n)]
    sigma = batched_svdvals([with_singular_values(values, 24, n, seed=5)])[0]
    curve = energy_curve(sigma)
    for k in range(1, n + 1):
        assert curve[k - 1] == pytest.approx((1 - q ** (2 * k)) / (1 - q ** (2 * n)), rel=1e-10)
    expected = math.ceil(math.log(1 - 0.95 * (1 - q ** (2 * n))) / (2 * math.log(q)))
    assert rank_for_energy(sigma, 0.95) == expected


def test_zero_matrix_and_bad_fraction():
    sigma = torch.zeros(4, dtype=torch.float64)
    assert effective_rank(sigma) == 0.0
    assert stable_rank(sigma) == 0.0
    with pytest.raises(ValueError):
        rank_for_energy(torch.ones(3), 1.5)


# ---- batching and factored matrices ---------------------------------------------------------------------------
def test_batched_svdvals_match_full_svd_for_mixed_shapes():
    generator = torch.Generator().manual_seed(0)
    shapes = [(12, 8), (8, 12), (12, 8), (5, 5), (12, 8), (8, 12)]
    matrices = [torch.randn(*s, generator=generator) for s in shapes]
    for matrix, sigma in zip(matrices, batched_svdvals(matrices)):
        assert sigma.dtype == torch.float64
        assert torch.allclose(sigma, torch.linalg.svd(matrix.double()).S, atol=1e-10)


def test_batched_svdvals_rejects_nan():
    with pytest.raises(LowrankError, match="NaN"):
        batched_svdvals([torch.full((3, 3), float("nan"))])


def test_small_batch_limit_gives_the_same_spectra():
    generator = torch.Generator().manual_seed(1)
    named = [(f"m{i}", torch.randn(10, 6, generator=generator)) for i in range(7)]
    big = spectrum.spectra(named)
    small = spectrum.spectra(named, batch_bytes=1)  # every matrix flushed on its own
    assert all(torch.allclose(big[name], small[name]) for name, _ in named)


def test_factored_svdvals_equal_those_of_the_product():
    generator = torch.Generator().manual_seed(2)
    up = torch.randn(30, 4, generator=generator)
    down = torch.randn(4, 20, generator=generator)
    sigma = factored_svdvals(up, down)
    assert sigma.shape == (20,)
    assert torch.allclose(sigma, torch.linalg.svdvals(up.double() @ down.double()), atol=1e-10)
    assert torch.all(sigma[4:] == 0)


def test_split_name():
    assert split_name("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert split_name("transformer.h.0.attn.c_attn") == (0, "attn.c_attn")
    assert split_name("lm_head") == (None, "lm_head")
