"""Sequential compression: factor one transformer block at a time, on the compressed path's inputs.

One-shot compression takes every layer's statistics from the dense model, blind to the error the
compressed earlier blocks introduce. Here the inputs of the first block are captured once for all
calibration windows; then, block by block, the statistics of block l come from the outputs of the
already-compressed blocks 0..l−1, the block is factored, and the calibration activations are run
through the compressed block to become block l+1's inputs (as GPTQ and SVD-LLM do).

Only one block's weights sit on the compute device at a time and activations live on CPU, so this
is also how a model larger than the device is processed.

The optional closed-form update (SVD-LLM's "parameter update") refits each factored layer's second
factor `up` by ridge least squares, with its first factor `down` fixed, so that up·down·x_c matches
the dense layer's output W·x_d, where x_c is the layer's input inside the compressed block and x_d
its input inside the dense block, both fed the same block input.
"""

from __future__ import annotations

import copy
import logging
import resource
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import hf_integration
from .calibration import ActivationStats, StatsCollector, collect_stats
from .errors import CalibrationError, LowrankError
from .factorize import DEFAULT_DAMPING
from .layers import LowRankLinear
from .plan import Plan
from .targets import Target, find_block_list, weight_matrix

log = logging.getLogger(__name__)

#: Ridge of the update's least squares, relative to the mean eigenvalue of the rank-k Gram matrix.
UPDATE_RIDGE = 1e-4

#: What the update fits: the dense layer on the dense block's inputs, or on the compressed block's.
UPDATE_TARGETS = ("dense", "compressed")


# ---- capturing the blocks' call arguments ---------------------------------------------------------

class _StopForward(Exception):
    """Raised by the last block recorder: nothing after the blocks needs to run."""


@dataclass
class BlockCall:
    """How one block was called for one batch, without its hidden states (they flow separately)."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_by_keyword: bool  # hidden states passed as `hidden_states=` rather than first positional


@dataclass
class CapturedInputs:
    """First-block hidden states for every batch, and every block's other call arguments."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # per batch, on CPU
    calls: list[list[BlockCall]] = field(default_factory=list)  # [block][batch]


def _move(obj: Any, device: torch.device | str, memo: dict[int, Any]) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) moved to `device`; shared tensors stay shared."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    """Separate a block's hidden-state input from the rest of its call arguments."""
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs), hidden_by_keyword=False)
    if "hidden_states" not in kwargs:
        raise LowrankError("the transformer block was called without hidden states as first argument or "
                           "`hidden_states=`; this architecture is not supported by sequential compression, "
                           "use --one-shot")
    rest = dict(kwargs)
    hidden = rest.pop("hidden_states")
    return hidden, BlockCall((), rest, hidden_by_keyword=True)


def _hidden_of(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise LowrankError(f"a transformer block returned {type(output).__name__}, not hidden states; "
                       "use --one-shot for this architecture")


class _BlockRecorder(nn.Module):
    """Stands in for block `index` during capture: records its call and passes the hidden states on.

    The real block is kept outside the module tree (so moving the model leaves it alone); attribute
    lookups the model's loop makes on its blocks (e.g. `attention_type`) fall through to it.
    """

    def __init__(self, block: nn.Module, index: int, record, last: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_record", record)
        self.index = index
        self.last = last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs):
        hidden, call = _split_hidden(args, kwargs)
        self._record(self.index, hidden, call)
        if self.last:
            raise _StopForward
        return hidden


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> CapturedInputs:
    """Run the model up to its blocks for every batch of `windows`; keep what the blocks receive, on CPU.

    Every block is replaced by a recorder for the duration, so no block computes anything and the
    forward stops at the last block. Per-block arguments (e.g. a sliding-window mask on some layers)
    are kept per block; tensors shared between blocks are stored once.
    """
    _, blocks = find_block_list(model)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    originals = list(blocks)
    captured = CapturedInputs(calls=[[] for _ in originals])
    memo: dict[int, Any] = {}

    def record(index: int, hidden: torch.Tensor, call: BlockCall) -> None:
        if index == 0:
            captured.hidden.append(_move(hidden, "cpu", memo))
        captured.calls[index].append(_move(call, "cpu", memo))

    was_training = model.training
    model.eval()
    for i, block in enumerate(originals):
        blocks[i] = _BlockRecorder(block, i, record, last=i == len(originals) - 1)
    try:
        model.to(device)  # only the modules outside the blocks: the blocks are not in the tree now
        for batch in windows.split(batch_size):
            memo.clear()
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise LowrankError("the model's forward pass did not reach its last transformer block; "
                                   "use --one-shot for this architecture")
        memo.clear()
    finally:
        model.to(home)
        for i, block in enumerate(originals):
            blocks[i] = block
        model.train(was_training)
    return captured


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, device: torch.device) -> torch.Tensor:
    """One block on one batch, on `device`; returns its output hidden states (on `device`)."""
    memo: dict[int, Any] = {}
    hidden = hidden.to(device)
    args = _move(call.args, device, memo)
    kwargs = _move(call.kwargs, device, memo)
    if call.hidden_by_keyword:
        return _hidden_of(block(*args, hidden_states=hidden, **kwargs))
    return _hidden_of(block(hidden, *args, **kwargs))


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
    w = weight.to(torch.float64)
    d = down.to(torch.float64)
    g = gram.to(torch.float64)
    c = g if cross is None else cross.to(torch.float64)
    reduced = d @ g @ d.T  # (k, k): Gram matrix of the rank-k codes
    reduced = (reduced + reduced.T) / 2
    scale = torch.diagonal(reduced).mean().clamp(min=torch.finfo(torch.float64).tiny)
    reduced = reduced + ridge * scale * torch.eye(reduced.shape[0], dtype=torch.float64, device=reduced.device)
    rhs = w @ c @ d.T  # (out, k)
    # up · reduced = rhs, and reduced is symmetric positive definite.
    up = torch.linalg.solve(reduced, rhs.T).T
    if not torch.isfinite(up).all():
        raise LowrankError("the least-squares update produced NaN or Inf; rerun without --update")
    return up


