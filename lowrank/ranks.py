"""Rank arithmetic: what a rank-k factorization of an m×n matrix costs, and SVD-LLM's uniform rank.

A rank-k factorization stores k(m+n) numbers where the dense matrix stores mn, so factoring only
saves parameters while k < mn/(m+n). Every stage (planner, analyzer, plan files) counts with
these few functions.
"""

from __future__ import annotations

from .errors import BudgetError


def saves_parameters(rank: int, out_features: int, in_features: int) -> bool:
    """A rank-k factorization of an m×n matrix costs k(m+n); it only pays while that is < mn."""
    return rank * (out_features + in_features) < out_features * in_features


def break_even_rank(out_features: int, in_features: int) -> int:
    """The smallest rank at which factoring no longer saves parameters: ⌈mn/(m+n)⌉."""
    m, n = out_features, in_features
    return -(-(m * n) // (m + n))


def kept_params(rank: int, out_features: int, in_features: int) -> int:
    """Parameters of a rank-k factorization, or of the dense matrix where factoring saves nothing."""
    if saves_parameters(rank, out_features, in_features):
        return rank * (out_features + in_features)
    return out_features * in_features


def check_ratio(ratio: float) -> float:
    """A kept-parameter fraction must lie in (0, 1]."""
    if not (0.0 < ratio <= 1.0):
        raise BudgetError(f"ratio {ratio} is outside (0, 1]; pass the fraction of parameters to keep, e.g. --ratio 0.8")
    return ratio


def round_rank(rank: int, round_to: int) -> int:
    """Round down to a multiple of `round_to` (hardware-friendly shapes), never below it."""
    if round_to < 1:
        raise BudgetError(f"--round-to must be a positive integer, got {round_to}")
    return max(round_to, (rank // round_to) * round_to)


def uniform_rank(out_features: int, in_features: int, ratio: float, round_to: int = 1) -> int:
    """k = ⌊r·mn/(m+n)⌋, rounded down to a multiple of `round_to`, at least 1."""
    k = int(ratio * out_features * in_features // (out_features + in_features))
    k = max(1, min(k, min(out_features, in_features)))
    return min(round_rank(k, round_to), min(out_features, in_features))
