"""Perplexity of SmolLM2-135M compressed by whiten under every planning strategy, at ratios 0.8 and 0.6.

Run:  flock /tmp/lowrank-cpu.lock python benchmarks/bench_planner.py     (about 15-20 minutes on 2 CPU cores)
Writes reports/planner.json and reports/planner.md.

The expensive analysis is done once and shared by every run: calibration statistics (64×512
tokens of Hamlet), the output Fisher for the sensitivity strategy (8 of those windows, backward
passes), and the whitened SVD of every target. Each run then only allocates ranks (the planning
time reported), factors a fresh copy of the dense model by truncating the stored SVDs (exactly
what `apply_plan` computes, checked on the first block's matrices) and evaluates it.
`--variants` adds an ablation at ratio 0.6: the sensitivity strategy with one Fisher weight per
matrix instead of one per direction.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (dense_baseline, CALIB_SAMPLES, EVAL_WINDOWS, SEQ_LEN, environment, eval_ppl, fresh_copy, peak_rss_mib, write_report)

from lowrank.calibration import collect_stats
from lowrank.compression import apply_plan
from lowrank.factorize import DEFAULT_DAMPING, Factors, WhiteningCache
from lowrank.layers import LowRankLinear, replace_module
from lowrank.plan import Plan
from lowrank.model_info import count_parameters
from lowrank.planner import STRATEGIES, plan_targets
from lowrank.profile import MatrixProfile
from lowrank.profiling import DEFAULT_SENSITIVITY_SAMPLES
from lowrank.sensitivity import direction_costs, measure_output_fisher
from lowrank.targets import weight_matrix

RATIOS = (0.8, 0.6)
#: The best strategy must beat uniform by this much at the lower ratio (and not lose at the higher).
REQUIRED_GAIN = 0.15


def ablation_spectra(spectra: dict[str, MatrixProfile]) -> dict[str, dict[str, MatrixProfile]]:
    """Spectra that make the sensitivity allocator run an ablation: one Fisher weight per matrix.

    Each matrix's directions all get the energy-weighted mean price Σσⱼ²·uⱼᵀFuⱼ / Σσⱼ², so the
    loss is that matrix's relative whitened error times the measured price of its whole output.
    """
    per_matrix = {}
    for n, s in spectra.items():
        energy = s.planning ** 2
        price = torch.full_like(energy, float((energy * s.price).sum() / energy.sum()))
        per_matrix[n] = MatrixProfile(n, s.shape, s.sigma, s.whitened, price)
    return {"sensitivity-per-matrix": per_matrix}


class WhitenedSVDs:
    """The SVD of every target's W·S, computed once: spectra for planning and factors for every run.

    Truncating a stored SVD gives exactly the factors `factorize("whiten", ...)` computes (same
    whitening, same SVD, same √σ split), without repeating 210 SVDs for each of the runs;
    `check_against_apply_plan` verifies that on a few matrices.
    """

    def __init__(self, model, targets, stats, fisher):
        self.svds, self.spectra, whitenings = {}, {}, WhiteningCache(DEFAULT_DAMPING)
        for target in targets:
            white = whitenings.get(stats[target.name], target.name)
            weight = weight_matrix(model.get_submodule(target.name)).detach().to(torch.float64)
            left, sigma, right = torch.linalg.svd(weight @ white.root, full_matrices=False)
            self.svds[target.name] = (left, sigma, right, white.inverse)
            prices = direction_costs(fisher[target.name].mean, left) if fisher else None
            # σ(W·S) is all the planner reads here; it stands in for plain σ(W), which no strategy uses
            self.spectra[target.name] = MatrixProfile(target.name, target.shape, sigma, sigma, prices)

    def factors(self, name: str, rank: int) -> Factors:
        left, sigma, right, inverse = self.svds[name]
        root = sigma[:rank].sqrt()
        return Factors(down=(root[:, None] * right[:rank]) @ inverse, up=left[:, :rank] * root)

    def apply(self, model, plan) -> None:
        """What `apply_plan` does for method whiten, from the stored SVDs."""
        for name, rank in plan.factored.items():
            module = model.get_submodule(name)
            weight = weight_matrix(module)
            replace_module(model, name, LowRankLinear.from_factors(self.factors(name, rank), bias=module.bias,
                                                                    dtype=weight.dtype, device=weight.device))

    def check_against_apply_plan(self, model, plan, stats, names) -> float:
        """Largest difference between these factors and apply_plan's on `names` (should be ~1e-7 or 0)."""
        sub = Plan(modules={n: plan.modules[n] for n in names}, method="whiten")
        mine, theirs = fresh_copy(model), fresh_copy(model)
        apply_plan(theirs, sub, stats, progress=False)
        self.apply(mine, sub)
        with torch.no_grad():
            return max(float((mine.get_submodule(n).merged_weight() - theirs.get_submodule(n).merged_weight()).abs().max())
                       for n in names)


