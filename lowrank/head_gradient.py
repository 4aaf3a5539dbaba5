"""The next-token loss's gradient at the last block's output, through the model's own head, a slice of tokens at a time.

Everything after the transformer blocks (the final norm, the head, a logit scale or soft cap) acts
on each position alone, so the gradient at one position's final hidden state depends on that
position and its next token only. Taken over slices of the tokens it is the same gradient (up to
float32 rounding: bit for bit on the Intel hosts measured, within a unit or two in the last place where
MKL rounds a slice of a few rows differently, as on an AMD EPYC host; tested), while the logits of the
whole batch never exist at once.

That matters for speed as much as for memory: 4 windows of 512 tokens over a 49k vocabulary have
403 MB of logits, and the loss's backward holds several such copies. glibc maps every allocation
over 32 MiB afresh and unmaps it when freed, so each copy was faulted in page by page and given
back, batch after batch: on SmolLM2 the sensitivity pass spent 11–22 of its 43–55 processor
seconds in the kernel. Slices whose logits stay under `LOGITS_SLICE_BYTES` are served from memory
the process already holds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .block_capture import StandIn, hidden_of
from .model_info import without_cache

#: The most bytes of float32 logits one slice of tokens may produce (under glibc's largest mmap threshold, 32 MiB).
LOGITS_SLICE_BYTES = 16 * 2**20


class _Injector(StandIn):
    """Stands in for a block while the head runs: the last one outputs the given final hidden states."""

    def __init__(self, block: nn.Module, holder: list, last: bool):
        super().__init__(block)
        object.__setattr__(self, "_holder", holder)
        self.last = last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return self._holder[0] if self.last else hidden


class _Final(Exception):
    """Raised by the last block's hook, carrying its output: nothing after the blocks needs to run."""

    def __init__(self, output):
        super().__init__()
        self.output = output


def slice_tokens(vocab_size: int, budget: int | None = None) -> int:
    """How many tokens one slice may hold for its float32 logits to stay within `budget` bytes (None:
    LOGITS_SLICE_BYTES); at least 1."""
    return max(1, (budget or LOGITS_SLICE_BYTES) // (4 * vocab_size))


def token_slices(windows: int, length: int, tokens: int) -> list[tuple[slice, slice]]:
    """(windows, positions) of each slice holding at most `tokens` tokens, covering a windows × length batch.

    Whole windows go together when one fits; otherwise each window is cut into equal parts.
    """
    if tokens >= length:
        per_slice = tokens // length
        return [(slice(w, min(w + per_slice, windows)), slice(0, length)) for w in range(0, windows, per_slice)]
    parts = math.ceil(length / tokens)
    size = math.ceil(length / parts)
    return [(slice(w, w + 1), slice(start, min(start + size, length)))
            for w in range(windows) for start in range(0, length, size)]


def final_hidden_states(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor) -> torch.Tensor:
    """The last block's output on `batch` (with its autograd graph, where gradients are on); the model's
    forward ends there, so the final norm and the head do not run."""

    def hook(module, args, output):
        raise _Final(hidden_of(output))

    handle = blocks[-1].register_forward_hook(hook)
    try:
        model(input_ids=batch, **without_cache(model))
    except _Final as final:
        return final.output
    finally:
        handle.remove()
    raise RuntimeError("the model's forward pass never reached its last block")


def head_gradient(model: nn.Module, blocks: nn.ModuleList, final: torch.Tensor, batch: torch.Tensor,
                  device: torch.device, tokens: int | None = None) -> torch.Tensor:
    """∂(summed next-token loss of `batch`)/∂`final`, the last block's output, through the model's own head.

    The model runs with its blocks swapped for pass-throughs, on a slice of `batch` at a time (at most
    `tokens` tokens; None: `slice_tokens` of the vocabulary), the last block handing over that slice
    of `final`. A window's last position predicts nothing (its gradient is zero).
    """
    tokens = tokens or slice_tokens(model.get_output_embeddings().weight.shape[0])
    following = nn.functional.pad(batch[:, 1:], (0, 1), value=-100)  # each position's next token
    holder: list[torch.Tensor] = []
    originals = list(blocks)
    home = model.get_input_embeddings().weight.device
    for i, block in enumerate(originals):
        blocks[i] = _Injector(block, holder, last=i == len(originals) - 1)
    gradient = torch.zeros(final.shape, dtype=final.dtype, device=device)
    try:
        model.to(device)  # the modules outside the blocks only: the blocks are out of the tree now
        for windows, positions in token_slices(final.shape[0], final.shape[1], tokens):
            holder[:] = [final[windows, positions].to(device).requires_grad_(True)]
            with torch.enable_grad():
                logits = model(input_ids=batch[windows, positions].to(device), **without_cache(model)).logits
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                   following[windows, positions].reshape(-1).to(device),
                                                   reduction="sum", ignore_index=-100)
                del logits
                gradient[windows, positions] = torch.autograd.grad(loss, holder[0])[0]
            del loss
    finally:
        model.to(home)
        for i, block in enumerate(originals):
            blocks[i] = block
    return gradient
