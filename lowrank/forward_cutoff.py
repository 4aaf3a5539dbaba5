"""Ending a block's forward pass once the modules that a pass reads from have all run.

Sequential compression's statistics pass reads only the factored modules' inputs, and the update's
pass only their codes (each `down` factor's output); whatever the block computes after the last of
them is thrown away. At ratio 0.8 on SmolLM2, 26 of the 30 blocks factor nothing after `gate_proj`,
so the rest of their MLP, most of a block's work, need not run in those two passes. What is read
does not change: the same modules see the same inputs, so the sums are the same bits.

The first batch runs whole and counts how often each watched module runs. Only when each ran exactly
once (no module reused within the block) do the later batches end right after the last of them.
"""

from __future__ import annotations

import torch
from torch import nn

from .block_capture import BlockCall, run_block

#: Where a watched module's hook ends the pass: once it has its input, or once it has computed its output.
CUT_POINTS = ("input", "output")


class _Cut(Exception):
    """Raised by the hook of the last watched module to run: nothing after it is needed."""


class ForwardCutoff:
    """Hooks on `modules` that end a block's forward pass once every one of them has run.

    Enter it after registering the hooks that collect: hooks run in the order they were registered, so
    the collectors have seen the last module before the pass ends.
    """

    def __init__(self, modules: list[nn.Module], after: str = "input"):
        if after not in CUT_POINTS:
            raise ValueError(f"after must be one of {CUT_POINTS}, not {after!r}")
        self.modules = list({id(m): m for m in modules}.values())  # each module once
        self.after = after
        self.armed = False  # set after a first batch in which each module ran exactly once
        self.cut_batches = 0  # how many batches ended early (what a test checks)
        self._calls: dict[int, int] = {}  # this batch: module index → how many times it ran
        self._handles = []

    def _hook(self, index: int):
        def hook(module, *_):
            self._calls[index] = self._calls.get(index, 0) + 1
            if self.armed and len(self._calls) == len(self.modules):
                raise _Cut
        return hook

    def __enter__(self) -> "ForwardCutoff":
        for index, module in enumerate(self.modules):
            register = module.register_forward_pre_hook if self.after == "input" else module.register_forward_hook
            self._handles.append(register(self._hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, block: nn.Module, hidden: torch.Tensor, call: BlockCall, device: torch.device) -> torch.Tensor | None:
        """`run_block`, ended once every watched module has run: the block's output, or None where it was cut."""
        self._calls = {}
        try:
            output = run_block(block, hidden, call, device)
        except _Cut:
            self.cut_batches += 1
            return None
        if not self.armed:
            self.armed = bool(self.modules) and len(self._calls) == len(self.modules) and \
                all(count == 1 for count in self._calls.values())
        return output
