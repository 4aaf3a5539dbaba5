"""The analyzer: singular-value spectra of every target matrix, and what they say about rank.

For each matrix W (out × in) it computes σ(W) and, given calibration statistics, the whitened
σ(W·S) with S Sᵀ = XᵀX: σᵢ(W·S)² is exactly the squared output error ‖(W − W′)X‖² that dropping
direction i costs (see `factorize`). From a spectrum follow the energy curve, the effective rank
(Roy & Vetterli, 2007), the stable rank, the rank that keeps 90/95/99% of the energy and the
truncation-loss curve (relative output error against parameters kept).

Only singular values are needed, so no singular vectors are formed: σ² are the eigenvalues of the
smaller Gram matrix (W Wᵀ or Wᵀ W), from a symmetric eigensolver, stacked by shape into batches,
in float64 (`gram_svdvals`, 3–6× cheaper than an SVD on these shapes). Whitening is computed once per distinct
layer input (q/k/v share one, gate/up share one). Without statistics the analysis is data-free;
it then also reads a checkpoint folder one tensor at a time from safetensors (`analyze_folder`).
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import ActivationStats
from .errors import LowrankError, ModelLoadError
from .factorize import DEFAULT_DAMPING, Whitening, gram_svdvals, whitening
from .layers import LowRankLinear, saves_parameters
from .planner import uniform_rank
from .targets import Target, find_targets, weight_matrix

log = logging.getLogger(__name__)

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


def kept_params(rank: int, out_features: int, in_features: int) -> int:
    """Parameters of a rank-k factorization, or of the dense matrix where factoring saves nothing."""
    if saves_parameters(rank, out_features, in_features):
        return rank * (out_features + in_features)
    return out_features * in_features


# ---- per-matrix records -------------------------------------------------------------------------
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


@dataclass
class MatrixSpectrum:
    """The spectra of one target matrix: σ(W) and, with calibration statistics, σ(W·S)."""

    name: str
    shape: tuple[int, int]
    sigma: torch.Tensor = field(repr=False)  # descending, float64
    whitened: torch.Tensor | None = field(default=None, repr=False)
    rank: int | None = None  # the stored rank when the matrix is factored already (compressed input)

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

    def spectrum(self, whitened: bool) -> torch.Tensor:
        """σ(W·S) if `whitened` (an error when there are no statistics), else σ(W)."""
        if whitened:
            if self.whitened is None:
                raise LowrankError(f"{self.name} has no whitened spectrum; analyze with calibration text (--calib)")
            return self.whitened
        return self.sigma

    def stats(self, whitened: bool = False) -> SpectrumStats:
        return SpectrumStats.of(self.spectrum(whitened))

    def loss_at_rank(self, rank: int, whitened: bool = False) -> float:
        """Relative truncation loss of keeping `rank` (0 once factoring stops saving parameters)."""
        if not saves_parameters(rank, *self.shape):
            return 0.0
        return float(truncation_loss(self.spectrum(whitened))[min(rank, self.max_rank)])


@dataclass
class Analysis:
    """Spectra of every target matrix of one model, in model order, with where they came from."""

    matrices: list[MatrixSpectrum]
    source: str | None = None
    whitened: bool = False
    options: dict = field(default_factory=dict)
    model_params: int | None = None

    def __post_init__(self) -> None:
        if not self.matrices:
            raise LowrankError("nothing to analyze: no target matrices; check --include/--exclude")

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


class _ShapeBatcher:
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


def _spectra(
    named: Iterable[tuple[str, torch.Tensor]],
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> dict[str, torch.Tensor]:
    """σ of every (name, matrix), batched by shape with bounded memory."""
    batcher = _ShapeBatcher(batch_bytes)
    for name, matrix in named:
        batcher.add(name, matrix)
    return batcher.finish()


# ---- analysis of a model in memory ------------------------------------------------------------------
def module_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a module applies, merged from its factors when it is a LowRankLinear."""
    if isinstance(module, LowRankLinear):
        return module.merged_weight()
    return weight_matrix(module)


