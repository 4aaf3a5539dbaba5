"""Where a streamed compression's peak memory goes: the highest resident set seen in each stage.

    python benchmarks/trace_memory.py /tmp/syn-2                 # a checkpoint from bench_memory.py make
    python benchmarks/trace_memory.py /tmp/syn-2 --samples 8 --seq-len 256

tracemalloc does not see torch's allocations, so a thread reads VmRSS from /proc/self/status every
few milliseconds (LAPACK and BLAS release the GIL, so it reads during them too) and charges each
reading to the innermost stage running: the parts the passes time themselves (their StageClock) and
a few finer ones wrapped here (whitening, factoring a block, the update, the head's gradient). One
block's peak does not depend on depth, so a 2-layer checkpoint of the real widths shows the
per-block terms of the 22-layer one; only the sensitivity boundaries grow with depth.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (see bench_memory.py)

import argparse
import functools
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

GIB = 2**30


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class Tracer:
    """A stack of stage names and, per name, the highest VmRSS read while it was the innermost."""

    def __init__(self, interval: float = 0.005):
        self.stack: list[str] = ["start"]
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.charge()
            self._stop.wait(self.interval)

    def charge(self) -> None:
        label, rss = self.stack[-1], _status("VmRSS")
        if label not in self.peaks:
            self.order.append(label)
        self.peaks[label] = max(self.peaks.get(label, 0), rss)

    @contextmanager
    def stage(self, label: str):
        self.charge()
        passes = [s for s in self.stack if s.endswith(" pass")]
        self.stack.append(f"{passes[-1].split()[0]}: {label}" if passes and not label.endswith(" pass") else label)
        self.charge()
        try:
            yield
        finally:
            self.charge()
            self.stack.pop()

    def wrap(self, module, name: str, label: str | None = None) -> None:
        """Charge calls of `module.name` to `label` (default: the function's name)."""
        original = getattr(module, name)

        @functools.wraps(original)
        def traced(*args, **kwargs):
            with self.stage(label or name):
                return original(*args, **kwargs)

        setattr(module, name, traced)

    def __enter__(self) -> "Tracer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.charge()


def install(tracer: Tracer) -> None:
    """Wrap the stages of the streamed path (module globals, where the callers look them up)."""
    from lowrank import compression, factorize, stream_compress, stream_profile, streaming

    original_call = stream_profile.StageClock.__call__

    @contextmanager
    def clocked(self, part: str):
        with original_call(self, part), tracer.stage(part):
            yield

    stream_profile.StageClock.__call__ = clocked
    tracer.wrap(streaming, "profile_streamed", "profile pass")
    tracer.wrap(streaming, "compress_pass", "compress pass")
    tracer.wrap(factorize.WhiteningCache, "get", "whitening")  # not whitening(): its args would pin the Gram
    tracer.wrap(compression, "_factor_modules", "factor_modules")
    tracer.wrap(compression, "update_block")
    tracer.wrap(stream_profile, "head_gradient")
    tracer.wrap(stream_profile, "_backpropagate", "backpropagate")
    tracer.wrap(stream_profile, "_block_spectra", "block_spectra")
    tracer.wrap(stream_compress, "block_stats")
    tracer.wrap(streaming, "plan_targets")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--trim", action="store_true",
                        help="experiment: glibc malloc_trim(0) after each block is freed (is the growth fragmentation?)")
    args = parser.parse_args()
    if args.trim:
        import ctypes

        from lowrank.block_source import BlockSource

        libc, free_block = ctypes.CDLL("libc.so.6"), BlockSource.free_block

        def free_and_trim(self, index: int) -> None:
            free_block(self, index)
            libc.malloc_trim(0)

        BlockSource.free_block = free_and_trim

    import lowrank
    from lowrank.config import CompressConfig

    windows = torch.randint(0, 32000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    tracer = Tracer()
    install(tracer)
    out = Path(tempfile.mkdtemp(prefix="trace-memory-", dir="/tmp")) / "out"
    started = time.perf_counter()
    try:
        with tracer:
            lowrank.compress(str(args.folder), CompressConfig(stream=True), windows, output=out, progress=False)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    print(f"{'stage':32s} peak VmRSS")
    for label in tracer.order:
        print(f"{label:32s} {tracer.peaks[label] / GIB:.3f} GiB")
    print(f"{'VmHWM':32s} {_status('VmHWM') / GIB:.3f} GiB   wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
