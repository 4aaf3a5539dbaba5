"""Wall time of the default compress of SmolLM2-135M against its floor, one dense forward pass, in one run.

    python benchmarks/bench_speed.py prepare /tmp/smollm2-st       # the GGUF, saved once as a safetensors folder
    python benchmarks/bench_speed.py run /tmp/smollm2-st --ratio 0.8 --mode in-memory [--keep DIR]
    python benchmarks/bench_speed.py run /tmp/smollm2-st --ratio 0.8 --mode stream [--keep DIR]
    python benchmarks/bench_speed.py report                        # reports/speed.md from reports/speed.json

`run` measures, in one process and in this order: the floor (the dense model, loaded from the
folder, run forward over the calibration windows in batches of 8, no gradients: logits included),
the default compress (`lowrank.compress(folder, CompressConfig(stream=..., ratio=r))`: sensitivity
planner, sequential, update, 64 × 512 tokens of Hamlet), in memory (the default `lowrank compress`)
or streamed (`--stream`), and the floor again. The ratio is the compress wall time over the mean of
the two floors; the stage seconds come from the plan (`stage_seconds`). Each of the three parts also
records its processor time (user + system, `getrusage`; the floors' without loading the model, as their
wall time) and minor page faults: the ratio in processor time says whether the compress leaves cores
idle that the floor keeps busy (a lower ratio in processor time than in wall time) or the other way.
The load average of the machine is recorded beside the numbers: the cores are shared. On a shared
machine, run timed benchmarks one at a time (for example each under `flock LOCKFILE`).
"""

from __future__ import annotations

import lowrank  # noqa: F401  (first: it sets OPENBLAS_THREAD_TIMEOUT before SciPy starts its OpenBLAS)

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from common import cpu_seconds, minor_faults, processor_name

REPORTS = Path(__file__).resolve().parent.parent / "reports"
RESULTS = REPORTS / "speed.json"
BATCH = 8


def prepare(folder: Path) -> None:
    """SmolLM2-135M from its GGUF, saved as a float32 safetensors folder with its tokenizer."""
    from lowrank.loading import load_model

    loaded = load_model("smollm2-135m")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


class ProcessorTime:
    """Processor seconds (user + system) and minor page faults of this process over a `with` block."""

    def __enter__(self) -> "ProcessorTime":
        self._start = cpu_seconds(), minor_faults()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = round(cpu_seconds() - self._start[0], 1)
        self.minor_faults = minor_faults() - self._start[1]


