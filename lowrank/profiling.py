"""The profiling stage: measure a model in memory and turn the measurements into a Profile.

Calibration windows give each target's input Gram matrix (`calibration.collect_stats`), a few
backward passes its output Fisher (`sensitivity.measure_output_fisher`); from them this module
computes the vectors a `Profile` keeps: σ(W), the whitened σ(W·S) and, with a Fisher, the loss
price uⱼᵀFuⱼ of each whitened direction uⱼ. Singular values alone come from batched symmetric
eigensolves (`spectrum.gram_svdvals`); where prices are wanted the directions are needed too, and
then σ and u come from one SVD, so that each σⱼ is paired with its own uⱼ.
"""

from __future__ import annotations

import re
from contextlib import nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .calibration import (ActivationStats, OutputStats, StatsCollector, collect_stats, first_windows, output_side,
                          window_count, windows_after)
from .embedding_prices import DEFAULT_PROBES, DirectionPrices, measure_embedding_prices, whitened_basis
from .encoders import is_encoder
from .errors import LowrankError
from .factorize import DEFAULT_DAMPING, WhiteningCache, output_side_spectrum, reciprocal_or_zero, top_singular
from .layers import LowRankLinear
from .model_info import count_parameters
from .profile import MatrixProfile, Profile
from .sensitivity import OutputFisher, direction_costs, measure_output_fisher
from .spectrum import DEFAULT_BATCH_BYTES, ShapeBatcher
from .stage_times import stage
from .targets import Target, find_targets, name_filter, weight_matrix

#: Calibration windows that the sensitivity prices backpropagate through.
DEFAULT_SENSITIVITY_SAMPLES = 8


def module_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a module applies, merged from its factors when it is a LowRankLinear."""
    if isinstance(module, LowRankLinear):
        return module.merged_weight()
    return weight_matrix(module)


def targets_of(model: nn.Module, include: str | None = None, exclude: str | None = None) -> list[Target]:
    """The matrices to profile: find_targets, with a compressed model's LowRankLinear counted as one."""
    lowrank = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not lowrank:
        return find_targets(model, include, exclude)
    targets = []
    for target in find_targets(model, include, exclude):
        parent, _, leaf = target.name.rpartition(".")
        if parent in lowrank and leaf in ("down", "up"):
            continue  # a factor: its LowRankLinear is profiled instead
        targets.append(target)
    wanted = name_filter(include, exclude)
    targets += [Target(name, m.out_features, m.in_features, m.bias is not None)
                for name, m in lowrank.items() if wanted(name)]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(targets, key=lambda t: order[t.name])


def measure(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    *,
    statistics: bool = True,
    prices: bool = False,
    batch_size: int = 8,
    sensitivity_samples: int = DEFAULT_SENSITIVITY_SAMPLES,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
    output_stats: bool = False,
) -> tuple[dict[str, ActivationStats | OutputStats] | None, dict[str, OutputFisher | DirectionPrices] | None]:
    """Input statistics of every target (if `statistics`) and its loss prices (if `prices`) on `windows`.

    The prices of a causal LM are output Fishers from the first `sensitivity_samples` windows; an
    encoder's are exact per-direction prices of its sentence embedding over every window (and
    need the statistics, so they are always collected then). `output_stats`: the targets that
    `calibration.output_side` names get `OutputStats`, enough for their spectra (not for factoring)."""
    if prices and sensitivity_samples < 1:
        raise LowrankError(f"--sensitivity-samples must be at least 1, got {sensitivity_samples}")
    if prices and is_encoder(model):  # exact per-direction prices of the sentence embedding, on every sentence
        stats = collect_stats(model, targets, windows, batch_size=batch_size, progress=progress)
        return stats, embedding_prices(model, targets, windows, stats, damping=damping, batch_size=batch_size,
                                       progress=progress)
    outputs = output_side(model, targets) if output_stats else set()
    fisher = stats = None
    # One forward pass per window: the sensitivity windows' statistics are taken in their backward passes' forward
    with StatsCollector(model, targets, outputs) if statistics else nullcontext() as collector:
        if prices:
            with stage("profile_sensitivity"):
                fisher = measure_output_fisher(model, targets, first_windows(windows, sensitivity_samples),
                                               batch_size=max(1, min(batch_size, 4)), progress=progress,
                                               after_batch=collector.end_batch if statistics else None)
        if statistics:
            with stage("profile_statistics"):
                stats = collect_stats(model, targets, windows_after(windows, sensitivity_samples) if prices else windows,
                                      batch_size=batch_size, progress=progress, into=collector)
    return stats, fisher


