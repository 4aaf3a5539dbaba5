"""Tuning probe for block refinement: the first N blocks of SmolLM2-135M compressed, the rest dense.

Run:  python benchmarks/probe_refinement.py --ratio 0.6 --blocks 16 --samples 32 --eval-windows 10 \
          default refit:refit=1 old:steps=16,loss=mse,holdout=0 token:steps=16 all:steps=16,refit=1,dense=1

Each setting is NAME[:key=value,...] with keys steps, lr, share, holdout, loss, refit, dense, norms
(RefineOptions' fields; refit = refit_rounds, dense = train_dense, norms = train_norms). The ranks
are those of a folder compressed with today's default at the ratio (its saved plan), restricted to
the first N blocks; calibration is the protocol's Hamlet windows (fewer of them, batches of 4), so a
setting costs minutes instead of a whole compression. Prints one JSON line per setting: the
perplexity on the first --eval-windows windows of Macbeth (never calibrated on), each block's error
after / before refinement (1.0: no step lowered the held-out error, the block kept its factors),
the step each block kept, and the seconds the compression took.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from common import calibration_windows, eval_ppl, evaluation_windows, load_smollm2

from lowrank.checkpoint import read_plan
from lowrank.compression import compress_sequential
from lowrank.plan import Plan
from lowrank.refinement import RefineOptions

FOLDERS = {"0.6": "/tmp/repro/smollm2-r0.6", "0.8": "/tmp/repro/smollm2-135m-whiten-r0.8"}
KEYS = {"steps": ("steps", int), "lr": ("lr", float), "share": ("share", float), "holdout": ("holdout", float),
        "loss": ("loss", str), "refit": ("refit_rounds", int), "dense": ("train_dense", lambda v: bool(int(v))),
        "norms": ("train_norms", lambda v: bool(int(v)))}


def parse_setting(text: str) -> tuple[str, RefineOptions]:
    """NAME[:key=value,...] → (NAME, RefineOptions)."""
    name, _, rest = text.partition(":")
    fields = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=", 1)
        field, kind = KEYS[key]
        fields[field] = kind(value)
    return name, RefineOptions(**fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", default="0.6", choices=sorted(FOLDERS))
    parser.add_argument("--blocks", type=int, default=16, help="compress blocks 0..N-1, keep the rest dense")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of Hamlet")
    parser.add_argument("--eval-windows", type=int, default=10, help="first windows of Macbeth for perplexity")
    parser.add_argument("settings", nargs="+")
    args = parser.parse_args()
    loaded = load_smollm2()
    dense = loaded.model
    full = read_plan(FOLDERS[args.ratio])[0]
    modules = {k: v for k, v in full.modules.items() if int(k.split(".")[2]) < args.blocks}
    windows = calibration_windows(loaded.tokenizer, args.samples)
    evaluation = evaluation_windows(loaded.tokenizer)[: args.eval_windows]
    for name, options in map(parse_setting, args.settings):
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        plan = compress_sequential(model, Plan(modules=dict(modules)), windows, update=True, progress=False,
                                   batch_size=4, refine=options)
        seconds = time.perf_counter() - started
        errors = plan.options.get("refine_errors", {})
        print(json.dumps({"setting": name, "options": options.record(), "blocks": args.blocks, "ratio": args.ratio,
                          "samples": args.samples, "eval_windows": args.eval_windows,
                          "perplexity": round(eval_ppl(model, evaluation), 3), "seconds": round(seconds, 1),
                          "after_over_before": [round(a / b, 3) if b else 1.0 for b, a, *_ in errors.values()],
                          "best_step": [s for *_, s in errors.values()]}), flush=True)


if __name__ == "__main__":
    main()
