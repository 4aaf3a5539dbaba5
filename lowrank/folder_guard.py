"""The compressed folder's format version, and the guard that makes a plain transformers load fail.

Format 2 stores a one-element tensor, the guard, under each factored module's dense weight name
(`{module}.weight`). transformers without lowrank builds the dense model, whose `{module}.weight`
is a matrix, meets a size mismatch and raises (`ignore_mismatched_sizes=False`, its default);
lowrank's quantizer swaps in a LowRankLinear, which has no `weight` parameter, and skips the
guard. Format 1 folders (no guards) still load. docs/format.md (Loading safety) explains the choice.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

#: The format this lowrank writes; `quantization_config.format_version` in config.json.
FORMAT_VERSION = 2
#: Every format this lowrank reads. Version 1 (lowrank 0.1.0) has no guards.
READABLE_FORMATS = (1, 2)
#: The first version whose folders refuse a plain transformers load.
FIRST_GUARDED_FORMAT = 2
#: A guard's shape: 1-D, so it never equals a dense weight's 2-D shape.
GUARD_SHAPE = (1,)
#: Written into every safetensors header of a format-2 folder, for tools that read headers.
SAFETENSORS_METADATA = {
    "lowrank_format_version": str(FORMAT_VERSION),
    "lowrank_note": "low-rank factored weights: load with lowrank installed (pip install lowrank)",
}


def guard_key(module: str) -> str:
    """The tensor name of `module`'s guard: the name its dense weight would have."""
    return f"{module}.weight"


def is_guard(shape: Iterable[int]) -> bool:
    """A tensor of this shape, stored under a factored module's weight name, is a guard."""
    return tuple(shape) == GUARD_SHAPE


def guard_patterns(modules: Iterable[str]) -> set[str]:
    """Regular expressions matching the guards' names, for transformers' ignored unexpected keys."""
    return {rf"(^|\.){re.escape(guard_key(name))}$" for name in modules}


def unguarded_modules(factored: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The factored modules whose guard is missing from the tensors `shapes` (name → shape)."""
    return [name for name in factored if not is_guard(shapes.get(guard_key(name), ()))]


def format_version_of(quantization_config: object) -> int | None:
    """The format version recorded in a config.json `quantization_config` (None when unreadable)."""
    if not isinstance(quantization_config, dict):
        return None
    version = quantization_config.get("format_version", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) else None
