"""One job on N ranks with torch.distributed: who does which share, and how the shares are summed.

torchrun and `accelerate launch` describe the job in environment variables (RANK, WORLD_SIZE,
MASTER_ADDR, ...); `init_from_environment` joins it (gloo for CPU tensors, nccl for CUDA ones)
with a timeout on every collective. Calibration batches are dealt out round-robin (rank r takes
batches r, r+N, ...), so rank 0 always holds one and the batches themselves do not depend on N;
what each rank accumulates is summed in float64 (`reduce_shared`). Factorizations are spread over
the ranks (`owners`) and broadcast back (`computed_by_owner`). A failure on one rank ends every
rank: a collective that loses a peer raises `PeerFailure` (a silent one times out), the first rank
to fail prints the one line (`should_report`), and `agreement` lets rank 0's writing fail every
rank. With one process every function here is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch

from .errors import LowrankError

log = logging.getLogger(__name__)

#: Seconds a rank waits in a collective for the others before the run fails (override: LOWRANK_DIST_TIMEOUT).
DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "LOWRANK_DIST_TIMEOUT"
#: Bytes of a failure message that cross between ranks.
MESSAGE_BYTES = 1024
#: The counter in the process group's store that picks the one rank to report a failure.
FAILURE_KEY = "lowrank/failures"


class PeerFailure(LowrankError):
    """A collective failed because another rank stopped (it usually reported its own error first) or timed out."""

    def __init__(self, message: str, timed_out: bool):
        super().__init__(message)
        self.timed_out = timed_out


class AgreedFailure(LowrankError):
    """Raised on every rank when some rank failed inside an `agreement`; one rank reports it."""


# ---- the job ------------------------------------------------------------------------------------

def active() -> bool:
    """True inside a process group of more than one rank."""
    return not _ALONE[-1] and torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


_ALONE = [False]


@contextmanager
def alone() -> Iterator[None]:
    """Inside, this rank works on its own share as if it were the only process (no collectives)."""
    _ALONE.append(True)
    try:
        yield
    finally:
        _ALONE.pop()


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def is_writer() -> bool:
    """Only rank 0 writes files, logs progress and prints results."""
    return rank() == 0


def launched_ranks() -> int:
    """How many ranks the launcher's environment describes (1 when not under torchrun or accelerate)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LowrankError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; "
                           "launch with torchrun or accelerate launch") from None


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise LowrankError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds; set it to e.g. 600")
    return seconds


