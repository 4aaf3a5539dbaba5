"""Integrity checks: is a compressed folder what its plan says, and are a model's weights finite?

`verify_folder` reads a compressed folder without building the model: the sha256 recorded in
`lowrank_plan.json` for every weight file against the file on disk, then the tensors' names and
shapes (read from the safetensors headers) against the plan: every factored module holds
`down.weight` (k × in) and `up.weight` (out × k) of its planned rank and no dense weight, every
dense module its full weight and no factors, and no factors exist for modules the plan lacks.
Every tensor is also checked for NaN and Inf, and the folder's format version and its guards
against a plain transformers load are reported (lowrank.folder_guard). `check_finite_weights`
refuses a model holding NaN or Inf before any work starts on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import LowrankError
from .fileio import sha256_file
from .folder_format import PLAN_FILE, read_plan_record, weight_files
from .folder_guard import (FIRST_GUARDED_FORMAT, GUARD_SHAPE, READABLE_FORMATS, format_version_of, guard_key, is_guard,
                           unguarded_modules)
from .plan import Plan

#: Suffixes of the tensors a LowRankLinear stores (its bias lives on `up`).
FACTOR_SUFFIXES = (".down.weight", ".up.weight", ".up.bias")


@dataclass
class Verification:
    """What `verify_folder` checked, and every problem it found (empty when the folder is sound)."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0
    factored: int = 0
    dense: int = 0
    tensors: int = 0
    format_version: int | None = None
    unguarded: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def protected(self) -> bool:
        """A plain transformers load (lowrank not installed) of this folder raises instead of misloading."""
        return (self.format_version or 0) >= FIRST_GUARDED_FORMAT and not self.unguarded

    def protection(self) -> str:
        """One line: the format version and whether a load without lowrank fails loudly."""
        if self.protected:
            return (f"format version {self.format_version}; protected: transformers without lowrank refuses "
                    f"to load it (size mismatch on {self.factored} guard(s))")
        if self.format_version is None:
            return "format version unknown (config.json's quantization_config is unreadable); NOT protected"
        if self.format_version < FIRST_GUARDED_FORMAT:
            return (f"format version {self.format_version}; NOT protected: transformers without lowrank would "
                    "load it with random weights in place of the factored modules; to add the guards, load it with "
                    "lowrank.load and write it again with lowrank.save_compressed")
        return (f"format version {self.format_version}; NOT protected: {len(self.unguarded)} factored module(s) "
                "lack their guard; recompress")

    def summary(self) -> str:
        """One line describing what was checked."""
        return (f"{self.folder}: {self.files} weight file(s) match their recorded sha256; "
                f"{self.tensors} tensors agree with the plan ({self.factored} factored, {self.dense} dense modules)")


def check_finite_weights(model: nn.Module) -> None:
    """Raise a LowrankError naming the first module whose parameters hold NaN or Inf."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param.detach()).all():
            module, _, kind = name.rpartition(".")
            bad = int((~torch.isfinite(param.detach())).sum())
            raise LowrankError(
                f"the {kind} of module {module or name} holds {bad} NaN/Inf value(s); the checkpoint is damaged "
                "or was saved after a diverged training run: fix or replace it"
            )


def _tensor_shapes(path: Path, problems: list[str]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in one safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for damaged headers
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        problems.append(f"{path.name} is not a readable safetensors file ({first})")
        return {}


def _check_finite_tensors(path: Path, problems: list[str]) -> None:
    """Every tensor of a readable safetensors file holds only finite numbers."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                problems.append(f"{name} in {path.name} holds {bad} NaN/Inf value(s)")


def _check_hashes(folder: Path, recorded: dict, problems: list[str]) -> list[Path]:
    """Compare recorded sha256 with the files; return the weight files that exist."""
    present = weight_files(folder)
    if not isinstance(recorded, dict) or not recorded:
        problems.append(f"{PLAN_FILE} records no sha256 for the weight files; recompress to get a checkable folder")
        return present
    for name, digest in sorted(recorded.items()):
        path = folder / str(name)
        if not path.is_file():
            problems.append(f"weight file {name} is missing (recorded in {PLAN_FILE})")
        elif sha256_file(path) != digest:
            problems.append(f"weight file {name} does not match its recorded sha256; it was modified or damaged")
    for path in present:
        if path.name not in recorded:
            problems.append(f"weight file {path.name} is not recorded in {PLAN_FILE}; it does not belong to this folder")
    return present


