"""Reports written to a folder: report.md for people, report.json for programs, PNG plots.

Two kinds share one versioned JSON schema (lowrank/data/report.schema.json):
- `analysis`: the spectra of a model's target matrices (`lowrank analyze`);
- `compressed`: what a compressed checkpoint kept (`lowrank report`): ranks, parameters, method,
  budget and, given evaluation text, perplexity before and after.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from .fileio import atomic_output_dir
from .version import __version__
from .plan import Plan
from .profile import MatrixProfile, Profile
from .spectrum import COMMON_RATIOS, ENERGY_LEVELS, SpectrumStats, split_name

REPORT_FORMAT = "lowrank-report"
REPORT_VERSION = 1
SIGNIFICANT_DIGITS = 6
#: How many matrices the "most / least compressible" tables list.
EXTREMES = 8


def report_schema() -> dict:
    """The JSON schema every report.json follows."""
    return json.loads((resources.files("lowrank") / "data" / "report.schema.json").read_text(encoding="utf-8"))


def validate_report(data: dict) -> None:
    """Raise jsonschema.ValidationError if `data` does not follow the report schema (needs jsonschema)."""
    import jsonschema

    jsonschema.validate(data, report_schema())


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


# ---- analysis: numbers ------------------------------------------------------------------------------
def _stats_dict(stats: SpectrumStats, m: MatrixProfile) -> dict[str, Any]:
    return {
        "energy": _round(stats.energy),
        "sigma_max": _round(stats.sigma_max),
        "effective_rank": _round(stats.effective_rank),
        "stable_rank": _round(stats.stable_rank),
        "rank_for_energy": stats.rank_for_energy,
        "rank_fraction_for_energy": {k: _round(v / m.max_rank) for k, v in stats.rank_for_energy.items()},
    }


def _spectrum_dict(m: MatrixProfile, whitened: bool) -> dict[str, Any]:
    sigma = m.spectrum(whitened)
    return {**_stats_dict(SpectrumStats.of(sigma), m), "sigma": [_round(float(s)) for s in sigma]}


def _mean(values: list[float]) -> float:
    return _round(sum(values) / len(values)) if values else 0.0


def _group_summary(matrices: list[MatrixProfile], whitened: bool) -> dict[str, Any]:
    """Means over a group of matrices of the size-free numbers (fractions of min(m, n))."""
    stats = [(m, m.stats(whitened)) for m in matrices]
    return {
        "effective_rank_fraction": _mean([s.effective_rank / m.max_rank for m, s in stats]),
        "stable_rank": _mean([s.stable_rank for _, s in stats]),
        "rank_fraction_for_energy": {
            f"{level:g}": _mean([s.rank_for_energy[f"{level:g}"] / m.max_rank for m, s in stats])
            for level in ENERGY_LEVELS
        },
    }


def _spectra_kinds(analysis: Profile) -> list[tuple[str, bool]]:
    return [("weights", False)] + ([("whitened", True)] if analysis.whitened else [])


def analysis_to_dict(analysis: Profile) -> dict[str, Any]:
    """Every number of an analysis, ready for json.dumps (the schema's `analysis` kind)."""
    kinds = _spectra_kinds(analysis)
    by_type = []
    for kind in analysis.kinds:
        group = [m for m in analysis.matrices if m.kind == kind]
        by_type.append({
            "type": kind,
            "matrices": len(group),
            "shapes": sorted({f"{m.shape[0]}x{m.shape[1]}" for m in group}),
            "params": sum(m.params for m in group),
            **{label: _group_summary(group, whitened) for label, whitened in kinds},
        })
    by_depth = []
    for depth in analysis.depths:
        group = [m for m in analysis.matrices if m.depth == depth]
        by_depth.append({"depth": depth, "matrices": len(group),
                         **{label: _group_summary(group, whitened) for label, whitened in kinds}})
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "kind": "analysis",
        "tool_version": __version__,
        "source": analysis.source,
        "whitened": analysis.whitened,
        "options": analysis.options,
        "model_params": analysis.model_params,
        "target_params": analysis.target_params,
        "energy_levels": list(ENERGY_LEVELS),
        "by_type": by_type,
        "by_depth": by_depth,
        "budgets": {label: [{k: (_round(v) if isinstance(v, float) else v)
                             for k, v in analysis.uniform_budget(r, whitened).items()} for r in COMMON_RATIOS]
                    for label, whitened in kinds},
        "matrices": [
            {
                "name": m.name,
                "depth": m.depth,
                "type": m.kind,
                "shape": list(m.shape),
                "params": m.params,
                "stored_rank": m.rank,
                "weights": _spectrum_dict(m, False),
                "whitened": _spectrum_dict(m, True) if m.whitened is not None else None,
            }
            for m in analysis.matrices
        ],
    }