def backend() -> str:
    """gloo for CPU tensors, and nccl for CUDA ones where CUDA is there."""
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_from_environment() -> bool:
    """Join the process group torchrun or accelerate describes; True when this is a run of several ranks."""
    if active() or launched_ranks() <= 1:
        return active()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise LowrankError(f"WORLD_SIZE is {launched_ranks()} but {missing[0]} is not set; "
                           "launch with torchrun or accelerate launch")
    chosen = backend()
    if "nccl" in chosen:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    seconds = timeout_seconds()
    try:
        torch.distributed.init_process_group(chosen, timeout=timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as exc:  # a rank that never came, or an address in use
        raise LowrankError(f"rank {os.environ['RANK']} could not join the other ranks ({_first_line(exc)}); "
                           "check that every rank started, and MASTER_ADDR/MASTER_PORT") from None
    log.info("rank %d of %d joined (%s, timeout %.0f s)", rank(), world_size(), chosen, seconds)
    if rank() != 0:  # warnings and progress come from rank 0 only (errors from whichever rank fails first)
        logging.getLogger("lowrank").setLevel(max(logging.ERROR, logging.getLogger("lowrank").level))
    return True


def close() -> None:
    """Leave the process group (at the end of a run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _guarded(what: str, collective: Callable, *args, **kwargs):
    """Run one collective; a lost or silent peer becomes a PeerFailure instead of a hang or a traceback."""
    try:
        return collective(*args, **kwargs)
    except RuntimeError as exc:
        text = str(exc).lower()
        timed_out = "timeout" in text or "timed out" in text
        if timed_out:
            raise PeerFailure(f"rank {rank()} waited {timeout_seconds():.0f} s for the other ranks during {what}; "
                              f"one of them stopped or hangs (raise {TIMEOUT_ENV} if it is only slow)", True) from None
        raise PeerFailure(f"another rank stopped during {what} without saying why (killed, or out of memory?); "
                          "check the machine's memory and that rank's log", False) from None


# ---- dealing out the work --------------------------------------------------------------------------

def my_share(items: Sequence) -> list | torch.Tensor:
    """This rank's items: r, r+N, r+2N, ... (all of them with one process); a tensor stays a tensor."""
    if isinstance(items, torch.Tensor):
        return items[rank()::world_size()] if active() else items
    return list(items)[rank()::world_size()]


def my_count(leading: int) -> int:
    """How many of the first `leading` items are this rank's (`my_share`'s split)."""
    return len(range(rank(), leading, world_size())) if active() else leading


def with_ownership(items: Sequence) -> list[tuple[Any, bool]]:
    """Every item, each with whether this rank owns it (`my_share`'s split): for passes that draw every
    item's random numbers, so that a seed gives the same draws for any N, and compute only their own."""
    return [(item, index % world_size() == rank()) for index, item in enumerate(items)]


def owners(costs: Sequence[float], ranks: int | None = None) -> list[int]:
    """The rank that computes each job: longest jobs first, each to the least-loaded rank (deterministic)."""
    load = [0.0] * (ranks or world_size())
    owner = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        chosen = min(range(len(load)), key=lambda r: (load[r], r))
        owner[job] = chosen
        load[chosen] += costs[job]
    return owner


# ---- collectives --------------------------------------------------------------------------------

def all_reduce_sum_(tensors: list[torch.Tensor], what: str = "the statistics") -> None:
    """Sum `tensors` over the ranks in place, in float64 (one flat buffer, one collective)."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    _guarded(what, torch.distributed.all_reduce, flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()


def mean_over_ranks(value: float, what: str = "training") -> float:
    """The mean of a number over the ranks (the number itself with one process)."""
    if not active():
        return value
    total = torch.tensor([value], dtype=torch.float64)
    all_reduce_sum_([total], what)
    return float(total) / world_size()


def average_refinement(tensor: torch.Tensor) -> None:
    """Average `tensor` over the ranks in place: block refinement's gradients and errors (its `average` hook)."""
    if not active():
        return
    total = tensor.detach().to(torch.float64).reshape(-1).clone()
    all_reduce_sum_([total], "the block refinement")
    tensor.copy_((total / world_size()).reshape(tensor.shape).to(tensor.dtype))


def broadcast_json(value, src: int = 0, what: str = "setup"):
    """`value` (JSON-serializable) from rank `src` on every rank, without pickle."""
    if not active():
        return value
    payload = json.dumps(value).encode() if rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64)
    _guarded(what, torch.distributed.broadcast, size, src)
    buffer = torch.zeros(int(size), dtype=torch.uint8)
    if rank() == src:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    _guarded(what, torch.distributed.broadcast, buffer, src)
    return json.loads(bytes(buffer.tolist()).decode())


def broadcast_tensors(tensors: list[torch.Tensor], src: int, what: str = "the factors") -> None:
    """Overwrite `tensors` on every rank with rank `src`'s (shapes and dtypes agree on all ranks)."""
    if not active():
        return
    for t in tensors:  # sent as laid out in memory: a non-contiguous tensor travels through a contiguous copy
        buffer = t if t.is_contiguous() else t.contiguous()
        _guarded(what, torch.distributed.broadcast, buffer, src)
        if buffer is not t:
            t.copy_(buffer)


def reduce_shared(
    named: dict[str, list[torch.Tensor]],
    order: list[str],
    zeros: Callable[[str], list[torch.Tensor]],
    what: str = "the statistics",
) -> dict[str, list[torch.Tensor]]:
    """Sum each name's tensors over the ranks; names that share one accumulation (same first tensor) stay shared.

    `order` lists every name on every rank; a rank that saw no data for a name contributes
    `zeros(name)`. Which names share is taken from rank 0, which always holds a batch.
    """
    if not active():
        return named
    groups: dict[int, list[str]] = {}
    for name in order:
        if name in named:
            groups.setdefault(id(named[name][0]), []).append(name)
    shared = broadcast_json(list(groups.values()), 0, what)
    summed: dict[str, list[torch.Tensor]] = {}
    for group in shared:
        present = next((named[n] for n in group if n in named), None)
        # summed in place (the accumulators are float64 already): no second copy of every Gram matrix
        tensors = [t.detach().to(torch.float64) for t in present] if present is not None else \
            [t.to(torch.float64) for t in zeros(group[0])]
        all_reduce_sum_(tensors, what)
        for name in group:
            summed[name] = tensors
    return summed


