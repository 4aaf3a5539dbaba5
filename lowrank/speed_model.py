"""Matmul timings measured once on the device a model will run on, and the rank decisions they support.

A rank-k factorization of an m×n layer does k(m+n) multiply-adds per token where the dense layer
does mn, but a GEMM's speed is not proportional to its FLOPs: ranks the math library handles badly
(not a multiple of its vector width) run up to twice as slow per FLOP, and near the break-even rank
two thin matmuls lose to one square one. Two decisions therefore use measured times:

- `best_multiple`: the rank alignment the device likes (`--round-to auto`);
- `speed_limit`: per shape, the largest rank whose factored form still beats the dense matrix
  (`lowrank plan --speed` keeps a matrix dense above it).

A `SpeedTable` is plain JSON stored in the plan (`options.speed`), so replaying a plan, or planning
again from its table (`--timings PLAN`), gives the same ranks on any machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import LowrankError
from .ranks import break_even_rank

#: Rank alignments `best_multiple` chooses among.
ALIGNMENTS = (1, 2, 4, 8, 16, 32, 64)
#: A coarser alignment is chosen only when its ranks run more than this much faster than a finer one's.
ALIGNMENT_TOLERANCE = 0.03
#: Tensor cores want fp16/bf16 GEMM dimensions in multiples of 8; `--round-to auto` uses it on CUDA.
CUDA_ALIGNMENT = 8
TABLE_VERSION = 1


@dataclass
class ShapeTiming:
    """One (out, in) shape: the dense layer's time and the factored layer's time at several ranks (seconds)."""

    dense: float
    factored: dict[int, float]

    def time_at(self, rank: int | None) -> float:
        """Time of the layer at `rank` (None: dense), interpolated linearly between measured ranks."""
        if rank is None:
            return self.dense
        ranks = sorted(self.factored)
        return float(np.interp(rank, ranks, [self.factored[r] for r in ranks]))


@dataclass
class SpeedTable:
    """Per-shape timings on one device, at `tokens` rows per matmul, and a window of ranks for the alignment."""

    device: str
    dtype: str
    tokens: int
    threads: int
    shapes: dict[tuple[int, int], ShapeTiming] = field(default_factory=dict)
    alignment: dict[int, float] = field(default_factory=dict)  # rank → seconds on `alignment_shape`, consecutive ranks
    alignment_shape: tuple[int, int] | None = None

    def round_to(self) -> int:
        """The rank multiple this device likes, from the alignment window (1 when there is none)."""
        if self.device.startswith("cuda"):
            return CUDA_ALIGNMENT
        return best_multiple(self.alignment) if self.alignment else 1

    def limit(self, shape: tuple[int, int]) -> int | None:
        """Largest rank worth factoring `shape` at (0: never), or None when the table does not know the shape."""
        timing = self.shapes.get(tuple(shape))
        return None if timing is None else speed_limit(timing)

    def to_dict(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "device": self.device, "dtype": self.dtype, "tokens": self.tokens,
                "threads": self.threads,
                "shapes": {f"{m}x{n}": {"dense": t.dense, "factored": {str(r): s for r, s in sorted(t.factored.items())}}
                           for (m, n), t in self.shapes.items()},
                "alignment_shape": list(self.alignment_shape) if self.alignment_shape else None,
                "alignment": {str(r): s for r, s in sorted(self.alignment.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the speed table") -> "SpeedTable":
        """Read a table written by `to_dict`, with a clear error naming what is wrong."""
        try:
            if data.get("version") != TABLE_VERSION:
                raise ValueError(f"version {data.get('version')!r} (this lowrank reads {TABLE_VERSION})")
            shapes = {}
            for key, entry in data["shapes"].items():
                m, n = (int(v) for v in key.split("x"))
                factored = {int(r): _seconds(s) for r, s in entry["factored"].items()}
                if not factored:
                    raise ValueError(f"shape {key} has no factored timings")
                shapes[(m, n)] = ShapeTiming(_seconds(entry["dense"]), factored)
            alignment_shape = data.get("alignment_shape")
            return cls(device=str(data["device"]), dtype=str(data["dtype"]), tokens=int(data["tokens"]),
                       threads=int(data["threads"]), shapes=shapes,
                       alignment={int(r): _seconds(s) for r, s in (data.get("alignment") or {}).items()},
                       alignment_shape=tuple(alignment_shape) if alignment_shape else None)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LowrankError(f"{where} is not a valid speed table ({exc}); measure it again with "
                               "`lowrank plan --speed`") from None


def _seconds(value: Any) -> float:
    seconds = float(value)
    if not (seconds > 0 and np.isfinite(seconds)):
        raise ValueError(f"time {value!r} is not a positive number of seconds")
    return seconds


# ---- the decisions (pure) -------------------------------------------------------------------------

def best_multiple(times: dict[int, float], candidates: tuple[int, ...] = ALIGNMENTS,
                  tolerance: float = ALIGNMENT_TOLERANCE) -> int:
    """The smallest multiple whose ranks run (almost) as fast, relative to the trend, as any candidate's.

    `times` holds a matmul's time at consecutive ranks. A straight line fitted through all of them is
    the trend; a rank's relative time is its time over the trend's. Each candidate multiple m scores the
    mean relative time of the ranks divisible by m (at least two of them); the smallest m within
    `tolerance` of the best score wins, so a coarser alignment must earn its lost rank choices.
    """
    ranks = np.array(sorted(times), dtype=float)
    if len(ranks) < 2:
        return 1
    seconds = np.array([times[int(r)] for r in ranks])
    slope, intercept = np.polyfit(ranks, seconds, 1)
    relative = seconds / np.maximum(intercept + slope * ranks, 1e-12)
    scores = {m: float(relative[ranks % m == 0].mean()) for m in candidates if int((ranks % m == 0).sum()) >= 2}
    best = min(scores.values())
    return min(m for m, score in scores.items() if score <= best * (1 + tolerance))


def speed_limit(timing: ShapeTiming) -> int:
    """The largest measured rank below which every measured factored time beats the dense time (0: none does)."""
    limit = 0
    for rank in sorted(timing.factored):
        if timing.factored[rank] >= timing.dense:
            break
        limit = rank
    return limit


def predicted_seconds(modules: dict[str, tuple[tuple[int, int], int | None]], table: SpeedTable) -> tuple[float, float]:
    """(dense, planned) time of the named layers, each (shape, rank or None), from the table's timings."""
    dense = planned = 0.0
    for name, (shape, rank) in modules.items():
        timing = table.shapes.get(tuple(shape))
        if timing is None:
            raise LowrankError(f"the speed table has no timings for {name}'s shape {shape[0]}x{shape[1]}")
        dense += timing.dense
        planned += timing.time_at(rank)
    return dense, planned


