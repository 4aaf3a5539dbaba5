"""PNG figures of an analysis and of a compressed checkpoint, drawn with matplotlib's Agg backend.

Every figure has a title, labelled axes with their units and a legend or colorbar; files stay
small (moderate DPI, thinned curves) so reports can be committed.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib import ticker  # noqa: E402

from .profile import Profile  # noqa: E402
from .ranks import kept_params, saves_parameters, uniform_rank  # noqa: E402
from .spectrum import rank_for_energy, split_name  # noqa: E402

DPI = 100
#: Points per spectrum curve; a longer spectrum is sampled on a log-spaced grid (the shape survives).
CURVE_POINTS = 200


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # every figure uses constrained layout: no tight-bbox pass needed
    plt.close(fig)
    return path


def _grid(count: int) -> tuple[int, int]:
    cols = min(4, count)
    return math.ceil(count / cols), cols


def _depth_colors(depths: list[int]):
    norm = mcolors.Normalize(vmin=min(depths, default=0), vmax=max(max(depths, default=0), 1))
    return plt.get_cmap("viridis"), norm


def _thin(values: np.ndarray) -> np.ndarray:
    """Indices of at most CURVE_POINTS samples, dense at the top of the spectrum."""
    n = len(values)
    if n <= CURVE_POINTS:
        return np.arange(n)
    return np.unique(np.geomspace(1, n, CURVE_POINTS).astype(int) - 1)


def plot_spectra(analysis: Profile, path: Path, whitened: bool, title: str) -> Path:
    """One panel per layer type: σᵢ/σ₁ against i/min(m, n), one curve per depth coloured by depth."""
    kinds = analysis.kinds
    rows, cols = _grid(len(kinds))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharex=True, sharey=True,
                             layout="constrained")
    cmap, norm = _depth_colors(analysis.depths)
    for ax, kind in zip(axes.flat, kinds):
        for m in (m for m in analysis.matrices if m.kind == kind):
            sigma = m.spectrum(whitened).numpy()
            if sigma.size == 0 or sigma[0] <= 0:
                continue
            keep = _thin(sigma)
            x = (keep + 1) / m.max_rank
            color = cmap(norm(m.depth)) if m.depth is not None else "black"
            ax.semilogy(x, np.maximum(sigma[keep] / sigma[0], 1e-8), color=color, linewidth=0.9, alpha=0.85)
        shapes = sorted({f"{m.shape[0]}×{m.shape[1]}" for m in analysis.matrices if m.kind == kind})
        ax.set_title(f"{kind} ({', '.join(shapes)})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.yaxis.set_minor_locator(ticker.NullLocator())  # log minor ticks cost seconds per panel
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes.flat[len(kinds):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("rank fraction i / min(m, n)")
    for ax in axes[:, 0]:
        ax.set_ylabel("σᵢ / σ₁ (log scale)")
    if analysis.depths:
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8)
        bar.set_label("block depth (0 = first)")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _depth_kind_grid(analysis_kinds: list[str], depths: list[int], cells: dict[tuple[int, str], float]) -> np.ndarray:
    grid = np.full((len(depths), len(analysis_kinds)), np.nan)
    for (depth, kind), value in cells.items():
        if depth in depths and kind in analysis_kinds:
            grid[depths.index(depth), analysis_kinds.index(kind)] = value
    return grid


def _heatmap(ax, grid: np.ndarray, kinds: list[str], depths: list[int], norm, cmap, labels=None):
    image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=35, ha="right", fontsize=8)
    step = max(1, len(depths) // 16)
    ax.set_yticks(range(0, len(depths), step), [str(d) for d in depths[::step]], fontsize=8)
    ax.set_xlabel("layer type")
    ax.set_ylabel("block depth")
    if labels is not None and grid.size <= 400:
        for (i, j), text in np.ndenumerate(labels):
            if text:
                value = grid[i, j]
                dark = not np.isnan(value) and norm(value) < 0.55
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    return image


def plot_rank_heatmap(analysis: Profile, path: Path, level: float = 0.95) -> Path:
    """Depth × layer type: the rank fraction needed to keep `level` of the energy (weights, and whitened)."""
    kinds, depths = analysis.kinds, analysis.depths or [0]
    panels = [(False, "weights W")] + ([(True, "whitened W·S (output error)")] if analysis.whitened else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + 0.75 * len(kinds) * len(panels) + 1.2,
                                                         max(3.6, 1.6 + 0.22 * len(depths))), squeeze=False,
                             layout="constrained")
    norm = mcolors.Normalize(vmin=0.0, vmax=1.0)
    cmap = plt.get_cmap("magma")
    image = None
    for ax, (whitened, label) in zip(axes.flat, panels):
        cells = {}
        for m in analysis.matrices:
            cells[(m.depth if m.depth is not None else 0, m.kind)] = rank_for_energy(m.spectrum(whitened), level) / m.max_rank
        grid = _depth_kind_grid(kinds, depths, cells)
        labels = np.vectorize(lambda v: "" if np.isnan(v) else f"{v:.2f}".lstrip("0"))(grid)
        image = _heatmap(ax, grid, kinds, depths, norm, cmap, labels)
        ax.set_title(label, fontsize=10)
    bar = fig.colorbar(image, ax=axes, shrink=0.9)
    bar.set_label(f"rank / min(m, n) for {level:.0%} energy")
    fig.suptitle(f"Rank needed for {level:.0%} energy, by depth and layer type\n(lower = more compressible)",
                 fontsize=11)
    return _save(fig, path)


def uniform_loss_curve(matrices, whitened: bool, ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of parameters kept, mean relative truncation loss) under SVD-LLM's uniform ranks."""
    dense = sum(m.params for m in matrices)
    xs, ys = [], []
    for ratio in ratios:
        kept, losses = 0, []
        for m in matrices:
            k = uniform_rank(*m.shape, float(ratio))
            kept += kept_params(k, *m.shape)
            losses.append(m.loss_at_rank(k, whitened))
        xs.append(kept / dense)
        ys.append(float(np.mean(losses)))
    return np.array(xs), np.array(ys)