def computed_by_owner(
    jobs: list[str],
    costs: list[float],
    compute: Callable[[str], list[torch.Tensor]],
    like: Callable[[str], list[torch.Tensor]],
    what: str = "the factors",
) -> dict[str, list[torch.Tensor]]:
    """`compute(job)` for every job: each on one rank (`owners`), then broadcast to all of them.

    `like(job)` gives tensors of the shapes, dtypes and devices `compute(job)` returns, to receive into.
    """
    if not active():
        return {job: compute(job) for job in jobs}
    owner = owners(costs)
    results = {job: compute(job) if src == rank() else like(job) for job, src in zip(jobs, owner)}
    for job, src in zip(jobs, owner):
        broadcast_tensors(results[job], src, what)
    return results


def carry(tensor: torch.Tensor | None, src: int, dst: int, what: str = "the boundary") -> torch.Tensor | None:
    """Rank `src`'s CPU `tensor` on rank `dst` (point to point; its dtype and shape travel first), None elsewhere."""
    if not active() or src == dst:
        return tensor if rank() == src else None
    header = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    if rank() == src:
        text = json.dumps([str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]).encode()
        header[:len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        _guarded(what, torch.distributed.send, header, dst)
        _guarded(what, torch.distributed.send, tensor.detach().contiguous(), dst)
        return None
    if rank() != dst:
        return None
    _guarded(what, torch.distributed.recv, header, src)
    dtype, shape = json.loads(bytes(header[header != 0].tolist()).decode())
    received = torch.empty(shape, dtype=getattr(torch, dtype))
    _guarded(what, torch.distributed.recv, received, src)
    return received

# ---- failing together -----------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _message_of(exc: BaseException) -> str:
    text = _first_line(exc)
    return text if isinstance(exc, LowrankError) else f"{type(exc).__name__}: {text}"


@contextmanager
def agreement(what: str) -> Iterator[None]:
    """All ranks leave the block together: if any rank failed in it, every rank raises one AgreedFailure.

    Wrap the steps where ranks may fail on their own (reading files, checking inputs): every rank
    raises the first failing rank's message, and one of them prints it (`should_report`).
    """
    if not active():
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 — shared with the other ranks, then raised again
        failure = exc
    encoded = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    if failure is not None:
        text = _message_of(failure).encode()[:MESSAGE_BYTES - 1] or b"?"
        encoded[:len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    gathered = [torch.zeros_like(encoded) for _ in range(world_size())]
    _guarded(what, torch.distributed.all_gather, gathered, encoded)
    for source, message in enumerate(gathered):
        if int(message[0]) != 0:
            text = bytes(message[message != 0].tolist()).decode(errors="replace")
            prefix = f"rank {source}: " if source != 0 else ""
            raise AgreedFailure(prefix + text) from failure


def should_report(exc: BaseException) -> bool:
    """Whether this rank prints `exc`'s one line: only the first rank of the run to fail does.

    Before the ranks join, every rank runs the same checks on the same command line and fails
    alike, so rank 0 speaks. After, the ranks count their failures in the process group's store
    (an atomic add): the first one reports, and a peer that only noticed it (a lost connection)
    stays silent. A store that is gone went with rank 0's process, which had already failed and
    counted itself (or was killed, which the launcher reports): then this rank stays silent.
    """
    if not active():
        return os.environ.get("RANK", "0") == "0"
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=10))
        return store.add(FAILURE_KEY, 1) == 1
    except Exception:  # noqa: BLE001 — its host (rank 0's process) is gone, after reporting its own error
        return rank() == 0


def origin(exc: BaseException) -> str:
    """The start of an error line: "error: ", naming the rank when a rank other than 0 reports its own failure."""
    if active() and rank() != 0 and not isinstance(exc, (PeerFailure, AgreedFailure)):
        return f"error: rank {rank()}: "
    return "error: "


# ---- starting torchrun for the user ------------------------------------------------------------------

def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m lowrank ARGV` on `nproc` local ranks through torch.distributed.run; its exit code.

    torchrun's agent keeps per-rank log and error files in a folder it never removes (a new
    `torchelastic_*` in the temporary directory on every run); here that folder is a temporary one of
    our own, removed when the run ends, however it ends.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise LowrankError(f"--nproc must be at least 1, got {nproc}")
    if launched_ranks() > 1:
        raise LowrankError("--nproc starts torchrun, and this process is already one rank of a run; drop --nproc")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="lowrank-torchrun-") as logs:
        args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", f"--log-dir={logs}",
                                             "--module", "lowrank", *argv])
        try:
            run(args)
        except ChildFailedError as exc:  # every rank printed what it had to say
            codes = [failure.exitcode for failure in exc.failures.values()]
            return next((code for code in codes if code and code > 0), 1)
    return 0


def strip_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE` (how --nproc hands the rest of the command to torchrun)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept
