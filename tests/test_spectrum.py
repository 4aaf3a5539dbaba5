"""The analyzer against closed forms: constructed spectra, whitening, batching, folders read tensor by tensor."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_tiny_model, random_windows
from lowrank import spectrum
from lowrank.calibration import ActivationStats, collect_stats
from lowrank.checkpoint import save_compressed
from lowrank.compress import compress_model
from lowrank.errors import LowrankError, ModelLoadError
from lowrank.factorize import output_error, whiten_factors, whitened_singular_values
from lowrank.spectrum import (
    Analysis,
    MatrixSpectrum,
    analyze_folder,
    analyze_model,
    batched_svdvals,
    effective_rank,
    energy_curve,
    factored_svdvals,
    rank_for_energy,
    split_name,
    stable_rank,
    targets_of,
    truncation_loss,
    whitened_spectra,
)
from lowrank.targets import find_targets, weight_matrix


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
    big = spectrum._spectra(named)
    small = spectrum._spectra(named, batch_bytes=1)  # every matrix flushed on its own
    assert all(torch.allclose(big[name], small[name]) for name, _ in named)


def test_factored_svdvals_equal_those_of_the_product():
    generator = torch.Generator().manual_seed(2)
    up = torch.randn(30, 4, generator=generator)
    down = torch.randn(4, 20, generator=generator)
    sigma = factored_svdvals(up, down)
    assert sigma.shape == (20,)
    assert torch.allclose(sigma, torch.linalg.svdvals(up.double() @ down.double()), atol=1e-10)
    assert torch.all(sigma[4:] == 0)


# ---- whitened spectra ---------------------------------------------------------------------------------------
def gram_stats(inputs: torch.Tensor) -> ActivationStats:
    stats = ActivationStats.empty(inputs.shape[1])
    stats.update(inputs)
    return stats


def test_whitened_truncation_loss_is_the_relative_output_error():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 12, generator=generator, dtype=torch.float64)
    inputs = torch.randn(200, 12, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    stats = gram_stats(inputs)
    sigma = whitened_spectra({"w": weight}, {"w": stats}, damping=0.0)["w"]  # exact: no ridge
    loss = truncation_loss(sigma)
    full = float(((weight @ inputs.T) ** 2).sum())
    for k in (1, 4, 9):
        approx = whiten_factors(weight, stats.gram, k, damping=0.0).matrix()
        assert loss[k] == pytest.approx(output_error(weight, approx, stats.gram) / full, rel=1e-9)


def test_shared_input_is_whitened_once(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    shared = gram_stats(torch.randn(100, 8, generator=generator))
    alone = gram_stats(torch.randn(100, 8, generator=generator))
    weights = {name: torch.randn(6, 8, generator=generator) for name in ("q", "k", "v", "o")}
    stats = {"q": shared, "k": shared, "v": shared, "o": alone}
    calls = []
    real = spectrum.whitening
    monkeypatch.setattr(spectrum, "whitening", lambda gram, *a, **k: calls.append(gram) or real(gram, *a, **k))
    sigma = whitened_spectra(weights, stats)
    assert len(calls) == 2
    for name, weight in weights.items():
        assert torch.allclose(sigma[name], whitened_singular_values(weight, stats[name].gram), rtol=1e-10)


def test_missing_statistics_are_named():
    with pytest.raises(LowrankError, match="no calibration statistics for w"):
        whitened_spectra({"w": torch.eye(3)}, {})


# ---- models and folders ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_analyze_model_covers_every_target(arch):
    model = make_tiny_model(arch)
    targets = find_targets(model)
    stats = collect_stats(model, targets, random_windows(4, 16), progress=False)
    analysis = analyze_model(model, targets, stats)
    assert [m.name for m in analysis.matrices] == [t.name for t in targets]
    assert analysis.whitened and analysis.target_params == sum(t.params for t in targets)
    for m, t in zip(analysis.matrices, targets):
        weight = weight_matrix(model.get_submodule(t.name)).double()
        assert m.shape == tuple(weight.shape) and m.sigma.numel() == min(weight.shape)
        assert torch.allclose(m.sigma, torch.linalg.svdvals(weight), atol=1e-8)
        assert torch.allclose(m.whitened, whitened_singular_values(weight, stats[t.name].gram), rtol=1e-8)


def test_uniform_budget_matches_hand_computation():
    model = make_tiny_model("llama")
    analysis = analyze_model(model)
    dense = analysis.uniform_budget(1.0)
    assert dense["matrices_dense"] == len(analysis.matrices)  # k = mn/(m+n) saves nothing
    assert dense["target_ratio"] == 1.0 and dense["mean_loss"] == 0.0
    half = analysis.uniform_budget(0.5)
    q = analysis.matrices[0]  # 48×48 → k = ⌊0.5·2304/96⌋ = 12
    assert q.shape == (48, 48)
    assert q.loss_at_rank(12) == pytest.approx(float((q.sigma[12:] ** 2).sum() / (q.sigma**2).sum()), rel=1e-12)
    losses = [m.loss_at_rank(int(0.5 * m.params // sum(m.shape))) for m in analysis.matrices]
    assert half["mean_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    assert half["matrices_dense"] == 0 and half["target_ratio"] <= 0.5


def test_split_name():
    assert split_name("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert split_name("transformer.h.0.attn.c_attn") == (0, "attn.c_attn")
    assert split_name("lm_head") == (None, "lm_head")


def test_empty_analysis_is_refused():
    with pytest.raises(LowrankError):
        Analysis([])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_folder_read_tensor_by_tensor_equals_model_in_memory(arch, tmp_path):
    model = make_tiny_model(arch)
    model.save_pretrained(tmp_path / "model")
    from_folder = analyze_folder(tmp_path / "model")
    in_memory = analyze_model(model)
    assert [m.name for m in from_folder.matrices] == [m.name for m in in_memory.matrices]
    for a, b in zip(from_folder.matrices, in_memory.matrices):
        assert a.shape == b.shape  # GPT-2's Conv1D is stored (in, out); shapes stay (out, in)
        assert torch.allclose(a.sigma, b.sigma, atol=1e-8)
    assert not from_folder.whitened
    if arch == "gpt2":
        assert from_folder.matrices[0].shape == (144, 48)  # c_attn: 3·48 outputs


def test_compressed_folder_spectra_come_from_the_factors(tmp_path):
    model = make_tiny_model("llama")
    original = analyze_model(model)
    plan = compress_model(model, ratio=0.5, method="svd", progress=False)
    save_compressed(model, None, plan, tmp_path / "small")
    analysis = analyze_folder(tmp_path / "small")
    assert [m.name for m in analysis.matrices] == list(plan.modules)
    for m, before in zip(analysis.matrices, original.matrices):
        k = plan.modules[m.name].rank
        assert m.rank == k
        # plain SVD truncation keeps the top k singular values exactly and zeroes the rest
        assert torch.allclose(m.sigma[:k], before.sigma[:k], rtol=1e-4)
        assert float(m.sigma[k:].abs().max()) < 1e-5 * float(before.sigma[0])
    loaded = analyze_model(model)  # the compressed model in memory, LowRankLinear merged
    assert [m.rank for m in loaded.matrices] == [m.rank for m in analysis.matrices]
    assert all(torch.allclose(a.sigma, b.sigma, atol=1e-5) for a, b in zip(loaded.matrices, analysis.matrices))
    assert len(targets_of(model)) == len(plan.modules)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        analyze_folder(tmp_path)


def test_matrix_without_whitened_spectrum_says_how_to_get_one():
    m = MatrixSpectrum("x", (2, 2), torch.ones(2, dtype=torch.float64))
    with pytest.raises(LowrankError, match="--calib"):
        m.spectrum(True)
