"""Choosing ranks under a parameter budget.

Four strategies turn a budget (see `budget`) into one rank per target matrix:

- `uniform`: SVD-LLM's rule; every m×n matrix keeps the same fraction r of its parameters,
  k = ⌊r·mn/(m+n)⌋.
- `energy`: every matrix keeps the same fraction of its whitened energy Σσⱼ²(W·S).
- `global`: minimize the total *relative* output error Σᵢ (Σ_{j>kᵢ} σᵢⱼ²) / ‖WᵢSᵢ‖²_F. Dropping
  whitened direction j costs σⱼ² of squared output error, but matrices' errors are not on one
  scale: dividing by each matrix's whitened energy puts them on one (raw σ² allocates far worse
  than uniform).
- `sensitivity`: minimize the estimated rise of the model's loss, Σᵢ Σ_{j>kᵢ} σᵢⱼ² · uᵢⱼᵀ Fᵢ uᵢⱼ,
  with Fᵢ the output Fisher measured by `sensitivity`.

`global` and `sensitivity` share one allocator: each matrix's options (every allowed rank, and
dense) are points (parameters, loss); the lower convex hull of those points lists the purchases
worth making, and a single greedy pass buys hull segments in order of loss removed per parameter
until the budget runs out. Dense is just the last option, so a matrix whose useful rank would
save nothing is kept dense. A larger budget buys a longer prefix of the same list, so no rank
ever shrinks when the budget grows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import Budget, Override, RankLimits, parse_overrides
from .errors import BudgetError, LowrankError
from .evaluate import is_causal_lm
from .factorize import DEFAULT_DAMPING, Whitening, gram_svdvals, whitening
from .plan import ModulePlan, Plan, module_plan
from .sensitivity import OutputFisher, direction_costs
from .targets import Target, weight_matrix

log = logging.getLogger(__name__)

STRATEGIES = ("uniform", "energy", "global", "sensitivity")
#: The strategy used with method whiten when none is named. benchmarks/bench_planner.py chose it:
#: on SmolLM2-135M it beat uniform by 54% in perplexity at ratio 0.8 and by 35% at 0.6.
DEFAULT_STRATEGY = "sensitivity"
#: Calibration windows that the sensitivity strategy backpropagates through.
DEFAULT_SENSITIVITY_SAMPLES = 8


def default_strategy(method: str, model: nn.Module | None = None) -> str:
    """DEFAULT_STRATEGY for whiten, whose whitened spectra the strategies were measured on; uniform otherwise.

    The sensitivity strategy backpropagates a next-token loss, so a `model` that is not a causal
    language model (BERT, say) falls back to uniform.
    """
    if method != "whiten":
        return "uniform"
    if DEFAULT_STRATEGY == "sensitivity" and model is not None and not is_causal_lm(model):
        return "uniform"
    return DEFAULT_STRATEGY


# ---- the uniform rule (SVD-LLM) -------------------------------------------------------------

def check_ratio(ratio: float) -> float:
    """A kept-parameter fraction must lie in (0, 1]."""
    if not (0.0 < ratio <= 1.0):
        raise BudgetError(f"ratio {ratio} is outside (0, 1]; pass the fraction of parameters to keep, e.g. --ratio 0.8")
    return ratio


def round_rank(rank: int, round_to: int) -> int:
    """Round down to a multiple of `round_to` (hardware-friendly shapes), never below it."""
    if round_to < 1:
        raise BudgetError(f"--round-to must be a positive integer, got {round_to}")
    return max(round_to, (rank // round_to) * round_to)


def uniform_rank(out_features: int, in_features: int, ratio: float, round_to: int = 1) -> int:
    """k = ⌊r·mn/(m+n)⌋, rounded down to a multiple of `round_to`, at least 1."""
    k = int(ratio * out_features * in_features // (out_features + in_features))
    k = max(1, min(k, min(out_features, in_features)))
    return min(round_rank(k, round_to), min(out_features, in_features))


def plan_uniform(targets: list[Target], ratio: float, round_to: int = 1) -> dict[str, ModulePlan]:
    """SVD-LLM's uniform allocation: the same kept fraction for every matrix."""
    check_ratio(ratio)
    return {
        t.name: module_plan(t.shape, uniform_rank(t.out_features, t.in_features, ratio, round_to))
        for t in targets
    }


# ---- spectra: what each dropped direction costs -------------------------------------------

