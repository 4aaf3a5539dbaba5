"""Choosing ranks under a parameter budget: the plan stage, pure arithmetic on a Profile.

Numbers in (each matrix's shape and spectrum, with loss prices, from `lowrank.profile`; a
`budget.Budget`, `RankLimits` and overrides), a `Plan` out: no model, no calibration, no autograd,
so one profile plans any budget in milliseconds. Four strategies turn a budget (see `budget`) into one rank per target matrix:

- `uniform`: SVD-LLM's rule; every m×n matrix keeps the same fraction r of its parameters,
  k = ⌊r·mn/(m+n)⌋.
- `energy`: every matrix keeps the same fraction of its whitened energy Σσⱼ²(W·S).
- `global`: minimize the total *relative* output error Σᵢ (Σ_{j>kᵢ} σᵢⱼ²) / ‖WᵢSᵢ‖²_F. Dropping
  whitened direction j costs σⱼ² of squared output error, but matrices' errors are not on one
  scale: dividing by each matrix's whitened energy puts them on one (raw σ² allocates far worse
  than uniform).
- `sensitivity`: minimize the estimated rise of the model's loss, Σᵢ Σ_{j>kᵢ} σᵢⱼ² · uᵢⱼᵀ Fᵢ uᵢⱼ,
  with Fᵢ the output Fisher measured by `sensitivity` (the profile's loss prices).

`global` and `sensitivity` share one allocator: each matrix's options (every allowed rank, and
dense) are points (parameters, loss); the lower convex hull of those points lists the purchases
worth making, and a single greedy pass buys hull segments in order of loss removed per parameter
until the budget runs out. Dense is just the last option, so a matrix whose useful rank would
save nothing is kept dense. A larger budget buys a longer prefix of the same list, so no rank
ever shrinks when the budget grows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch import nn

from .budget import Budget, Override, RankLimits, parse_overrides
from .errors import BudgetError, LowrankError
from .model_info import is_causal_lm
from .plan import ModulePlan, Plan, module_plan
from .profile import MatrixProfile, Profile
from .ranks import check_ratio, uniform_rank
from .speed_model import SpeedTable, speed_caps
from .version import __version__

class Matrix(Protocol):
    """What the planner knows of a target matrix: its name and (out, in) shape (a Target or a MatrixProfile)."""

    name: str
    shape: tuple[int, int]
    out_features: int
    in_features: int
    params: int


STRATEGIES = ("uniform", "energy", "global", "sensitivity")
#: The strategy used with method whiten when none is named. benchmarks/bench_planner.py chose it:
#: on SmolLM2-135M it beat uniform by 54% in perplexity at ratio 0.8 and by 35% at 0.6.
DEFAULT_STRATEGY = "sensitivity"


#: The default for encoders (not causal LMs): on all-MiniLM-L6-v2, sensitivity priced by the sentence
#: embedding (lowrank.embedding_prices) kept the embeddings closest to the dense ones, ahead of global
#: and uniform at ratios 0.9 and 0.8 (reports/encoders.md).
ENCODER_STRATEGY = "sensitivity"


def default_strategy(method: str, model: nn.Module | None = None) -> str:
    """DEFAULT_STRATEGY for whiten, whose whitened spectra the strategies were measured on; uniform otherwise.

    A `model` that is not a causal language model (BERT, a sentence encoder) gets ENCODER_STRATEGY,
    the strategy measured best on a real encoder.
    """
    if method != "whiten":
        return "uniform"
    if model is not None and not is_causal_lm(model):
        return ENCODER_STRATEGY
    return DEFAULT_STRATEGY


def needs_spectra(strategy: str) -> bool:
    """Every strategy but uniform chooses ranks from the matrices' spectra."""
    return strategy != "uniform"


def plan_uniform(targets: list[Matrix], ratio: float, round_to: int = 1) -> dict[str, ModulePlan]:
    """SVD-LLM's uniform allocation: the same kept fraction for every matrix (targets: name and shape)."""
    check_ratio(ratio)
    return {
        t.name: module_plan(t.shape, uniform_rank(t.shape[0], t.shape[1], ratio, round_to))
        for t in targets
    }


