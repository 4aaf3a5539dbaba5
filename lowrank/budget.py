"""Parameter budgets, rank limits and per-module overrides: the constraints a plan must meet.

A budget is written `[SCOPE:]VALUE`:

- `0.6` or `target:0.6`: keep 60% of the target layers' parameters;
- `model:0.7`: keep 70% of the whole model's parameters (embeddings and norms count, and are kept);
- `90M`, `1.2B`, `500K`, `123456` (or `model:90M`): the compressed model holds at most that many
  parameters; `target:40M` limits the target layers alone.

Every budget becomes one number, the target-parameter allowance: how many parameters the
target layers may hold after compression. A plan never exceeds it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import BudgetError
from .ranks import break_even_rank

SCOPES = ("target", "model")
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_COUNT = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMBGT]?)$", re.IGNORECASE)


def parse_count(text: str) -> int:
    """'90M' → 90_000_000, '1.2B' → 1_200_000_000, '123456' → 123456."""
    match = _COUNT.match(text.strip())
    if not match:
        raise BudgetError(f"{text!r} is not a parameter count; write e.g. 90M, 1.2B, 500K or 123456")
    return int(round(float(match.group(1)) * _SUFFIXES[match.group(2).upper()]))


def format_count(count: float) -> str:
    """A parameter count for people: 90.12M, 1.2B, 850K."""
    for suffix, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(count) >= size:
            return f"{count / size:.4g}{suffix}"
    return str(int(count))


def _round_up(value: float, digits: int, count: bool = False) -> str:
    """`value` rounded *up* to `digits` significant digits, so the text never names too small a budget."""
    if value <= 0:
        return "0"
    exponent = math.floor(math.log10(value)) - digits + 1
    rounded = math.ceil(value / 10**exponent - 1e-9) * 10**exponent
    return format_count(rounded) if count else f"{rounded:.{max(0, -exponent)}f}"


@dataclass(frozen=True)
class Budget:
    """How many parameters to keep: a fraction or a count, of the target layers or the whole model."""

    scope: str  # "target" or "model"
    kind: str  # "fraction" or "count"
    value: float

    @classmethod
    def parse(cls, text: "str | float | Budget") -> "Budget":
        """Read `[target:|model:]VALUE`; a bare number ≤ 1 is a target fraction, anything larger a count."""
        if isinstance(text, Budget):
            return text
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = repr(text)
        raw = str(text).strip()
        scope, _, value_text = raw.rpartition(":")
        scope = scope.strip().lower()
        value_text = value_text.strip()
        if scope and scope not in SCOPES:
            raise BudgetError(f"budget {raw!r}: unknown scope {scope!r}; write target:VALUE or model:VALUE")
        try:
            number = float(value_text)
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):
            raise BudgetError(f"budget {raw!r} is not a finite number")
        if number is not None and number <= 1.0:
            if number <= 0.0:
                raise BudgetError(f"budget {raw!r} must be positive; e.g. 0.6 keeps 60% of the target parameters")
            return cls(scope or "target", "fraction", number)
        count = parse_count(value_text)
        if count < 1:
            raise BudgetError(f"budget {raw!r} keeps no parameters; give a positive count such as 90M")
        return cls(scope or "model", "count", count)

    def allowance(self, target_params: int, model_params: int | None) -> int:
        """The most parameters the target layers may hold after compression."""
        if self.scope == "target":
            return int(math.floor(self.value * target_params)) if self.kind == "fraction" else int(self.value)
        if model_params is None:
            raise BudgetError(f"budget {self.text} is relative to the whole model, whose size is unknown here; "
                              "give a target budget such as 0.6 instead")
        others = model_params - target_params
        kept = math.floor(self.value * model_params) if self.kind == "fraction" else int(self.value)
        return int(kept - others)

    def same_form(self, allowance: int, target_params: int, model_params: int | None) -> str:
        """The smallest budget of this budget's form that allows `allowance` (for error messages)."""
        if self.scope == "target":
            return (f"target:{_round_up(allowance / target_params, 4)}" if self.kind == "fraction"
                    else f"target:{_round_up(allowance, 4, count=True)}")
        total = allowance + (model_params or 0) - target_params
        return (f"model:{_round_up(total / model_params, 4)}" if self.kind == "fraction"
                else _round_up(total, 4, count=True))

    @property
    def text(self) -> str:
        """The canonical spelling, which `parse` reads back to the same budget."""
        if self.kind == "fraction":
            return f"{self.scope}:{self.value!r}"  # repr: the shortest text that reads back exactly
        if self.value == 1:
            return f"{self.scope}:0.001K"  # a bare 1 would read as the fraction 1.0
        return f"{self.scope}:{int(self.value)}"

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.text, "scope": self.scope, "kind": self.kind, "value": self.value}