def floor_seconds(folder: Path, windows: torch.Tensor, processor: ProcessorTime | None = None) -> float:
    """One dense forward pass over `windows`, model loading excluded (from `processor`'s counts too)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    started = time.perf_counter()
    with processor or nullcontext(), torch.no_grad():
        for batch in windows.split(BATCH):
            model(input_ids=batch, use_cache=False)
    seconds = time.perf_counter() - started
    del model
    return round(seconds, 2)


def timed_compress(folder: Path, config, calibration, keep: Path | None = None) -> dict:
    """One compress, timed; its output is removed unless `keep` names where to move it."""
    out = Path(tempfile.mkdtemp(prefix="bench-speed-", dir="/tmp")) / "out"
    started = time.perf_counter()
    try:
        plan = lowrank.compress(str(folder), config, calibration, output=out, progress=False)
        seconds = time.perf_counter() - started
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.move(str(out), str(keep))
        return {"wall_seconds": round(seconds, 1), "stage_seconds": plan.options.get("stage_seconds"),
                "factored": len(plan.factored), "target_ratio": plan.summary()["target_ratio"],
                "plan_samples": plan.options.get("plan_samples"), "update_samples": plan.options.get("update_samples")}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def run(folder: Path, ratio: float, mode: str, keep: Path | None, plan_samples: int | None = None,
        update_samples: int | None = None) -> None:
    """Floor, compress, floor; merged into reports/speed.json under a key naming ratio, mode (and the
    --plan-samples / --update-samples when given, also noted in the table)."""
    from lowrank.calibration import text_windows
    from lowrank.config import CalibrationConfig, CompressConfig
    from lowrank.loading import load_tokenizer

    calibration = CalibrationConfig()
    tokenizer = load_tokenizer(str(folder), None, False)
    windows = text_windows(tokenizer, list(calibration.texts), calibration.samples, calibration.seq_len,
                           calibration.seed)
    result: dict = {"ratio": ratio, "mode": mode, "samples": calibration.samples, "seq_len": calibration.seq_len,
                    "threads": torch.get_num_threads(), "processor": processor_name(),
                    "load_average_start": os.getloadavg()[0],
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    parts = [ProcessorTime(), ProcessorTime(), ProcessorTime()]  # floor, compress (loading and saving too), floor
    floors = [floor_seconds(folder, windows, parts[0])]
    options = {k: v for k, v in (("plan_samples", plan_samples), ("update_samples", update_samples)) if v is not None}
    with parts[1]:
        result.update(timed_compress(folder, CompressConfig(stream=mode == "stream", ratio=ratio, **options),
                                     calibration, keep))
    floors.append(floor_seconds(folder, windows, parts[2]))
    result["floor_seconds"] = floors
    result["times_floor"] = round(result["wall_seconds"] / (sum(floors) / len(floors)), 2)
    result["processor_seconds"] = {"floor_before": parts[0].seconds, "compress": parts[1].seconds,
                                   "floor_after": parts[2].seconds}
    result["minor_faults"] = {"floor_before": parts[0].minor_faults, "compress": parts[1].minor_faults,
                              "floor_after": parts[2].minor_faults}
    result["times_floor_processor"] = round(parts[1].seconds / ((parts[0].seconds + parts[2].seconds) / 2), 2)
    result["load_average_end"] = os.getloadavg()[0]
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if options:
        result["note"] = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
    suffix = "".join(f"-{k.split('_')[0]}{v}" for k, v in options.items())
    results[f"smollm2-r{ratio}-{mode}{suffix}"] = result
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(result, indent=1))
    report()


TOP_STAGES = ("profile", "profile_forward", "profile_backward", "planning", "compress")


def _stage_rows(stages: dict[str, float], wall: float) -> list[str]:
    top = {k: stages[k] for k in TOP_STAGES if k in stages}
    rows = [f"| **{k}** | {v:.1f} | {100 * v / wall:.0f}% |" for k, v in top.items()]
    rows += [f"| {k} | {v:.1f} | {100 * v / wall:.0f}% |" for k, v in stages.items() if k not in top]
    return rows


def report() -> None:
    results = json.loads(RESULTS.read_text())
    lines = ["# Speed: the default compress of SmolLM2-135M against its floor", "",
             "Written by `benchmarks/bench_speed.py` (see its docstring for the protocol). Floor: one dense forward "
             "pass of the float32 model over the same 64 × 512 calibration windows (batches of 8, logits "
             "included), measured before and after the compress in the same process. Machine: 2 CPU cores "
             "shared with other jobs (load average recorded), on whichever host the session was lent (the "
             "processor is recorded from stop 35 on; stop 34's rows ran on an Intel Sapphire Rapids host).", "",
             "| ratio | run | date | processor | wall (s) | floor (s, before / after) | × floor "
             "| × floor in processor time | load avg (start / end) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results.values():
        mode = r["mode"] + (f" ({r['note']})" if r.get("note") else "")
        processor_ratio = f"{r['times_floor_processor']:.2f}" if "times_floor_processor" in r else "—"
        lines.append(f"| {r['ratio']} | {mode} | {r['date']} | {r.get('processor', '—')} | {r['wall_seconds']:.0f} | "
                     f"{r['floor_seconds'][0]:.0f} / {r['floor_seconds'][-1]:.0f} | {r['times_floor']:.2f} | "
                     f"{processor_ratio} | {r['load_average_start']:.1f} / {r['load_average_end']:.1f} |")
    for key, r in results.items():
        stages = r.get("stage_seconds") or {}
        lines += ["", f"## Where the time goes ({key}, wall {r['wall_seconds']:.0f} s)", "",
                  "Top-level stages in bold; the parts below them sum to (about) their stage; the rest of the "
                  "wall time is loading the model and saving the output.", "",
                  "| stage | seconds | share of wall |", "| --- | --- | --- |", *_stage_rows(stages, r["wall_seconds"])]
    notes = REPORTS / "speed-notes.md"
    text = "\n".join(lines) + "\n"
    if notes.is_file():
        text += "\n" + notes.read_text()
    (REPORTS / "speed.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("prepare")
    make.add_argument("folder", type=Path)
    measure = sub.add_parser("run")
    measure.add_argument("folder", type=Path)
    measure.add_argument("--ratio", type=float, default=0.8)
    measure.add_argument("--mode", choices=("in-memory", "stream"), default="in-memory",
                         help="in-memory: the default `lowrank compress`; stream: `--stream`")
    measure.add_argument("--keep", type=Path, help="move the compressed output here (for `lowrank eval`)")
    measure.add_argument("--plan-samples", type=int, help="windows the planner profiles (default: the toolkit's)")
    measure.add_argument("--update-samples", type=int, help="windows the update fits on (default: the toolkit's)")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.folder)
    elif args.command == "run":
        run(args.folder, args.ratio, args.mode, args.keep, args.plan_samples, args.update_samples)
    else:
        report()


if __name__ == "__main__":
    sys.exit(main())
