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
