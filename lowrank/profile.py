"""The Profile: per target matrix, what the planner and the analyzer need, and nothing bigger.

For every target matrix W (out × in) a profile holds its shape, its singular values σ(W), with
calibration statistics the whitened σ(W·S) (σᵢ² is the output error dropping direction i costs),
and with an output Fisher F the loss price uᵢᵀFuᵢ of each of those directions. Vectors only: the
Gram and Fisher matrices they come from are freed by the profiling stage (`lowrank.profiling`).

A profile is saved as one safetensors file (the vectors, plus JSON metadata in its header; never
a pickle), so one profiling run can be planned at any budget in milliseconds and analyzed again.
It records the model it measured (source, every target's name and shape), so that it is never
applied to another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import LowrankError
from .fileio import atomic_file
from .ranks import kept_params, saves_parameters, uniform_rank
from .spectrum import SpectrumStats, split_name, truncation_loss
from .version import __version__

PROFILE_FORMAT = "lowrank-profile"
PROFILE_VERSION = 1
#: Vectors a matrix may carry in the file, as `<module name>.<kind>`.
VECTOR_KINDS = ("sigma", "whitened", "price")


@dataclass
class MatrixProfile:
    """One target matrix: σ(W), and with calibration σ(W·S) and the loss price of each direction."""

    name: str
    shape: tuple[int, int]
    sigma: torch.Tensor | None = field(repr=False)  # σ(W), descending, float64 (None: a planning-only profile)
    whitened: torch.Tensor | None = field(default=None, repr=False)  # σ(W·S), descending, float64
    price: torch.Tensor | None = field(default=None, repr=False)  # uⱼᵀ F uⱼ / N per direction of `planning`
    rank: int | None = None  # the stored rank when the matrix is factored already (compressed input)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    @property
    def depth(self) -> int | None:
        return split_name(self.name)[0]

    @property
    def kind(self) -> str:
        return split_name(self.name)[1]

    @property
    def planning(self) -> torch.Tensor:
        """The spectrum ranks are chosen on: whitened where measured, else σ(W)."""
        return self.whitened if self.whitened is not None else self.sigma

    def spectrum(self, whitened: bool) -> torch.Tensor:
        """σ(W·S) if `whitened` (an error when there are no statistics), else σ(W)."""
        if whitened:
            if self.whitened is None:
                raise LowrankError(f"{self.name} has no whitened spectrum; analyze with calibration text (--calib)")
            return self.whitened
        if self.sigma is None:  # planning-only profiles skip σ(W) (profile_model(plain=False))
            raise LowrankError(f"{self.name} has no plain spectrum σ(W); profile the model with `lowrank profile`")
        return self.sigma

    def stats(self, whitened: bool = False) -> SpectrumStats:
        return SpectrumStats.of(self.spectrum(whitened))

    def loss_at_rank(self, rank: int, whitened: bool = False) -> float:
        """Relative truncation loss of keeping `rank` (0 once factoring stops saving parameters)."""
        if not saves_parameters(rank, *self.shape):
            return 0.0
        return float(truncation_loss(self.spectrum(whitened))[min(rank, self.max_rank)])


@dataclass
class Profile:
    """Every target matrix of one model, in model order, with where and how they were measured."""

    matrices: list[MatrixProfile]
    source: str | None = None
    whitened: bool = False
    options: dict = field(default_factory=dict)
    model_params: int | None = None

    def __post_init__(self) -> None:
        if not self.matrices:
            raise LowrankError("nothing to analyze: no target matrices; check --include/--exclude")

    # ---- what the profile covers -------------------------------------------------------------
    @property
    def kinds(self) -> list[str]:
        """Layer types in the order they first appear in the model."""
        return list(dict.fromkeys(m.kind for m in self.matrices))

    @property
    def depths(self) -> list[int]:
        return sorted({m.depth for m in self.matrices if m.depth is not None})

    @property
    def target_params(self) -> int:
        return sum(m.params for m in self.matrices)

    @property
    def priced(self) -> bool:
        """True when every matrix carries loss prices (the sensitivity strategy needs them)."""
        return all(m.price is not None for m in self.matrices)

    @property
    def fingerprint(self) -> str:
        """A short hash of every target's name and shape: two profiles of one architecture agree on it."""
        layout = json.dumps([[m.name, list(m.shape)] for m in self.matrices])
        return hashlib.sha256(layout.encode()).hexdigest()[:16]

    def check_model(self, targets, where: str = "the profile") -> None:
        """Refuse `targets` (a model's target matrices) that are not the ones this profile measured."""
        mine = {m.name: tuple(m.shape) for m in self.matrices}
        theirs = {t.name: tuple(t.shape) for t in targets}
        if mine == theirs:
            return
        missing = sorted(set(mine) - set(theirs)) or sorted(set(theirs) - set(mine))
        if missing:
            detail = f"module {missing[0]} is in one and not the other"
        else:
            name = next(n for n in mine if mine[n] != theirs[n])
            detail = f"{name} is {list(mine[name])} there and {list(theirs[name])} here"
        raise LowrankError(f"{where} was measured on another model ({self.source}): {detail}; "
                           "profile this model with `lowrank profile`")

    def uniform_budget(self, ratio: float, whitened: bool | None = None) -> dict:
        """What SVD-LLM's uniform ranks at `ratio` would give: parameters kept and truncation loss."""
        whitened = self.whitened if whitened is None else whitened
        kept = 0
        losses = []
        dense = 0
        for m in self.matrices:
            k = uniform_rank(*m.shape, ratio)
            if not saves_parameters(k, *m.shape):
                dense += 1
            kept += kept_params(k, *m.shape)
            losses.append(m.loss_at_rank(k, whitened))
        return {
            "ratio": ratio,
            "target_params": kept,
            "target_ratio": kept / self.target_params,
            "matrices_dense": dense,
            "mean_loss": sum(losses) / len(losses),
            "max_loss": max(losses),
        }

    # ---- the file ------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "tool_version": __version__,
            "source": self.source,
            "whitened": self.whitened,
            "model_params": self.model_params,
            "options": self.options,
            "fingerprint": self.fingerprint,
            "matrices": [{"name": m.name, "shape": list(m.shape), "rank": m.rank} for m in self.matrices],
        }

    def save(self, path: str | Path) -> Path:
        """Write the profile as one safetensors file (vectors + JSON header), atomically.

        A planning-only profile (options["planning_only"], made with `plain=False`) is saved without σ(W);
        any other profile must have it, so that a report read from the file has every spectrum."""
        from safetensors.torch import save_file

        tensors = {}
        if any(m.sigma is None for m in self.matrices) and not self.options.get("planning_only"):
            raise LowrankError("this profile lacks σ(W) but is not marked planning-only; profile with `lowrank profile`")
        for m in self.matrices:
            for kind in VECTOR_KINDS:
                vector = getattr(m, kind)
                if vector is not None:
                    tensors[f"{m.name}.{kind}"] = vector.detach().to("cpu", torch.float64).contiguous()
        path = Path(path)
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"lowrank_profile": json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Read a profile file; every problem is a LowrankError naming the file and the fix."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise LowrankError(f"profile file {path} does not exist; write one with `lowrank profile MODEL -o {path}`")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = (handle.metadata() or {}).get("lowrank_profile")
                if header is None:
                    raise LowrankError(f"{path} is a safetensors file but not a lowrank profile; "
                                       "write one with `lowrank profile MODEL`")
                data = json.loads(header)
                vectors = {key: handle.get_tensor(key) for key in handle.keys()}
        except LowrankError:
            raise
        except Exception as exc:  # safetensors raises its own error type for files that are not safetensors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise LowrankError(f"{path} is not a lowrank profile ({first}); write one with `lowrank profile MODEL`"
                               ) from None
        return cls.from_metadata(data, vectors, str(path))

    @classmethod
    def from_metadata(cls, data: Any, vectors: dict[str, torch.Tensor], where: str) -> "Profile":
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise LowrankError(f"{where} is not a lowrank profile; write one with `lowrank profile MODEL`")
        version = data.get("version")
        if not isinstance(version, int) or version > PROFILE_VERSION:
            raise LowrankError(f"{where}: profile version {version!r} is newer than this lowrank understands; "
                               "upgrade lowrank")
        matrices = []
        # a planning-only profile (`plain=False`; the streamed compress keeps one for --resume) has no σ(W)
        planning_only = isinstance(data.get("options"), dict) and data["options"].get("planning_only") is True
        try:
            for entry in data["matrices"]:
                name, shape = entry["name"], tuple(int(s) for s in entry["shape"])
                if f"{name}.sigma" not in vectors and not (planning_only and f"{name}.whitened" in vectors):
                    raise KeyError(f"{name}.sigma")
                matrices.append(MatrixProfile(name, shape, vectors.get(f"{name}.sigma"), vectors.get(f"{name}.whitened"),
                                              vectors.get(f"{name}.price"), entry.get("rank")))
            profile = cls(matrices, source=data.get("source"), whitened=bool(data.get("whitened")),
                          options=dict(data.get("options") or {}), model_params=data.get("model_params"))
        except (KeyError, TypeError, ValueError) as exc:
            raise LowrankError(f"{where} is a damaged lowrank profile (missing or bad {exc}); profile the model again"
                               ) from None
        if data.get("fingerprint") not in (None, profile.fingerprint):
            raise LowrankError(f"{where} is a damaged lowrank profile (its matrix list was edited); profile the model again")
        return profile
