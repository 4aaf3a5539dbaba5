"""The compression stage: factor the modules a plan names, one group of statistics at a time.

`compress_blocks` is the one factor → replace → (update) loop. It consumes `BlockWork` from a
producer in `lowrank.sequential`: one-shot compression (statistics from the dense model) and
sequential compression (statistics block by block on the compressed path) differ only there.
`compress_model` is the whole pipeline on a model in memory: profile → plan (`model_planning`) → compress.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, hf_integration
from .budget import RankLimits
from .calibration import (DEFAULT_PLAN_SAMPLES, DEFAULT_UPDATE_SAMPLES, ActivationStats, leading_batches,
                          leading_windows, planning_windows, warn_if_thin, window_count)
from .errors import LowrankError
from .factorize import DEFAULT_DAMPING, METHODS, Factors, WhiteningCache, factorize
from .layers import LowRankLinear, replace_module
from .model_info import count_parameters
from .plan import Plan
from .model_planning import check_plan_matches, needs_statistics, plan_model, plan_modules
from .planner import default_strategy
from .profiling import DEFAULT_SENSITIVITY_SAMPLES
from .ranks import check_ratio
from .refinement import Average, RefineOptions, refine_block
from .stage_times import recording, stage, summary
from .sequential import BlockWork, dense_statistics, peak_memory_mib, sequential_statistics
from .targets import Target, find_targets, weight_matrix
from .update import update_block
from .verify import check_finite_weights

log = logging.getLogger(__name__)

__all__ = ["compress_model", "compress_with_plan", "compress_blocks", "compress_sequential", "apply_plan"]


# ---- the factor → replace → update loop --------------------------------------------------------------

def _factor_modules(model: nn.Module, plan: Plan, work: BlockWork, damping: float, progress: bool) -> None:
    """Replace every module of `work` by a LowRankLinear holding its factors."""
    # one whitening per shared input; a sequential block's statistics are its own (nobody reads them after), so
    # there each Gram is freed once whitened and each whitening after its last reader: one alive at a time
    owned = work.block is not None and work.stats and plan.method == "whiten"
    whitenings = WhiteningCache(damping, [work.stats[n] for n in work.names if n in work.stats] if owned else None)
    bar = tqdm(total=len(work.names), desc="Factoring", unit="matrix", disable=not progress)

    def factor(name: str) -> list[torch.Tensor]:
        weight = weight_matrix(model.get_submodule(name)).detach()
        layer_stats = work.stats.get(name) if work.stats else None
        white = None
        if plan.method == "whiten" and layer_stats is not None:
            white = whitenings.get(layer_stats, name)
        factors = factorize(
            plan.method,
            weight,
            plan.factored[name],
            gram=layer_stats.gram if layer_stats is not None else None,
            mean_abs=layer_stats.mean_abs if layer_stats is not None else None,
            damping=damping,
            name=name,
            white=white,
        )
        if white is not None:
            whitenings.done(layer_stats)
        bar.update()
        return [factors.down.to(torch.float64).contiguous(), factors.up.to(torch.float64).contiguous()]

    def receive(name: str) -> list[torch.Tensor]:  # another rank factors it (distributed runs)
        out_features, in_features = weight_matrix(model.get_submodule(name)).shape
        device, rank = model.get_submodule(name).weight.device, min(plan.factored[name], out_features, in_features)
        return [torch.empty(rank, in_features, dtype=torch.float64, device=device),
                torch.empty(out_features, rank, dtype=torch.float64, device=device)]

    get = factor  # one process: factor each module as it is replaced
    if distributed.active():  # several: each rank factors its share, then all receive every module's factors
        costs = [float(math.prod(weight_matrix(model.get_submodule(n)).shape)) * plan.factored[n] for n in work.names]
        get = distributed.computed_by_owner(work.names, costs, factor, receive).pop
    for name in work.names:
        module = model.get_submodule(name)
        weight = weight_matrix(module).detach()
        factors = Factors(*get(name))
        new = LowRankLinear.from_factors(factors, bias=module.bias, dtype=weight.dtype, device=weight.device)
        if not all(torch.isfinite(p).all() for p in new.parameters()):
            raise LowrankError(f"factoring {name} produced NaN or Inf; check the weights of that module")
        replace_module(model, name, new)
    bar.close()


def _dense_copy(block: nn.Module) -> nn.Module:
    """The block as it is now, for the update: new modules over the same tensors (factoring replaces modules and
    never writes into a dense weight), so the dense weights are not copied, only kept."""
    shared = {id(t): t for t in [*block.parameters(), *block.buffers()]}
    return copy.deepcopy(block, shared)


def compress_blocks(
    model: nn.Module,
    plan: Plan,
    work: Iterable[BlockWork],
    *,
    update: bool = False,
    update_target: str = "dense",
    damping: float = DEFAULT_DAMPING,
    progress: bool = False,
    refine: RefineOptions | None = None,
    refine_average: Average | None = None,
) -> None:
    """Factor each group of modules the producer `work` yields, refit `up` where `update`, then mark the model.

    `update` needs the block a group lives in (sequential producers give it): every factor `up` is
    refitted by ridge least squares against the dense block (see `update.update_block`). `refine`
    then trains the block's factors against the dense block's outputs, where the producer gives
    them (`BlockWork.dense_outputs`; see `refinement.refine_block`); in a distributed run
    `refine_average` averages its gradients and errors across ranks (an all-reduce).
    """
    if plan.method not in METHODS:
        raise LowrankError(f"unknown method {plan.method!r}; choose one of {', '.join(METHODS)}")
    producer = iter(work)
    try:
        for block_work in producer:
            dense_block = _dense_copy(block_work.block) if update and block_work.block is not None else None
            with stage("compress_factor"):
                _factor_modules(model, plan, block_work, damping, progress)
            block_work.stats = None
            if dense_block is not None:
                relative = {n[len(block_work.prefix):]: plan.factored[n] for n in block_work.names}
                kept = [{n[len(block_work.prefix):]: x for n, x in batch.items()} for batch in block_work.dense_inputs]
                with stage("compress_update"):
                    fitted = slice(block_work.update_batches)  # the leading batches the update fits on
                    update_block(dense_block, block_work.block, relative, block_work.inputs[fitted],
                                 block_work.calls[fitted], block_work.device, target=update_target,
                                 dense_inputs=kept if update_target == "dense" else None,
                                 both_rounds=refine.refit_rounds if refine is not None else 0)
                del dense_block, kept
            block_work.dense_inputs = []
            if refine is not None and refine.enabled and block_work.dense_outputs is not None:
                result = refine_block(block_work.dense_outputs, block_work.block, block_work.inputs, block_work.calls,
                                      refine, block_work.device, average=refine_average)
                if result is not None:
                    plan.options.setdefault("refine_errors", {})[block_work.prefix.rstrip(".")] = [
                        float(f"{result.before:.6g}"), float(f"{result.after:.6g}"), result.best_step]
    finally:
        close = getattr(producer, "close", None)  # a generator producer: run its clean-up now, even on failure
        if close is not None:
            close()
    hf_integration.attach(model, plan.factored, plan.method)


def apply_plan(
    model: nn.Module,
    plan: Plan,
    stats: dict[str, ActivationStats] | None,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
) -> None:
    """One-shot: replace every factored module of the plan by a LowRankLinear, from the given statistics."""
    compress_blocks(model, plan, [BlockWork(list(plan.factored), stats)], damping=damping, progress=progress)


@torch.no_grad()
def compress_sequential(
    model: nn.Module,
    plan: Plan,
    windows: torch.Tensor,
    method: str = "whiten",
    update: bool = False,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
    update_target: str = "dense",
    refine: RefineOptions | None = None,
    update_samples: int = DEFAULT_UPDATE_SAMPLES,
) -> Plan:
    """Compress `model` in place, block by block, following `plan`; return the plan.

    Each block's statistics come from the outputs of the already-compressed blocks before it.
    `update` refits every factor `up` by ridge least squares against the dense block (SVD-LLM's
    parameter update; `update_target` says against what, see `update.update_block`); `refine` then
    trains each block's factors against the dense block's outputs (lowrank.refinement). The update
    fits on the first `update_samples` windows (0: all), the statistics use all of them. Blocks are
    moved to `device` (default: where the model is) one at a time and back afterwards;
    calibration activations stay on CPU.
    """
    if not needs_statistics(method):
        raise LowrankError(f"sequential compression needs calibration statistics, which method {method} does "
                           "not use; pass --one-shot or --method whiten")
    if windows is None or window_count(windows) == 0:
        raise LowrankError("sequential compression needs calibration text; pass --calib")
    plan.method = method
    targets = {t.name: t for t in plan_modules(model, plan)}
    check_plan_matches(plan, list(targets.values()))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    refining = refine is not None and refine.enabled
    fitted = distributed.my_count(leading_batches(windows, batch_size, update_samples))  # this rank's share
    work = sequential_statistics(model, plan, targets, windows, batch_size, device, progress, dense_stream=refining,
                                 keep_inputs=bool(update) and update_target == "dense", update_batches=fitted)
    compress_blocks(model, plan, work, update=update, update_target=update_target, damping=damping, refine=refine,
                    refine_average=distributed.average_refinement if distributed.active() else None)
    plan.options.update({"sequential": True, "update": bool(update)})
    if update:
        plan.options["update_target"] = update_target
        plan.options["update_samples"] = leading_windows(windows, batch_size, update_samples)
    if refine is not None and refine.recorded:
        plan.options["refine"] = refine.record()
    peak = peak_memory_mib(device)
    log.info("sequential compression: peak %s memory %.0f MiB", device.type, peak)
    if progress:
        tqdm.write(f"sequential compression: peak {'GPU' if device.type == 'cuda' else 'process'} memory {peak:,.0f} MiB")
    return plan


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
    refine: RefineOptions | None = None,
    plan_samples: int = DEFAULT_PLAN_SAMPLES,
    update_samples: int = DEFAULT_UPDATE_SAMPLES,
    sensitivity_samples: int = DEFAULT_SENSITIVITY_SAMPLES,
) -> Plan:
    """Compress `model` in place and return the Plan it followed: profile → plan → compress.

    `sequential` (the default) takes each block's statistics from the already-compressed blocks
    before it; `update` (default: on when sequential) then refits each factor `up` by least
    squares. There, `device` (default: the model's) receives one block at a time, so the model may
    stay on CPU. `refine` (sequential only) trains each block's factors against the dense block.

    `windows` (calibration token ids, shape (n, seq_len)) are needed by whiten and asvd; sequential
    compression plans from the first `plan_samples` of them and fits its update on the first
    `update_samples` (0: all); the sensitivity planner backpropagates the first `sensitivity_samples`.
    Without a `plan`, the planner picks ranks by `strategy` (default: `default_strategy(method, model)`)
    under `budget` (lowrank.budget; default: `ratio` of the target parameters), within `limits`
    and `overrides`.
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
    if windows is not None and method == "whiten":  # asvd scales by Σ|x|, which stays defined
        warn_if_thin(windows, targets)
    with recording() as seconds:  # plan.options["stage_seconds"]: where the time went
        plan = _profile_plan_compress(model, plan, targets, ratio=ratio, method=method, windows=windows,
                                      round_to=round_to, batch_size=batch_size, damping=damping, progress=progress,
                                      source=source, sequential=sequential, update=update, device=device,
                                      strategy=strategy, budget=budget, limits=limits, overrides=overrides,
                                      refine=refine, plan_samples=plan_samples, update_samples=update_samples,
                                      sensitivity_samples=sensitivity_samples)
    plan.options["stage_seconds"] = summary(seconds)
    return plan


def _profile_plan_compress(model: nn.Module, plan: Plan | None, targets: list[Target], *, ratio, method, windows,
                           round_to, batch_size, damping, progress, source, sequential, update, device, strategy,
                           budget, limits, overrides, refine, plan_samples, update_samples,
                           sensitivity_samples) -> Plan:
    """compress_model's stages: plan (profiling where the strategy needs it) unless given, then compress.

    Sequential compression calibrates again on the compressed path, so its planner profiles only the first
    `plan_samples` windows; one-shot factoring reuses the profile's statistics, so it profiles them all.
    """
    planning_stats = None  # statistics the profile collected, reused by one-shot factoring
    if plan is None:
        profiled = planning_windows(windows, plan_samples) if sequential and windows is not None else windows
        plan, planning_stats = plan_model(
            model, targets, check_ratio(ratio) if budget is None else budget,
            strategy or default_strategy(method, model), windows=profiled, method=method,
            limits=limits or RankLimits(round_to=round_to), overrides=overrides, batch_size=batch_size,
            damping=damping, source=source, progress=progress, reuse_statistics=not sequential,
            sensitivity_samples=sensitivity_samples)
        if sequential and windows is not None:
            plan.options["plan_samples"] = window_count(profiled)
    else:
        check_plan_matches(plan, targets)
        plan.method = method
        if plan.model_params is None:
            plan.model_params = count_parameters(model)
    with stage("compress"):
        return compress_with_plan(model, plan, targets, windows=windows, method=method, sequential=sequential,
                                  update=update, device=device, batch_size=batch_size, damping=damping,
                                  progress=progress, stats=planning_stats, refine=refine, update_samples=update_samples)


def compress_with_plan(
    model: nn.Module,
    plan: Plan,
    targets: list[Target],
    *,
    windows: torch.Tensor | None = None,
    method: str = "whiten",
    sequential: bool = True,
    update: bool | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
    stats: dict[str, ActivationStats] | None = None,
    refine: RefineOptions | None = None,
    update_samples: int = DEFAULT_UPDATE_SAMPLES,
) -> Plan:
    """The compress stage: follow `plan` on `model` (whose `targets` it was checked against), in place.

    Sequential (block by block on the compressed path, `update` on by default) or one-shot (the
    dense model's statistics: `stats` if the profile stage already collected them). `refine`
    (sequential only) trains each block's factors against the dense block's outputs.
    """
    if refine is not None and refine.enabled and not (sequential and needs_statistics(method)):
        raise LowrankError("--refine-steps trains each block against the dense block on calibration windows, "
                           "block by block; add --sequential and --method whiten, or drop --refine-steps")
    if needs_statistics(method):
        if windows is None:
            raise LowrankError(f"method {method} needs calibration text; pass --calib or use --method svd")
        if sequential:
            del stats  # the dense model's statistics: sequential compression collects its own
            return compress_sequential(model, plan, windows, method=method, update=update is not False, device=device,
                                       batch_size=batch_size, damping=damping, progress=progress, refine=refine,
                                       update_samples=update_samples)
        if update:
            raise LowrankError("--update refits factors on the compressed blocks' inputs, which one-shot compression "
                               "does not produce; add --sequential")
    elif update:
        raise LowrankError(f"--update refits factors on calibration statistics, which method {method} does not "
                           "use; pass --method whiten or --no-update")
    else:
        windows = None  # method svd factors without statistics
    plan.method = method
    work = dense_statistics(model, plan, targets, windows, batch_size, progress, stats=stats)
    compress_blocks(model, plan, work, damping=damping, progress=progress)
    return plan
