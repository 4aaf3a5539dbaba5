"""One-shot compression: statistics from the dense model, a plan, then factors swapped in."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__, hf_integration
from .calibration import ActivationStats, collect_stats
from .errors import LowrankError
from .factorize import DEFAULT_DAMPING, METHODS, Whitening, factorize, whitening
from .layers import LowRankLinear, replace_module
from .plan import Plan
from .planner import plan_uniform
from .targets import Target, find_targets, weight_matrix

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
) -> Plan:
    """Compress `model` in place and return the Plan it followed.

    `windows` (calibration token ids, shape (n, seq_len)) are needed by whiten and asvd.
    Without a `plan`, ranks follow the uniform rule at `ratio`.
    """
    if method not in METHODS:
        raise LowrankError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    targets = find_targets(model, include, exclude)
    if plan is None:
        plan = uniform_plan(model, targets, ratio, method, round_to, source)
    else:
        check_plan_matches(plan, targets)
        plan.method = method
        if plan.model_params is None:
            plan.model_params = count_parameters(model)
    stats = None
    if needs_statistics(method):
        if windows is None:
            raise LowrankError(f"method {method} needs calibration text; pass --calib or use --method svd")
        wanted = [t for t in targets if t.name in plan.factored]
        stats = collect_stats(model, wanted, windows, batch_size=batch_size, progress=progress)
    apply_plan(model, plan, stats, damping=damping, progress=progress)
    return plan