@dataclass
class Spectrum:
    """One matrix's whitened spectrum: σⱼ²(W·S) in descending order, and optionally uⱼᵀF uⱼ."""

    shape: tuple[int, int]
    energy: np.ndarray  # σⱼ², descending
    fisher: np.ndarray | None = None  # uⱼᵀ F uⱼ / N per direction (sensitivity strategy)

    @property
    def total(self) -> float:
        return float(self.energy.sum())


def matrix_spectrum(weight: torch.Tensor, white: Whitening | None = None,
                    fisher: torch.Tensor | None = None) -> Spectrum:
    """σⱼ²(W·S) (plain σⱼ²(W) without a whitening) and, given an output Fisher F, uⱼᵀ F uⱼ."""
    product = weight.detach().to(torch.float64)
    if white is not None:
        product = product @ white.root
    if fisher is None:
        return Spectrum(tuple(weight.shape), (gram_svdvals(product) ** 2).cpu().numpy())
    left, sigma, _ = torch.linalg.svd(product, full_matrices=False)
    return Spectrum(tuple(weight.shape), (sigma ** 2).cpu().numpy(), direction_costs(fisher, left).cpu().numpy())


def model_spectra(
    model: nn.Module,
    targets: list[Target],
    stats: dict | None,
    fisher: dict[str, OutputFisher] | None = None,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
) -> dict[str, Spectrum]:
    """The spectrum of every target (whitened with its calibration statistics where given)."""
    whitenings: dict[int, Whitening] = {}  # one per shared input
    spectra = {}
    for target in tqdm(targets, desc="Spectra", unit="matrix", disable=not progress):
        white = None
        if stats is not None:
            layer_stats = stats[target.name]
            key = id(layer_stats)
            if key not in whitenings:
                whitenings[key] = whitening(layer_stats.gram, damping, target.name)
            white = whitenings[key]
        output_fisher = fisher[target.name].mean if fisher is not None else None
        weight = weight_matrix(model.get_submodule(target.name))
        spectra[target.name] = matrix_spectrum(weight, white, output_fisher)
    return spectra


def direction_loss(spectrum: Spectrum, strategy: str) -> np.ndarray:
    """What dropping each direction costs under `strategy` (non-negative, in SVD order)."""
    if strategy in ("energy", "global"):
        total = spectrum.total
        return spectrum.energy / total if total > 0 else np.zeros_like(spectrum.energy)
    if strategy == "sensitivity":
        if spectrum.fisher is None:
            raise LowrankError("the sensitivity strategy needs output Fisher statistics; "
                               "measure them with lowrank.sensitivity.measure_output_fisher")
        return spectrum.energy * np.clip(spectrum.fisher, 0.0, None)
    raise LowrankError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


# ---- options per matrix ------------------------------------------------------------------

@dataclass
class Options:
    """One matrix's choices, ascending in cost: the allowed ranks, then dense (rank None) if allowed."""

    ranks: list[int | None]
    costs: np.ndarray  # parameters of each option
    losses: np.ndarray | None = None  # loss left by each option (None for uniform)


def matrix_options(shape: tuple[int, int], limits: RankLimits, loss: np.ndarray | None = None) -> Options:
    """Every allowed rank (and dense) of an m×n matrix, with cost k(m+n) (mn) and tail loss Σ_{j≥k}."""
    m, n = shape
    ranks: list[int | None] = list(limits.ranks(shape))
    if limits.allows_dense():
        ranks.append(None)
    costs = np.array([m * n if k is None else k * (m + n) for k in ranks], dtype=np.int64)
    losses = None
    if loss is not None:
        tail = np.concatenate([np.cumsum(loss[::-1])[::-1], [0.0]])  # tail[k] = Σ_{j≥k} loss[j]
        losses = np.array([0.0 if k is None else tail[min(k, len(loss))] for k in ranks])
    return Options(ranks, costs, losses)