def embedding_prices(model: nn.Module, targets: list[Target], windows, stats: dict[str, ActivationStats], *,
                     damping: float = DEFAULT_DAMPING, batch_size: int = 8,
                     progress: bool = True) -> dict[str, DirectionPrices]:
    """An encoder's prices: each target's whitened SVD from `stats`, then its directions priced by the
    squared change of the pooled embedding they cause (lowrank.embedding_prices)."""
    whitenings = WhiteningCache(damping)
    sigmas, bases = {}, {}
    for target in targets:
        white = whitenings.get(stats[target.name], target.name)
        sigmas[target.name], bases[target.name] = whitened_basis(
            module_weight(model.get_submodule(target.name)), white.root, white.inverse)
    prices = measure_embedding_prices(model, targets, windows, bases, batch_size=batch_size, progress=progress)
    samples = window_count(windows) * DEFAULT_PROBES
    return {name: DirectionPrices(sigmas[name], prices[name], samples) for name in prices}


def fisher_matrix(fisher: "torch.Tensor | OutputFisher") -> torch.Tensor:
    """The per-token Fisher matrix, from an OutputFisher or as given."""
    return fisher.mean if isinstance(fisher, OutputFisher) else fisher


def priced_spectrum(weight: torch.Tensor, white, fisher: "torch.Tensor | OutputFisher | DirectionPrices"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """σ of W·S (W without `white`) from one SVD, and the price uⱼᵀ F uⱼ of each left direction uⱼ
    (F: a per-token Fisher matrix or an OutputFisher; an encoder's DirectionPrices already hold both).

    With an input-side OutputFisher (WᵀFW), uⱼ = W·S·vⱼ/σⱼ is priced as aⱼᵀ(WᵀFW)aⱼ with aⱼ = S·vⱼ/σⱼ."""
    if isinstance(fisher, DirectionPrices):
        return fisher.sigma, fisher.price
    product = weight.detach().to(torch.float64)
    if white is not None:
        product = white.whiten(product)
    if isinstance(fisher, OutputFisher) and fisher.side == "input":
        _, sigma, rows = top_singular(product, left=False)
        coefficients = rows.T if white is None else white.root @ rows.T
        return sigma, direction_costs(fisher.mean, coefficients * reciprocal_or_zero(sigma))
    left, sigma, _ = top_singular(product, right=False)
    return sigma, direction_costs(fisher_matrix(fisher), left)


@torch.no_grad()
def profile_model(
    model: nn.Module,
    targets: list[Target] | None = None,
    stats: dict[str, ActivationStats] | None = None,
    fisher: dict[str, OutputFisher] | None = None,
    *,
    damping: float = DEFAULT_DAMPING,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    progress: bool = False,
    source: str | None = None,
    plain: bool = True,
) -> Profile:
    """The Profile of `targets` (default: every target) from a model in memory and its measurements.

    `stats` (from `measure` or `collect_stats`) add the whitened spectra, `fisher` the loss prices.
    `plain=False` skips σ(W) where there are statistics: planning reads only the whitened spectrum,
    and the plain SVDs are a tenth of the profile's time.
    """
    targets = targets if targets is not None else targets_of(model)
    if distributed.active():
        return _profile_spread(model, targets, stats, fisher, damping=damping, batch_bytes=batch_bytes,
                               progress=progress, source=source, plain=plain)
    modules = {t.name: model.get_submodule(t.name) for t in targets}
    weights = {name: module_weight(module).detach() for name, module in modules.items()}
    if stats is not None:
        missing = [name for name in weights if name not in stats]
        if missing:
            raise LowrankError(f"no calibration statistics for {missing[0]}; it never ran during calibration")
    whitenings = WhiteningCache(damping)
    plains, white = ShapeBatcher(batch_bytes), ShapeBatcher(batch_bytes)
    prices: dict[str, torch.Tensor] = {}
    previous = None
    for name, weight in tqdm(weights.items(), desc="Spectra", unit="matrix", disable=not progress):
        if stats is not None and isinstance(stats[name], OutputStats):  # no input Gram: no whitening to form
            left, white.done[name] = output_side_spectrum(weight, stats[name], damping, name)
            if fisher is not None:
                prices[name] = direction_costs(fisher_matrix(fisher[name]), left)
            if plain:
                plains.add(name, weight)
            continue
        if stats is not None and stats[name] is not previous:  # one input's whitening alive at a time (memory)
            whitenings, previous = WhiteningCache(damping), stats[name]
        whitening = whitenings.get(stats[name], name) if stats is not None else None
        if fisher is not None:  # the planning spectrum and its directions, from one SVD
            sigma, prices[name] = priced_spectrum(weight, whitening, fisher[name])
            (white.done if whitening is not None else plains.done)[name] = sigma
        if whitening is not None and fisher is None:
            white.add(name, whitening.whiten(weight.to(torch.float64)))
        if whitening is not None and plain or whitening is None and fisher is None:  # σ(W)
            plains.add(name, weight)
    sigma, whitened = plains.finish(), white.finish()
    matrices = [
        MatrixProfile(name=t.name, shape=t.shape, sigma=sigma.get(t.name), whitened=whitened.get(t.name),
                      price=prices.get(t.name),
                      rank=modules[t.name].rank if isinstance(modules[t.name], LowRankLinear) else None)
        for t in targets
    ]
    options = {"damping": damping} if stats is not None else {}
    if stats is not None and not plain:
        options["planning_only"] = True  # σ(W) skipped: see Profile.save
    return Profile(matrices, source=source, whitened=stats is not None, model_params=count_parameters(model),
                   options=options)


def _profile_spread(model: nn.Module, targets: list[Target], stats, fisher, **options) -> Profile:
    """profile_model on several ranks: each profiles its share of the matrices, then every rank gets all of them."""
    owner = distributed.owners([float(t.out_features * t.in_features * min(t.shape)) for t in targets])
    mine = [t for t, r in zip(targets, owner) if r == distributed.rank()]
    with distributed.alone():
        local = profile_model(model, mine, stats, fisher, **options)
    done = {m.name: m for m in local.matrices}
    for m in done.values():  # sent from CPU (gloo), whichever device computed them
        m.sigma, m.whitened, m.price = (None if v is None else v.detach().to("cpu", torch.float64).contiguous()
                                        for v in (m.sigma, m.whitened, m.price))
    matrices = []
    for target, src in zip(targets, owner):
        m = done.get(target.name) or MatrixProfile(
            name=target.name, shape=target.shape,
            sigma=torch.empty(min(target.shape), dtype=torch.float64) if stats is None or options["plain"] else None,
            whitened=torch.empty(min(target.shape), dtype=torch.float64) if stats is not None else None,
            price=torch.empty(min(target.shape), dtype=torch.float64) if fisher is not None else None,
            rank=getattr(model.get_submodule(target.name), "rank", None))
        distributed.broadcast_tensors([v for v in (m.sigma, m.whitened, m.price) if v is not None], src, "the spectra")
        matrices.append(m)
    local.matrices = matrices
    return local


def profile_with_calibration(
    model: nn.Module,
    windows: torch.Tensor | None,
    *,
    include: str | None = None,
    exclude: str | None = None,
    prices: bool = True,
    batch_size: int = 8,
    sensitivity_samples: int = DEFAULT_SENSITIVITY_SAMPLES,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
    source: str | None = None,
) -> Profile:
    """Measure and profile in one call: whitened spectra from `windows`, loss prices where `prices`.

    Without windows the profile is data-free (σ(W) only).
    """
    for flag, pattern in (("--include", include), ("--exclude", exclude)):
        try:
            re.compile(pattern or "")
        except re.error as exc:
            raise LowrankError(f"{flag} {pattern!r} is not a valid regular expression ({exc})") from None
    targets = targets_of(model, include, exclude)
    stats = fisher = None
    if windows is not None:  # the statistics serve the spectra alone here: output-side ones where cheaper
        stats, fisher = measure(model, targets, windows, prices=prices, batch_size=batch_size,
                                sensitivity_samples=sensitivity_samples, damping=damping, progress=progress,
                                output_stats=True)
    profile = profile_model(model, targets, stats, fisher, damping=damping, progress=progress, source=source)
    if fisher is not None:
        profile.options["sensitivity_samples"] = min(sensitivity_samples, window_count(windows))
    profile.options.update({key: value for key, value in (("include", include), ("exclude", exclude)) if value})
    return profile
