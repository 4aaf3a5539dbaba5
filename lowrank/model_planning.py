"""The plan stage on a model in memory: profile what the strategy needs, then hand the numbers to the
pure planner (`lowrank.planner`); also the plans that need no profile (uniform) and the checks that a
plan fits the model it is applied to.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from .budget import Budget, Override, RankLimits
from .calibration import ActivationStats, window_count
from .errors import LowrankError
from .factorize import DEFAULT_DAMPING
from .layers import LowRankLinear
from .model_info import count_parameters
from .plan import Plan
from .planner import DEFAULT_STRATEGY, STRATEGIES, check_feasible, needs_spectra, plan_targets, plan_uniform
from .profiling import DEFAULT_SENSITIVITY_SAMPLES, measure, profile_model
from .stage_times import stage
from .targets import Target, weight_matrix
from .version import __version__

if TYPE_CHECKING:  # annotations only: speed_model measures matmuls, which planning never needs to import
    from .speed_model import SpeedTable


def needs_statistics(method: str) -> bool:
    """whiten and asvd factor with calibration statistics; svd needs none."""
    return method in ("whiten", "asvd")


def uniform_plan(
    model: nn.Module,
    targets: list[Target],
    ratio: float,
    method: str = "whiten",
    round_to: int = 1,
    source: str | None = None,
) -> Plan:
    """A Plan with SVD-LLM's uniform ranks for `targets`."""
    return Plan(
        modules=plan_uniform(targets, ratio, round_to),
        method=method,
        strategy="uniform",
        budget={"kind": "target_ratio", "value": ratio},
        model_params=count_parameters(model),
        source=source,
        tool_version=__version__,
        options={"round_to": round_to},
    )


def check_plan_matches(plan: Plan, targets: list[Target]) -> None:
    """A plan may only name modules the model has, with the shapes the model has."""
    by_name = {t.name: t for t in targets}
    for name, module_plan in plan.modules.items():
        target = by_name.get(name)
        if target is None:
            raise LowrankError(f"the plan names module {name!r}, which is not a linear layer of this model; "
                               "regenerate the plan for this model with `lowrank plan`")
        if tuple(module_plan.shape) != target.shape:
            raise LowrankError(f"the plan gives {name} shape {list(module_plan.shape)} but the model has "
                               f"{list(target.shape)}; regenerate the plan for this model")


def plan_modules(model: nn.Module, plan: Plan) -> list[Target]:
    """The plan's modules as Targets, read from the model (a named module that is missing is an error)."""
    found = []
    for name in plan.modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LowrankError(f"the plan names module {name!r}, which is not in this model; "
                               "regenerate the plan for this model") from None
        if isinstance(module, LowRankLinear):
            raise LowrankError(f"{name} is already factored; load the dense checkpoint to compress it again")
        out_features, in_features = weight_matrix(module).shape
        found.append(Target(name, out_features, in_features, module.bias is not None))
    return found


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
    speed: "SpeedTable | None" = None,
    reuse_statistics: bool = True,
) -> tuple[Plan, dict[str, ActivationStats] | None]:
    """Profile `targets` where the strategy needs it (calibrate, measure sensitivity), then plan.

    Returns the Plan and the calibration statistics it collected (None if it needed none), so
    that one-shot factoring can reuse them instead of calibrating twice. Where they will not be
    reused (`reuse_statistics=False`: sequential compression calibrates again), the profile takes the
    cheaper output-side statistics where it can (`calibration.output_side`), and returns None.
    """
    if strategy not in STRATEGIES:
        raise LowrankError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    started = time.perf_counter()
    model_params = count_parameters(model)
    check_feasible(targets, budget, model_params, limits, overrides)  # before any slow work
    statistics = needs_spectra(strategy) and needs_statistics(method)
    if statistics and windows is None:
        raise LowrankError(f"strategy {strategy} with method {method} needs calibration text; pass --calib")
    prices = strategy == "sensitivity"
    if prices and windows is None:
        raise LowrankError("the sensitivity strategy needs calibration text; pass --calib")
    stats = fisher = None
    if statistics or prices:
        stats, fisher = measure(model, targets, windows, statistics=statistics, prices=prices, batch_size=batch_size,
                                sensitivity_samples=sensitivity_samples, damping=damping, progress=progress,
                                output_stats=not reuse_statistics)
    spectra = None
    if needs_spectra(strategy):
        with stage("profile_spectra"):
            profile = profile_model(model, targets, stats, fisher, damping=damping, progress=progress, source=source,
                                    plain=False)
        spectra = {m.name: m for m in profile.matrices}
        del profile, fisher
    with stage("planning"):
        plan = plan_targets(targets, model_params, budget, strategy, spectra=spectra, method=method, limits=limits,
                            overrides=overrides, source=source, speed=speed)
    plan.options["planning_seconds"] = round(time.perf_counter() - started, 3)
    if prices:
        plan.options["sensitivity_samples"] = min(sensitivity_samples, window_count(windows))
    return plan, stats if reuse_statistics else None