class _PairedInputs:
    """Hooks that accumulate, per factored layer of a block, Σ x_c x_cᵀ and Σ x_d x_cᵀ.

    x_d is the layer's input in the dense copy of the block, x_c in the compressed block, for the
    same batch. Layers reading the very same input tensor (q/k/v, gate/up) share one accumulation.
    """

    def __init__(self, dense: nn.Module, compressed: nn.Module, names: dict[str, int]):
        self.names = names  # name relative to the block -> in_features
        self.dense_inputs: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._linked: set[str] = set()
        self._handles = []
        for name in names:
            self._handles.append(dense.get_submodule(name).register_forward_pre_hook(self._dense_hook(name)))
            self._handles.append(compressed.get_submodule(name).register_forward_pre_hook(self._compressed_hook(name)))

    def _dense_hook(self, name: str):
        def hook(module, args):
            self.dense_inputs[name] = args[0]
        return hook

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
            d = self.dense_inputs[name].detach().reshape(-1, dim).to(work)
            if name not in self.gram:
                self.gram[name] = torch.zeros(dim, dim, dtype=torch.float64)
                self.cross[name] = torch.zeros(dim, dim, dtype=torch.float64)
            self.gram[name] += (c.T @ c).to("cpu", torch.float64)
            self.cross[name] += (d.T @ c).to("cpu", torch.float64)
            self._seen[id(x_c)] = (weakref.ref(x_c), name)
        return hook

    def end_batch(self) -> None:
        self.dense_inputs.clear()
        self._seen.clear()

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
) -> None:
    """Refit `up` of every factored layer of `block` (names relative to it) against the dense block.

    `target` "dense": match W·x_d, the dense layer on the dense block's own internal inputs (corrects
    the error of the layers before it in the block too); "compressed": match W·x_c, the dense layer
    on the compressed block's inputs.
    """
    if target not in UPDATE_TARGETS:
        raise LowrankError(f"unknown update target {target!r}; choose one of {', '.join(UPDATE_TARGETS)}")
    dims = {name: weight_matrix(dense_block.get_submodule(name)).shape[1] for name in factored}
    pairs = _PairedInputs(dense_block, block, dims)
    try:
        for h, call in zip(hidden, calls):
            _run_block(dense_block, h, call, device)
            _run_block(block, h, call, device)
            pairs.end_batch()
    finally:
        pairs.close()
    for name in factored:
        layer = block.get_submodule(name)
        if not isinstance(layer, LowRankLinear):
            continue
        weight = weight_matrix(dense_block.get_submodule(name)).detach().cpu()
        cross = pairs.cross[name] if target == "dense" else None
        up = refit_up(weight, layer.down.weight.detach().cpu(), pairs.gram[name], cross, ridge)
        layer.up.weight.copy_(up.to(layer.up.weight.dtype))


# ---- the sequential pass ----------------------------------------------------------------------------

def _block_of(name: str, prefix: str) -> int | None:
    """Index of the block that module `name` lives in, or None outside the block list."""
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _sub_plan(plan: Plan, names: list[str]) -> Plan:
    return Plan(modules={n: plan.modules[n] for n in names}, method=plan.method)


