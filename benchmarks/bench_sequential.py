"""Sequential against one-shot compression of SmolLM2-135M: perplexity, time and peak memory.

Run:  flock /tmp/lowrank-cpu.lock python benchmarks/bench_sequential.py   (ratios 0.8 and 0.6, then memory)
or in pieces (`--ratio 0.6`, `--ratio 0.8`, `--memory`); results merge into reports/sequential.{json,md}.

Every variant at a ratio follows the same plan (the planner's default strategy). One-shot takes
its statistics from the dense model (collected once per run); sequential takes each block's from
the already-compressed blocks; sequential+update also refits every `up` factor by least squares.
Peak memory is the maximum resident set size (`/usr/bin/time -v`) of separate `lowrank compress`
runs, one-shot and sequential.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time

from common import (CALIB_SAMPLES, EVAL_WINDOWS, REPORTS, SEQ_LEN, calibration_windows, environment, eval_ppl,
                    evaluation_windows, fresh_copy, load_smollm2, write_report)

from lowrank import planner
from lowrank.calibration import collect_stats
from lowrank.compression import apply_plan, compress_sequential
from lowrank.model_planning import uniform_plan
from lowrank.model_info import count_parameters
from lowrank.profiling import profile_model
from lowrank.targets import find_targets

NAME = "sequential"
RATIOS = (0.8, 0.6)
VARIANTS = ("one-shot", "sequential", "sequential+update")


def make_plan(model, targets, ratio, stats):
    """The planner's default plan at `ratio` (uniform today), and the strategy's name."""
    if planner.DEFAULT_STRATEGY == "uniform":
        return uniform_plan(model, targets, ratio), "uniform"
    spectra = {m.name: m for m in profile_model(model, targets, stats).matrices}
    plan = planner.plan_targets(targets, count_parameters(model), ratio, planner.DEFAULT_STRATEGY, spectra=spectra)
    return plan, planner.DEFAULT_STRATEGY


class Dense:
    """The dense model, both window sets and its one-shot statistics: loaded and calibrated once per run."""

    def __init__(self):
        loaded = load_smollm2()
        self.model = loaded.model
        self.calib = calibration_windows(loaded.tokenizer)
        self.evaluation = evaluation_windows(loaded.tokenizer)
        self.targets = find_targets(self.model)
        started = time.perf_counter()
        self.stats = collect_stats(self.model, self.targets, self.calib, progress=False)
        self.calib_seconds = time.perf_counter() - started


def run_ratio(dense: Dense, ratio: float, variants: tuple[str, ...], update_target: str,
              dense_ppl: float | None) -> dict:
    model, calib, evaluation, targets, stats = dense.model, dense.calib, dense.evaluation, dense.targets, dense.stats
    calib_seconds = dense.calib_seconds
    plan, strategy = make_plan(model, targets, ratio, stats)
    rows = []
    for variant in variants:
        compressed = fresh_copy(model)
        run_plan = type(plan).from_dict(plan.to_dict())
        started = time.perf_counter()
        if variant == "one-shot":
            apply_plan(compressed, run_plan, stats, progress=False)
            seconds = calib_seconds + time.perf_counter() - started
        else:
            compress_sequential(compressed, run_plan, calib, update=variant != "sequential",
                                update_target=update_target, progress=False)
            seconds = time.perf_counter() - started
        ppl = eval_ppl(compressed, evaluation)
        rows.append({"ratio": ratio, "variant": variant, "perplexity": ppl, "compress_seconds": round(seconds, 1),
                     "target_ratio": plan.summary()["target_ratio"], "model_ratio": plan.summary()["model_ratio"],
                     "modules_factored": len(plan.factored), "strategy": strategy,
                     "update_target": update_target if "update" in variant else None})
        print(f"ratio {ratio} {variant}: ppl {ppl:.3f} ({seconds:.0f} s)", flush=True)
        del compressed
    if dense_ppl is None:  # the same for every run: measured once
        dense_ppl = eval_ppl(model, evaluation)
    return {"dense_perplexity": dense_ppl, "rows": rows}


def max_rss_mib(args: list[str]) -> tuple[float, float]:
    """Maximum resident set size (MiB) and wall seconds of a command, from GNU time -v."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True, check=True)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return int(match.group(1)) / 1024, time.perf_counter() - started