def targets_of(model: nn.Module, include: str | None = None, exclude: str | None = None) -> list[Target]:
    """The matrices to analyze: find_targets, with a compressed model's LowRankLinear counted as one."""
    lowrank = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not lowrank:
        return find_targets(model, include, exclude)
    include_re = re.compile(include) if include else None
    exclude_re = re.compile(exclude) if exclude else None
    targets = []
    for target in find_targets(model, include, exclude):
        parent, _, leaf = target.name.rpartition(".")
        if parent in lowrank and leaf in ("down", "up"):
            continue  # a factor: its LowRankLinear is analyzed instead
        targets.append(target)
    for name, module in lowrank.items():
        if include_re is not None and not include_re.search(name):
            continue
        if exclude_re is not None and exclude_re.search(name):
            continue
        targets.append(Target(name, module.out_features, module.in_features, module.bias is not None))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(targets, key=lambda t: order[t.name])


def whitened_spectra(
    weights: dict[str, torch.Tensor],
    stats: dict[str, ActivationStats],
    damping: float = DEFAULT_DAMPING,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """σ(W·S) of every named weight; S is computed once per shared input (one per stats object)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name in weights:
        if name not in stats:
            raise LowrankError(f"no calibration statistics for {name}; it never ran during calibration")
        groups[id(stats[name])].append(name)
    batcher = _ShapeBatcher(batch_bytes)
    for names in tqdm(groups.values(), desc="Whitening", unit="input", disable=not progress):
        white: Whitening = whitening(stats[names[0]].gram, damping, names[0])
        for name in names:
            batcher.add(name, weights[name].to(torch.float64) @ white.root)
    return batcher.finish()


@torch.no_grad()
def analyze_model(
    model: nn.Module,
    targets: list[Target] | None = None,
    stats: dict[str, ActivationStats] | None = None,
    damping: float = DEFAULT_DAMPING,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    progress: bool = False,
    source: str | None = None,
) -> Analysis:
    """Spectra of every target of a model in memory; whitened too when `stats` are given."""
    targets = targets if targets is not None else targets_of(model)
    modules = {t.name: model.get_submodule(t.name) for t in targets}
    weights = {name: module_weight(module).detach() for name, module in modules.items()}
    iterator = tqdm(weights.items(), desc="Spectra", unit="matrix", disable=not progress)
    sigma = _spectra(iterator, batch_bytes)
    white = whitened_spectra(weights, stats, damping, batch_bytes, progress) if stats is not None else {}
    matrices = [
        MatrixSpectrum(
            name=t.name,
            shape=t.shape,
            sigma=sigma[t.name],
            whitened=white.get(t.name),
            rank=modules[t.name].rank if isinstance(modules[t.name], LowRankLinear) else None,
        )
        for t in targets
    ]
    model_params = sum(p.numel() for p in model.parameters())
    return Analysis(matrices, source=source, whitened=stats is not None, model_params=model_params,
                    options={"damping": damping} if stats is not None else {})


# ---- data-free analysis of a folder, one tensor at a time -------------------------------------------
class _TensorFiles:
    """Every tensor name of a folder's safetensors files, read one tensor at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{folder} holds no *.safetensors files to analyze")
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    self.where[key] = path
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def read(self, key: str) -> torch.Tensor:
        with self._safe_open(str(self.where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def total_params(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


def _checkpoint_key(files: _TensorFiles, name: str, suffix: str, prefixes: list[str]) -> str | None:
    """The key of `name + suffix` in the files, allowing for a base-model prefix added or dropped."""
    candidates = [name]
    for prefix in prefixes:
        if name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        else:
            candidates.append(f"{prefix}.{name}")
    for candidate in candidates:
        if candidate + suffix in files:
            return candidate + suffix
    return None


def _meta_targets(folder: Path, include: str | None, exclude: str | None, trust_remote_code: bool):
    """Targets of the model a folder holds, found on an empty (meta-device) skeleton: no weights read."""
    import transformers

    from .loading import model_class_for

    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = model_class_for(config)._from_config(config)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the model architecture in {folder}: {str(exc).splitlines()[0][:200]}") from None
    targets = find_targets(skeleton, include, exclude)
    oriented = {t.name: type(skeleton.get_submodule(t.name)).__name__ == "Conv1D" for t in targets}
    prefixes = [p for p in {getattr(skeleton, "base_model_prefix", ""), "model"} if p]
    return targets, oriented, prefixes


def _dense_folder_matrices(folder: Path, include, exclude, trust_remote_code):
    targets, transposed, prefixes = _meta_targets(folder, include, exclude, trust_remote_code)
    files = _TensorFiles(folder)
    keys = {}
    for t in targets:
        key = _checkpoint_key(files, t.name, ".weight", prefixes)
        if key is None:
            raise ModelLoadError(
                f"{folder}: no tensor {t.name}.weight in the safetensors files; the weight names do not follow "
                "the architecture, pass --calib to analyze the loaded model instead"
            )
        keys[t.name] = key

    def matrices() -> Iterator[tuple[str, torch.Tensor, int | None]]:
        for t in targets:
            tensor = files.read(keys[t.name])
            yield t.name, (tensor.T if transposed[t.name] else tensor), None

    return targets, matrices, files.total_params()


def _compressed_folder_matrices(folder: Path, include, exclude):
    from .checkpoint import read_plan

    plan, _ = read_plan(folder)
    include_re = re.compile(include) if include else None
    exclude_re = re.compile(exclude) if exclude else None
    targets = [
        Target(name, m.shape[0], m.shape[1], False)
        for name, m in plan.modules.items()
        if (include_re is None or include_re.search(name)) and not (exclude_re and exclude_re.search(name))
    ]
    if not targets:
        raise LowrankError(f"no module of {folder}'s plan matches --include/--exclude; check the regexes")
    files = _TensorFiles(folder)
    prefixes = ["model"]

    def key(name: str, suffix: str) -> str:
        found = _checkpoint_key(files, name, suffix, prefixes)
        if found is None:
            raise ModelLoadError(f"{folder}: tensor {name}{suffix} is missing; the compressed folder is damaged")
        return found

    def matrices() -> Iterator[tuple[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor], int | None]]:
        for t in targets:
            rank = plan.modules[t.name].rank
            if rank is None:
                yield t.name, files.read(key(t.name, ".weight")), None
            else:
                yield t.name, (files.read(key(t.name, ".up.weight")), files.read(key(t.name, ".down.weight"))), rank

    return targets, matrices, plan.model_params_after or files.total_params()


@torch.no_grad()
def analyze_folder(
    folder: str | Path,
    include: str | None = None,
    exclude: str | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    progress: bool = False,
    trust_remote_code: bool = False,
    source: str | None = None,
) -> Analysis:
    """Data-free spectra of a checkpoint folder, read one tensor at a time (the model is never built).

    A dense folder needs config.json and safetensors weights; a compressed lowrank folder is read
    through its plan, each factored matrix's σ computed from its two factors.
    """
    from .checkpoint import is_compressed_folder

    folder = Path(folder)
    if is_compressed_folder(folder):
        targets, matrices, model_params = _compressed_folder_matrices(folder, include, exclude)
    else:
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} is not a model folder (no config.json)")
        targets, matrices, model_params = _dense_folder_matrices(folder, include, exclude, trust_remote_code)
    batcher = _ShapeBatcher(batch_bytes)
    ranks: dict[str, int | None] = {}
    for name, matrix, rank in tqdm(matrices(), total=len(targets), desc="Spectra", unit="matrix",
                                   disable=not progress):
        ranks[name] = rank
        if isinstance(matrix, tuple):
            batcher.done[name] = factored_svdvals(*matrix)
        else:
            batcher.add(name, matrix)
    sigma = batcher.finish()
    spectra = [MatrixSpectrum(t.name, t.shape, sigma[t.name], rank=ranks[t.name]) for t in targets]
    return Analysis(spectra, source=source or str(folder), whitened=False, model_params=model_params)


def has_safetensors(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(folder.glob("*.safetensors"))

