"""Choosing ranks under a parameter budget.

`uniform` is SVD-LLM's rule: every m×n matrix keeps the same fraction r of its parameters,
k = ⌊r·mn/(m+n)⌋. A matrix stays dense where its rank would not save anything.
"""

from __future__ import annotations

from .errors import BudgetError
from .plan import ModulePlan, module_plan
from .targets import Target


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


def plan_uniform(targets: list[Target], ratio: float, round_to: int = 1) -> dict[str, ModulePlan]:
    """SVD-LLM's uniform allocation: the same kept fraction for every matrix."""
    check_ratio(ratio)
    return {
        t.name: module_plan(t.shape, uniform_rank(t.out_features, t.in_features, ratio, round_to))
        for t in targets
    }
