"""The profile pass of streaming compression: a Profile measured one block at a time, Fishers never formed.

Forward, block 0 → L−1: each block is loaded from disk and run on the calibration batches; its
output hidden states (the next block boundary) go to a `BoundaryStore`, then the block is freed.
The head turns the last boundary into the next-token loss and its gradient.

Backward, block L−1 → 0: the block is loaded again; its inputs (the stored boundary) give its
Gram matrices, hence each target's whitening S and the SVD W·S = U Σ Vᵀ. Its forward is then
recomputed on the sensitivity windows with gradients on, and the incoming gradient is
backpropagated through it alone. A hook on each target's output accumulates Σ_t (g_t·uⱼ)² for
every whitened direction uⱼ: the price uⱼᵀFuⱼ without the out × out Fisher F. The gradient at
the block's input flows on to the block below; the block, its Grams and its SVDs are freed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .block_capture import BlockCall, capture_block_inputs, run_block
from .block_source import BlockSource
from .boundary_store import BoundaryStore
from .errors import LowrankError
from .factorize import DEFAULT_DAMPING, WhiteningCache
from .model_info import count_parameters, is_causal_lm
from .profile import MatrixProfile, Profile
from .sequential import block_of, block_stats
from .spectrum import ShapeBatcher
from .targets import Target, weight_matrix

#: Boundary levels of the sensitivity windows are stored after the calibration ones, from this offset.
_FISHER_LEVELS = 1 << 20


class StageClock:
    """Seconds spent per named part of a pass, summed over blocks (`with clock("grams"): ...`)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - started

    def rounded(self, prefix: str = "") -> dict[str, float]:
        return {prefix + part: round(value, 3) for part, value in self.seconds.items()}


class _Injector(nn.Module):
    """Stands in for a block while the head runs: the last one outputs the given final hidden states."""

    def __init__(self, block: nn.Module, holder: list, last: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_holder", holder)
        self.last = last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return self._holder[0] if self.last else hidden


def head_gradient(model: nn.Module, blocks: nn.ModuleList, final: torch.Tensor, batch: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """∂(summed next-token loss)/∂(last block's output) for one batch, through the model's own head."""
    holder = [final.to(device).requires_grad_(True)]
    originals = list(blocks)
    home = model.get_input_embeddings().weight.device
    for i, block in enumerate(originals):
        blocks[i] = _Injector(block, holder, last=i == len(originals) - 1)
    try:
        model.to(device)  # the modules outside the blocks only: the blocks are out of the tree now
        with torch.enable_grad():
            logits = model(input_ids=batch.to(device), use_cache=False).logits
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].to(device).reshape(-1),
                reduction="sum")
            (gradient,) = torch.autograd.grad(loss, holder[0])
    finally:
        model.to(home)
        for i, block in enumerate(originals):
            blocks[i] = block
    return gradient


class _Projections:
    """Forward hooks on a block's targets: each output's gradient g, projected on the directions U, squared and summed."""

    def __init__(self, model: nn.Module, directions: dict[str, torch.Tensor]):
        self.directions = directions
        self.sums = {name: torch.zeros(u.shape[1], dtype=torch.float64) for name, u in directions.items()}
        self.tokens = {name: 0 for name in directions}
        self._handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in directions]

    def _hook(self, name: str):
        def hook(module, args, output):
            def accumulate(grad):
                flat = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float64)
                u = self.directions[name]
                self.sums[name] += ((flat @ u.to(flat.device)) ** 2).sum(0).cpu()
                self.tokens[name] += flat.shape[0]

            output.register_hook(accumulate)

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _block_spectra(model: nn.Module, names: list[str], stats: dict, damping: float, priced: bool) -> tuple[dict, dict, dict]:
    """σ(W), σ(W·S) and (where `priced`) the left directions U of W·S, for one block's targets.

    Targets sharing an input are consecutive (q/k/v, gate/up): one whitening is alive at a time, and
    each Gram is released (popped from `stats`) once its last reader is done.
    """
    plain = ShapeBatcher(0)  # σ(W) of each matrix as it comes: no stack of float64 copies of the block
    whitened, directions = {}, {}
    current = None  # (statistics, its whitening)
    for name in names:
        layer_stats = stats.pop(name)
        if current is None or current[0] is not layer_stats:
            current = None
            current = (layer_stats, WhiteningCache(damping).get(layer_stats, name))
        weight = weight_matrix(model.get_submodule(name)).detach().cpu()  # the spectra are computed on CPU
        product = weight.to(torch.float64) @ current[1].root
        if priced:
            left, whitened[name], _ = torch.linalg.svd(product, full_matrices=False)
            directions[name] = left
        else:
            whitened[name] = torch.linalg.svdvals(product)
        del product
        plain.add(name, weight)
    return plain.finish(), whitened, directions


