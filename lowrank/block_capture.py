"""Capturing what a model's transformer blocks receive, and running one block on its own.

Every block is swapped for a recorder for one forward pass per batch: the recorder keeps the
block's hidden-state input (first block only) and its other call arguments (masks, positions), then
passes the hidden states on without computing. With those, any block can later be run alone on
any hidden states (`run_block`), which is how sequential compression walks the model block by block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import distributed
from .calibration import window_batches
from .errors import LowrankError
from .targets import find_block_list
from .model_info import without_cache


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


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise LowrankError(f"a transformer block returned {type(output).__name__}, not hidden states; "
                       "use --one-shot for this architecture")


class StandIn(nn.Module):
    """A module put in a block's place in the model's block list, for one pass that does not run the block.

    The real block is kept outside the module tree (so moving the model leaves it alone); attribute
    lookups the model's loop makes on its blocks (e.g. `attention_type`) fall through to it.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "_block", block)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


class _BlockRecorder(StandIn):
    """Stands in for block `index` during capture: records its call and passes the hidden states on."""

    def __init__(self, block: nn.Module, index: int, record, last: bool):
        super().__init__(block)
        object.__setattr__(self, "_record", record)
        self.index = index
        self.last = last

    def forward(self, *args, **kwargs):
        hidden, call = _split_hidden(args, kwargs)
        self._record(self.index, hidden, call)
        if self.last:
            raise _StopForward
        return hidden


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    windows: "torch.Tensor | list[torch.Tensor]",
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> CapturedInputs:
    """Run the model up to its blocks for every batch of `windows`; keep what the blocks receive, on CPU.

    Every block is replaced by a recorder for the duration, so no block computes anything and the
    forward stops at the last block. Per-block arguments (e.g. a sliding-window mask on some layers)
    are kept per block; tensors shared between blocks are stored once.
    """
    _, blocks = find_block_list(model)
    home = model_device(model)
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
        for batch in distributed.my_share(window_batches(windows, batch_size)):  # this rank's share: all with one process
            memo.clear()
            try:
                model(input_ids=batch.to(device), **without_cache(model))
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


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, device: torch.device) -> torch.Tensor:
    """One block on one batch, on `device`; returns its output hidden states (on `device`)."""
    memo: dict[int, Any] = {}
    hidden = hidden.to(device)
    args = _move(call.args, device, memo)
    kwargs = _move(call.kwargs, device, memo)
    if call.hidden_by_keyword:
        return hidden_of(block(*args, hidden_states=hidden, **kwargs))
    return hidden_of(block(hidden, *args, **kwargs))
