"""The profiling stage: spectra of a model in memory, whitened and priced, against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import make_tiny_model, random_windows
from lowrank import factorize
from lowrank.calibration import ActivationStats, OutputStats, collect_stats, output_side
from lowrank.compression import compress_model
from lowrank.errors import LowrankError
from lowrank.factorize import output_error, whiten_factors, whitened_singular_values, whitening
from lowrank.planner import plan_profile
from lowrank.profiling import measure, priced_spectrum, profile_model, profile_with_calibration, targets_of
from lowrank.sensitivity import OutputFisher, direction_costs
from lowrank.spectrum import truncation_loss
from lowrank.targets import Target, find_targets, weight_matrix


def gram_stats(inputs: torch.Tensor) -> ActivationStats:
    stats = ActivationStats.empty(inputs.shape[1])
    stats.update(inputs)
    return stats


def linears(weights: dict[str, torch.Tensor]) -> tuple[nn.Module, list[Target]]:
    """A module holding one bias-free Linear per named weight, and those Linears as targets."""
    model = nn.ModuleDict()
    for name, weight in weights.items():
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        layer.weight.data.copy_(weight)
        model[name] = layer
    return model, [Target(name, *w.shape, False) for name, w in weights.items()]


def test_whitened_truncation_loss_is_the_relative_output_error():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 12, generator=generator, dtype=torch.float64)
    inputs = torch.randn(200, 12, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    stats = gram_stats(inputs)
    model, targets = linears({"w": weight})
    sigma = profile_model(model, targets, {"w": stats}, damping=0.0).matrices[0].whitened  # exact: no ridge
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
    real = factorize.whitening
    monkeypatch.setattr(factorize, "whitening", lambda gram, *a, **k: calls.append(gram) or real(gram, *a, **k))
    model, targets = linears(weights)
    profile = profile_model(model, targets, stats)
    assert len(calls) == 2
    for m in profile.matrices:
        assert torch.allclose(m.whitened, whitened_singular_values(weights[m.name], stats[m.name].gram), rtol=1e-10)


def test_missing_statistics_are_named():
    model, targets = linears({"w": torch.eye(3)})
    with pytest.raises(LowrankError, match="no calibration statistics for w"):
        profile_model(model, targets, {})


def test_priced_spectrum_is_the_output_energy_and_prices_are_quadratic_forms():
    torch.manual_seed(0)
    weight = torch.randn(12, 8, dtype=torch.float64)
    inputs = torch.randn(200, 8, dtype=torch.float64)
    gram = inputs.T @ inputs
    fisher = torch.randn(12, 12, dtype=torch.float64)
    fisher = fisher @ fisher.T
    white = whitening(gram, damping=0.0)
    sigma, price = priced_spectrum(weight, white, fisher)
    assert float((sigma**2).sum()) == pytest.approx(float(((inputs @ weight.T) ** 2).sum()), rel=1e-9)
    left = torch.linalg.svd(weight @ white.root).U
    expected = [float(left[:, j] @ fisher @ left[:, j]) for j in range(8)]
    torch.testing.assert_close(price, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)


def test_priced_profile_pairs_each_whitened_direction_with_its_price():
    """With a Fisher, the whitened σ and the prices come from one SVD; plain σ(W) is still there."""
    generator = torch.Generator().manual_seed(6)
    weights = {"a": torch.randn(6, 8, generator=generator, dtype=torch.float64)}
    stats = {"a": gram_stats(torch.randn(50, 8, generator=generator, dtype=torch.float64))}
    fisher = {"a": OutputFisher(torch.eye(6, dtype=torch.float64) * 3.0, tokens=3)}
    model, targets = linears(weights)
    m = profile_model(model, targets, stats, fisher).matrices[0]
    # F/N = I: every unit direction costs 1
    torch.testing.assert_close(m.price, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(m.whitened, whitened_singular_values(weights["a"], stats["a"].gram), rtol=1e-10, atol=0)
    torch.testing.assert_close(m.sigma, torch.linalg.svdvals(weights["a"]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_profile_covers_every_target(arch):
    model = make_tiny_model(arch)
    targets = find_targets(model)
    stats = collect_stats(model, targets, random_windows(4, 16), progress=False)
    profile = profile_model(model, targets, stats)
    assert [m.name for m in profile.matrices] == [t.name for t in targets]
    assert profile.whitened and profile.target_params == sum(t.params for t in targets)
    for m, t in zip(profile.matrices, targets):
        weight = weight_matrix(model.get_submodule(t.name)).double()
        assert m.shape == tuple(weight.shape) and m.sigma.numel() == min(weight.shape)
        assert torch.allclose(m.sigma, torch.linalg.svdvals(weight), atol=1e-8)
        assert torch.allclose(m.whitened, whitened_singular_values(weight, stats[t.name].gram), rtol=1e-8)


def test_profile_with_calibration_measures_prices_on_a_causal_model():
    model = make_tiny_model("llama")
    profile = profile_with_calibration(model, random_windows(4, 16), batch_size=2, sensitivity_samples=2,
                                       progress=False, source="tiny")
    assert profile.priced and profile.whitened and profile.source == "tiny"
    assert profile.options["sensitivity_samples"] == 2
    assert all(float(m.price.min()) >= -1e-12 for m in profile.matrices)  # F is positive semi-definite


def test_measure_refuses_zero_sensitivity_samples():
    model = make_tiny_model("llama")
    with pytest.raises(LowrankError, match="--sensitivity-samples must be at least 1"):
        measure(model, find_targets(model), random_windows(2, 8), statistics=False, prices=True,
                sensitivity_samples=0, progress=False)


def test_compressed_model_profiles_each_lowrank_layer_as_one_matrix():
    model = make_tiny_model("llama")
    plan = compress_model(model, ratio=0.5, method="svd", progress=False)
    targets = targets_of(model)
    assert [t.name for t in targets] == list(plan.modules)
    profile = profile_model(model)
    assert [m.rank for m in profile.matrices] == [plan.modules[m.name].rank for m in profile.matrices]


def test_output_side_spectrum_equals_the_whitened_svd_and_its_prices():
    """Σ y yᵀ + λ·W·Wᵀ gives the σ and the left directions (so the prices) of W·S without the input Gram."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(6, 20, generator=generator, dtype=torch.float64)  # narrow out, wide in: a down projection
    inputs = torch.randn(300, 20, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, 20, dtype=torch.float64)
    stats = OutputStats.empty(6, 20)
    stats.update(inputs, inputs @ weight.T)
    left, sigma = factorize.output_side_spectrum(weight, stats, damping=0.01)
    white = whitening(inputs.T @ inputs, damping=0.01)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(white.whiten(weight)), rtol=1e-10, atol=0)
    fisher = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    fisher = fisher @ fisher.T
    _, price = priced_spectrum(weight, white, fisher)
    torch.testing.assert_close(direction_costs(fisher, left), price, rtol=1e-8, atol=0)
    stats.energy.zero_()
    with pytest.raises(LowrankError, match="only zero inputs"):
        factorize.output_side_spectrum(weight, stats)


