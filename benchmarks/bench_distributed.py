"""Wall time of the default SmolLM2-135M compression (ratio 0.8) on 2 processes × 1 thread against 1 process × 2 threads.

Run, in two stages (only the first is timed, so only it holds the machine's timing lock):

    python benchmarks/bench_distributed.py time
    nice -n 10 python benchmarks/bench_distributed.py quality

`time` runs `lowrank compress` twice as a user would, each in a fresh process: once with
OMP_NUM_THREADS=2, once with `--nproc 2` (torchrun, OMP_NUM_THREADS=1 per rank). `quality`
scores both folders on the shared protocol (benchmarks/common.py: 40 windows of Macbeth) and
compares their factors. Writes reports/distributed.json and reports/distributed.md; with
`--stream` among the extra arguments (streamed compression on both sides), reports/distributed-stream.*:

    python benchmarks/bench_distributed.py time smollm2-135m --seq-len 256 --stream
    nice -n 10 python benchmarks/bench_distributed.py quality --stream   # or `compare`: without perplexity
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
STREAM = "--stream" in sys.argv[2:]
WORK = Path(os.environ.get("LOWRANK_BENCH_DIR", "/tmp/bench-distributed" + ("-stream" if STREAM else "")))
RUNS = {"2 processes × 1 thread": ("two", "1", ["--nproc", "2"]), "1 process × 2 threads": ("one", "2", [])}
NAME = "distributed-stream" if STREAM else "distributed"
JSON = REPO / "reports" / f"{NAME}.json"


def timed_run(folder: str, threads: str, extra: list[str], model: list[str]) -> dict:
    """`lowrank compress -o WORK/folder` in a wrapper process: wall seconds and the peak RSS of its largest process."""
    out = WORK / folder
    code = ("import resource, subprocess, sys, time; "
            "open('/proc/self/oom_score_adj', 'w').write('1000'); "  # on a shared machine, be the one killed first
            "started = time.perf_counter(); "
            f"rc = subprocess.call([sys.executable, '-m', 'lowrank', 'compress', *{model!r}, '-o', {str(out)!r}, '--overwrite', "
            f"'-q', *{extra!r}]); "
            "print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc)")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    seconds, peak, rc = result.stdout.strip().splitlines()[-1].split()
    if rc != "0":
        raise SystemExit(f"lowrank compress failed ({rc}):\n{result.stderr[-2000:]}")
    return {"folder": str(out), "threads_per_process": int(threads), "wall_seconds": round(float(seconds), 1),
            "peak_rss_mib_largest_process": round(float(peak))}


def stage_time(model: list[str]) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    runs = {}
    for label, (folder, threads, extra) in RUNS.items():
        runs[label] = timed_run(folder, threads, extra, model)
        print(label, runs[label], flush=True)
    two, one = (runs[label]["wall_seconds"] for label in RUNS)
    load = [round(x, 1) for x in os.getloadavg()]
    return {"command": " ".join(["lowrank compress", *model]) + " (smollm2-135m at ratio 0.8 when no model is named)",
            "runs": runs,
            "speedup": round(one / two, 3), "machine": f"{os.cpu_count()} CPU cores, no GPU lent to this task",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_after": load}


def factor_products(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {k: v.to(torch.float64) for shard in sorted(folder.glob("*.safetensors"))
               for k, v in load_file(shard).items()}
    return {k.removesuffix(".up.weight"): v @ weights[k.removesuffix("up.weight") + "down.weight"]
            for k, v in weights.items() if k.endswith(".up.weight")}


def stage_quality(data: dict, perplexity: bool = True) -> dict:
    """Perplexity of both folders (unless not `perplexity`: the `compare` stage), their ranks and factors compared."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import eval_ppl, evaluation_windows

    import lowrank

    for run in data["runs"].values():
        if perplexity:
            loaded = lowrank.load_model(run["folder"])
            run["perplexity"] = round(eval_ppl(loaded.model, evaluation_windows(loaded.tokenizer)), 4)
            print(run["folder"], run["perplexity"], flush=True)
        run["ranks"] = {n: m["rank"] for n, m in
                        json.loads((Path(run["folder"]) / "lowrank_plan.json").read_text())["modules"].items()}
    two, one = (Path(run["folder"]) for run in data["runs"].values())
    a, b = factor_products(one), factor_products(two)
    data["same_ranks"] = all(r["ranks"] == next(iter(data["runs"].values()))["ranks"] for r in data["runs"].values())
    data["max_relative_product_difference"] = max(float((b[k] - a[k]).norm() / a[k].norm()) for k in a)
    for run in data["runs"].values():
        del run["ranks"]
    return data


def markdown(data: dict) -> str:
    rows = "\n".join(f"| {label} | {run['wall_seconds']:.0f} | {run['peak_rss_mib_largest_process']:,} | "
                     + (f"{run['perplexity']:.3f} |" if "perplexity" in run else "(quality stage not run) |")
                     for label, run in data["runs"].items())
    title = "Streamed distributed compression" if STREAM else "Distributed compression"
    return f"""# {title}: 2 processes against 1 (SmolLM2-135M, ratio 0.8)

`{data['command']}`, measured {data['date']} on {data['machine']} (torch {data['torch']}), with
`benchmarks/bench_distributed.py` (the timed stage under the machine's timing lock). The baseline
is the fair one on 2 cores: one process using both cores (OMP_NUM_THREADS=2) against `--nproc 2`,
two gloo ranks of one thread each, the calibration batches split between them.

| run | wall time (s) | peak RSS, largest process (MiB) | perplexity (Macbeth, 40 × 512) |
| --- | ---: | ---: | ---: |
{rows}

- **speed-up of 2 processes: {data['speedup']:.2f}×**
- same ranks in both plans: {data.get('same_ranks')}; largest relative difference of any factored
  layer's up·down between the two folders: {data.get('max_relative_product_difference', float('nan')):.1e}
  (float64 sums over the ranks in another order, then saved in float32).
- No GPU is lent to this task, so the `--device cuda` row of issue 14 is not measured.
- Wall time includes what each run pays once: loading the model (each rank loads it) and, for
  `--nproc`, starting torchrun and the ranks.
""" + "".join(f"- {note}\n" for note in data.get("notes", []))


def main() -> None:
    stage = sys.argv[1] if len(sys.argv) > 1 else "time"
    if stage == "time":
        data = stage_time(sys.argv[2:])  # extra arguments: another model and options (a quick check)
    elif stage in ("quality", "compare"):
        data = stage_quality(json.loads(JSON.read_text()), perplexity=stage == "quality")
    else:
        raise SystemExit("usage: bench_distributed.py time|quality|compare")
    JSON.write_text(json.dumps(data, indent=2) + "\n")
    (REPO / "reports" / f"{NAME}.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
