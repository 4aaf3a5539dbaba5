"""The Plan: which rank every target module gets, as a versioned, hand-editable JSON file.

A module whose rank is `null` stays dense. Loading validates the file strictly (unknown keys,
wrong types and impossible ranks are rejected with a message naming the key) because a plan
edited by hand is the input most likely to be wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LowrankError
from .fileio import atomic_write_text
from .ranks import saves_parameters

PLAN_FORMAT = "lowrank-plan"
PLAN_VERSION = 1


@dataclass
class ModulePlan:
    """One target: its dense shape (out, in) and the rank it gets (None: kept dense)."""

    shape: tuple[int, int]
    rank: int | None

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def params(self) -> int:
        """Parameters after compression: k(m+n) if factored, mn if dense (biases excluded)."""
        if self.rank is None:
            return self.dense_params
        return self.rank * (self.shape[0] + self.shape[1])


@dataclass
class Plan:
    """Ranks for every target, with how they were chosen and what they cost."""

    modules: dict[str, ModulePlan]
    method: str = "whiten"
    strategy: str = "uniform"
    budget: dict[str, Any] = field(default_factory=dict)
    model_params: int | None = None  # every parameter of the dense model, targets included
    source: str | None = None
    tool_version: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    # ---- parameter accounting -------------------------------------------------------------
    @property
    def target_params_dense(self) -> int:
        return sum(m.dense_params for m in self.modules.values())

    @property
    def target_params(self) -> int:
        return sum(m.params for m in self.modules.values())

    @property
    def target_ratio(self) -> float:
        """Fraction of the target layers' parameters kept."""
        return self.target_params / self.target_params_dense

    @property
    def model_params_after(self) -> int | None:
        if self.model_params is None:
            return None
        return self.model_params - self.target_params_dense + self.target_params

    @property
    def model_ratio(self) -> float | None:
        """Fraction of the whole model's parameters kept."""
        if self.model_params is None:
            return None
        return self.model_params_after / self.model_params

    @property
    def factored(self) -> dict[str, int]:
        """Rank of every module that is factored (dense ones left out)."""
        return {name: m.rank for name, m in self.modules.items() if m.rank is not None}

    def summary(self) -> dict[str, Any]:
        """Parameter counts and both ratios, for printing and for the plan file."""
        return {
            "target_params_dense": self.target_params_dense,
            "target_params": self.target_params,
            "target_ratio": round(self.target_ratio, 6),
            "model_params_dense": self.model_params,
            "model_params": self.model_params_after,
            "model_ratio": None if self.model_ratio is None else round(self.model_ratio, 6),
            "modules": len(self.modules),
            "modules_factored": len(self.factored),
        }

    # ---- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "method": self.method,
            "strategy": self.strategy,
            "budget": self.budget,
            "source": self.source,
            "tool_version": self.tool_version,
            "options": self.options,
            "model_params": self.model_params,
            "summary": self.summary(),
            "modules": {name: {"shape": list(m.shape), "rank": m.rank} for name, m in self.modules.items()},
        }

    def save(self, path: str | Path) -> None:
        """Write the plan as indented JSON, atomically (temporary file, then rename)."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> "Plan":
        """Validate and parse a plan dictionary; every error names the offending key."""
        if not isinstance(data, dict):
            raise LowrankError(f"{where}: expected a JSON object, got {type(data).__name__}")
        allowed = {"format", "version", "method", "strategy", "budget", "source", "tool_version",
                   "options", "model_params", "summary", "modules"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise LowrankError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise LowrankError(f"{where}: 'format' is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        version = data.get("version", PLAN_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > PLAN_VERSION:
            raise LowrankError(f"{where}: plan version {version!r} is newer than this lowrank understands; upgrade lowrank")
        modules_raw = data.get("modules")
        if not isinstance(modules_raw, dict) or not modules_raw:
            raise LowrankError(f"{where}: 'modules' must be a non-empty object of module name → {{shape, rank}}")
        modules = {}
        for name, entry in modules_raw.items():
            key = f"{where}: modules[{name!r}]"
            if not isinstance(entry, dict) or set(entry) - {"shape", "rank"} or "shape" not in entry:
                raise LowrankError(f"{key} must be an object with keys 'shape' and 'rank'")
            shape = entry["shape"]
            if (not isinstance(shape, list) or len(shape) != 2
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
                raise LowrankError(f"{key}.shape must be [out_features, in_features] as positive integers")
            rank = entry.get("rank")
            if rank is not None:
                if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                    raise LowrankError(f"{key}.rank must be a positive integer or null (dense), got {rank!r}")
                if rank > min(shape):
                    raise LowrankError(f"{key}.rank {rank} exceeds min(out, in) = {min(shape)}; lower it or use null")
            modules[name] = ModulePlan((shape[0], shape[1]), rank)
        for text_key in ("method", "strategy"):
            if text_key in data and not isinstance(data[text_key], str):
                raise LowrankError(f"{where}: {text_key!r} must be a string")
        for text_key in ("source", "tool_version"):
            if data.get(text_key) is not None and not isinstance(data[text_key], str):
                raise LowrankError(f"{where}: {text_key!r} must be a string or null")
        for dict_key in ("budget", "options"):
            if dict_key in data and not isinstance(data[dict_key], dict):
                raise LowrankError(f"{where}: {dict_key!r} must be an object")
        model_params = data.get("model_params")
        if model_params is not None and (not isinstance(model_params, int) or isinstance(model_params, bool)):
            raise LowrankError(f"{where}: 'model_params' must be an integer")
        return cls(
            modules=modules,
            method=data.get("method", "whiten"),
            strategy=data.get("strategy", "uniform"),
            budget=data.get("budget") or {},
            model_params=model_params,
            source=data.get("source"),
            tool_version=data.get("tool_version"),
            options=data.get("options") or {},
        )

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LowrankError(f"plan file {path} does not exist; write one with `lowrank plan`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LowrankError(f"plan file {path} is not valid JSON ({exc}); fix or regenerate it") from None
        if isinstance(data, dict) and path.name == "lowrank_plan.json":  # a compressed folder's plan: replayable too
            data.pop("files", None)  # the folder's checksums (folder_format), not part of the plan
        return cls.from_dict(data, where=str(path))


def module_plan(shape: tuple[int, int], rank: int | None) -> ModulePlan:
    """A ModulePlan that is dense whenever the rank would not save parameters."""
    if rank is not None and not saves_parameters(rank, *shape):
        rank = None
    return ModulePlan(tuple(shape), rank)
