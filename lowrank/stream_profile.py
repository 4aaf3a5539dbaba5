"""The profile pass of streaming compression: a Profile measured one block at a time, Fishers never formed.

Forward, block 0 → L−1: each block is loaded from disk and run on the calibration batches; hooks
collect its Gram matrices on the way, and its output hidden states (the next block boundary) go to
a `BoundaryStore`, the previous boundary being dropped. From the Grams come each target's whitening
S and the SVD W·S = U Σ Vᵀ: σ(W·S) is kept (and σ(W), unless the profile is for planning alone), the
directions U wait on disk for the backward sweep, and the block and its Grams are freed. The
sensitivity windows (the first few calibration windows) run in batches of their own, their Grams
counted with the others', and their boundaries are all kept; at the last block the head turns them
into the next-token loss and its gradient.

Backward, block L−1 → 0 (only where prices are wanted): the block is loaded again with its
directions U; its forward is recomputed on the sensitivity windows with gradients on, and the
incoming gradient is backpropagated through it alone. A hook on each target's output accumulates
Σ_t (g_t·uⱼ)² for every whitened direction uⱼ: the price uⱼᵀFuⱼ without the out × out Fisher F.
The gradient at the block's input flows on to the block below. Each block's calibration windows
thus run forward once (the Grams ride along), not twice.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .block_capture import BlockCall, capture_block_inputs, run_block
from .block_source import BlockSource
from .boundary_store import BoundaryStore
from .errors import CalibrationError, LowrankError
from .factorize import DEFAULT_DAMPING, WhiteningCache, output_side_spectrum, top_singular
from .head_gradient import head_gradient
from .model_info import count_parameters, is_causal_lm
from .profile import MatrixProfile, Profile
from .calibration import OutputStats, StatsCollector, all_reduce_stats, output_side, window_batches
from .sequential import block_of
from .spectrum import ShapeBatcher
from .targets import Target, weight_matrix

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


class _Scratch:
    """Each block's whitened directions U, from the forward sweep to the backward one: on disk, float64."""

    def __init__(self, parent: str | Path | None):
        self.folder = Path(tempfile.mkdtemp(prefix="lowrank-directions-", dir=parent))

    def save(self, index: int, name: str, directions: torch.Tensor) -> None:
        """One target's U, written as soon as it exists (a block's together would be ~0.25 GiB at 1B)."""
        from safetensors.torch import save_file

        count = len(list(self.folder.glob(f"block-{index}-*.safetensors")))
        save_file({name: directions.contiguous()}, str(self.folder / f"block-{index}-{count}.safetensors"))

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s directions, every target's, removed from disk."""
        from safetensors.torch import load_file

        directions = {}
        for path in sorted(self.folder.glob(f"block-{index}-*.safetensors"), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
            directions.update(load_file(str(path)))
            path.unlink()
        return directions

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _check_ran(names: list[str], stats: dict) -> None:
    missing = [n for n in names if n not in stats]
    if missing:
        raise CalibrationError(f"{len(missing)} target layers never ran during calibration (first: {missing[0]}); "
                               "exclude them with --exclude")


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


def _block_spectra(model: nn.Module, names: list[str], stats: dict, damping: float,
                   keep: Callable[[str, torch.Tensor], None] | None, whitening=None,
                   plain: bool = True) -> tuple[dict, dict]:
    """σ(W) (where `plain`) and σ(W·S) for one block's targets; where `keep` is given, it receives each left
    directions U of W·S.

    Targets sharing an input are consecutive (q/k/v, gate/up): one whitening is alive at a time, each
    Gram is freed as soon as it is whitened, and each whitening once its last reader is done.
    `whitening`: the whitening of the one input all `names` read, already computed (`_spectra_on_ranks`).
    """
    plains = ShapeBatcher(0)  # σ(W) of each matrix as it comes: no stack of float64 copies of the block
    whitened = {}
    # each Gram freed once whitened
    whitenings = WhiteningCache(damping, readers=[stats[n] for n in names if not isinstance(stats[n], OutputStats)])
    for name in names:
        layer_stats = stats.pop(name)
        if isinstance(layer_stats, OutputStats):  # no input Gram: no whitening to form (profiling's way)
            weight = weight_matrix(model.get_submodule(name)).detach().cpu()
            left, whitened[name] = output_side_spectrum(weight, layer_stats, damping, name)
            if keep is not None:
                keep(name, left)
            del left, layer_stats
            if plain:
                plains.add(name, weight)
            continue
        white = whitening if whitening is not None else whitenings.get(layer_stats, name)
        whitenings.done(layer_stats)
        weight = weight_matrix(model.get_submodule(name)).detach().cpu()  # the spectra are computed on CPU
        product = white.whiten(weight.to(torch.float64))
        del white
        if keep is not None:
            left, whitened[name], _ = top_singular(product, right=False)
            keep(name, left)
            del left
        else:
            whitened[name] = torch.linalg.svdvals(product)
        del product
        if plain:
            plains.add(name, weight)
    return plains.finish(), whitened


def _spectra_on_ranks(model: nn.Module, names: list[str], stats: dict, damping: float,
                      keep: Callable[[str, torch.Tensor], None] | None, plain: bool = True) -> tuple[dict, dict]:
    """`_block_spectra` on several ranks: each rank takes its share of the block's SVDs, then all receive all
    (and every rank's `keep` gets every target's U)."""
    if not distributed.active():
        return _block_spectra(model, names, stats, damping, keep, plain=plain)
    shapes = {n: tuple(weight_matrix(model.get_submodule(n)).shape) for n in names}
    current: list = [None, None]  # (statistics, its whitening): targets sharing an input share one

    def compute(name: str) -> list[torch.Tensor]:
        if current[0] is not stats[name] and not isinstance(stats[name], OutputStats):
            current[:] = [stats[name], WhiteningCache(damping).get(stats[name], name)]
        left: dict = {}
        sigma, whitened = _block_spectra(model, [name], {name: stats[name]}, damping,
                                         left.__setitem__ if keep is not None else None, whitening=current[1],
                                         plain=plain)
        found = [whitened[name]] + ([sigma[name]] if plain else []) + ([left[name]] if keep is not None else [])
        return [t.contiguous() for t in found]  # broadcast as laid out: an SVD's U is column-major

    def like(name: str) -> list[torch.Tensor]:
        out, k = shapes[name][0], min(shapes[name])
        return [torch.empty(k, dtype=torch.float64) for _ in range(1 + plain)] + (
            [torch.empty(out, k, dtype=torch.float64)] if keep is not None else [])

    costs = [float(shapes[n][0] * shapes[n][1] * min(shapes[n])) for n in names]
    done = distributed.computed_by_owner(names, costs, compute, like, "the spectra")
    stats.clear()
    current.clear()
    if keep is not None:
        for name in names:
            keep(name, done[name][-1])
    return ({n: done[n][1] for n in names} if plain else {}), {n: done[n][0] for n in names}


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
    scratch_dir: str | Path | None = None,
    output_stats: bool = True,
    plain: bool = True,
) -> Profile:
    """The Profile of `targets` (all inside the blocks) of a checkpoint read block by block (see the module doc).

    Each block's whitened directions wait on disk for the backward sweep, in a temporary folder
    under `scratch_dir` (default: the system's temporary folder), removed at the end. `output_stats`:
    output-side statistics where cheaper, as `profiling.measure(output_stats=True)` takes them.
    `plain=False` skips σ(W), as `profiling.profile_model` does for planning: a planning-only profile
    (on a 1.1B Llama, σ(W) is a third of the spectra's time).
    """
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
    outputs = output_side(model, targets) if output_stats else set()

    clock = StageClock()
    started = time.perf_counter()
    fisher_windows = windows[:sensitivity_samples] if prices else windows[:0]
    # the sensitivity windows' Grams come from their own forward (as in profiling.measure): the others' from this one
    captured = capture_block_inputs(model, windows[fisher_windows.shape[0]:], batch_size, device)
    calls = captured.calls
    for b, hidden in enumerate(captured.hidden):
        store.put(0, b, hidden)
    n_batches = len(captured.hidden)
    fisher_batch = max(1, min(batch_size, 4))
    fisher = capture_block_inputs(model, fisher_windows, fisher_batch, device) if prices else None
    scratch = _Scratch(scratch_dir)
    # every level of the sensitivity windows waits for the backward sweep: on disk, so that memory does not grow
    # with depth (one level is read back at a time)
    levels = BoundaryStore(0, scratch.folder)
    n_fisher = len(fisher.hidden) if fisher is not None else 0
    fisher_batches = distributed.my_share(window_batches(fisher_windows, fisher_batch))  # this rank's, as captured
    del captured
    source.free_outside()  # only blocks run until the head's gradient (embeddings and head: back to disk)
    gradients: list[torch.Tensor] = []  # per sensitivity batch: ∂loss/∂(output of the block being priced)

    last = len(blocks) - 1 if prices else max(by_block, default=-1)
    spectra: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for b in range(n_fisher):
            levels.put(0, b, fisher.hidden[b])
        if fisher is not None:
            fisher.hidden = []
        for index in tqdm(range(last + 1), desc="Profile (forward)", unit="block", disable=not progress):
            with clock("forward_load"):
                block = source.load_block(index).to(device)
            names = by_block.get(index, [])
            finals = []  # the last block's outputs on the sensitivity windows
            with clock("forward_blocks_and_grams"), StatsCollector(model, [by_name[n] for n in names],
                                                                   outputs & set(names)) as grams:
                for b in range(n_fisher):  # first, in their own batches: the same sums as profiling.measure's
                    output = run_block(block, levels.get(index, b), fisher.calls[index][b], device)
                    grams.end_batch()
                    if index < last:
                        levels.put(index + 1, b, output)
                    else:
                        finals.append(output)
                    del output
                for b in range(n_batches):
                    output = run_block(block, store.get(index, b), calls[index][b], device)
                    grams.end_batch()
                    if index < last:
                        store.put(index + 1, b, output)
                    del output
            store.drop_level(index, n_batches)  # the calibration windows' boundary: one level alive at a time
            grams.stats = all_reduce_stats(grams.stats, [by_name[n] for n in names], grams.outputs)  # → all ranks
            _check_ran(names, grams.stats)
            with clock("forward_spectra"):
                keep = (lambda name, u: scratch.save(index, name, u)) if prices else None  # to disk at once
                sigma, whitened = _spectra_on_ranks(model, names, grams.stats, damping, keep, plain=plain)
            spectra.update({n: (sigma.get(n), whitened[n]) for n in names})
            del grams
            if finals:
                with clock("head_gradient"):
                    source.load_outside()
                    gradients = [head_gradient(model, blocks, final, fisher_batches[b], device).cpu()
                                 for b, final in enumerate(finals)]
                del finals
            source.free_outside()
            source.free_block(index)

        forward_seconds = time.perf_counter() - started
        matrices: dict[str, MatrixProfile] = {}
        for index in tqdm(range(last, -1, -1), desc="Profile (backward)", unit="block",
                          disable=not progress or not prices):
            names = by_block.get(index, [])
            price = {}
            if prices:
                with clock("backward_load"):
                    block = source.load_block(index).to(device)
                    directions = scratch.load(index)
                with clock("backward_prices"):
                    gradients, price = _backpropagate(model, block, directions, levels, fisher.calls[index], index,
                                                      gradients, device)
                del directions
                source.free_block(index)
                levels.drop_level(index, n_fisher)
            for n in names:
                matrices[n] = MatrixProfile(n, by_name[n].shape, spectra[n][0], spectra[n][1], price.get(n))
    finally:
        levels.close()
        scratch.close()
    store.close()
    profile = Profile([matrices[t.name] for t in targets], source=name, whitened=True,
                      model_params=count_parameters(model),
                      options={"damping": damping, "streamed": True, **({} if plain else {"planning_only": True})})
    profile.options["seconds"] = {"forward": round(forward_seconds, 3),
                                  "backward": round(time.perf_counter() - started - forward_seconds, 3),
                                  **clock.rounded()}
    if prices:
        profile.options["sensitivity_samples"] = min(sensitivity_samples, windows.shape[0])
    return profile


def _backpropagate(model: nn.Module, block: nn.Module, directions: dict[str, torch.Tensor], levels: BoundaryStore,
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
                hidden = levels.get(index, b).to(device).requires_grad_(True)
                output = run_block(block, hidden, call, device)
                (incoming,) = torch.autograd.grad(output, hidden, gradient.to(device))
                below.append(incoming.cpu())
    finally:
        projections.close()
    tokens = {name: torch.tensor(float(count), dtype=torch.float64) for name, count in projections.tokens.items()}
    distributed.all_reduce_sum_([*projections.sums.values(), *tokens.values()], "the sensitivity")  # over the ranks
    prices = {}
    for name in directions:
        prices[name] = projections.sums[name] / max(float(tokens[name]), 1)
        if not torch.isfinite(prices[name]).all():
            raise LowrankError(f"the loss gradient at {name} is NaN or Inf; check the model and calibration text")
    return below, prices
