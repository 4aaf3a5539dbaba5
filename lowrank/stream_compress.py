"""The compress pass of streaming compression: block by block from disk into output shards.

Each block is loaded from the checkpoint (`BlockSource`), its statistics are taken on the
compressed path (the outputs of the blocks already compressed, as `sequential_statistics` does in
memory), its planned modules are factored and their `up` refitted (`compression.compress_blocks`),
its tensors go to the `ShardWriter`, and it is freed. When a shard is flushed, the block-boundary
hidden states are saved beside it, so that `--resume` restarts from the first unwritten block.
With block refinement, the dense path's hidden states flow beside the compressed ones: they are
kept in the same store (each level's dense batches after its compressed ones), spilled and saved
for `--resume` with them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, stream_ranks
from .block_capture import capture_block_inputs, run_block
from .block_source import BlockSource
from .boundary_store import BoundaryStore
from .calibration import DEFAULT_UPDATE_SAMPLES, leading_batches, window_batches
from .compression import compress_blocks
from .errors import LowrankError
from .factorize import DEFAULT_DAMPING
from .folder_guard import GUARD_SHAPE, guard_key
from .plan import Plan
from .refinement import RefineOptions
from .sequential import BlockWork, block_of, block_stats
from .shard_writer import ShardWriter
from .stream_profile import StageClock
from .targets import Target

BOUNDARY_FILE = "boundary.safetensors"


def block_tensors(source: BlockSource, index: int, factored: dict[str, int]) -> dict[str, torch.Tensor]:
    """Block `index`'s tensors under their checkpoint names, with a guard for each factored module (format 2)."""
    prefix = source.block_name(index) + "."
    tensors = {prefix + name: t for name, t in source.blocks[index].state_dict().items()}
    for name in factored:
        if name.startswith(prefix):
            dtype = tensors[f"{name}.up.weight"].dtype
            tensors[guard_key(name)] = torch.zeros(GUARD_SHAPE, dtype=dtype)
    return tensors