# ---- what each dropped direction costs -----------------------------------------------------

def direction_loss(spectrum: MatrixProfile, strategy: str) -> np.ndarray:
    """What dropping each direction costs under `strategy` (non-negative, in SVD order)."""
    energy = (spectrum.planning ** 2).cpu().numpy()  # σⱼ², descending
    if strategy in ("energy", "global"):
        total = float(energy.sum())
        return energy / total if total > 0 else np.zeros_like(energy)
    if strategy == "sensitivity":
        if spectrum.price is None:
            raise LowrankError("the sensitivity strategy needs output Fisher statistics; "
                               "measure them with lowrank.sensitivity.measure_output_fisher")
        return energy * np.clip(spectrum.price.cpu().numpy(), 0.0, None)
    raise LowrankError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


# ---- options per matrix ------------------------------------------------------------------

@dataclass
class Options:
    """One matrix's choices, ascending in cost: the allowed ranks, then dense (rank None) if allowed."""

    ranks: list[int | None]
    costs: np.ndarray  # parameters of each option
    losses: np.ndarray | None = None  # loss left by each option (None for uniform)


def matrix_options(shape: tuple[int, int], limits: RankLimits, loss: np.ndarray | None = None,
                   speed_cap: int | None = None) -> Options:
    """Every allowed rank (and dense) of an m×n matrix, with cost k(m+n) (mn) and tail loss Σ_{j≥k}.

    `speed_cap` (plan --speed): ranks above it are slower than dense on the device, so dense replaces them.
    """
    m, n = shape
    ranks: list[int | None] = list(limits.ranks(shape))
    if speed_cap is not None and limits.allows_dense():
        ranks = [k for k in ranks if k <= speed_cap]
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


def split_overrides(targets: list[Matrix], overrides: list[Override], limits: RankLimits
                    ) -> tuple[dict[str, ModulePlan], list[Matrix]]:
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


def smallest_allowance(targets: list[Matrix], limits: RankLimits, overrides: list[Override]) -> int:
    """The fewest target parameters any plan within `limits` and `overrides` can keep."""
    fixed, free = split_overrides(targets, overrides, limits)
    for t in free:
        if not limits.ranks(t.shape) and not limits.allows_dense():
            raise BudgetError(f"{t.name} ({t.shape[0]}×{t.shape[1]}) has no rank allowed by --min-rank "
                              f"{limits.min_rank}, --max-rank {limits.max_rank} and --round-to {limits.round_to} "
                              "that saves parameters; loosen those limits or override the module")
    return sum(p.params for p in fixed.values()) + sum(int(matrix_options(t.shape, limits).costs[0]) for t in free)


def check_feasible(targets: list[Matrix], budget: "Budget | str | float", model_params: int | None,
                   limits: RankLimits | None = None, overrides=None) -> int:
    """The target allowance of `budget`; a BudgetError naming the smallest feasible budget if it is too small."""
    budget = Budget.parse(budget)
    target_params = sum(t.params for t in targets)
    allowance = budget.allowance(target_params, model_params)
    smallest = smallest_allowance(targets, limits or RankLimits(), parse_overrides(overrides))
    if smallest > allowance:
        raise _infeasible(smallest, budget, target_params, model_params)
    return allowance