def plot_loss_vs_params(analysis: Profile, path: Path) -> Path:
    """Mean relative truncation loss against the fraction of parameters kept, uniform ranks, per layer type."""
    ratios = np.linspace(0.02, 1.0, 50)
    panels = [(False, "weights only: ‖W − W_k‖² / ‖W‖²")]
    if analysis.whitened:
        panels.append((True, "whitened: output error ‖(W − W_k)X‖² / ‖WX‖²"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False, sharey=True,
                             layout="constrained")
    palette = plt.get_cmap("tab10")
    for ax, (whitened, label) in zip(axes.flat, panels):
        for index, kind in enumerate(analysis.kinds):
            x, y = uniform_loss_curve([m for m in analysis.matrices if m.kind == kind], whitened, ratios)
            ax.plot(x, y, color=palette(index % 10), linewidth=1.2, label=kind)
        x, y = uniform_loss_curve(analysis.matrices, whitened, ratios)
        ax.plot(x, y, color="black", linewidth=2.4, label="all targets")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("parameters kept (fraction of the dense target layers)")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, None)
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("mean relative truncation loss (0 = exact)")
    axes[0, -1].legend(fontsize=8, title="layer type (uniform ranks)", title_fontsize=8)
    fig.suptitle("Truncation loss against parameters kept\n(SVD-LLM uniform ranks; dense where factoring saves nothing)",
                 fontsize=11)
    return _save(fig, path)


def plot_plan_ranks(modules: dict, path: Path, title: str) -> Path:
    """Depth × layer type heatmap of a plan: colour = parameters kept, label = rank ('D' = dense)."""
    entries = [(split_name(name), plan) for name, plan in modules.items()]
    kinds = list(dict.fromkeys(kind for (_, kind), _ in entries))
    depths = sorted({depth if depth is not None else 0 for (depth, _), _ in entries}) or [0]
    cells, text = {}, {}
    for (depth, kind), plan in entries:
        key = (depth if depth is not None else 0, kind)
        m, n = plan.shape
        rank = plan.rank
        dense = rank is None or not saves_parameters(rank, m, n)
        cells[key] = 1.0 if dense else rank * (m + n) / (m * n)
        text[key] = "D" if rank is None else str(rank)
    grid = _depth_kind_grid(kinds, depths, cells)
    labels = np.full(grid.shape, "", dtype=object)
    for (depth, kind), value in text.items():
        labels[depths.index(depth), kinds.index(kind)] = value
    fig, ax = plt.subplots(figsize=(1.6 + 0.85 * len(kinds), max(3.6, 1.6 + 0.22 * len(depths))), layout="constrained")
    norm = mcolors.Normalize(vmin=0.0, vmax=1.0)
    image = _heatmap(ax, grid, kinds, depths, norm, plt.get_cmap("viridis"), labels)
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label("parameters kept / dense")
    ax.set_title(title + "\n(cell label: rank; D = kept dense)", fontsize=10)
    return _save(fig, path)