def outside_tensors(source: BlockSource) -> dict[str, torch.Tensor]:
    """The tensors outside the blocks (embeddings, norms, head), tied weights stored once under their first name."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in source.model.state_dict(keep_vars=True).items():
        if name.startswith(source.prefix + ".") or tensor.is_meta:
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensors[name] = tensor.detach()
    return tensors


def _save_boundary(folder: Path, hidden: list[torch.Tensor], block: int) -> None:
    from safetensors.torch import save_file

    tmp = folder / (BOUNDARY_FILE + ".tmp")
    save_file({f"batch.{b}": h.contiguous() for b, h in enumerate(hidden)}, str(tmp), metadata={"block": str(block)})
    tmp.replace(folder / BOUNDARY_FILE)


def _load_boundary(folder: Path, block: int) -> list[torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(folder / BOUNDARY_FILE), framework="pt") as handle:
        if handle.metadata().get("block") != str(block):
            raise LowrankError(f"{folder}: the saved boundary does not match the finished blocks; "
                               "rerun without --resume")
        return [handle.get_tensor(f"batch.{b}") for b in range(len(handle.keys()))]


@torch.no_grad()
def compress_pass(
    source: BlockSource,
    plan: Plan,
    targets: dict[str, Target],
    windows: torch.Tensor,
    writer: ShardWriter,
    store: BoundaryStore,
    *,
    batch_size: int = 8,
    update: bool = True,
    update_target: str = "dense",
    damping: float = DEFAULT_DAMPING,
    device: torch.device | str = "cpu",
    progress: bool = True,
    refine: RefineOptions | None = None,
    keep_inputs: bool = True,
    update_samples: int = DEFAULT_UPDATE_SAMPLES,
) -> dict[str, float]:
    """Compress every block of `source` by `plan`, sequentially, writing each to `writer` (see the module doc).

    Returns the seconds spent per part (load, statistics, factor_update, propagate, write).
    `keep_inputs`: the statistics forward keeps each layer's input for the update (faster; memory
    for one block's layer inputs over the update's windows); else the update runs the dense block
    again. The update fits on the first `update_samples` windows (0: all).
    """
    device = torch.device(device)
    clock = StageClock()
    by_block: dict[int, list[str]] = {}
    for name in plan.factored:
        index = block_of(name, source.prefix)
        if index is None:
            raise LowrankError(f"{name} lies outside the transformer blocks, which streaming compression does not "
                               "factor; drop it from the plan, or pass --no-stream")
        by_block.setdefault(index, []).append(name)
    source.load_outside()  # the embeddings, for the first block's inputs (the profile pass may have freed them)
    captured = capture_block_inputs(source.model, windows, batch_size, device)
    source.free_outside()  # back to disk until the last shard is written
    n_batches = len(captured.hidden)
    fitted = distributed.my_count(leading_batches(windows, batch_size, update_samples))  # the update's batches
    refining = refine is not None and refine.enabled
    per_level = 2 * n_batches if refining else n_batches  # batches n.. of a level: the dense path's (refinement)
    done = writer.finished_blocks
    start = done[-1] + 1 if done else 0
    first = captured.hidden + captured.hidden if refining else captured.hidden
    parts, total = 1 + refining, len(window_batches(windows, batch_size))  # the boundary as one process holds it
    hidden = first if start == 0 else [] if start == len(source.blocks) else \
        stream_ranks.dealt_out(lambda: _load_boundary(writer.folder, start), parts, total)
    for b, h in enumerate(hidden):
        store.put(start, b, h)
    del hidden, captured.hidden

    def save_boundary(last_flushed: int) -> None:
        if last_flushed + 1 < len(source.blocks):  # after the last block nothing needs a boundary
            every = stream_ranks.gathered(store.level(last_flushed + 1, per_level), parts, total)  # on rank 0
            if every is not None:
                _save_boundary(writer.folder, every, last_flushed + 1)

    bar = tqdm(range(start, len(source.blocks)), desc="Compress (stream)", unit="block", disable=not progress)
    for index in bar:
        with clock("load"):
            block = source.load_block(index).to(device)
        calls = captured.calls[index]
        names = by_block.get(index, [])
        if refining:  # the block is still dense: its outputs on the dense path
            for b in range(n_batches):
                store.put(index + 1, n_batches + b, run_block(block, store.get(index, n_batches + b), calls[b], device))
        if names:
            with clock("statistics"):
                inputs = store.level(index, n_batches)
                kept = [] if keep_inputs and update and update_target == "dense" else None  # the update's x_d
                work = BlockWork(names, None, block, source.block_name(index) + ".", inputs, calls, device,
                                 update_batches=fitted)
                work.stats = block_stats(source.model, block, [targets[n] for n in names], inputs, calls, device,
                                         keep_inputs=kept, keep_batches=fitted)  # held by `work` alone: freed once factored
                work.dense_inputs = kept or []
                work.dense_outputs = [store.get(index + 1, n_batches + b) for b in range(n_batches)] if refining else None
                del kept
            with clock("factor_update"):
                compress_blocks(source.model, plan, [work], update=update, update_target=update_target,
                                damping=damping, refine=refine,
                                refine_average=distributed.average_refinement if distributed.active() else None)
                del work, inputs
        with clock("propagate"):
            if index + 1 < len(source.blocks):
                for b in range(n_batches):
                    store.put(index + 1, b, run_block(block, store.get(index, b), calls[b], device).to("cpu"))
        with clock("write"):
            writer.add_block(index, block_tensors(source, index, plan.factored), on_flush=save_boundary)
        store.drop_level(index, per_level)
        source.free_block(index)
    with clock("write"):
        source.load_outside()
        writer.add_block(None, outside_tensors(source))
    store.close()
    return clock.rounded()
