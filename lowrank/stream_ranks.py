"""Streaming on several ranks: what each rank keeps to itself, and what only rank 0 keeps on disk.

Each rank streams every block but holds only its own calibration batches (dealt round-robin, as
`distributed.my_share` deals them), and spills them to its own subfolder `rank-K` of
--offload-dir. Only rank 0 writes the partial folder and the output: the other ranks follow its
`ShardWriter` (`SharedWriter`), and the block boundary a resumed run restarts from is gathered
to rank 0 and saved in one process's batch order, so that any number of ranks can resume it
(`gathered`, `dealt_out`). With one process every function here is the identity.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from . import distributed
from .calibration import window_batches
from .plan import Plan
from .shard_writer import ShardWriter

log = logging.getLogger(__name__)


def rank_folder(offload_dir: str | Path | None) -> str | None:
    """This rank's own subfolder of --offload-dir (`rank-K`) when several ranks run; the folder itself alone."""
    if offload_dir is None or not distributed.active():
        return None if offload_dir is None else str(offload_dir)
    return str(Path(offload_dir) / f"rank-{distributed.rank()}")


def remove_rank_folder(offload_dir: str | Path | None, own: str | None) -> None:
    """Remove this rank's subfolder `own` of `offload_dir` (whatever it spilled), at the end of a run or a failure."""
    if own is not None and offload_dir is not None and Path(own) != Path(offload_dir):
        shutil.rmtree(own, ignore_errors=True)


def memory_share(available: int) -> int:
    """The memory one rank may plan on: what the machine has free, split among the ranks on it."""
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if distributed.active() else available


def my_windows(windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The calibration windows this rank's batches hold (all of them with one process): what it stores."""
    if not distributed.active():
        return windows
    mine = distributed.my_share(window_batches(windows, batch_size))
    return torch.cat(mine) if mine else windows[:0]


def writer_answer(ask: Callable[[], object], what: str = "resuming"):
    """`ask()` on rank 0 (which alone reads the partial folder), handed to every rank."""
    return distributed.broadcast_json(ask() if distributed.is_writer() else None, 0, what)


def same_plan(plan: Plan | None) -> Plan:
    """Rank 0's plan on every rank (the others planned nothing: the profile and the plan file are rank 0's)."""
    if not distributed.active():
        return plan
    return Plan.from_dict(distributed.broadcast_json(plan.to_dict() if distributed.is_writer() else None, 0,
                                                     "the plan"))


class SharedWriter:
    """Rank 0's `ShardWriter` as every rank sees it: rank 0 writes; the others take part in each flush it makes.

    A flush saves the boundary for --resume, which is gathered from every rank (`gathered`), so
    rank 0 announces each flush (the last flushed block) and then the end of each `add_block`.
    """

    def __init__(self, writer: ShardWriter | None):
        self.writer = writer  # on rank 0 only
        self.folder = writer.folder if writer is not None else None

    @property
    def finished_blocks(self) -> list[int]:
        """Rank 0's finished blocks (a collective: every rank asks once, at the start of the pass)."""
        return writer_answer(lambda: self.writer.finished_blocks)

    def add_block(self, index: int | None, tensors: dict[str, torch.Tensor], on_flush=None) -> None:
        if self.writer is not None:
            flushed = []

            def announced(last: int) -> None:
                distributed.broadcast_json(last, 0, "writing the shards")
                on_flush(last)
                flushed.append(last)

            self.writer.add_block(index, tensors, on_flush=announced if on_flush is not None else None)
            for last in flushed:  # the shards and their record are on disk now
                log.info("saved the boundary after block %d, gathered from %d ranks", last, distributed.world_size())
            if on_flush is not None:
                distributed.broadcast_json(None, 0, "writing the shards")
        elif on_flush is not None:
            while (last := distributed.broadcast_json(None, 0, "writing the shards")) is not None:
                on_flush(last)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.finish()


def shared_writer(make: Callable[[], ShardWriter]) -> ShardWriter | SharedWriter:
    """The shard writer of a streamed run: `make()` itself with one process; rank 0's, shared, with several."""
    if not distributed.active():
        return make()
    return SharedWriter(make() if distributed.is_writer() else None)


def _positions(parts: int, total: int) -> list[tuple[int, int, int]]:
    """For each position of one process's boundary list: (owning rank, its index in that rank's list)."""
    ranks = distributed.world_size()
    out = []
    for position in range(parts * total):
        part, batch = divmod(position, total)
        owner = batch % ranks
        out.append((owner, part * len(range(owner, total, ranks)) + batch // ranks))
    return out


def gathered(mine: list[torch.Tensor], parts: int, total: int) -> list[torch.Tensor] | None:
    """Every rank's boundary tensors, in one process's order, on rank 0 (None on the others; `mine` alone).

    `mine` holds `parts` runs of this rank's batches (compressed path, then dense path with
    refinement); one process would hold `parts` runs of all `total` batches.
    """
    if not distributed.active():
        return mine
    every = [distributed.carry(mine[local] if owner == distributed.rank() else None, owner, 0)
             for owner, local in _positions(parts, total)]
    return every if distributed.is_writer() else None


def dealt_out(read: Callable[[], list[torch.Tensor]], parts: int, total: int) -> list[torch.Tensor]:
    """The saved boundary (one process's order, read by rank 0 alone) → this rank's own tensors, in its order."""
    if not distributed.active():
        return read()
    with distributed.agreement("reading the saved boundary"):
        every = read() if distributed.is_writer() else None
    mine: dict[int, torch.Tensor] = {}
    for position, (owner, local) in enumerate(_positions(parts, total)):
        received = distributed.carry(every[position] if every is not None else None, 0, owner)
        if owner == distributed.rank():
            mine[local] = received
        if every is not None:
            every[position] = None  # sent: rank 0 holds its own share only
    return [mine[local] for local in sorted(mine)]
