"""Perplexity of SmolLM2-135M after one-shot compression by svd, asvd and whiten at two ratios.

Run:  python benchmarks/bench_compress.py          (about 10 minutes on 2 CPU cores)
Writes reports/compress.json and reports/compress.md. Calibration statistics are collected once
from the dense model and shared by every method (each method sees exactly the same data).
"""

from __future__ import annotations

import time

from common import (dense_baseline, CALIB_SAMPLES, EVAL_WINDOWS, SEQ_LEN, environment, eval_ppl, fresh_copy, write_report)

from lowrank.calibration import collect_stats
from lowrank.compression import apply_plan
from lowrank.model_planning import uniform_plan

RATIOS = (0.8, 0.6)
METHODS = ("svd", "asvd", "whiten")


def main() -> None:
    model, tokenizer, calib, evaluation, targets, dense_ppl = dense_baseline()

    started = time.perf_counter()
    stats = collect_stats(model, targets, calib, progress=False)
    calib_seconds = time.perf_counter() - started

    rows = []
    for ratio in RATIOS:
        for method in METHODS:
            compressed = fresh_copy(model)
            plan = uniform_plan(compressed, targets, ratio, method)
            started = time.perf_counter()
            apply_plan(compressed, plan, stats, progress=False)
            factor_seconds = time.perf_counter() - started
            ppl = eval_ppl(compressed, evaluation)
            summary = plan.summary()
            rows.append({"ratio": ratio, "method": method, "perplexity": ppl, "factor_seconds": factor_seconds,
                         "target_ratio": summary["target_ratio"], "model_ratio": summary["model_ratio"],
                         "modules_factored": summary["modules_factored"], "modules": summary["modules"]})
            print(f"ratio {ratio} {method}: {ppl:.3f} (factoring {factor_seconds:.0f} s)", flush=True)
            del compressed

    data = {
        "protocol": {"calibration": f"{CALIB_SAMPLES} random windows of {SEQ_LEN} tokens of Hamlet, seed 0",
                     "evaluation": f"first {EVAL_WINDOWS} windows of {SEQ_LEN} tokens of Macbeth",
                     "eval_tokens": EVAL_WINDOWS * (SEQ_LEN - 1), "planner": "uniform (SVD-LLM)"},
        "environment": environment(),
        "dense_perplexity": dense_ppl,
        "calibration_seconds": calib_seconds,
        "results": rows,
    }
    lines = [
        "# One-shot compression of SmolLM2-135M: svd vs asvd vs whiten",
        "",
        "Produced by `python benchmarks/bench_compress.py` "
        f"({data['environment']['date']}, torch {data['environment']['torch']}, "
        f"{data['environment']['threads']} CPU threads).",
        "",
        f"Calibration: {data['protocol']['calibration']}. Evaluation: {data['protocol']['evaluation']} "
        f"({data['protocol']['eval_tokens']:,} predicted tokens). Ranks: SVD-LLM's uniform rule "
        "k = ⌊r·mn/(m+n)⌋ on every linear layer of the 30 blocks (210 matrices).",
        "",
        f"Dense perplexity: **{dense_ppl:.2f}**",
        "",
        "| ratio (target params kept) | whole-model ratio | svd | asvd | whiten |",
        "| --- | --- | --- | --- | --- |",
    ]
    for ratio in RATIOS:
        by_method = {r["method"]: r for r in rows if r["ratio"] == ratio}
        model_ratio = by_method["whiten"]["model_ratio"]
        cells = " | ".join(f"{by_method[m]['perplexity']:.2f}" for m in METHODS)
        lines.append(f"| {by_method['whiten']['target_ratio']:.3f} | {model_ratio:.3f} | {cells} |")
    lines += ["", f"Calibration statistics took {calib_seconds:.0f} s and were shared by all runs.", ""]
    write_report("compress", data, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
