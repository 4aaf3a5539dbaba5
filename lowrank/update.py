"""The closed-form update (SVD-LLM's "parameter update"): refit each factor `up` by least squares.

With a layer's first factor `down` fixed, its second factor `up` is refitted by ridge least squares
so that up·down·x_c matches the dense layer's output W·x_d, where x_c is the layer's input inside
the compressed block and x_d its input inside the dense block, both fed the same block input.
With `both_rounds`, both factors are refitted together instead (reduced-rank regression, `refit_both`),
in rounds that each see the block's inputs as the previous round left them.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import distributed
from .block_capture import BlockCall
from .errors import LowrankError
from .factorize import Factors, whiten_factors, whitening
from .forward_cutoff import ForwardCutoff
from .layers import LowRankLinear
from .targets import weight_matrix

#: Ridge of the update's least squares, relative to the mean eigenvalue of the rank-k Gram matrix.
UPDATE_RIDGE = 1e-4

#: What the update fits: the dense layer on the dense block's inputs, or on the compressed block's.
UPDATE_TARGETS = ("dense", "compressed")


# ---- the closed-form update -------------------------------------------------------------------------

def refit_up(
    weight: torch.Tensor,
    down: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor | None = None,
    ridge: float = UPDATE_RIDGE,
) -> torch.Tensor:
    """The `up` (out × k) minimizing ‖W·X_d − up·down·X_c‖² + λ‖up‖², with `down` fixed.

    `gram` = Σ x_c x_cᵀ and `cross` = Σ x_d x_cᵀ (in × in, summed over tokens); without `cross`
    the target is W·X_c, the dense layer on the compressed path's own inputs. Closed form:
    up = W·C·downᵀ (down·G·downᵀ + λI)⁻¹, with λ = `ridge` × mean eigenvalue of down·G·downᵀ.
    """
    d = down.to(torch.float64)
    g = gram.to(torch.float64)
    c = g if cross is None else cross.to(torch.float64)
    return refit_up_from_codes(weight, d @ g @ d.T, c @ d.T, ridge)


def refit_up_from_codes(
    weight: torch.Tensor,
    code_gram: torch.Tensor,
    cross_codes: torch.Tensor,
    ridge: float = UPDATE_RIDGE,
) -> torch.Tensor:
    """`refit_up` from sums over the rank-k codes z = down·x_c: `code_gram` = Σ z zᵀ (k × k) and
    `cross_codes` = Σ x_d zᵀ (in × k; Σ x_c zᵀ for the compressed target). The same solution,
    without any in × in matrix: up = W·cross_codes·(code_gram + λI)⁻¹.
    """
    w = weight.to(torch.float64)
    reduced = code_gram.to(torch.float64)  # (k, k): Gram matrix of the rank-k codes
    reduced = (reduced + reduced.T) / 2
    scale = torch.diagonal(reduced).mean().clamp(min=torch.finfo(torch.float64).tiny)
    reduced = reduced + ridge * scale * torch.eye(reduced.shape[0], dtype=torch.float64, device=reduced.device)
    rhs = w @ cross_codes.to(torch.float64)  # (out, k)
    # up · reduced = rhs, and reduced is symmetric positive definite.
    up = torch.linalg.solve(reduced, rhs.T).T
    if not torch.isfinite(up).all():
        raise LowrankError("the least-squares update produced NaN or Inf; rerun without --update")
    return up


def refit_both(
    weight: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    rank: int,
    ridge: float = UPDATE_RIDGE,
) -> Factors:
    """Both factors at once: the rank-k M = up·down minimizing ‖W·X_d − M·X_c‖² (reduced-rank regression).

    The unconstrained minimizer is M̂ = W·C·G⁻¹ (C = Σ x_d x_cᵀ, G = Σ x_c x_cᵀ + λ·mean eig·I), and the
    error splits as ‖W·X_d − M̂·X_c‖² + ‖(M̂ − M)·S‖² with G = S·Sᵀ: so M is the whitened truncation of M̂
    (SVD-LLM's, with the dense target in place of W). Exact in one solve, no alternating rounds needed.
    """
    white = whitening(gram, ridge)
    target = weight.to(torch.float64) @ cross.to(torch.float64) @ white.inverse.T @ white.inverse  # M̂
    factors = whiten_factors(target, gram, rank, white=white)
    if not all(torch.isfinite(t).all() for t in (factors.down, factors.up)):
        raise LowrankError("the least-squares refit of both factors produced NaN or Inf; rerun without --refine-refit")
    return factors


class _PairedHooks:
    """Forward hooks on a block's dense copy and on the compressed block, run on the same batch: the
    inputs they keep for the batch, and their removal. Subclasses sum what their refit needs."""

    def __init__(self):
        self.dense_inputs: dict[str, torch.Tensor] = {}  # this batch's x_d of each layer
        self._handles = []

    def _keep_inputs(self, module: nn.Module, kept: str, name: str) -> None:
        """Keep `module`'s input of each batch as `self.<kept>[name]`."""
        def hook(_, args):
            getattr(self, kept)[name] = args[0]
        self._handles.append(module.register_forward_pre_hook(hook))

    def end_batch(self) -> None:
        self.dense_inputs = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _PairedCodes(_PairedHooks):
    """Hooks that accumulate, per factored layer of a block, Σ z zᵀ and Σ x zᵀ over its rank-k codes.

    z = down·x_c is the code the compressed layer computes anyway (its `down`'s output); x is the
    layer's input in the dense copy of the block (x_d, target "dense") or in the compressed block
    (x_c, target "compressed"), for the same batch. Per token this costs k² + in·k, where the
    in × in sums Σ x_c x_cᵀ and Σ x_d x_cᵀ would cost 2·in².
    """

    def __init__(self, dense: nn.Module, compressed: nn.Module, names: list[str], target: str):
        super().__init__()
        self.target = target
        self.code_gram: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, torch.Tensor] = {}  # this batch's x_c of each layer
        for name in names:
            layer = compressed.get_submodule(name)
            if target == "dense":
                self._keep_inputs(dense.get_submodule(name), "dense_inputs", name)
            self._keep_inputs(layer, "_inputs", name)
            self._handles.append(layer.down.register_forward_hook(self._code_hook(name)))

    def _code_hook(self, name: str):
        def hook(module, args, codes):
            x = self.dense_inputs[name] if self.target == "dense" else self._inputs[name]
            work = torch.float64 if codes.dtype == torch.float64 else torch.float32
            z = codes.detach().reshape(-1, codes.shape[-1]).to(work)
            x = x.detach().reshape(-1, x.shape[-1]).to(z.device, work)
            if name not in self.code_gram:
                self.code_gram[name] = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64)
                self.cross[name] = torch.zeros(x.shape[1], z.shape[1], dtype=torch.float64)
            self.code_gram[name] += (z.T @ z).to("cpu", torch.float64)
            self.cross[name] += (x.T @ z).to("cpu", torch.float64)
        return hook

    def end_batch(self) -> None:
        super().end_batch()
        self._inputs = {}