def _check_config_ranks(folder: Path, plan, problems: list[str]) -> int | None:
    """Ranks in config.json agree with the plan; return the folder's format version (None if unreadable)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"config.json cannot be read ({type(exc).__name__}); copy the original config back")
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    ranks = quant.get("ranks") if isinstance(quant, dict) else None
    if ranks != plan.factored:
        problems.append(f"the ranks in config.json's quantization_config disagree with {PLAN_FILE}")
    version = format_version_of(quant)
    if isinstance(quant, dict) and version not in READABLE_FORMATS:
        problems.append(f"config.json's quantization_config.format_version is {quant.get('format_version')!r}; "
                        f"this lowrank reads {', '.join(map(str, READABLE_FORMATS))}: upgrade lowrank")
    return version


def _check_tensors(shapes: dict[str, tuple[int, ...]], plan, problems: list[str]) -> None:
    """Plan and weights agree: factors of the planned rank for factored modules, full weights for dense ones.

    A factored module may hold a guard (lowrank.folder_guard) under its dense weight name; never a dense weight.
    """
    for name, module in plan.modules.items():
        out_features, in_features = module.shape
        if module.rank is not None:
            expected = {f"{name}.down.weight": (module.rank, in_features), f"{name}.up.weight": (out_features, module.rank)}
            for key, shape in expected.items():
                if key not in shapes:
                    problems.append(f"{name} is factored in the plan but the weights lack {key}")
                elif shapes[key] != shape:
                    problems.append(f"{key} has shape {list(shapes[key])}, the plan (rank {module.rank}) needs {list(shape)}")
            if guard_key(name) in shapes and not is_guard(shapes[guard_key(name)]):
                problems.append(f"{name} is factored in the plan but the weights still hold its dense {name}.weight")
        else:
            key = f"{name}.weight"
            if key not in shapes:
                problems.append(f"{name} is dense in the plan but the weights lack {key}")
            elif sorted(shapes[key]) != sorted(module.shape):  # Conv1D stores (in, out)
                problems.append(f"{key} has shape {list(shapes[key])}, the plan says {list(module.shape)}")
            if f"{name}.down.weight" in shapes or f"{name}.up.weight" in shapes:
                problems.append(f"{name} is dense in the plan but the weights hold low-rank factors for it")
    factored = set(plan.factored)
    for key in sorted(shapes):
        for suffix in FACTOR_SUFFIXES:
            if key.endswith(suffix) and key[: -len(suffix)] not in factored:
                problems.append(f"unexpected tensor {key}: module {key[: -len(suffix)]} is not factored in the plan")


def check_weights_match_plan(folder: str | Path, plan) -> None:
    """Before loading: raise a LowrankError when the tensors (read from the headers) disagree with `plan`."""
    problems: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(Path(folder)):
        shapes.update(_tensor_shapes(path, problems))
    named_as_planned = any(f"{name}.down.weight" in shapes for name in plan.factored)
    if named_as_planned and not problems:  # another naming scheme: leave the judgement to transformers
        _check_tensors(shapes, plan, problems)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LowrankError(f"{folder}: the weights do not match {PLAN_FILE}: {problems[0]}{more}; "
                           f"run `lowrank verify {folder}` and recompress")


def verify_folder(folder: str | Path) -> Verification:
    """Check a compressed folder's weight hashes and that its weights match its plan."""
    folder = Path(folder)
    result = Verification(folder)
    if not folder.is_dir():
        raise LowrankError(f"{folder} is not a folder; pass a compressed lowrank folder")
    if not (folder / PLAN_FILE).is_file():
        raise LowrankError(f"{folder} has no {PLAN_FILE}, so it is not a compressed lowrank folder")
    try:
        data, recorded = read_plan_record(folder)
        plan = Plan.from_dict(data, where=str(folder / PLAN_FILE))
    except LowrankError as exc:
        result.problems.append(str(exc))
        return result
    present = _check_hashes(folder, recorded, result.problems)
    result.format_version = _check_config_ranks(folder, plan, result.problems)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in present:
        found = _tensor_shapes(path, result.problems)
        if found:
            _check_finite_tensors(path, result.problems)
        shapes.update(found)
    if not present:
        result.problems.append(f"{folder} holds no *.safetensors weight files; copy them back or recompress")
    elif shapes:
        _check_tensors(shapes, plan, result.problems)
    result.files = len(present)
    result.tensors = len(shapes)
    result.factored = len(plan.factored)
    result.dense = len(plan.modules) - result.factored
    if shapes and (result.format_version or 0) >= FIRST_GUARDED_FORMAT:
        result.unguarded = unguarded_modules(plan.factored, shapes)
        missing = [name for name in result.unguarded if guard_key(name) not in shapes]  # the rest hold a dense weight
        for name in missing[:1]:
            result.problems.append(
                f"{name} lacks its guard {guard_key(name)} of shape {list(GUARD_SHAPE)} (format version "
                f"{result.format_version}); transformers without lowrank would load random weights for it "
                f"({len(missing)} module(s) lack their guard); recompress")
    return result