@torch.no_grad()
def profile_streamed(
    source: BlockSource,
    targets: list[Target],
    windows: torch.Tensor,
    store: BoundaryStore,
    *,
    prices: bool = True,
    batch_size: int = 8,
    sensitivity_samples: int = 8,
    damping: float = DEFAULT_DAMPING,
    device: torch.device | str = "cpu",
    progress: bool = True,
    name: str | None = None,
) -> Profile:
    """The Profile of `targets` (all inside the blocks) of a checkpoint read block by block (see the module doc)."""
    model, blocks, device = source.model, source.blocks, torch.device(device)
    if prices and not is_causal_lm(model):
        raise LowrankError(f"the sensitivity strategy needs a causal language model, and {type(model).__name__} "
                           "is not one; use --strategy global")
    if prices and windows.shape[1] < 2:
        raise LowrankError("sensitivity needs windows of at least 2 tokens; raise --seq-len")
    by_block: dict[int, list[str]] = {}
    for target in targets:
        index = block_of(target.name, source.prefix)
        if index is None:
            raise LowrankError(f"{target.name} lies outside the transformer blocks, which streaming compression "
                               "does not factor; drop it from --include, or pass --no-stream")
        by_block.setdefault(index, []).append(target.name)
    by_name = {t.name: t for t in targets}

    clock = StageClock()
    started = time.perf_counter()
    captured = capture_block_inputs(model, windows, batch_size, device)
    calls = captured.calls
    for b, hidden in enumerate(captured.hidden):
        store.put(0, b, hidden)
    n_batches = len(captured.hidden)
    fisher_windows = windows[:sensitivity_samples] if prices else windows[:0]
    fisher_batch = max(1, min(batch_size, 4))
    fisher = capture_block_inputs(model, fisher_windows, fisher_batch, device) if prices else None
    if fisher is not None:
        for b, hidden in enumerate(fisher.hidden):
            store.put(_FISHER_LEVELS, b, hidden)
    n_fisher = len(fisher.hidden) if fisher is not None else 0
    del captured

    last = len(blocks) - 1 if prices else max(by_block, default=-1)
    for index in tqdm(range(last), desc="Profile (forward)", unit="block", disable=not progress):
        with clock("forward_load"):
            block = source.load_block(index).to(device)
        with clock("forward_blocks"):
            for b in range(n_batches):
                store.put(index + 1, b, run_block(block, store.get(index, b), calls[index][b], device))
        with clock("forward_sensitivity_windows"):
            for b in range(n_fisher):
                store.put(_FISHER_LEVELS + index + 1, b,
                          run_block(block, store.get(_FISHER_LEVELS + index, b), fisher.calls[index][b], device))
        source.free_block(index)

    gradients: list[torch.Tensor] = []
    if prices:
        block = source.load_block(last).to(device)
        with clock("forward_head_gradient"):
            for b, batch in enumerate(fisher_windows.split(fisher_batch)):
                final = run_block(block, store.get(_FISHER_LEVELS + last, b), fisher.calls[last][b], device)
                gradients.append(head_gradient(model, blocks, final, batch, device).cpu())
        source.free_block(last)

    forward_seconds = time.perf_counter() - started
    matrices: dict[str, MatrixProfile] = {}
    for index in tqdm(range(last, -1, -1), desc="Profile (backward)", unit="block", disable=not progress):
        names = by_block.get(index, [])
        if not names and not prices:
            continue
        with clock("backward_load"):
            block = source.load_block(index).to(device)
        with clock("backward_grams"):
            inputs = store.level(index, n_batches)
            stats = block_stats(model, block, [by_name[n] for n in names], inputs, calls[index], device) if names else {}
            del inputs
        with clock("backward_spectra"):
            sigma, whitened, directions = _block_spectra(model, names, stats, damping, prices)
            del stats
        price = {}
        if prices:
            with clock("backward_prices"):
                gradients, price = _backpropagate(model, block, directions, store, fisher.calls[index], index,
                                                  gradients, device)
        del directions
        for n in names:
            matrices[n] = MatrixProfile(n, by_name[n].shape, sigma[n], whitened[n], price.get(n))
        source.free_block(index)
        store.drop_level(index + 1, n_batches)
        store.drop_level(_FISHER_LEVELS + index + 1, n_fisher)
    store.close()
    profile = Profile([matrices[t.name] for t in targets], source=name, whitened=True,
                      model_params=count_parameters(model), options={"damping": damping, "streamed": True})
    profile.options["seconds"] = {"forward": round(forward_seconds, 3),
                                  "backward": round(time.perf_counter() - started - forward_seconds, 3),
                                  **clock.rounded()}
    if prices:
        profile.options["sensitivity_samples"] = min(sensitivity_samples, windows.shape[0])
    return profile


def _backpropagate(model: nn.Module, block: nn.Module, directions: dict[str, torch.Tensor], store: BoundaryStore,
                   calls: list[BlockCall], index: int, gradients: list[torch.Tensor], device: torch.device,
                   ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Recompute `block` on the sensitivity windows, backpropagate `gradients` through it, price its directions.

    Returns the gradients at the block's input (for the block below) and each target's prices uⱼᵀFuⱼ/N.
    """
    projections = _Projections(model, directions)
    below = []
    try:
        with torch.enable_grad():
            for b, (gradient, call) in enumerate(zip(gradients, calls)):
                hidden = store.get(_FISHER_LEVELS + index, b).to(device).requires_grad_(True)
                output = run_block(block, hidden, call, device)
                (incoming,) = torch.autograd.grad(output, hidden, gradient.to(device))
                below.append(incoming.cpu())
    finally:
        projections.close()
    prices = {}
    for name in directions:
        prices[name] = projections.sums[name] / max(projections.tokens[name], 1)
        if not torch.isfinite(prices[name]).all():
            raise LowrankError(f"the loss gradient at {name} is NaN or Inf; check the model and calibration text")
    return below, prices
