"""Seconds per stage of one run, added up where the work happens (`with stage("name")`) and read by the caller.

A run opens `recording()`; code anywhere below it adds to named stages, summed over blocks and
batches. Outside a recording `stage` records nothing. What the benchmark reports as a run's
breakdown (plan.options["stage_seconds"]).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

_current: ContextVar[dict[str, float] | None] = ContextVar("lowrank_stage_seconds", default=None)


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Collect the stages run inside this block into the dict it yields (seconds, summed per name)."""
    seconds: dict[str, float] = {}
    token = _current.set(seconds)
    try:
        yield seconds
    finally:
        _current.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the wall time of this block to stage `name` of the current recording, if any."""
    seconds = _current.get()
    started = time.perf_counter()
    try:
        yield
    finally:
        if seconds is not None:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def summary(seconds: dict[str, float]) -> dict[str, float]:
    """A recording's stages to the millisecond, in the order they first ran; the parts of the profile
    (stages named profile_*) are also summed as "profile"."""
    profile = sum(value for name, value in seconds.items() if name.startswith("profile_"))
    top = {"profile": profile} if profile else {}
    return {name: round(value, 3) for name, value in {**top, **seconds}.items()}