class _PairedInputs(_PairedHooks):
    """Hooks that accumulate, per factored layer of a block, Σ x_c x_cᵀ and Σ x_d x_cᵀ (in × in): what
    `refit_both` needs, where the plain update makes do with `_PairedCodes`.

    x_d is the layer's input in the dense copy of the block, x_c in the compressed block, for the
    same batch. Layers reading the very same input tensor (q/k/v, gate/up) share one accumulation.
    """

    def __init__(self, dense: nn.Module, compressed: nn.Module, names: dict[str, int]):
        super().__init__()
        self.names = names  # name relative to the block -> in_features
        self.gram: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._linked: set[str] = set()
        for name in names:
            self._keep_inputs(dense.get_submodule(name), "dense_inputs", name)
            self._handles.append(compressed.get_submodule(name).register_forward_pre_hook(self._compressed_hook(name)))

    def _compressed_hook(self, name: str):
        def hook(module, args):
            if name in self._linked:
                return  # reads the same input as an earlier layer: accumulated there
            x_c = args[0]
            entry = self._seen.get(id(x_c))
            if entry is not None and entry[0]() is x_c and name not in self.gram:
                self.gram[name], self.cross[name] = self.gram[entry[1]], self.cross[entry[1]]
                self._linked.add(name)
                return
            dim = self.names[name]
            work = torch.float64 if x_c.dtype == torch.float64 else torch.float32
            c = x_c.detach().reshape(-1, dim).to(work)
            d = self.dense_inputs[name].detach().reshape(-1, dim).to(x_c.device, work)
            if name not in self.gram:
                self.gram[name] = torch.zeros(dim, dim, dtype=torch.float64)
                self.cross[name] = torch.zeros(dim, dim, dtype=torch.float64)
            self.gram[name] += (c.T @ c).to("cpu", torch.float64)
            self.cross[name] += (d.T @ c).to("cpu", torch.float64)
            self._seen[id(x_c)] = (weakref.ref(x_c), name)
        return hook

    def end_batch(self) -> None:
        super().end_batch()
        self._seen.clear()