def run(model, targets, svds, evaluation, ratio, strategy, spectra, label=None) -> dict:
    """Plan, factor a fresh copy, evaluate: one row of the table."""
    started = time.perf_counter()
    plan = plan_targets(targets, count_parameters(model), ratio, strategy, spectra=spectra)
    plan_seconds = time.perf_counter() - started
    compressed = fresh_copy(model)
    started = time.perf_counter()
    svds.apply(compressed, plan)
    factor_seconds = time.perf_counter() - started
    ppl = eval_ppl(compressed, evaluation)
    del compressed
    summary = plan.summary()
    ranks = list(plan.factored.values())
    row = {"ratio": ratio, "strategy": label or strategy, "perplexity": ppl,
           "planning_seconds": plan_seconds, "factor_seconds": factor_seconds,
           "target_ratio": summary["target_ratio"], "model_ratio": summary["model_ratio"],
           "modules_factored": summary["modules_factored"], "modules_dense": summary["modules"] - summary["modules_factored"],
           "min_rank": min(ranks) if ranks else None, "max_rank": max(ranks) if ranks else None}
    print(f"ratio {ratio} {row['strategy']}: ppl {ppl:.3f} (plan {plan_seconds:.2f} s, factor {factor_seconds:.0f} s, "
          f"{row['modules_dense']} dense)", flush=True)
    return row