# ---- analysis: markdown -----------------------------------------------------------------------------
def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _ranked(analysis: Profile, whitened: bool) -> list[tuple[float, MatrixProfile]]:
    """Matrices sorted by the rank fraction they need for 95% energy (most compressible first)."""
    return sorted(((m.stats(whitened).rank_for_energy["0.95"] / m.max_rank, m) for m in analysis.matrices),
                  key=lambda item: item[0])


def analysis_markdown(analysis: Profile, data: dict[str, Any], plots: dict[str, str]) -> str:
    """report.md: summary tables per layer type and depth, extremes, common budgets, the plots."""
    main = "whitened" if analysis.whitened else "weights"
    what = ("whitened spectra σ(W·S), S Sᵀ = XᵀX from calibration text (σᵢ² = output error of dropping direction i)"
            if analysis.whitened else "weights only (data-free): σ(W)")
    lines = [
        f"# Spectral analysis: {analysis.source}",
        "",
        f"- {len(analysis.matrices)} target matrices, {analysis.target_params:,} parameters"
        + (f" of {analysis.model_params:,} in the model" if analysis.model_params else ""),
        f"- spectra: {what}",
    ]
    if analysis.options:
        lines.append("- options: " + ", ".join(f"{k}={v}" for k, v in analysis.options.items()))
    lines += [
        f"- generated by lowrank {__version__}; every number is in report.json (schema version {REPORT_VERSION})",
        "",
        "Effective rank is Roy & Vetterli's exp(entropy of σ/Σσ); stable rank is Σσ²/σ₁²; "
        "'rank for p%' is the smallest k whose truncation keeps p% of Σσ². Fractions are of min(m, n).",
        "",
        "## Per layer type",
        "",
    ]
    header = "| type | matrices | shape | spectrum | eff. rank | stable rank | rank for 90% | 95% | 99% |"
    lines += [header, "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in data["by_type"]:
        for label, _ in _spectra_kinds(analysis):
            s = row[label]
            r = s["rank_fraction_for_energy"]
            lines.append(f"| {row['type']} | {row['matrices']} | {', '.join(row['shapes'])} | {label} | "
                         f"{_pct(s['effective_rank_fraction'])} | {s['stable_rank']:.1f} | "
                         f"{_pct(r['0.9'])} | {_pct(r['0.95'])} | {_pct(r['0.99'])} |")
    if analysis.depths:
        lines += ["", f"## Per depth: rank fraction for 95% energy ({main})", ""]
        kinds = analysis.kinds
        lines.append("| depth | " + " | ".join(k.split(".")[-1] for k in kinds) + " | mean |")
        lines.append("|---:|" + "---:|" * (len(kinds) + 1))
        cell = {(m.depth, m.kind): m.stats(analysis.whitened).rank_for_energy["0.95"] / m.max_rank
                for m in analysis.matrices}
        for row in data["by_depth"]:
            depth = row["depth"]
            values = [cell.get((depth, k)) for k in kinds]
            lines.append(f"| {depth} | " + " | ".join("" if v is None else _pct(v) for v in values)
                         + f" | {_pct(row[main]['rank_fraction_for_energy']['0.95'])} |")
    ranked = _ranked(analysis, analysis.whitened)
    for title, items in (("Most compressible", ranked[:EXTREMES]), ("Least compressible", ranked[::-1][:EXTREMES])):
        lines += ["", f"## {title} matrices ({main}, by rank fraction for 95% energy)", "",
                  "| matrix | shape | rank for 95% | fraction | eff. rank | stable rank |",
                  "|---|---|---:|---:|---:|---:|"]
        for fraction, m in items:
            s = m.stats(analysis.whitened)
            lines.append(f"| {m.name} | {m.shape[0]}×{m.shape[1]} | {s.rank_for_energy['0.95']} | {_pct(fraction)} | "
                         f"{s.effective_rank:.1f} | {s.stable_rank:.1f} |")
    lines += ["", "## What common budgets would give (uniform ranks, SVD-LLM's rule)", "",
              "Each m×n matrix gets k = ⌊ratio·mn/(m+n)⌋ and stays dense where that saves nothing. "
              "Loss is the relative truncation loss Σ_{i>k}σᵢ²/Σσᵢ² "
              + ("(for whitened spectra: the relative output error ‖(W−W′)X‖²/‖WX‖²)" if analysis.whitened else "")
              + ", averaged over matrices.", ""]
    head = "| ratio | params kept | dense matrices | " + " | ".join(
        f"{label} loss mean | {label} loss max" for label, _ in _spectra_kinds(analysis)) + " |"
    lines += [head, "|---:|---:|---:|" + "---:|---:|" * len(_spectra_kinds(analysis))]
    for i, ratio in enumerate(COMMON_RATIOS):
        first = data["budgets"]["weights"][i]
        cells = [f"{ratio:g}", f"{first['target_params']:,} ({_pct(first['target_ratio'])})",
                 str(first["matrices_dense"])]
        for label, _ in _spectra_kinds(analysis):
            b = data["budgets"][label][i]
            cells += [f"{b['mean_loss']:.4f}", f"{b['max_loss']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    for caption, file in plots.items():
        lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_analysis_report(analysis: Profile, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write report.md, report.json and the PNG plots of an analysis into `out_dir`, atomically."""
    from . import plots

    data = analysis_to_dict(analysis)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        files = {"Spectra of the weights, per layer type": "spectra.png"}
        plots.plot_spectra(analysis, tmp / "spectra.png", whitened=False,
                           title="Singular values of W per layer type (normalized by σ₁), one curve per block")
        if analysis.whitened:
            files["Whitened spectra (output error), per layer type"] = "spectra-whitened.png"
            plots.plot_spectra(analysis, tmp / "spectra-whitened.png", whitened=True,
                               title="Singular values of W·S (whitened: σᵢ² = output error) per layer type")
        files["Rank needed for 95% energy, depth × layer type"] = "rank95-heatmap.png"
        plots.plot_rank_heatmap(analysis, tmp / "rank95-heatmap.png")
        files["Truncation loss against parameters kept"] = "loss-vs-params.png"
        plots.plot_loss_vs_params(analysis, tmp / "loss-vs-params.png")
        data["plots"] = list(files.values())
        (tmp / "report.json").write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(analysis_markdown(analysis, data, files), encoding="utf-8")
    return Path(out_dir)


# ---- compressed checkpoint ---------------------------------------------------------------------------
def compressed_to_dict(plan: Plan, folder: str, perplexity: dict | None = None,
                       config: dict | None = None) -> dict[str, Any]:
    """Ranks, parameters per type and in total, method and budget of a plan (the schema's `compressed` kind)."""
    by_type: dict[str, dict[str, Any]] = {}
    modules = []
    for name, m in plan.modules.items():
        depth, kind = split_name(name)
        row = by_type.setdefault(kind, {"type": kind, "matrices": 0, "factored": 0, "params_dense": 0, "params": 0})
        row["matrices"] += 1
        row["factored"] += m.rank is not None
        row["params_dense"] += m.dense_params
        row["params"] += m.params
        modules.append({"name": name, "depth": depth, "type": kind, "shape": list(m.shape), "rank": m.rank,
                        "params_dense": m.dense_params, "params": m.params})
    for row in by_type.values():
        row["ratio"] = _round(row["params"] / row["params_dense"])
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "kind": "compressed",
        "tool_version": __version__,
        "folder": folder,
        "source": plan.source,
        "method": plan.method,
        "strategy": plan.strategy,
        "budget": plan.budget,
        "options": plan.options,
        "config": config or None,
        "plan_tool_version": plan.tool_version,
        "summary": plan.summary(),
        "by_type": list(by_type.values()),
        "modules": modules,
        "perplexity": perplexity,
    }


def compressed_markdown(data: dict[str, Any], plots: dict[str, str]) -> str:
    """report.md of a compressed checkpoint."""
    s = data["summary"]
    budget = ", ".join(f"{k}={v}" for k, v in data["budget"].items()) or "not recorded"
    lines = [
        f"# Compressed checkpoint: {data['folder']}",
        "",
        f"- source model: {data['source'] or 'not recorded'}",
        f"- method: {data['method']}; rank strategy: {data['strategy']}; budget: {budget}",
        f"- factored {s['modules_factored']} of {s['modules']} target matrices"
        + (f" (made by lowrank {data['plan_tool_version']})" if data.get("plan_tool_version") else ""),
    ]
    if data["options"]:
        lines.append("- options: " + ", ".join(f"{k}={v}" for k, v in data["options"].items()))
    for section, settings in (data.get("config") or {}).items():
        if isinstance(settings, dict):
            shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "version")
            lines.append(f"- {section} config: {shown}")
    lines += ["", "## Parameters", "", "| layer type | matrices | factored | before | after | kept |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in data["by_type"]:
        lines.append(f"| {row['type']} | {row['matrices']} | {row['factored']} | {row['params_dense']:,} | "
                     f"{row['params']:,} | {_pct(row['ratio'])} |")
    lines.append(f"| **all target layers** | {s['modules']} | {s['modules_factored']} | {s['target_params_dense']:,} | "
                 f"{s['target_params']:,} | {_pct(s['target_ratio'])} |")
    if s["model_params_dense"] is not None:
        lines.append(f"| **whole model** | | | {s['model_params_dense']:,} | {s['model_params']:,} | "
                     f"{_pct(s['model_ratio'])} |")
    ppl = data["perplexity"]
    if ppl is not None:
        before = "n/a" if ppl["before"] is None else f"{ppl['before']:.3f}"
        change = "" if ppl["before"] is None else f" (×{ppl['after'] / ppl['before']:.3f})"
        lines += ["", "## Perplexity", "",
                  f"On {', '.join(ppl['texts'])}: {ppl['windows']} windows of {ppl['seq_len']} tokens "
                  f"({ppl['tokens']:,} predicted tokens).", "",
                  "| model | perplexity |", "|---|---:|",
                  f"| before (source: {data['source']}) | {before} |",
                  f"| after (compressed) | {ppl['after']:.3f}{change} |"]
    lines += ["", "## Ranks per module", ""]
    for caption, file in plots.items():
        lines += [f"![{caption}]({file})", ""]
    lines += ["| module | shape | rank | params before | after |", "|---|---|---:|---:|---:|"]
    for m in data["modules"]:
        rank = "dense" if m["rank"] is None else str(m["rank"])
        lines.append(f"| {m['name']} | {m['shape'][0]}×{m['shape'][1]} | {rank} | {m['params_dense']:,} | "
                     f"{m['params']:,} |")
    return "\n".join(lines).rstrip() + "\n"


def write_compressed_report(plan: Plan, folder: str, out_dir: str | Path, overwrite: bool = False,
                            perplexity: dict | None = None, config: dict | None = None) -> Path:
    """Write report.md, report.json and ranks.png for a compressed checkpoint into `out_dir`, atomically.

    `config` is the record of the configs the folder was made with (lowrank_config.json), shown as is.
    """
    from . import plots

    data = compressed_to_dict(plan, folder, perplexity, config)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        files = {"Ranks per module": "ranks.png"}
        plots.plot_plan_ranks(plan.modules, tmp / "ranks.png",
                              title=f"Ranks per module: {plan.method}, {plan.strategy}, "
                                    f"{_pct(plan.target_ratio)} of target parameters kept")
        data["plots"] = list(files.values())
        (tmp / "report.json").write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(compressed_markdown(data, files), encoding="utf-8")
    return Path(out_dir)
