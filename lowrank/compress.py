"""One-shot compression: statistics from the dense model, a plan, then factors swapped in."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__, hf_integration
from .budget import RankLimits
from .calibration import ActivationStats, collect_stats
from .errors import LowrankError
from .factorize import DEFAULT_DAMPING, METHODS, Whitening, factorize, whitening
from .layers import LowRankLinear, replace_module
from .plan import Plan
from .planner import check_ratio, default_strategy, plan_model, plan_uniform
from .targets import Target, find_targets, weight_matrix
from .verify import check_finite_weights

log = logging.getLogger(__name__)


def count_parameters(model: nn.Module) -> int:
    """Every distinct parameter of the model (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


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


def needs_statistics(method: str) -> bool:
    return method in ("whiten", "asvd")


def apply_plan(
    model: nn.Module,
    plan: Plan,
    stats: dict[str, ActivationStats] | None,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
) -> None:
    """Replace every factored module of the plan by a LowRankLinear holding its factors."""
    if plan.method not in METHODS:
        raise LowrankError(f"unknown method {plan.method!r}; choose one of {', '.join(METHODS)}")
    whitenings: dict[int, Whitening] = {}  # one whitening per shared input
    factored = [(name, rank) for name, rank in plan.factored.items()]
    for name, rank in tqdm(factored, desc="Factoring", unit="matrix", disable=not progress):
        module = model.get_submodule(name)
        weight = weight_matrix(module).detach()
        layer_stats = stats.get(name) if stats else None
        white = None
        if plan.method == "whiten" and layer_stats is not None:
            key = id(layer_stats)
            if key not in whitenings:
                whitenings[key] = whitening(layer_stats.gram, damping, name)
            white = whitenings[key]
        factors = factorize(
            plan.method,
            weight,
            rank,
            gram=layer_stats.gram if layer_stats is not None else None,
            mean_abs=layer_stats.mean_abs if layer_stats is not None else None,
            damping=damping,
            name=name,
            white=white,
        )
        new = LowRankLinear.from_factors(factors, bias=module.bias, dtype=weight.dtype, device=weight.device)
        if not all(torch.isfinite(p).all() for p in new.parameters()):
            raise LowrankError(f"factoring {name} produced NaN or Inf; check the weights of that module")
        replace_module(model, name, new)
    hf_integration.attach(model, plan.factored, plan.method)


def compress_model(
    model: nn.Module,
    *,
    ratio: float = 0.8,
    method: str = "whiten",
    windows: torch.Tensor | None = None,
    plan: Plan | None = None,
    include: str | None = None,
    exclude: str | None = None,
    round_to: int = 1,
    batch_size: int = 8,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
    source: str | None = None,
    sequential: bool = True,
    update: bool | None = None,
    device: torch.device | str | None = None,
    strategy: str | None = None,
    budget: "str | float | None" = None,
    limits: "RankLimits | None" = None,
    overrides: "dict | list[str] | None" = None,
) -> Plan:
    """Compress `model` in place and return the Plan it followed.

    `sequential` (the default) takes each block's statistics from the already-compressed blocks
    before it (lowrank.sequential); `update` (default: on when sequential) then refits each factor
    `up` by least squares. There,
    `device` (default: the model's) receives one block at a time, so the model may stay on CPU.

    `windows` (calibration token ids, shape (n, seq_len)) are needed by whiten and asvd.
    Without a `plan`, the planner picks ranks by `strategy` (default: `default_strategy(method, model)`) under `budget`
    (lowrank.budget; default: `ratio` of the target parameters), within `limits` and `overrides`.
    """
    if method not in METHODS:
        raise LowrankError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_finite_weights(model)  # NaN/Inf would otherwise surface later, far from its source
    for flag, pattern in (("--include", include), ("--exclude", exclude)):
        try:
            re.compile(pattern or "")
        except re.error as exc:
            raise LowrankError(f"{flag} {pattern!r} is not a valid regular expression ({exc})") from None
    targets = find_targets(model, include, exclude)
    planning_stats = None  # statistics the planner collected, reused for factoring
    if plan is None:
        plan, planning_stats = plan_model(
            model, targets, check_ratio(ratio) if budget is None else budget, strategy or default_strategy(method, model),
            windows=windows, method=method,
            limits=limits or RankLimits(round_to=round_to), overrides=overrides, batch_size=batch_size,
            damping=damping, source=source, progress=progress)
    else:
        check_plan_matches(plan, targets)
        plan.method = method
        if plan.model_params is None:
            plan.model_params = count_parameters(model)
    stats = None
    if needs_statistics(method):
        if windows is None:
            raise LowrankError(f"method {method} needs calibration text; pass --calib or use --method svd")
        if sequential:
            from .sequential import compress_sequential

            del planning_stats  # the dense model's statistics: sequential compression collects its own
            return compress_sequential(model, plan, windows, method=method, update=update is not False, device=device,
                                       batch_size=batch_size, damping=damping, progress=progress)
        if update:
            raise LowrankError("--update refits factors on the compressed blocks' inputs, which one-shot compression "
                               "does not produce; add --sequential")
        wanted = [t for t in targets if t.name in plan.factored]
        stats = planning_stats or collect_stats(model, wanted, windows, batch_size=batch_size, progress=progress)
    elif update:
        raise LowrankError(f"--update refits factors on calibration statistics, which method {method} does not "
                           "use; pass --method whiten or --no-update")
    apply_plan(model, plan, stats, damping=damping, progress=progress)
    return plan