def _block_stats(
    model: nn.Module,
    block: nn.Module,
    targets: list[Target],
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    device: torch.device,
) -> dict[str, ActivationStats]:
    """Input statistics of `targets` (inside `block`) for the given block inputs."""
    with StatsCollector(model, targets) as collector:
        for h, call in zip(hidden, calls):
            _run_block(block, h, call, device)
            collector.end_batch()
    missing = [t.name for t in targets if t.name not in collector.stats]
    if missing:
        raise CalibrationError(f"{len(missing)} target layers never ran during calibration (first: {missing[0]}); "
                               "exclude them with --exclude")
    return collector.stats


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated on a CUDA device, else this process's resident set (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def compress_sequential(
    model: nn.Module,
    plan: Plan,
    windows: torch.Tensor,
    method: str = "whiten",
    update: bool = False,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
    update_target: str = "dense",
) -> Plan:
    """Compress `model` in place, block by block, following `plan`; return the plan.

    Each block's statistics come from the outputs of the already-compressed blocks before it.
    `update` refits every factor `up` by ridge least squares against the dense block (SVD-LLM's
    parameter update; `update_target` says against what, see `update_block`). Blocks are moved to `device` (default: where the model is) one at a time
    and back afterwards; calibration activations stay on CPU.
    """
    from .compress import apply_plan, check_plan_matches, needs_statistics

    if not needs_statistics(method):
        raise LowrankError(f"sequential compression needs calibration statistics, which method {method} does "
                           "not use; pass --one-shot or --method whiten")
    if windows is None or windows.numel() == 0:
        raise LowrankError("sequential compression needs calibration text; pass --calib")
    plan.method = method
    prefix, blocks = find_block_list(model)
    targets = {t.name: t for t in _targets_of(model, plan)}
    check_plan_matches(plan, list(targets.values()))
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    by_block: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in plan.factored:
        index = _block_of(name, prefix)
        (outside if index is None else by_block.setdefault(index, [])).append(name)

    was_training = model.training
    model.eval()
    try:
        last_needed = max(by_block, default=-1)
        captured = capture_block_inputs(model, windows, batch_size, device) if by_block else CapturedInputs()
        hidden = captured.hidden
        bar = tqdm(range(last_needed + 1), desc="Sequential", unit="block", disable=not progress)
        for index in bar:
            bar.set_postfix_str(f"block {index + 1}/{len(blocks)}")
            block = blocks[index]
            block_home = next(block.parameters()).device
            block.to(device)
            names = by_block.get(index, [])
            if names:
                block_targets = [targets[n] for n in names]
                stats = _block_stats(model, block, block_targets, hidden, captured.calls[index], device)
                dense_block = copy.deepcopy(block) if update else None
                apply_plan(model, _sub_plan(plan, names), stats, damping=damping, progress=False)
                del stats
                if update:
                    relative = {n[len(f"{prefix}.{index}."):]: plan.factored[n] for n in names}
                    update_block(dense_block, block, relative, hidden, captured.calls[index], device,
                                 target=update_target)
                    del dense_block
            if index < last_needed:
                hidden = [_run_block(block, h, call, device).to("cpu")
                          for h, call in zip(hidden, captured.calls[index])]
            block.to(block_home)
        del hidden, captured
        if outside:
            # Layers outside the blocks (e.g. an included lm_head) see the compressed blocks' outputs.
            stats = collect_stats(model, [targets[n] for n in outside], windows, batch_size, progress=progress)
            apply_plan(model, _sub_plan(plan, outside), stats, damping=damping, progress=False)
    finally:
        model.train(was_training)
    hf_integration.attach(model, plan.factored, plan.method)
    plan.options.update({"sequential": True, "update": bool(update)})
    if update:
        plan.options["update_target"] = update_target
    peak = peak_memory_mib(device)
    log.info("sequential compression: peak %s memory %.0f MiB", device.type, peak)
    if progress:
        tqdm.write(f"sequential compression: peak {'GPU' if device.type == 'cuda' else 'process'} memory {peak:,.0f} MiB")
    return plan


def _targets_of(model: nn.Module, plan: Plan) -> list[Target]:
    """The plan's modules as Targets, read from the model (a named module that is missing is an error)."""
    found = []
    for name in plan.modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LowrankError(f"the plan names module {name!r}, which is not in this model; "
                               "regenerate the plan for this model") from None
        if isinstance(module, LowRankLinear):
            raise LowrankError(f"{name} is already factored; load the dense checkpoint to compress it again")
        out_features, in_features = weight_matrix(module).shape
        found.append(Target(name, out_features, in_features, module.bias is not None))
    return found
