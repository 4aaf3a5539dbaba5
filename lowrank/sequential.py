"""Where compression gets each block's statistics: from the dense model, or block by block on the compressed path.

Compression (`lowrank.compression`) factors one group of modules at a time from their input
statistics; a *producer* here hands it those groups as `BlockWork`. Two producers exist:

- `dense_statistics` (one-shot): every factored module at once, statistics from the dense model;
- `sequential_statistics`: one transformer block at a time. The inputs of the first block are
  captured once for all calibration windows; block l's statistics come from the outputs of the
  already-compressed blocks 0..l−1, and once the consumer has compressed block l the calibration
  activations are run through it to become block l+1's inputs (as GPTQ and SVD-LLM do). Errors
  then stop compounding through depth, and only one block sits on the compute device at a time.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .block_capture import BlockCall, CapturedInputs, capture_block_inputs, model_device, run_block
from .calibration import ActivationStats, StatsCollector, all_reduce_stats, collect_stats
from .errors import CalibrationError
from .forward_cutoff import ForwardCutoff
from .plan import Plan
from .stage_times import stage
from .targets import Target, find_block_list


@dataclass
class BlockWork:
    """Modules to factor together, their input statistics, and (sequential only) the block they live in."""

    names: list[str]  # full module names, in plan order
    stats: dict[str, ActivationStats] | None
    block: nn.Module | None = None  # the transformer block holding `names` (None: one-shot, or outside the blocks)
    prefix: str = ""  # the block's own name plus "." (names relative to the block follow it)
    inputs: list[torch.Tensor] = field(default_factory=list)  # the block's input hidden states, per batch
    calls: list[BlockCall] = field(default_factory=list)  # the block's other call arguments, per batch
    device: torch.device | None = None
    dense_outputs: list[torch.Tensor] | None = None  # the dense block on the dense path's inputs (for refinement)
    # per batch, each module's input inside the dense block (kept by block_stats for the update's
    # dense target, so that the update does not run the dense block again); empty: not kept
    dense_inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    update_batches: int | None = None  # the least-squares update fits on this many leading batches (None: all)


def dense_statistics(
    model: nn.Module,
    plan: Plan,
    targets: list[Target],
    windows: torch.Tensor | None,
    batch_size: int = 8,
    progress: bool = True,
    stats: dict[str, ActivationStats] | None = None,
) -> Iterator[BlockWork]:
    """One-shot: every factored module at once, with the dense model's statistics (`stats` if already collected).

    Without `windows` (method svd) the modules come without statistics.
    """
    if stats is None and windows is not None:
        wanted = [t for t in targets if t.name in plan.factored]
        stats = collect_stats(model, wanted, windows, batch_size=batch_size, progress=progress)
    yield BlockWork(list(plan.factored), stats)


def block_of(name: str, prefix: str) -> int | None:
    """Index of the block that module `name` lives in, or None outside the block list."""
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def block_stats(
    model: nn.Module,
    block: nn.Module,
    targets: list[Target],
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    device: torch.device,
    keep_inputs: list[dict[str, torch.Tensor]] | None = None,
    keep_batches: int | None = None,
) -> dict[str, ActivationStats]:
    """Input statistics of `targets` (inside `block`) for the given block inputs.

    With `keep_inputs` (a list), each batch's input of every target is appended to it as a dict
    (on CPU; modules reading one input share one tensor): what the update's dense target needs; with
    `keep_batches`, only the leading batches' (those the update fits on).
    """
    # this batch's inputs: id → (the input, kept alive so that its id stays its own; its CPU copy)
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str):
        def hook(module, args):
            if keep_batches is not None and len(keep_inputs) > keep_batches:
                return
            if id(args[0]) not in copies:
                copies[id(args[0])] = (args[0], args[0].detach().to("cpu"))
            keep_inputs[-1][name] = copies[id(args[0])][1]
        return hook

    handles = [] if keep_inputs is None else [
        model.get_submodule(t.name).register_forward_pre_hook(keep(t.name)) for t in targets]
    try:
        modules = [model.get_submodule(t.name) for t in targets]
        with StatsCollector(model, targets) as collector, ForwardCutoff(modules, after="input") as cutoff:
            for h, call in zip(hidden, calls):
                if keep_inputs is not None:
                    keep_inputs.append({})
                cutoff.run(block, h, call, device)  # ends once the last target has its input
                collector.end_batch()
                copies.clear()
        if keep_inputs is not None and keep_batches is not None:
            del keep_inputs[keep_batches:]  # the batches past the update's, appended empty
    finally:
        for handle in handles:
            handle.remove()
    collector.stats = all_reduce_stats(collector.stats, targets)  # this rank's batches → all of them
    missing = [t.name for t in targets if t.name not in collector.stats]
    if missing:
        raise CalibrationError(f"{len(missing)} target layers never ran during calibration (first: {missing[0]}); "
                               "exclude them with --exclude")
    return collector.stats


@torch.no_grad()
def sequential_statistics(
    model: nn.Module,
    plan: Plan,
    targets: dict[str, Target],
    windows: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | None = None,
    progress: bool = True,
    dense_stream: bool = False,
    keep_inputs: bool = False,
    update_batches: int | None = None,
) -> Iterator[BlockWork]:
    """Yield each block's factored modules with statistics taken on the compressed path.

    `keep_inputs`: each BlockWork also carries its modules' inputs inside the dense block
    (`dense_inputs`), for the update's dense target; `update_batches`: of this rank's leading batches
    only, which the update fits on (None: all).

    The consumer must compress the yielded block before asking for the next one: the next block's
    inputs are computed by running the block as it is then. Layers outside the blocks (an included
    lm_head, say) come last, with statistics from the whole compressed model. With `dense_stream`
    the dense path's hidden states flow beside the compressed ones, and each block comes with its
    dense outputs on them (`BlockWork.dense_outputs`, what block refinement fits).
    """
    prefix, blocks = find_block_list(model)
    device = device if device is not None else model_device(model)
    by_block: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in plan.factored:
        index = block_of(name, prefix)
        (outside if index is None else by_block.setdefault(index, [])).append(name)

    was_training = model.training
    model.eval()
    try:
        last_needed = max(by_block, default=-1)
        with stage("compress_capture"):
            captured = capture_block_inputs(model, windows, batch_size, device) if by_block else CapturedInputs()
        hidden = captured.hidden
        dense_hidden = captured.hidden if dense_stream else None  # the dense path's block inputs
        bar = tqdm(range(last_needed + 1), desc="Sequential", unit="block", disable=not progress)
        for index in bar:
            bar.set_postfix_str(f"block {index + 1}/{len(blocks)}")
            block = blocks[index]
            block_home = next(block.parameters()).device
            block.to(device)
            names = by_block.get(index, [])
            if dense_hidden is not None:  # the block is still dense here
                dense_hidden = [run_block(block, h, call, device).to("cpu")
                                for h, call in zip(dense_hidden, captured.calls[index])]
            if names:
                kept = [] if keep_inputs else None
                with stage("compress_statistics"):
                    stats = block_stats(model, block, [targets[n] for n in names], hidden, captured.calls[index],
                                        device, keep_inputs=kept, keep_batches=update_batches)
                yield BlockWork(names, stats, block, f"{prefix}.{index}.", hidden, captured.calls[index], device,
                                dense_inputs=kept or [], dense_outputs=dense_hidden, update_batches=update_batches)
                del stats, kept
            if index < last_needed:
                with stage("compress_propagate"):
                    hidden = [run_block(block, h, call, device).to("cpu")
                              for h, call in zip(hidden, captured.calls[index])]
            block.to(block_home)
        del hidden, dense_hidden, captured
        if outside:
            yield BlockWork(outside, collect_stats(model, [targets[n] for n in outside], windows, batch_size,
                                                   progress=progress))
    finally:
        model.train(was_training)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated on a CUDA device, else this process's resident set (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