def test_profile_from_output_side_statistics_agrees_with_the_input_side():
    """The down projections' statistics taken from their outputs: the same spectra and prices to float32 rounding,
    the same ranks, and the sensitivity windows run forward once (their Grams from the backward passes' forward)."""
    model = make_tiny_model("llama")
    targets = find_targets(model)
    windows = random_windows(12, 16)
    assert output_side(model, targets) == {t.name for t in targets if t.name.endswith("down_proj")}
    forwards = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    stats, fisher = measure(model, targets, windows, prices=True, batch_size=8, sensitivity_samples=8,
                            progress=False, output_stats=True)
    assert forwards == [4, 4, 4]  # the 8 sensitivity windows in batches of 4, then the other 4: each window once
    # through the blocks (the head's slices run the model with its blocks stood in for: lowrank.head_gradient)
    assert isinstance(stats["model.layers.0.mlp.down_proj"], OutputStats)
    assert isinstance(stats["model.layers.0.mlp.up_proj"], ActivationStats)
    by_output = profile_model(model, targets, stats, fisher)
    by_input = profile_model(model, targets, *measure(model, targets, windows, prices=True, batch_size=8,
                                                       sensitivity_samples=8, progress=False))
    for a, b in zip(by_output.matrices, by_input.matrices):
        torch.testing.assert_close(a.whitened, b.whitened, rtol=1e-5, atol=1e-6 * float(b.whitened[0]))
        cost_a, cost_b = a.whitened**2 * a.price, b.whitened**2 * b.price
        torch.testing.assert_close(cost_a, cost_b, rtol=1e-4, atol=1e-6 * float(cost_b.max()))
    ranks = [{n: m.rank for n, m in plan_profile(p, 0.6, "sensitivity").modules.items()}
             for p in (by_output, by_input)]
    assert ranks[0] == ranks[1]