@torch.no_grad()
def update_block(
    dense_block: nn.Module,
    block: nn.Module,
    factored: dict[str, int],
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    device: torch.device,
    target: str = "dense",
    ridge: float = UPDATE_RIDGE,
    dense_inputs: list[dict[str, torch.Tensor]] | None = None,
    both_rounds: int = 0,
) -> None:
    """Refit `up` of every factored layer of `block` (names relative to it) against the dense block.

    `target` "dense": match W·x_d, the dense layer on the dense block's own internal inputs (corrects
    the error of the layers before it in the block too); "compressed": match W·x_c, the dense layer
    on the compressed block's inputs. `dense_inputs` (per batch, name → x_d, as `block_stats` keeps
    them) saves running the dense block again: the same inputs, the same numbers. `both_rounds` > 0
    refits both factors together (`refit_both`) that many times, each round on the inputs the block
    then produces (a layer's x_c moves as the layers before it in the block are refitted).
    """
    if target not in UPDATE_TARGETS:
        raise LowrankError(f"unknown update target {target!r}; choose one of {', '.join(UPDATE_TARGETS)}")
    for _ in range(max(1, both_rounds)):
        _update_round(dense_block, block, factored, hidden, calls, device, target, ridge, dense_inputs, both_rounds > 0)


def _update_round(dense_block: nn.Module, block: nn.Module, factored: dict[str, int], hidden: list[torch.Tensor],
                  calls: list[BlockCall], device: torch.device, target: str, ridge: float,
                  dense_inputs: list[dict[str, torch.Tensor]] | None, both: bool) -> None:
    """One pass over the calibration batches accumulating each layer's sums, then one refit of every layer.

    The plain update sums over the rank-k codes (`_PairedCodes`); refitting both factors needs the
    in × in sums (`_PairedInputs`).
    """
    layers = [name for name in factored if isinstance(block.get_submodule(name), LowRankLinear)]
    dims = {name: weight_matrix(dense_block.get_submodule(name)).shape[1] for name in layers}
    ranks = {name: block.get_submodule(name).rank for name in layers}
    run_dense = both or target == "dense"
    pairs = _PairedInputs(dense_block, block, dims) if both else _PairedCodes(dense_block, block, layers, target)
    # each pass ends once what it reads has run: the layers' inputs, or (plain update) their codes
    compressed_cut = ForwardCutoff([block.get_submodule(n) for n in layers], after="input") if both else \
        ForwardCutoff([block.get_submodule(n).down for n in layers], after="output")
    dense_cut = ForwardCutoff([dense_block.get_submodule(n) for n in layers], after="input")
    try:
        with compressed_cut, dense_cut:
            for b, (h, call) in enumerate(zip(hidden, calls)):
                if run_dense:
                    if dense_inputs:
                        pairs.dense_inputs = dense_inputs[b]
                    else:
                        dense_cut.run(dense_block, h, call, device)
                compressed_cut.run(block, h, call, device)
                pairs.end_batch()
    finally:
        pairs.close()
    if both:
        local = {n: [pairs.gram[n], pairs.cross[n]] for n in pairs.gram}
        zeros = lambda n: [torch.zeros(dims[n], dims[n]), torch.zeros(dims[n], dims[n])]  # noqa: E731
    else:
        local = {n: [pairs.code_gram[n], pairs.cross[n]] for n in pairs.code_gram}
        zeros = lambda n: [torch.zeros(ranks[n], ranks[n]), torch.zeros(dims[n], ranks[n])]  # noqa: E731
    sums = distributed.reduce_shared(local, layers, zeros, "the least-squares update")

    def refit(name: str) -> list[torch.Tensor]:
        weight = weight_matrix(dense_block.get_submodule(name)).detach().cpu()
        first, second = sums[name]
        if both:
            factors = refit_both(weight, first, second if target == "dense" else first, ranks[name], ridge)
            return [factors.up, factors.down]
        return [refit_up_from_codes(weight, first, second, ridge)]

    def receive(name: str) -> list[torch.Tensor]:  # another rank refits it (distributed runs)
        layer = block.get_submodule(name)
        shapes = [layer.up.weight.shape] + ([layer.down.weight.shape] if both else [])
        return [torch.empty(shape, dtype=torch.float64) for shape in shapes]

    costs = [float(block.get_submodule(n).up.weight.numel() * dims[n]) for n in layers]
    for name, refitted in distributed.computed_by_owner(layers, costs, refit, receive, "the update").items():
        layer = block.get_submodule(name)
        for factor, value in zip((layer.up, layer.down), refitted):
            factor.weight.copy_(value.to(factor.weight.dtype))
