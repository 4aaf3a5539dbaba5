"""Singular values, computed in batches, and what one spectrum says about rank.

From a spectrum σ follow the energy curve, the effective rank (Roy & Vetterli, 2007), the stable
rank, the rank that keeps 90/95/99% of the energy and the truncation-loss curve (relative output
error against rank kept). For whitened σ(W·S) the squares σᵢ² are exactly the squared output
error ‖(W − W′)X‖² that dropping direction i costs (see `factorize`).

Only singular values are needed, so no singular vectors are formed: σ² are the eigenvalues of the
smaller Gram matrix (W Wᵀ or Wᵀ W), from a symmetric eigensolver, stacked by shape into batches,
in float64 (`gram_svdvals`, 3–6× cheaper than an SVD on these shapes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable
from collections import defaultdict

import torch

from .errors import LowrankError
from .factorize import gram_svdvals


#: Energy fractions whose rank the analysis reports.
ENERGY_LEVELS = (0.90, 0.95, 0.99)

#: Kept-parameter ratios of the "what common budgets would give" table (uniform ranks).
COMMON_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)

#: Largest stack (in float64 bytes) handed to one batched σ computation; bounds memory.
DEFAULT_BATCH_BYTES = 256 << 20

_DEPTH_RE = re.compile(r"^(?P<prefix>.*?)\.(?P<depth>\d+)\.(?P<kind>.+)$")


# ---- closed-form metrics of one spectrum --------------------------------------------------------
def energy_curve(sigma: torch.Tensor) -> torch.Tensor:
    """Fraction of ‖W‖²_F kept by the best rank-k approximation, for k = 1..len(σ)."""
    energy = sigma.to(torch.float64) ** 2
    total = energy.sum()
    if total <= 0:
        return torch.ones_like(energy)
    return (energy.cumsum(0) / total).clamp(max=1.0)


def truncation_loss(sigma: torch.Tensor) -> torch.Tensor:
    """Relative squared error Σ_{i>k} σᵢ² / Σ σᵢ² of keeping rank k, for k = 0..len(σ).

    For whitened σ this is the relative output error ‖(W − W_k)X‖² / ‖WX‖².
    """
    return torch.cat([torch.ones(1, dtype=torch.float64), 1.0 - energy_curve(sigma)]).clamp(min=0.0)


def effective_rank(sigma: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), pᵢ = σᵢ / Σσ: 1 for rank one, n for a flat spectrum."""
    sigma = sigma.to(torch.float64)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(sigma: torch.Tensor) -> float:
    """‖W‖²_F / ‖W‖²₂ = Σσᵢ² / σ₁²: a rank that small singular values cannot inflate."""
    sigma = sigma.to(torch.float64)
    top = sigma.max() if sigma.numel() else torch.tensor(0.0)
    if top <= 0:
        return 0.0
    return float((sigma**2).sum() / top**2)


def rank_for_energy(sigma: torch.Tensor, fraction: float) -> int:
    """The smallest k whose best rank-k approximation keeps `fraction` of the energy."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must lie in (0, 1], got {fraction}")
    curve = energy_curve(sigma)
    # a hair of tolerance so that exactly reaching the fraction counts despite rounding
    return int(torch.searchsorted(curve, torch.tensor(fraction - 1e-12, dtype=torch.float64))) + 1


# ---- per-matrix summaries -------------------------------------------------------------------
def split_name(name: str) -> tuple[int | None, str]:
    """(depth, layer type) of a module name: 'model.layers.3.self_attn.q_proj' → (3, 'self_attn.q_proj')."""
    match = _DEPTH_RE.match(name)
    if match is None:
        return None, name
    return int(match["depth"]), match["kind"]


@dataclass
class SpectrumStats:
    """Summary numbers of one spectrum."""

    energy: float  # Σσ²
    sigma_max: float
    effective_rank: float
    stable_rank: float
    rank_for_energy: dict[str, int]  # "0.9" → k

    @classmethod
    def of(cls, sigma: torch.Tensor) -> "SpectrumStats":
        return cls(
            energy=float((sigma.to(torch.float64) ** 2).sum()),
            sigma_max=float(sigma.max()) if sigma.numel() else 0.0,
            effective_rank=effective_rank(sigma),
            stable_rank=stable_rank(sigma),
            rank_for_energy={f"{level:g}": rank_for_energy(sigma, level) for level in ENERGY_LEVELS},
        )


# ---- batched singular values -------------------------------------------------------------------
def batched_svdvals(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """σ of every matrix (float64, descending), one `gram_svdvals` call per group of equal shapes."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, matrix in enumerate(matrices):
        by_shape[tuple(matrix.shape)].append(index)
    result: list[torch.Tensor | None] = [None] * len(matrices)
    for indices in by_shape.values():
        stack = torch.stack([matrices[i].to(torch.float64) for i in indices])
        if not torch.isfinite(stack).all():
            raise LowrankError("a weight matrix contains NaN or Inf; the checkpoint is damaged")
        values = gram_svdvals(stack)
        for i, sigma in zip(indices, values):
            result[i] = sigma
    return result  # type: ignore[return-value]


def factored_svdvals(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """σ(up @ down) padded with zeros to min(out, in), via two thin QRs and a k×k svdvals."""
    up = up.to(torch.float64)
    down = down.to(torch.float64)
    _, r_up = torch.linalg.qr(up)  # up = Q_u R_u, (k × k)
    _, r_down = torch.linalg.qr(down.T)  # downᵀ = Q_d R_d
    sigma = torch.linalg.svdvals(r_up @ r_down.T)
    full = min(up.shape[0], down.shape[1])
    return torch.cat([sigma, torch.zeros(full - sigma.numel(), dtype=torch.float64)])


class ShapeBatcher:
    """Collect (name, matrix) pairs by shape; flush a shape's stack through `gram_svdvals` when it is full."""

    def __init__(self, batch_bytes: int, transform=None):
        self.batch_bytes = batch_bytes
        self.transform = transform
        self.pending: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = defaultdict(list)
        self.done: dict[str, torch.Tensor] = {}

    def add(self, name: str, matrix: torch.Tensor) -> None:
        items = self.pending[tuple(matrix.shape)]
        items.append((name, matrix.to(torch.float64)))
        if len(items) * matrix.numel() * 8 >= self.batch_bytes:
            self._flush(tuple(matrix.shape))

    def _flush(self, shape: tuple[int, int]) -> None:
        items = self.pending.pop(shape, [])
        if items:
            for (name, _), sigma in zip(items, batched_svdvals([m for _, m in items])):
                self.done[name] = sigma

    def finish(self) -> dict[str, torch.Tensor]:
        for shape in list(self.pending):
            self._flush(shape)
        return self.done


def spectra(
    named: Iterable[tuple[str, torch.Tensor]],
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> dict[str, torch.Tensor]:
    """σ of every (name, matrix), batched by shape with bounded memory."""
    batcher = ShapeBatcher(batch_bytes)
    for name, matrix in named:
        batcher.add(name, matrix)
    return batcher.finish()
