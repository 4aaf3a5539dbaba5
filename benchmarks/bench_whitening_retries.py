"""Whitening a singular Gram: Cholesky retried with a larger ridge, against the eigendecomposition it replaced.

    python benchmarks/bench_whitening_retries.py [--width 5632] [--tokens 2048] [--outlier 100]

The Gram is summed as calibration sums it (float32 products of 256-token batches, float64 sums) from
fewer tokens than its width, with one direction `--outlier` times the others, as LLM activations have:
the 1B Llama shape's MLP input at `--samples 8 --seq-len 256`. Its rounding leaves eigenvalues below
the ridge δ, so Cholesky at δ fails (printed). `whitening` is then timed with its retries
(`factorize.RIDGE_RETRIES`) and without them (what it did before: an eigendecomposition).
"""

from __future__ import annotations

import lowrank  # noqa: F401  (first: it sets the BLAS thread policies before torch starts)

import argparse
import time

import torch

from lowrank import factorize
from lowrank.calibration import add_gram_


def singular_gram(width: int, tokens: int, outlier: float, seed: int = 0) -> torch.Tensor:
    """XᵀX of `tokens` random activations in a random basis, one direction `outlier` × the others."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(width, width, generator=generator))
    scales = torch.ones(width)
    scales[0] = outlier
    gram = torch.zeros(width, width, dtype=torch.float64)
    for _ in range(max(1, tokens // 256)):
        add_gram_(gram, (torch.randn(256, width, generator=generator) * scales) @ basis)
    return gram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=5632)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--outlier", type=float, default=100.0)
    args = parser.parse_args()
    gram = singular_gram(args.width, args.tokens, args.outlier)
    damped = (gram + gram.T) / 2
    damped.diagonal().add_(factorize.DEFAULT_DAMPING * gram.diagonal().mean())
    print(f"{args.width}-wide Gram of {args.tokens} tokens; Cholesky at the ridge δ alone:",
          "passes" if factorize.cholesky_in_place(damped) is not None else "fails")
    del damped
    retries = factorize.RIDGE_RETRIES
    for label, setting in (("with the retries", retries), ("without (before stop 32)", ())):
        factorize.RIDGE_RETRIES = setting
        started = time.perf_counter()
        white = factorize.whitening(gram)
        seconds = time.perf_counter() - started
        print(f"{label}: {seconds:.1f} s, {'Cholesky' if white.lower is not None else 'eigendecomposition'}")
    factorize.RIDGE_RETRIES = retries


if __name__ == "__main__":
    main()