def allocate_uniform(targets: list[Matrix], allowance: int, limits: RankLimits,
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


def allocate_energy(targets: list[Matrix], options: dict[str, Options], spectra: dict[str, MatrixProfile],
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


def allocate_greedy(targets: list[Matrix], options: dict[str, Options], allowance: int) -> dict[str, ModulePlan]:
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
    targets: list[Matrix],
    allowance: int,
    strategy: str = DEFAULT_STRATEGY,
    spectra: dict[str, MatrixProfile] | None = None,
    limits: RankLimits | None = None,
    overrides: "list[Override] | dict | list[str] | None" = None,
    budget: Budget | None = None,
    model_params: int | None = None,
    speed: SpeedTable | None = None,
) -> dict[str, ModulePlan]:
    """Ranks for `targets` that keep at most `allowance` target parameters, chosen by `strategy`.

    `spectra` (a Profile's matrices by name) are needed by every strategy but uniform. With `speed`
    (measured timings), no matrix gets a rank whose factored form is slower than dense. Raises a
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
        if speed is not None:
            raise LowrankError("--speed trades ranks between matrices, which the uniform strategy does not; "
                               "pass --strategy sensitivity, global or energy")
        exact = budget is not None and budget.scope == "target" and budget.kind == "fraction" and not fixed
        plans = allocate_uniform(free, left, limits, budget.value if exact else None)
    else:
        if spectra is None:
            raise LowrankError(f"strategy {strategy} needs the matrices' spectra; profile the model first "
                               "(lowrank.profiling.profile_model, or `lowrank profile`)")
        caps = speed_caps(free, speed)
        options = {t.name: matrix_options(t.shape, limits, direction_loss(spectra[t.name], strategy), caps[t.name])
                   for t in free}
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


def plan_targets(
    targets: list[Matrix],
    model_params: int | None,
    budget: "Budget | str | float",
    strategy: str = DEFAULT_STRATEGY,
    *,
    spectra: dict[str, MatrixProfile] | None = None,
    method: str = "whiten",
    limits: RankLimits | None = None,
    overrides: "list[Override] | dict | list[str] | None" = None,
    source: str | None = None,
    speed: SpeedTable | None = None,
) -> Plan:
    """A Plan for `targets` (name and shape each) under `budget`, recording the budget, limits and planning time.

    `spectra` (a Profile's matrices by name) are needed by every strategy but uniform, with loss
    prices for sensitivity.
    """
    started = time.perf_counter()
    budget = Budget.parse(budget)
    limits = limits or RankLimits()
    overrides = parse_overrides(overrides)
    if strategy == "sensitivity" and (spectra is None or any(s.price is None for s in spectra.values())):
        raise LowrankError("the sensitivity strategy needs output Fisher statistics; "
                           "measure them with lowrank.sensitivity.measure_output_fisher")
    target_params = sum(t.params for t in targets)
    allowance = budget.allowance(target_params, model_params)
    modules = allocate(targets, allowance, strategy, spectra, limits, overrides, budget, model_params, speed)
    options: dict[str, Any] = {**limits.to_dict(), "planning_seconds": round(time.perf_counter() - started, 3)}
    if speed is not None:  # the table is stored, so planning again from it gives the same ranks
        options.update(speed=True, timings=speed.to_dict())
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


def plan_profile(
    profile: Profile,
    budget: "Budget | str | float",
    strategy: str = DEFAULT_STRATEGY,
    *,
    method: str = "whiten",
    limits: RankLimits | None = None,
    overrides: "list[Override] | dict | list[str] | None" = None,
    speed: SpeedTable | None = None,
) -> Plan:
    """Plan from a saved or fresh Profile: numbers in, ranks out; no model, no calibration."""
    if strategy not in STRATEGIES:
        raise LowrankError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    matrices = profile.matrices
    if method == "svd" and profile.whitened:  # plain SVD truncates W itself: plan on σ(W), as planning on the model does
        if strategy == "sensitivity":
            raise LowrankError("the profile's loss prices belong to whitened directions, which method svd does not "
                               "truncate; pass --strategy global, or --method whiten")
        matrices = [MatrixProfile(m.name, m.shape, m.sigma, rank=m.rank) for m in matrices]
    if strategy == "sensitivity" and not profile.priced:
        raise LowrankError("the sensitivity strategy needs loss prices, which this profile lacks (it was made "
                           "without calibration text or from a model that is not a causal LM); "
                           "pass --strategy global or profile with --calib")
    plan = plan_targets(matrices, profile.model_params, budget, strategy,
                        spectra={m.name: m for m in matrices}, method=method, limits=limits,
                        overrides=overrides, source=profile.source, speed=speed)
    for key in ("samples", "seq_len", "seed", "calibration", "sensitivity_samples"):
        if key in profile.options:
            plan.options[key] = profile.options[key]
    plan.options["profile"] = profile.fingerprint
    return plan
