"""Tuning probe for block refinement: the first N blocks of SmolLM2-135M, each block's output error before and after.

Run:  python benchmarks/probe_refinement.py 0.6 3 16 16,1e-3,0.25,0 16,3e-3,0.25,0 16,1e-2,0.25,0 16,3e-3,0.25,1
      (ratio, blocks, calibration windows, then one steps,lr,share,norms per setting)

The ranks are those of a folder compressed with today's default at the ratio (its saved plan),
restricted to the first N blocks; calibration is the protocol's Hamlet windows (fewer of them,
batches of 4), so each setting takes a minute or two instead of a whole compression. Prints one
JSON line per setting: each block's error after / before refinement (1.0: refinement did not lower
it and the block kept its factors), and the errors before.
"""

from __future__ import annotations

import copy
import json
import sys
import time

from common import calibration_windows, load_smollm2

from lowrank.checkpoint import read_plan
from lowrank.compression import compress_sequential
from lowrank.plan import Plan
from lowrank.refinement import RefineOptions

FOLDERS = {"0.6": "/tmp/repro/smollm2-r0.6", "0.8": "/tmp/repro/smollm2-135m-whiten-r0.8"}


def main() -> None:
    ratio, blocks, samples = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    settings = [tuple(float(x) for x in item.split(",")) for item in sys.argv[4:]]
    loaded = load_smollm2()
    dense = loaded.model
    full = read_plan(FOLDERS[ratio])[0]
    modules = {k: v for k, v in full.modules.items() if int(k.split(".")[2]) < blocks}
    windows = calibration_windows(loaded.tokenizer, samples)
    for steps, lr, share, norms in settings:
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        plan = compress_sequential(model, Plan(modules=dict(modules)), windows, update=True, progress=False,
                                   batch_size=4, refine=RefineOptions(steps=int(steps), lr=lr, share=share,
                                                                      train_norms=bool(norms)))
        errors = plan.options.get("refine_errors", {})
        print(json.dumps({"steps": int(steps), "lr": lr, "share": share, "norms": bool(norms),
                          "seconds": round(time.perf_counter() - started, 1),
                          "after_over_before": [round(after / before, 3) for before, after in errors.values()],
                          "before": [before for before, _ in errors.values()]}), flush=True)


if __name__ == "__main__":
    main()