def run_memory(ratio: float = 0.8) -> list[dict]:
    rows = []
    for mode in ("--one-shot", "--sequential"):
        out = tempfile.mkdtemp(prefix="lowrank-mem-")
        command = ["lowrank", "compress", "--ratio", str(ratio), mode, "-o", out, "--overwrite", "--quiet"]
        try:
            mib, seconds = max_rss_mib(command)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rows.append({"mode": mode.lstrip("-"), "ratio": ratio, "max_rss_mib": round(mib, 1),
                     "wall_seconds": round(seconds, 1), "command": "/usr/bin/time -v " + " ".join(command)})
        print(f"{mode}: max RSS {mib:.0f} MiB ({seconds:.0f} s)", flush=True)
    return rows


def load_previous() -> dict:
    path = REPORTS / f"{NAME}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def markdown(data: dict) -> str:
    lines = ["# Sequential vs one-shot compression (SmolLM2-135M)", "",
             f"Calibration: {data['protocol']['calibration']}. Evaluation: {data['protocol']['evaluation']}. "
             f"Dense perplexity: {data.get('dense_perplexity', float('nan')):.3f}.", ""]
    rows = sorted(data.get("rows", []), key=lambda r: (-r["ratio"], VARIANTS.index(r["variant"])
                                                       if r["variant"] in VARIANTS else 9))
    if rows:
        lines += ["| ratio | variant | plan | perplexity | compression time (s) |", "|---|---|---|---|---|"]
        for r in rows:
            label = r["variant"] + (f" (target {r['update_target']})" if r.get("update_target") else "")
            lines.append(f"| {r['ratio']} | {label} | {r['strategy']}, {r['modules_factored']} factored, "
                         f"target ratio {r['target_ratio']:.3f} | {r['perplexity']:.2f} | {r['compress_seconds']} |")
        lines.append("")
    if data.get("memory"):
        lines += ["## Peak memory of `lowrank compress` (maximum resident set size, /usr/bin/time -v)", "",
                  "| mode | ratio | max RSS (MiB) | wall (s) |", "|---|---|---|---|"]
        for r in data["memory"]:
            lines.append(f"| {r['mode']} | {r['ratio']} | {r['max_rss_mib']:.0f} | {r['wall_seconds']:.0f} |")
        lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in data["memory"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, action="append",
                        help="ratio to measure (repeatable); default: 0.8 and 0.6, then --memory")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--update-target", default="dense", choices=("dense", "compressed"))
    parser.add_argument("--memory", action="store_true", help="measure peak RSS of CLI runs")
    args = parser.parse_args()
    ratios = list(args.ratio or [])
    memory = args.memory
    if not ratios and not memory:
        ratios, memory = list(RATIOS), True

    data = load_previous()
    data["protocol"] = {"calibration": f"{CALIB_SAMPLES} random windows of {SEQ_LEN} tokens of Hamlet, seed 0",
                        "evaluation": f"first {EVAL_WINDOWS} windows of {SEQ_LEN} tokens of Macbeth",
                        "eval_tokens": EVAL_WINDOWS * (SEQ_LEN - 1)}
    data["environment"] = environment()
    dense = Dense() if ratios else None
    for ratio in ratios:
        variants = tuple(v for v in args.variants.split(",") if v)
        result = run_ratio(dense, ratio, variants, args.update_target, data.get("dense_perplexity"))
        data["dense_perplexity"] = result["dense_perplexity"]
        keep = [r for r in data.get("rows", []) if not any(
            r["ratio"] == n["ratio"] and r["variant"] == n["variant"] and r.get("update_target") == n["update_target"]
            for n in result["rows"])]
        data["rows"] = keep + result["rows"]
        write_report(NAME, data, markdown(data))  # after every ratio, so a long run keeps what it measured
    del dense
    if memory:
        data["memory"] = run_memory()
    write_report(NAME, data, markdown(data))


if __name__ == "__main__":
    main()
