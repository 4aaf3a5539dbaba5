"""How long SciPy's OpenBLAS workers should wait before sleeping: LAPACK, and torch's products after it.

    python benchmarks/bench_openblas_wait.py [--repeats 2] [--rounds 40]

`factorize` runs its Cholesky and eigensolves through SciPy's OpenBLAS, between torch's matrix products.
Each child process here (OPENBLAS_THREAD_TIMEOUT read when OpenBLAS loads, so one process per value)
repeats `rounds` times: one eigensolve and one Cholesky of a 576² float64 Gram (SmolLM2's width), then
five products 4096 × 576 → 1536 in float32 (one batch through an MLP projection). It prints the seconds
spent in each. A worker that is still spinning when the products start takes a core from them.
Values are OpenBLAS's: the wait is 2^value cycles (4 to 30; 28 is OpenBLAS's default). The processes
run one after another, alternating through the values `repeats` times. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

VALUES = (28, 4, 16, 20, 24)

CHILD = """
import lowrank, sys, time, torch
from lowrank.factorize import cholesky_in_place, symmetric_eigh
torch.manual_seed(0)
sample = torch.randn(2000, 576, dtype=torch.float64)
gram = sample.T @ sample
x, w = torch.randn(4096, 576), torch.randn(1536, 576)
lapack = products = 0.0
for round in range(int(sys.argv[1]) + 1):  # the first round warms up, uncounted
    started = time.perf_counter()
    symmetric_eigh(gram.clone())
    cholesky_in_place(gram.clone())
    middle = time.perf_counter()
    for _ in range(5):
        torch.nn.functional.linear(x, w)
    if round:
        lapack += middle - started
        products += time.perf_counter() - middle
print(f"{lapack:.3f} {products:.3f}")
"""


def measure(value: int, rounds: int) -> tuple[float, float]:
    """(LAPACK seconds, products seconds) of one child process run with OPENBLAS_THREAD_TIMEOUT=value."""
    env = {**os.environ, "OPENBLAS_THREAD_TIMEOUT": str(value)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(rounds)], env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    runs: dict[int, list[tuple[float, float]]] = {value: [] for value in VALUES}
    for _ in range(args.repeats):
        for value in VALUES:
            runs[value].append(measure(value, args.rounds))
    print(f"| OPENBLAS_THREAD_TIMEOUT | LAPACK (s, {args.rounds} rounds) | products after it (s) |")
    print("| ---: | --- | --- |")
    for value, results in runs.items():
        print(f"| {value} | {' / '.join(f'{r[0]:.2f}' for r in results)} | {' / '.join(f'{r[1]:.2f}' for r in results)} |")


if __name__ == "__main__":
    main()