# ---- measuring --------------------------------------------------------------------------------------

def clock(device: torch.device) -> Callable[[], float]:
    """The clock to time with: this thread's CPU time when torch computes on it alone (one CPU thread), else wall time.

    CPU time leaves out the time other processes hold the core, so timings taken on a busy machine
    stay those of the matmul itself.
    """
    return time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def median_seconds(run: Callable[[], Any], device: torch.device, repeats: int = 7, warmup: int = 2) -> float:
    """Median time of `run()` after `warmup` calls (synchronizing CUDA around each call), on `clock(device)`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    now = clock(device)
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeats):
        started = now()
        run()
        sync()
        times.append(now() - started)
    return statistics.median(times)


class _Shape:
    """Random inputs and weights for timing one (out, in) shape at `tokens` rows."""

    def __init__(self, shape: tuple[int, int], tokens: int, device: torch.device, dtype: torch.dtype):
        generator = torch.Generator().manual_seed(0)
        self.out_features, self.in_features = shape
        self.device, self.dtype = device, dtype
        self.x = torch.randn(tokens, self.in_features, generator=generator).to(device, dtype)
        self.generator = generator

    def weight(self, rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=self.generator).to(self.device, self.dtype)

    def dense(self, repeats: int) -> float:
        w = self.weight(self.out_features, self.in_features)
        return median_seconds(lambda: F.linear(self.x, w), self.device, repeats)

    def factored(self, rank: int, repeats: int) -> float:
        down, up = self.weight(rank, self.in_features), self.weight(self.out_features, rank)
        return median_seconds(lambda: F.linear(F.linear(self.x, down), up), self.device, repeats)


def measure_table(shapes: list[tuple[int, int]], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  tokens: int = 512, step: int = 8, alignment_window: tuple[int, int] = (33, 160),
                  repeats: int = 7, progress: bool = True) -> SpeedTable:
    """Time every distinct shape dense and factored at ranks step, 2·step, … up to min(m, n), once.

    The alignment window (consecutive ranks on the most common shape) feeds `best_multiple`. The
    timings are of `F.linear`, the call `LowRankLinear` makes, at `tokens` rows (prefill-sized).
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    distinct = sorted(set(map(tuple, shapes)), key=lambda s: (-list(map(tuple, shapes)).count(s), s))
    if not distinct:
        raise LowrankError("no target shapes to time")
    table = SpeedTable(device=str(device), dtype=str(dtype).removeprefix("torch."), tokens=tokens,
                       threads=torch.get_num_threads())
    jobs = [(shape, rank) for shape in distinct  # up to the first multiple past the break-even rank: beyond it nothing saves
            for rank in [None, *range(step, min(min(shape), break_even_rank(*shape) + step) + 1, step)]]
    common = distinct[0]
    low, high = alignment_window
    window = [] if device.type == "cuda" else list(range(low, min(high, min(common)) + 1))
    jobs += [("align", rank) for rank in window]
    timers = {shape: _Shape(shape, tokens, device, dtype) for shape in distinct}
    for shape, rank in tqdm(jobs, desc="Timing matmuls", unit="shape", disable=not progress):
        if shape == "align":
            table.alignment[rank] = timers[common].factored(rank, repeats)
            continue
        timing = table.shapes.setdefault(shape, ShapeTiming(0.0, {}))
        if rank is None:
            timing.dense = timers[shape].dense(repeats)
        else:
            timing.factored[rank] = timers[shape].factored(rank, repeats)
    table.alignment_shape = common if window else None
    return table