def markdown(data: dict) -> str:
    rows = data["results"]
    lines = [
        "# Planner: perplexity of SmolLM2-135M by rank-allocation strategy (method whiten)",
        "",
        f"Calibration: {data['protocol']['calibration']}. Evaluation: {data['protocol']['evaluation']} "
        f"({data['protocol']['eval_tokens']:,} tokens). Dense perplexity: **{data['dense_perplexity']:.2f}**.",
        "",
        "| ratio | strategy | perplexity | vs uniform | target ratio | model ratio | dense matrices | ranks | planning (s) | factoring (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(r["perplexity"] for r in rows if r["ratio"] == row["ratio"] and r["strategy"] == "uniform")
        change = (row["perplexity"] - base) / base
        lines.append(
            f"| {row['ratio']} | {row['strategy']} | {row['perplexity']:.2f} | {change:+.1%} | {row['target_ratio']:.4f} "
            f"| {row['model_ratio']:.4f} | {row['modules_dense']}/{row['modules_factored'] + row['modules_dense']} "
            f"| {row['min_rank']}–{row['max_rank']} | {row['planning_seconds']:.2f} | {row['factor_seconds']:.1f} |")
    shared = data["shared_seconds"]
    verdict = data["verdict"]
    lines += [
        "",
        f"One-time analysis shared by every run: calibration {shared['calibration']:.0f} s, whitened spectra "
        f"{shared['spectra']:.0f} s, output Fisher for `sensitivity` {shared['fisher']:.0f} s "
        f"({DEFAULT_SENSITIVITY_SAMPLES} windows). The planning column is the allocation alone; factoring "
        f"truncates the stored SVDs (max |ΔW| vs `apply_plan` {data['factors_vs_apply_plan_max_abs_diff']:.1e}).",
        "",
        f"Best strategy: **{verdict['best']}**: {verdict['gain_low']:+.1%} perplexity vs uniform at "
        f"{verdict['low_ratio']}, {verdict['gain_high']:+.1%} at {verdict['high_ratio']} "
        f"(required: ≤ {-REQUIRED_GAIN:+.0%} at {verdict['low_ratio']}, ≤ 0 at {verdict['high_ratio']}): "
        f"{'met' if verdict['met'] else 'NOT met'}.",
        "",
        f"Peak memory {data['peak_rss_mib']:.0f} MiB; {data['environment']['threads']} threads; "
        f"total {data['total_seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", action="store_true", help="also run the ablation at ratio 0.6")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES),
                        help="strategies to run (default: all; uniform is always run as the baseline)")
    args = parser.parse_args()
    begun = time.perf_counter()
    model, tokenizer, calib, evaluation, targets, dense_ppl = dense_baseline()

    shared = {}
    started = time.perf_counter()
    stats = collect_stats(model, targets, calib, progress=False)
    shared["calibration"] = time.perf_counter() - started
    strategies = [s for s in STRATEGIES if s in set(args.strategies) | {"uniform"}]
    started = time.perf_counter()
    fisher = None
    if "sensitivity" in strategies:
        fisher = measure_output_fisher(model, targets, calib[:DEFAULT_SENSITIVITY_SAMPLES], batch_size=4,
                                       progress=False)
    shared["fisher"] = time.perf_counter() - started
    started = time.perf_counter()
    svds = WhitenedSVDs(model, targets, stats, fisher)
    spectra = svds.spectra
    shared["spectra"] = time.perf_counter() - started
    print("shared analysis (s):", {k: round(v, 1) for k, v in shared.items()}, flush=True)
    probe = plan_targets(targets, count_parameters(model), min(RATIOS), "uniform")
    checked = [t.name for t in targets[:7]]  # every kind of matrix in the first block
    factor_check = svds.check_against_apply_plan(model, probe, stats, checked)
    print(f"stored-SVD factors vs apply_plan: max |ΔW| {factor_check:.2e} on {len(checked)} matrices", flush=True)

    rows = []
    for ratio in RATIOS:
        for strategy in strategies:
            rows.append(run(model, targets, svds, evaluation, ratio, strategy, spectra))
    if args.variants and fisher is not None:
        for label, variant in ablation_spectra(spectra).items():
            rows.append(run(model, targets, svds, evaluation, min(RATIOS), "sensitivity", variant, label))

    def ppl(ratio, strategy):
        return next(r["perplexity"] for r in rows if r["ratio"] == ratio and r["strategy"] == strategy)

    low, high = min(RATIOS), max(RATIOS)
    best = min((s for s in strategies if s != "uniform"), key=lambda s: ppl(low, s))
    gain_low = ppl(low, best) / ppl(low, "uniform") - 1
    gain_high = ppl(high, best) / ppl(high, "uniform") - 1
    verdict = {"best": best, "low_ratio": low, "high_ratio": high, "gain_low": gain_low, "gain_high": gain_high,
               "met": gain_low <= -REQUIRED_GAIN and gain_high <= 0}
    data = {
        "protocol": {"calibration": f"{CALIB_SAMPLES} random windows of {SEQ_LEN} tokens of Hamlet, seed 0",
                     "evaluation": f"first {EVAL_WINDOWS} windows of {SEQ_LEN} tokens of Macbeth",
                     "eval_tokens": EVAL_WINDOWS * (SEQ_LEN - 1), "method": "whiten",
                     "sensitivity_samples": DEFAULT_SENSITIVITY_SAMPLES},
        "environment": environment(),
        "dense_perplexity": dense_ppl,
        "shared_seconds": shared,
        "factors_vs_apply_plan_max_abs_diff": factor_check,
        "results": rows,
        "verdict": verdict,
        "peak_rss_mib": peak_rss_mib(),
        "total_seconds": time.perf_counter() - begun,
    }
    write_report("planner", data, markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
