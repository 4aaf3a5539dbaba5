"""Matmul timings of SmolLM2-135M's shapes on this CPU, and what they say about its default plans: reports/speed-model.{json,md}.

Run:  python benchmarks/bench_speed_model.py FOLDER [FOLDER ...] [--threads 1] [--tokens 1,512,4096]
For each row count (1: decoding one token; 512: a 512-token prompt; 4096: eight of them), the table
`lowrank plan --speed` measures (lowrank.speed_model.measure_table: every target shape dense and
factored at multiples of 8 up to its break-even rank, and consecutive ranks 33..160 of 576×576 for
the alignment), then per folder: how many of its factored matrices have a rank above the speed cap
(slower than dense), and the linear layers' time the table predicts for its plan against dense.
"""

from __future__ import annotations

import argparse
import json

import torch

from common import environment, write_report

from lowrank.checkpoint import read_plan
from lowrank.speed_model import load_timings, measure_table, predicted_seconds

NAME = "speed-model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", default="1,512,4096")
    parser.add_argument("--tables", nargs="*", default=None,
                        help="speed tables saved earlier (SpeedTable JSON, one per row count) instead of measuring")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plans = {folder: read_plan(folder)[0] for folder in args.folders}
    shapes = [m.shape for m in next(iter(plans.values())).modules.values()]
    tables, rows = {}, []
    saved = [load_timings(path) for path in args.tables or []]
    for tokens in [t.tokens for t in saved] if saved else map(int, args.tokens.split(",")):
        table = next((t for t in saved if t.tokens == tokens), None) or \
            measure_table(shapes, "cpu", torch.float32, tokens=tokens, repeats=5, progress=False)
        tables[tokens] = table.to_dict()
        caps = {f"{m}x{n}": table.limit((m, n)) for m, n in table.shapes}
        for folder, plan in plans.items():
            modules = {name: (m.shape, m.rank) for name, m in plan.modules.items()}
            slower = [name for name, (shape, rank) in modules.items() if rank is not None and rank > table.limit(shape)]
            dense, planned = predicted_seconds(modules, table)
            rows.append({"tokens": tokens, "folder": folder, "round_to_auto": table.round_to(), "caps": caps,
                         "factored": sum(r is not None for _, r in modules.values()), "slower_than_dense": slower,
                         "linear_dense_seconds": dense, "linear_planned_seconds": planned})
            print(f"{tokens} rows, {folder}: round-to auto {table.round_to()}, caps {caps}, {len(slower)} of "
                  f"{rows[-1]['factored']} factored slower than dense, linear layers ×{planned / dense:.3f}", flush=True)
    lines = ["# Matmul timings on this CPU and the default plans", "",
             f"{saved[0].threads if saved else args.threads} thread(s), float32, CPU time of the computing thread; medians of 5 runs after 2 "
             "warm-up. Speed cap: the largest rank (multiple of 8) whose factored matmul pair still beats the dense "
             "matmul; `lowrank plan --speed` never plans above it.", "",
             "| rows per matmul | --round-to auto | speed caps (shape: rank) | folder | factored | slower than dense | "
             "linear layers, planned / dense (predicted) |",
             "| ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        caps = ", ".join(f"{shape}: {cap}" for shape, cap in row["caps"].items())
        lines.append(f"| {row['tokens']} | {row['round_to_auto']} | {caps} | `{row['folder']}` | {row['factored']} | "
                     f"{len(row['slower_than_dense'])} | {row['linear_planned_seconds'] / row['linear_dense_seconds']:.3f} |")
    threads = saved[0].threads if saved else args.threads
    lines += ["", "```bash", f"python benchmarks/bench_speed_model.py {' '.join(args.folders)} --threads {threads} "
              f"--tokens {','.join(str(row['tokens']) for row in rows[::len(plans)])}", "```", "", f"Produced by `python benchmarks/bench_speed_model.py` "
              f"({environment()}).", ""]
    write_report(NAME, {"rows": rows, "tables": tables, "environment": environment()}, "\n".join(lines))


if __name__ == "__main__":
    main()
