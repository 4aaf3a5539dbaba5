"""The output Fisher: the sum of the loss gradient's outer products at each target's output."""

from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_model, random_windows
from lowrank.errors import LowrankError
from lowrank.sensitivity import direction_costs, measure_output_fisher
from lowrank.targets import find_targets


def test_direction_costs_are_quadratic_forms():
    torch.manual_seed(0)
    fisher = torch.randn(6, 6, dtype=torch.float64)
    fisher = fisher @ fisher.T
    directions = torch.randn(6, 3, dtype=torch.float64)
    expected = [float(directions[:, j] @ fisher @ directions[:, j]) for j in range(3)]
    torch.testing.assert_close(direction_costs(fisher, directions), torch.tensor(expected, dtype=torch.float64))


def test_output_fisher_is_the_sum_of_gradient_outer_products():
    model = make_tiny_model("llama")
    targets = find_targets(model)
    windows = random_windows(4, 16)
    fisher = measure_output_fisher(model, targets, windows, batch_size=2, progress=False)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # model left as it was

    name = "model.layers.1.mlp.down_proj"
    captured = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: captured.append(out))
    expected = torch.zeros(48, 48, dtype=torch.float64)
    for batch in windows.split(2):
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        (grad,) = torch.autograd.grad(loss, captured.pop())
        flat = grad.reshape(-1, 48).double()
        expected += flat.T @ flat
    handle.remove()
    assert fisher[name].tokens == 4 * 16
    torch.testing.assert_close(fisher[name].matrix, expected, rtol=1e-4, atol=1e-9)
    assert float(torch.trace(fisher[name].matrix)) > 0


def test_an_encoder_is_priced_by_its_embedding_and_unknown_objectives_are_refused():
    model = make_tiny_model("bert")  # no next-token loss: the pooled embedding's probes (tests/test_encoders.py)
    fisher = measure_output_fisher(model, find_targets(model), random_windows(2, 8), progress=False)
    assert all(float(torch.trace(f.matrix)) > 0 for f in fisher.values())
    with pytest.raises(LowrankError, match="unknown sensitivity objective"):
        measure_output_fisher(model, find_targets(model), random_windows(2, 8), objective="nsp", progress=False)


def test_a_module_wider_out_than_in_is_priced_through_its_input():
    """gate_proj (out > in) keeps Σ (Wᵀg)(Wᵀg)ᵀ, in × in, from the gradient at its own input edge (its input is
    shared with up_proj); its prices equal those of the out × out Fisher Σ g gᵀ."""
    from lowrank.factorize import whitening
    from lowrank.profiling import priced_spectrum
    from lowrank.sensitivity import OutputFisher

    model = make_tiny_model("llama")
    windows = random_windows(4, 16)
    name = "model.layers.1.mlp.gate_proj"
    fisher = measure_output_fisher(model, find_targets(model), windows, batch_size=2, progress=False)
    assert fisher[name].side == "input" and fisher["model.layers.1.mlp.down_proj"].side == "output"

    layer = model.get_submodule(name)
    weight = layer.weight.detach().double()
    captured = []
    handle = layer.register_forward_hook(lambda m, a, out: captured.append(out))
    output_side = torch.zeros(weight.shape[0], weight.shape[0], dtype=torch.float64)
    for batch in windows.split(2):
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        (grad,) = torch.autograd.grad(loss, captured.pop())
        flat = grad.reshape(-1, weight.shape[0]).double()
        output_side += flat.T @ flat
    handle.remove()
    torch.testing.assert_close(fisher[name].matrix, weight.T @ output_side @ weight, rtol=1e-4, atol=1e-9)

    inputs = torch.randn(200, weight.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    white = whitening(inputs.T @ inputs)
    sigma_in, price_in = priced_spectrum(weight, white, fisher[name])
    sigma_out, price_out = priced_spectrum(weight, white, OutputFisher(output_side, fisher[name].tokens))
    torch.testing.assert_close(sigma_in, sigma_out, rtol=1e-12, atol=0)
    torch.testing.assert_close(price_in, price_out, rtol=1e-4, atol=1e-8 * float(price_out.max()))
