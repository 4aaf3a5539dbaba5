"""The sensitivity pass of SmolLM2 through the head a slice of tokens at a time, against the whole batch's logits.

    python benchmarks/bench_head_gradient.py /tmp/smollm2-st [--pairs 3]

The pass is the one the default compress runs first: 8 calibration windows of 512 tokens (common.py's),
in batches of 4, forward and backward with the output Fishers of all 210 targets and the statistics
riding along. Each run is a fresh process of its own, as in a compress, where this pass is the first to
touch its memory; the two ways alternate, `--pairs` times each. A run records its wall time, processor
time (user and system) and minor page faults around the pass alone, and the Fishers of both ways are
compared (bit for bit, and the largest difference relative to each Fisher's largest entry: MKL may round a
slice of a few rows differently on some hosts). Writes reports/head-gradient.json and .md.

The whole batch's logits (4 × 512 × 49,152 float32: 403 MB) and the loss backward's copies of them
are each larger than glibc's largest mmap threshold (32 MiB): every one is mapped, faulted in page by
page and unmapped again, batch after batch, and that shows as system time. A slice's logits stay
under 16 MiB (`lowrank.head_gradient`).
"""

from __future__ import annotations

import lowrank  # noqa: F401  (first: it sets OPENBLAS_THREAD_TIMEOUT before SciPy starts its OpenBLAS)

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import calibration_windows, environment, write_report

WAYS = ("whole logits", "slices")


def one_run(folder: str, way: str, fishers_file: str) -> dict:
    """The pass, one way, in this (fresh) process: its seconds and faults; its Fishers saved to `fishers_file`."""
    import resource

    from lowrank import sensitivity
    from lowrank.calibration import StatsCollector, first_windows, output_side
    from lowrank.loading import load_model
    from lowrank.targets import find_targets

    loaded = load_model(folder)
    model = loaded.model
    targets = find_targets(model)
    windows = first_windows(calibration_windows(loaded.tokenizer), 8)
    if way == "whole logits":  # the path taken before stop 34
        sensitivity.BACKWARD["next-token"] = sensitivity.backward_next_token_whole

    def counters():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), usage.ru_utime, usage.ru_stime, usage.ru_minflt

    before = counters()
    with StatsCollector(model, targets, output_side(model, targets)) as collector:
        fishers = sensitivity.measure_output_fisher(model, targets, windows, batch_size=4, progress=False,
                                                    after_batch=collector.end_batch)
    after = counters()
    torch.save({name: fisher.matrix for name, fisher in fishers.items()}, fishers_file)
    wall, user, system, faults = (b - a for a, b in zip(before, after))
    return {"way": way, "wall_seconds": round(wall, 2), "user_seconds": round(user, 2),
            "system_seconds": round(system, 2), "minor_faults": int(faults)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="SmolLM2-135M as a safetensors folder (bench_speed.py prepare)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("WAY", "FISHERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.folder, *args.child)))
        return
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        files = {way: str(Path(scratch) / f"{i}.pt") for i, way in enumerate(WAYS)}
        for _ in range(args.pairs):
            for way in WAYS:
                done = subprocess.run([sys.executable, __file__, args.folder, "--child", way, files[way]],
                                      check=True, capture_output=True, text=True)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(runs[-1], flush=True)
        whole, sliced = (torch.load(files[way], weights_only=True) for way in WAYS)
        same = whole.keys() == sliced.keys() and all(torch.equal(whole[k], sliced[k]) for k in whole)
        # the largest difference of any target's Fisher, over that Fisher's largest entry
        difference = max(float((whole[k] - sliced[k]).abs().max() / whole[k].abs().max()) for k in whole)
    data = {"environment": environment(), "runs": runs, "same_fishers": same,
            "largest_relative_difference": difference}
    lines = ["# The sensitivity pass: the head by slices of tokens, or the whole batch's logits", "",
             "Written by `benchmarks/bench_head_gradient.py` (see its docstring). SmolLM2-135M, 8 windows of 512 "
             "tokens in batches of 4, each run a fresh process; the two ways alternate. Processor: "
             f"{data['environment']['processor']}.", "",
             f"The Fishers of the two ways are the same bits: **{same}** (the largest difference of any target's "
             f"Fisher, over its largest entry: {difference:.1e}).", "",
             "| run | way | wall (s) | user (s) | system (s) | minor faults |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {i + 1} | {r['way']} | {r['wall_seconds']:.2f} | {r['user_seconds']:.2f} | {r['system_seconds']:.2f} "
              f"| {r['minor_faults']:,} |" for i, r in enumerate(runs)]
    write_report("head-gradient", data, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