def lower_hull(costs: np.ndarray, losses: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points (cost, loss), costs ascending: the efficient purchases."""
    hull: list[int] = []
    for i in range(len(costs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the line from a to i
            if (losses[b] - losses[a]) * (costs[i] - costs[a]) >= (losses[i] - losses[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


# ---- allocation ----------------------------------------------------------------------------

def _fixed_rank(override: Override, shape: tuple[int, int], round_to: int) -> int | None:
    if override.rank == "dense":
        return None
    if isinstance(override.rank, float):
        return uniform_rank(shape[0], shape[1], override.rank, round_to) if override.rank < 1.0 else None
    return min(int(override.rank), min(shape))


def split_overrides(targets: list[Target], overrides: list[Override], limits: RankLimits
                    ) -> tuple[dict[str, ModulePlan], list[Target]]:
    """Modules fixed by an override (first matching pattern wins), and the rest left to allocate."""
    fixed: dict[str, ModulePlan] = {}
    free = []
    used = set()
    for target in targets:
        match = next((o for o in overrides if o.matches(target.name)), None)
        if match is None:
            free.append(target)
            continue
        used.add(match.pattern)
        fixed[target.name] = module_plan(target.shape, _fixed_rank(match, target.shape, limits.round_to))
    unused = [o.pattern for o in overrides if o.pattern not in used]
    if unused:
        raise BudgetError(f"override pattern {unused[0]!r} matches no target module; check it against the "
                          "module names (lowrank analyze lists them)")
    return fixed, free


def _infeasible(smallest: int, budget: Budget | None, target_params: int, model_params: int | None) -> BudgetError:
    wanted = f"--budget {budget.same_form(smallest, target_params, model_params)}" if budget else "a larger budget"
    return BudgetError(f"the budget cannot be met: the smallest feasible plan keeps {smallest:,} target parameters "
                       f"({smallest / target_params:.2%} of them); pass at least {wanted}, "
                       "or lower --min-rank, --round-to and the overrides")


def smallest_allowance(targets: list[Target], limits: RankLimits, overrides: list[Override]) -> int:
    """The fewest target parameters any plan within `limits` and `overrides` can keep."""
    fixed, free = split_overrides(targets, overrides, limits)
    for t in free:
        if not limits.ranks(t.shape) and not limits.allows_dense():
            raise BudgetError(f"{t.name} ({t.shape[0]}×{t.shape[1]}) has no rank allowed by --min-rank "
                              f"{limits.min_rank}, --max-rank {limits.max_rank} and --round-to {limits.round_to} "
                              "that saves parameters; loosen those limits or override the module")
    return sum(p.params for p in fixed.values()) + sum(int(matrix_options(t.shape, limits).costs[0]) for t in free)


def check_feasible(targets: list[Target], budget: "Budget | str | float", model_params: int | None,
                   limits: RankLimits | None = None, overrides=None) -> int:
    """The target allowance of `budget`; a BudgetError naming the smallest feasible budget if it is too small."""
    budget = Budget.parse(budget)
    target_params = sum(t.params for t in targets)
    allowance = budget.allowance(target_params, model_params)
    smallest = smallest_allowance(targets, limits or RankLimits(), parse_overrides(overrides))
    if smallest > allowance:
        raise _infeasible(smallest, budget, target_params, model_params)
    return allowance


def allocate_uniform(targets: list[Target], allowance: int, limits: RankLimits,
                     ratio: float | None = None) -> dict[str, ModulePlan]:
    """The uniform rule at `ratio` (default: the ratio that spends `allowance`), within the limits."""
    if ratio is None:
        dense = sum(t.params for t in targets)
        ratio = allowance / dense if dense else 1.0
    ratio = min(1.0, ratio)
    plans = {}
    for t in targets:
        allowed = limits.ranks(t.shape)
        if ratio >= 1.0 and limits.allows_dense():
            plans[t.name] = module_plan(t.shape, None)
            continue
        if not allowed:
            plans[t.name] = module_plan(t.shape, None)
            continue
        rank = uniform_rank(t.out_features, t.in_features, ratio, limits.round_to)
        rank = min(max(rank, allowed[0]), allowed[-1])
        plans[t.name] = module_plan(t.shape, rank)
    return plans


def allocate_energy(targets: list[Target], options: dict[str, Options], spectra: dict[str, Spectrum],
                    allowance: int) -> dict[str, ModulePlan]:
    """The largest common retained-energy fraction τ whose ranks fit in `allowance`."""
    retained = {}
    for t in targets:
        share = direction_loss(spectra[t.name], "energy")
        kept = np.concatenate([[0.0], np.cumsum(share)])  # kept[k]: fraction kept by rank k
        opts = options[t.name]
        retained[t.name] = np.array([1.0 if k is None else kept[min(k, len(share))] for k in opts.ranks])

    def choice(tau: float) -> dict[str, int]:
        picks = {}
        for t in targets:
            fractions = np.maximum.accumulate(retained[t.name])
            index = int(np.searchsorted(fractions, tau - 1e-12, side="left"))
            picks[t.name] = min(index, len(fractions) - 1)
        return picks

    def cost(picks: dict[str, int]) -> int:
        return int(sum(options[name].costs[i] for name, i in picks.items()))

    low, high = 0.0, 1.0
    if cost(choice(high)) <= allowance:
        low = high
    else:
        for _ in range(60):
            middle = (low + high) / 2
            if cost(choice(middle)) <= allowance:
                low = middle
            else:
                high = middle
    picks = choice(low)
    return {t.name: module_plan(t.shape, options[t.name].ranks[picks[t.name]]) for t in targets}


def allocate_greedy(targets: list[Target], options: dict[str, Options], allowance: int) -> dict[str, ModulePlan]:
    """Buy hull segments in order of loss removed per parameter; stop at the first that does not fit.

    The segment where the money runs out is bought in part: its matrix gets the largest allowed
    rank between the segment's ends that still fits, so little of the budget is left unspent.
    """
    picks = {t.name: 0 for t in targets}
    spent = int(sum(options[t.name].costs[0] for t in targets))
    segments = []  # (-efficiency, matrix order, segment order, name, from, to)
    for order, t in enumerate(targets):
        opts = options[t.name]
        hull = lower_hull(opts.costs, opts.losses)
        for step, (a, b) in enumerate(zip(hull, hull[1:])):
            gain = float(opts.losses[a] - opts.losses[b])
            extra = int(opts.costs[b] - opts.costs[a])
            segments.append((-gain / extra, order, step, t.name, a, b))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    for _, _, _, name, a, b in segments:
        costs = options[name].costs
        extra = int(costs[b] - costs[a])
        if spent + extra <= allowance:
            picks[name] = b
            spent += extra
            continue
        affordable = [i for i in range(a + 1, b) if spent + int(costs[i] - costs[a]) <= allowance]
        if affordable:
            picks[name] = affordable[-1]
            spent += int(costs[affordable[-1]] - costs[a])
        break
    return {t.name: module_plan(t.shape, options[t.name].ranks[picks[t.name]]) for t in targets}


def allocate(
    targets: list[Target],
    allowance: int,
    strategy: str = DEFAULT_STRATEGY,
    spectra: dict[str, Spectrum] | None = None,
    limits: RankLimits | None = None,
    overrides: "list[Override] | dict | list[str] | None" = None,
    budget: Budget | None = None,
    model_params: int | None = None,
) -> dict[str, ModulePlan]:
    """Ranks for `targets` that keep at most `allowance` target parameters, chosen by `strategy`.

    `spectra` (from `model_spectra`) are needed by every strategy but uniform. Raises a
    BudgetError naming the smallest feasible budget when `allowance` is too small.
    """
    if strategy not in STRATEGIES:
        raise LowrankError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    limits = limits or RankLimits()
    overrides = parse_overrides(overrides)
    fixed, free = split_overrides(targets, overrides, limits)
    target_params = sum(t.params for t in targets)
    fixed_cost = sum(p.params for p in fixed.values())
    smallest = smallest_allowance(targets, limits, overrides)
    if smallest > allowance:
        raise _infeasible(smallest, budget, target_params, model_params)
    left = allowance - fixed_cost
    if not free:
        plans = {}
    elif strategy == "uniform":
        exact = budget is not None and budget.scope == "target" and budget.kind == "fraction" and not fixed
        plans = allocate_uniform(free, left, limits, budget.value if exact else None)
    else:
        if spectra is None:
            raise LowrankError(f"strategy {strategy} needs the matrices' spectra; compute them with model_spectra")
        options = {t.name: matrix_options(t.shape, limits, direction_loss(spectra[t.name], strategy)) for t in free}
        if strategy == "energy":
            plans = allocate_energy(free, options, spectra, left)
        else:
            plans = allocate_greedy(free, options, left)
    plans.update(fixed)
    ordered = {t.name: plans[t.name] for t in targets}
    spent = sum(p.params for p in ordered.values())
    if spent > allowance:  # uniform's floor of 1 (or --min-rank) can overshoot a tiny budget
        raise _infeasible(spent, budget, target_params, model_params)
    return ordered


def needs_spectra(strategy: str) -> bool:
    return strategy != "uniform"


def build_plan(
    model: nn.Module,
    targets: list[Target],
    budget: "Budget | str | float",
    strategy: str = DEFAULT_STRATEGY,
    *,
    stats: dict | None = None,
    fisher: dict[str, OutputFisher] | None = None,
    spectra: dict[str, Spectrum] | None = None,
    method: str = "whiten",
    limits: RankLimits | None = None,
    overrides: "list[Override] | dict | list[str] | None" = None,
    damping: float = DEFAULT_DAMPING,
    source: str | None = None,
    progress: bool = True,
) -> Plan:
    """A Plan for `targets` of `model` under `budget`, recording the budget, limits and planning time.

    `stats` (calibration statistics) whiten the spectra; without them plain σ(W) is used.
    `fisher` (from `sensitivity.measure_output_fisher`) is needed by the sensitivity strategy.
    Pass precomputed `spectra` to plan many budgets from one analysis.
    """
    from . import __version__
    from .compress import count_parameters

    started = time.perf_counter()
    budget = Budget.parse(budget)
    limits = limits or RankLimits()
    overrides = parse_overrides(overrides)
    if strategy == "sensitivity" and fisher is None and (spectra is None or
                                                         any(s.fisher is None for s in spectra.values())):
        raise LowrankError("the sensitivity strategy needs output Fisher statistics; "
                           "measure them with lowrank.sensitivity.measure_output_fisher")
    if needs_spectra(strategy) and spectra is None:
        spectra = model_spectra(model, targets, stats, fisher if strategy == "sensitivity" else None,
                                damping, progress)
    model_params = count_parameters(model)
    target_params = sum(t.params for t in targets)
    allowance = budget.allowance(target_params, model_params)
    modules = allocate(targets, allowance, strategy, spectra, limits, overrides, budget, model_params)
    options: dict[str, Any] = {**limits.to_dict(), "planning_seconds": round(time.perf_counter() - started, 3)}
    if overrides:
        options["overrides"] = [o.to_dict() for o in overrides]
    return Plan(
        modules=modules,
        method=method,
        strategy=strategy,
        budget={**budget.to_dict(), "target_allowance": allowance},
        model_params=model_params,
        source=source,
        tool_version=__version__,
        options=options,
    )


def plan_model(
    model: nn.Module,
    targets: list[Target],
    budget: "Budget | str | float",
    strategy: str = DEFAULT_STRATEGY,
    *,
    windows: torch.Tensor | None = None,
    method: str = "whiten",
    limits: RankLimits | None = None,
    overrides: "list[Override] | dict | list[str] | None" = None,
    batch_size: int = 8,
    sensitivity_samples: int = DEFAULT_SENSITIVITY_SAMPLES,
    damping: float = DEFAULT_DAMPING,
    source: str | None = None,
    progress: bool = True,
) -> tuple[Plan, dict | None]:
    """Calibrate where the strategy needs it, measure sensitivity where asked, and plan.

    Returns the Plan and the calibration statistics it collected (None if it needed none), so
    that factoring can reuse them instead of calibrating twice.
    """
    from .calibration import collect_stats
    from .compress import count_parameters, needs_statistics
    from .sensitivity import measure_output_fisher

    if strategy not in STRATEGIES:
        raise LowrankError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    started = time.perf_counter()
    check_feasible(targets, budget, count_parameters(model), limits, overrides)  # before any slow work
    stats = fisher = None
    if needs_spectra(strategy) and needs_statistics(method):
        if windows is None:
            raise LowrankError(f"strategy {strategy} with method {method} needs calibration text; pass --calib")
        stats = collect_stats(model, targets, windows, batch_size=batch_size, progress=progress)
    if strategy == "sensitivity":
        if windows is None:
            raise LowrankError("the sensitivity strategy needs calibration text; pass --calib")
        if sensitivity_samples < 1:
            raise LowrankError(f"--sensitivity-samples must be at least 1, got {sensitivity_samples}")
        fisher = measure_output_fisher(model, targets, windows[:sensitivity_samples],
                                       batch_size=max(1, min(batch_size, 4)), progress=progress)
    plan = build_plan(model, targets, budget, strategy, stats=stats, fisher=fisher, method=method, limits=limits,
                      overrides=overrides, damping=damping, source=source, progress=progress)
    plan.options["planning_seconds"] = round(time.perf_counter() - started, 3)
    if fisher is not None:
        plan.options["sensitivity_samples"] = min(sensitivity_samples, windows.shape[0])
    return plan, stats