def measure_ranks(modules: dict[str, tuple[tuple[int, int], int | None]], device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, tokens: int = 512, repeats: int = 7) -> SpeedTable:
    """Time exactly the (shape, rank) pairs of a plan's modules, dense and factored: for predicting its speed-up."""
    device = torch.device(device)
    table = SpeedTable(device=str(device), dtype=str(dtype).removeprefix("torch."), tokens=tokens,
                       threads=torch.get_num_threads())
    for shape, rank in sorted({(tuple(s), r) for s, r in modules.values()}, key=lambda p: (p[0], p[1] or 0)):
        timer = _Shape(shape, tokens, device, dtype)
        timing = table.shapes.setdefault(shape, ShapeTiming(timer.dense(repeats), {}))
        if rank is not None:
            timing.factored[rank] = timer.factored(rank, repeats)
    for shape, timing in table.shapes.items():
        if not timing.factored:  # every module of this shape dense: time_at(None) needs no factored entry
            timing.factored[min(shape)] = timing.dense
    return table


def speed_caps(targets: list, speed: SpeedTable | None) -> dict[str, int | None]:
    """Each target's speed cap (largest rank faster than dense) from `speed`; None everywhere without a table."""
    if speed is None:
        return {t.name: None for t in targets}
    caps = {}
    for t in targets:
        cap = speed.limit(t.shape)
        if cap is None:
            raise LowrankError(f"the speed table has no timings for {t.name}'s shape {t.shape[0]}x{t.shape[1]} "
                               "(it was measured on another model); measure it again with `lowrank plan --speed`")
        caps[t.name] = cap
    return caps


def load_timings(path: str) -> SpeedTable:
    """The speed table stored in a plan file (its options.timings) or saved on its own as JSON."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowrankError(f"cannot read timings from {path} ({exc}); pass a plan written by `lowrank plan --speed`")
    if isinstance(data, dict) and data.get("format") == "lowrank-plan":
        data = (data.get("options") or {}).get("timings")
        if data is None:
            raise LowrankError(f"plan {path} holds no timings; it was planned without --speed or --round-to auto")
    if not isinstance(data, dict):
        raise LowrankError(f"{path} is not a speed table (a JSON object); pass a plan written by `lowrank plan --speed`")
    return SpeedTable.from_dict(data, where=str(path))


def parse_round_to(value: str | int) -> int | str:
    """--round-to: a positive integer, or 'auto' (what the device's GEMM likes, measured)."""
    if isinstance(value, int) or str(value).strip().lower() != "auto":
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise LowrankError(f"--round-to must be a positive integer or auto, got {value!r}") from None
        if number < 1:
            raise LowrankError(f"--round-to must be a positive integer or auto, got {value!r}")
        return number
    return "auto"


def resolve_round_to(config, shapes: list[tuple[int, int]], device: str | torch.device, progress: bool = True):
    """`compress --round-to auto`: the config with the multiple the device likes, timed once on the most common
    target shape, and the timings (stored in the plan); any other config comes back as it is, with None."""
    import dataclasses

    if config.round_to != "auto":
        return config, None
    shapes = [tuple(s) for s in shapes]
    if not shapes:
        raise LowrankError("--round-to auto has no target layers to time; check --include and --exclude")
    common = max(sorted(set(shapes)), key=shapes.count)
    table = measure_table([common], device, progress=progress)
    return dataclasses.replace(config, round_to=table.round_to()), table
