"""The price of each whitened direction for an encoder: how far dropping it moves the sentence embeddings.

A target y_t = W x_t (tokens t of one sentence) feeds the pooled, normalized sentence embedding e.
Dropping direction j of the whitened SVD W·S = Σ σⱼ uⱼ vⱼᵀ changes W by ΔW = σⱼ uⱼ ṽⱼᵀ, with
ṽⱼ = S⁻ᵀ vⱼ, and to first order moves the embedding by δe = Σ_t J_t ΔW x_t. For a random probe
r ~ N(0, I) at the output, r·δe = σⱼ Σ_t (uⱼ·g_t)(ṽⱼ·x_t) with g_t = J_tᵀ r the probe's gradient at
y_t, and E_r[(r·δe)²] = ‖δe‖². So

    price_j = mean over sentences and probes of ( Σ_t (uⱼ·g_t)(ṽⱼ·x_t) )²,   cost_j = σⱼ² · price_j

is the expected squared embedding error of dropping j, with no assumption that the errors of
different tokens are independent. That assumption (the per-token output Fisher of
`lowrank.sensitivity`, K-FAC's) under-prices what mean pooling adds up coherently over a
sentence's tokens. Each sentence gets its own probe; one backward pass per probe prices every
direction of every matrix at once. On several ranks each takes its share of the batches (the
probes of the others' are drawn all the same, so the seed gives the same probes for any number of
ranks), and the sums are added up in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .calibration import model_device, window_batches
from .encoders import embed
from .errors import LowrankError
from .model_info import frozen_in_eval
from .targets import Target

#: Random probes per sentence (one backward pass each).
DEFAULT_PROBES = 4


@dataclass
class DirectionBasis:
    """One matrix's whitened SVD directions: left uⱼ (out × r) and input functionals ṽⱼ = S⁻ᵀvⱼ (in × r)."""

    left: torch.Tensor
    right: torch.Tensor


@dataclass
class DirectionPrices:
    """The whitened σⱼ of one matrix and the embedding price of each direction (σⱼ² · price_j is its cost)."""

    sigma: torch.Tensor
    price: torch.Tensor
    samples: int  # sentence × probe pairs averaged over


def whitened_basis(weight: torch.Tensor, root: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, DirectionBasis]:
    """σ of W·S and its directions (uⱼ, S⁻ᵀvⱼ), from one float64 SVD."""
    left, sigma, right_t = torch.linalg.svd(weight.detach().to(torch.float64) @ root.to(torch.float64),
                                            full_matrices=False)
    return sigma, DirectionBasis(left, inverse.to(torch.float64).T @ right_t.T)


def measure_embedding_prices(
    model: nn.Module,
    targets: list[Target],
    windows: "torch.Tensor | list[torch.Tensor]",
    bases: dict[str, DirectionBasis],
    *,
    batch_size: int = 8,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """price_j (module docstring) of every direction of every target, over the sentences of `windows`.

    Parameters are frozen during the passes and restored; the model is left exactly as it was.
    """
    if probes < 1:
        raise LowrankError(f"embedding prices need at least 1 probe, got {probes}")
    device = model_device(model)
    sums = {t.name: torch.zeros(bases[t.name].left.shape[1], dtype=torch.float64) for t in targets}
    counts = {"samples": 0}
    projected_inputs: dict[str, torch.Tensor] = {}
    work = {name: (b.left.to(device, torch.float32), b.right.to(device, torch.float32)) for name, b in bases.items()}

    def watch(name: str):
        def hook(module, args, output):
            left, right = work[name]
            projected_inputs[name] = args[0].detach().float() @ right  # (b, s, r): ṽⱼ·x_t

            def accumulate(grad):
                along = grad.detach().float() @ left  # (b, s, r): uⱼ·g_t
                per_sentence = (along * projected_inputs[name]).sum(1).double()  # (b, r)
                sums[name] += (per_sentence ** 2).sum(0).cpu()

            output.register_hook(accumulate)

        return hook

    handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))]
    with frozen_in_eval(model):
        try:
            for target in targets:
                handles.append(model.get_submodule(target.name).register_forward_hook(watch(target.name)))
            generator = torch.Generator().manual_seed(seed)
            batches = distributed.with_ownership(window_batches(windows, batch_size))
            with torch.enable_grad():
                for batch, mine in tqdm(batches, desc="Embedding prices", unit="batch", disable=not progress):
                    if not mine:  # another rank's sentences: draw their probes, as a backward pass would
                        for _ in range(probes):
                            torch.randn((batch.shape[0], model.config.hidden_size), generator=generator)
                        continue
                    embeddings = embed(model, batch.to(device))
                    for k in range(probes):
                        probe = torch.randn(embeddings.shape, generator=generator).to(embeddings)
                        (embeddings * probe).sum().backward(retain_graph=k < probes - 1)
                    counts["samples"] += batch.shape[0] * probes
                    projected_inputs.clear()
        finally:
            for handle in handles:
                handle.remove()
    samples = torch.tensor(float(counts["samples"]), dtype=torch.float64)
    distributed.all_reduce_sum_([*sums.values(), samples], "the embedding prices")  # every rank's sentences
    prices = {name: total / max(float(samples), 1) for name, total in sums.items()}
    for name, price in prices.items():
        if not torch.isfinite(price).all():
            raise LowrankError(f"the embedding gradient at {name} is NaN or Inf; check the model and calibration text")
    return prices