@dataclass(frozen=True)
class RankLimits:
    """Bounds on every factored rank: at least `min_rank`, at most `max_rank`, a multiple of `round_to`.

    With a `max_rank`, every matrix the planner allocates is factored (dense would exceed it).
    """

    min_rank: int = 1
    max_rank: int | None = None
    round_to: int = 1

    def __post_init__(self):
        if self.round_to < 1:
            raise BudgetError(f"--round-to must be a positive integer, got {self.round_to}")
        if self.min_rank < 1:
            raise BudgetError(f"--min-rank must be at least 1, got {self.min_rank}")
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise BudgetError(f"--max-rank {self.max_rank} is below --min-rank {self.min_rank}; raise it")

    def ranks(self, shape: tuple[int, int]) -> list[int]:
        """Factored ranks allowed for an m×n matrix, ascending: only those that save parameters."""
        m, n = shape
        first = -(-self.min_rank // self.round_to) * self.round_to
        last = min(break_even_rank(m, n) - 1, min(m, n))
        if self.max_rank is not None:
            last = min(last, self.max_rank)
        return list(range(first, last + 1, self.round_to))

    def allows_dense(self) -> bool:
        return self.max_rank is None

    def to_dict(self) -> dict[str, Any]:
        return {"min_rank": self.min_rank, "max_rank": self.max_rank, "round_to": self.round_to}


@dataclass(frozen=True)
class Override:
    """A rank fixed by hand for every module whose name matches `pattern` (searched, like re.search).

    `rank` is an integer rank, a fraction in (0, 1] (that module's uniform kept fraction), or
    "dense".
    """

    pattern: str
    rank: int | float | str
    regex: re.Pattern = field(compare=False, repr=False, default=None)

    def __post_init__(self):
        try:
            object.__setattr__(self, "regex", re.compile(self.pattern))
        except re.error as exc:
            raise BudgetError(f"override pattern {self.pattern!r} is not a valid regex ({exc})") from None
        rank = self.rank
        if rank == "dense":
            return
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise BudgetError(f"override {self.pattern!r}: {rank!r} must be a rank, a fraction in (0, 1] or 'dense'")
        if isinstance(rank, int) and rank < 1:
            raise BudgetError(f"override {self.pattern!r}: rank {rank} must be at least 1")
        if isinstance(rank, float) and not 0.0 < rank <= 1.0:
            raise BudgetError(f"override {self.pattern!r}: fraction {rank} must lie in (0, 1]")

    @classmethod
    def parse(cls, text: str) -> "Override":
        """Read 'REGEX=RANK', 'REGEX=0.5' or 'REGEX=dense' (the last '=' splits)."""
        pattern, sep, value = text.rpartition("=")
        if not sep or not pattern:
            raise BudgetError(f"override {text!r} must look like REGEX=RANK, REGEX=FRACTION or REGEX=dense")
        value = value.strip()
        if value.lower() == "dense":
            return cls(pattern, "dense")
        try:
            number: int | float = int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise BudgetError(f"override {text!r}: {value!r} is not a rank, a fraction or 'dense'") from None
        return cls(pattern, number)

    def matches(self, name: str) -> bool:
        return self.regex.search(name) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "rank": self.rank}


def parse_overrides(overrides: "dict[str, Any] | list[str] | list[Override] | None") -> list[Override]:
    """Overrides from a {regex: rank} dict (like peft's rank_pattern) or 'REGEX=RANK' strings; order kept."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return [Override(pattern, rank) for pattern, rank in overrides.items()]
    return [item if isinstance(item, Override) else Override.parse(item) for item in overrides]
