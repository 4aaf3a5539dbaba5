"""The closed-form update (SVD-LLM's "parameter update"): refit each factor `up` by least squares.

With a layer's first factor `down` fixed, its second factor `up` is refitted by ridge least squares
so that up·down·x_c matches the dense layer's output W·x_d, where x_c is the layer's input inside
the compressed block and x_d its input inside the dense block, both fed the same block input.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .block_capture import BlockCall, run_block
from .errors import LowrankError
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


class _PairedCodes:
    """Hooks that accumulate, per factored layer of a block, Σ z zᵀ and Σ x zᵀ over its rank-k codes.

    z = down·x_c is the code the compressed layer computes anyway (its `down`'s output); x is the
    layer's input in the dense copy of the block (x_d, target "dense") or in the compressed block
    (x_c, target "compressed"), for the same batch. Per token this costs k² + in·k, where the
    in × in sums Σ x_c x_cᵀ and Σ x_d x_cᵀ would cost 2·in².
    """

    def __init__(self, dense: nn.Module, compressed: nn.Module, names: list[str], target: str):
        self.target = target
        self.dense_inputs: dict[str, torch.Tensor] = {}
        self.code_gram: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, torch.Tensor] = {}  # this batch's x_c of each layer
        self._handles = []
        for name in names:
            layer = compressed.get_submodule(name)
            if target == "dense":
                self._handles.append(dense.get_submodule(name).register_forward_pre_hook(self._dense_hook(name)))
            self._handles.append(layer.register_forward_pre_hook(self._input_hook(name)))
            self._handles.append(layer.down.register_forward_hook(self._code_hook(name)))

    def _dense_hook(self, name: str):
        def hook(module, args):
            self.dense_inputs[name] = args[0]
        return hook

    def _input_hook(self, name: str):
        def hook(module, args):
            self._inputs[name] = args[0]
        return hook

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
        self.dense_inputs = {}
        self._inputs = {}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


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
) -> None:
    """Refit `up` of every factored layer of `block` (names relative to it) against the dense block.

    `target` "dense": match W·x_d, the dense layer on the dense block's own internal inputs (corrects
    the error of the layers before it in the block too); "compressed": match W·x_c, the dense layer
    on the compressed block's inputs. `dense_inputs` (per batch, name → x_d, as `block_stats` keeps
    them) saves running the dense block again: the same inputs, the same numbers.
    """
    if target not in UPDATE_TARGETS:
        raise LowrankError(f"unknown update target {target!r}; choose one of {', '.join(UPDATE_TARGETS)}")
    layers = [name for name in factored if isinstance(block.get_submodule(name), LowRankLinear)]
    dims = {name: weight_matrix(dense_block.get_submodule(name)).shape[1] for name in layers}
    ranks = {name: block.get_submodule(name).rank for name in layers}
    codes = _PairedCodes(dense_block, block, layers, target)
    try:
        for b, (h, call) in enumerate(zip(hidden, calls)):
            if target == "dense":
                if dense_inputs:
                    codes.dense_inputs = dense_inputs[b]
                else:
                    run_block(dense_block, h, call, device)
            run_block(block, h, call, device)
            codes.end_batch()
    finally:
        codes.close()
    sums = distributed.reduce_shared({n: [codes.code_gram[n], codes.cross[n]] for n in codes.code_gram}, layers,
                                     lambda n: [torch.zeros(ranks[n], ranks[n]), torch.zeros(dims[n], ranks[n])],
                                     "the least-squares update")

    def refit(name: str) -> list[torch.Tensor]:
        weight = weight_matrix(dense_block.get_submodule(name)).detach().cpu()
        code_gram, cross = sums[name]
        return [refit_up_from_codes(weight, code_gram, cross, ridge)]

    def receive(name: str) -> list[torch.Tensor]:  # another rank refits it (distributed runs)
        return [torch.empty(block.get_submodule(name).up.weight.shape, dtype=torch.float64)]

    costs = [float(block.get_submodule(n).up.weight.numel() * dims[n]) for n in layers]
    for name, (up,) in distributed.computed_by_owner(layers, costs, refit, receive, "the update").items():
        layer = block.get_submodule(name)
        layer.up.weight.copy_(up.to(layer.up.weight.dtype))
