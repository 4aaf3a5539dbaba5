"""What block refinement costs, under the timing lock: the first N blocks of SmolLM2-135M, timed three ways.

Run:  python benchmarks/bench_refinement_cost.py --blocks 4 --ratio 0.6 \\
          --plan-from /tmp/repro/smollm2-r0.6 --steps 16

The floor (one dense forward pass over the 64 × 512 calibration windows, block by block), today's
compress stage (sequential + update) and the compress stage + refinement, all over the same first
N blocks with the default plan's ranks. Every block of SmolLM2 has the same shape, so the ratios
carry over to the whole model; the absolute seconds do not (ranks differ from block to block).
Writes reports/refinement-cost.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import REPORTS, calibration_windows, environment, fresh_copy, load_smollm2

from lowrank.block_capture import capture_block_inputs, run_block
from lowrank.checkpoint import read_plan
from lowrank.compression import compress_sequential
from lowrank.plan import Plan
from lowrank.refinement import RefineOptions
from lowrank.targets import find_block_list


@torch.no_grad()
def floor(model, windows, blocks: int) -> float:
    started = time.perf_counter()
    captured = capture_block_inputs(model, windows, 8, "cpu")
    hidden = captured.hidden
    for index, block in enumerate(find_block_list(model)[1][:blocks]):
        hidden = [run_block(block, h, call, torch.device("cpu")) for h, call in zip(hidden, captured.calls[index])]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--plan-from", required=True, help="a folder compressed with today's default at --ratio")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=RefineOptions.lr)
    parser.add_argument("--share", type=float, default=RefineOptions.share)
    parser.add_argument("--holdout", type=float, default=RefineOptions.holdout)
    parser.add_argument("--loss", default=RefineOptions.loss)
    parser.add_argument("--dense", action="store_true", help="refinement also trains the layers the plan kept dense")
    parser.add_argument("--refit", type=int, default=0, help="rounds of the closed-form refit of both factors "
                        "(adds a row with the refit alone)")
    parser.add_argument("--out", default="refinement-cost", help="reports/<out>.json")
    args = parser.parse_args()
    loaded = load_smollm2()
    dense, calib = loaded.model, calibration_windows(loaded.tokenizer)
    full = read_plan(args.plan_from)[0]
    modules = {k: v for k, v in full.modules.items() if int(k.split(".")[2]) < args.blocks}
    result = {"command": "python benchmarks/bench_refinement_cost.py "
                         f"--blocks {args.blocks} --ratio {args.ratio:g} --plan-from {args.plan_from} "
                         f"--steps {args.steps} --lr {args.lr:g} --share {args.share:g} --holdout {args.holdout:g} "
                         f"--loss {args.loss}" + (" --dense" if args.dense else "")
                         + (f" --refit {args.refit}" if args.refit else "") + f" --out {args.out}",
              "environment": environment(), "floor_seconds": round(floor(dense, calib, args.blocks), 1)}
    variants = [("default", 0, 0)] + ([("refit", 0, args.refit)] if args.refit else []) + [
        ("refined", args.steps, args.refit)]
    for name, steps, rounds in variants:
        model = fresh_copy(dense)
        started = time.perf_counter()
        options = RefineOptions(steps=steps, lr=args.lr, share=args.share, holdout=args.holdout, loss=args.loss,
                                train_dense=args.dense, refit_rounds=rounds)
        done = compress_sequential(model, Plan(modules=dict(modules)), calib, update=True, progress=False,
                                   refine=options)
        result[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
        if steps:  # each block's error (held-out batches, else all of them) before and after, and the step kept
            result["block_errors_before_after"] = done.options["refine_errors"]
        print(name, result[f"{name}_seconds"], flush=True)
    result["default_over_floor"] = round(result["default_seconds"] / result["floor_seconds"], 2)
    result["refined_over_floor"] = round(result["refined_seconds"] / result["floor_seconds"], 2)
    result["refined_over_default"] = round(result["refined_seconds"] / result["default_seconds"], 2)
    if args.refit:
        result["refit_over_default"] = round(result["refit_seconds"] / result["default_seconds"], 2)
    (REPORTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
