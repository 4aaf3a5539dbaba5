"""`lowrank plan`: choose every matrix's rank under a parameter budget and write the plan as JSON.

From a model (profiled on the spot) or from a saved profile (`--profile FILE`, from `lowrank
profile`): then no model is loaded and planning takes milliseconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..budget import RankLimits
from ..api import calibration_windows
from ..config import CalibrationConfig
from ..compression import needs_statistics, plan_model
from ..errors import LowrankError
from ..factorize import METHODS
from ..loading import DEFAULT_MODEL, load_model
from ..folder_profile import model_targets_from_config
from ..planner import DEFAULT_STRATEGY, STRATEGIES, default_strategy, needs_spectra, plan_profile
from ..profile import Profile
from ..profiling import DEFAULT_SENSITIVITY_SAMPLES
from ..targets import find_targets, name_filter
from ..config_base import resolve_device
from .common import DTYPES, calibration_options, model_options, quiet_option, silence_transformers
from .compress_cmd import describe


@click.command("plan")
@click.argument("model", required=False)
@click.option("--profile", "profile_file", default=None, metavar="FILE",
              help="Plan from this saved profile (`lowrank profile`) instead of measuring MODEL: no model is "
                   "loaded. Given MODEL too, the profile must have been measured on it.")
@click.option("--budget", default="0.8", show_default=True, metavar="BUDGET",
              help="Parameters to keep: 0.6 or target:0.6 (fraction of the target layers), model:0.7 (fraction of "
                   "the whole model), 90M or 1.2B (the whole compressed model's size), target:40M (the target "
                   "layers' size). The plan never exceeds it.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None,
              help="uniform: SVD-LLM's same kept fraction everywhere. energy: the same kept whitened energy in every "
                   "matrix. global: greedy over all matrices on each one's relative whitened error, dense where a "
                   "useful rank saves nothing. sensitivity: like global, with each direction priced by its effect "
                   "on the loss (output Fisher from a few backward passes). "
                   f"[default: {DEFAULT_STRATEGY} with --method whiten on a causal LM, uniform otherwise]")
@click.option("--method", type=click.Choice(METHODS), default="whiten", show_default=True,
              help="Factorization the plan is for; whiten and asvd plan on whitened spectra (need --calib text), "
                   "svd on plain singular values.")
@calibration_options()
@click.option("--sensitivity-samples", type=int, default=DEFAULT_SENSITIVITY_SAMPLES, show_default=True,
              help="Calibration windows backpropagated to measure sensitivity (strategy sensitivity only; an encoder "
                   "prices every calibration sentence by its embedding).")
@click.option("--override", "overrides", multiple=True, metavar="REGEX=RANK",
              help="Fix the rank of modules whose name matches REGEX (first match wins): an integer rank, a kept "
                   "fraction such as 0.5, or 'dense'. Repeat for several, e.g. --override 'mlp\\.down=0.5'.")
@click.option("--min-rank", type=int, default=1, show_default=True, help="Smallest rank any factored matrix gets.")
@click.option("--max-rank", type=int, default=None,
              help="Largest rank any matrix gets; with it every matrix is factored (none kept dense). Default: none.")
@click.option("--round-to", type=int, default=1, show_default=True,
              help="Every rank a multiple of this (e.g. 8 for tensor cores).")
@click.option("--include", default=None, help="Regex: plan only modules whose name matches (default: every "
              "linear layer in the transformer blocks).")
@click.option("--exclude", default=None, help="Regex: leave out modules whose name matches.")
@click.option("-o", "--output", default="plan.json", show_default=True, help="Plan file to write (JSON).")
@click.option("--overwrite", is_flag=True, help="Replace the plan file if it exists.")
@model_options
@quiet_option
@silence_transformers
def command(model, profile_file, budget, strategy, method, texts, samples, seq_len, seed, batch_size, sensitivity_samples,
            overrides, min_rank, max_rank, round_to, include, exclude, output, overwrite, dtype, device,
            tokenizer_source, trust_remote_code, allow_pickle, quiet):
    """Write a plan for MODEL (default: smollm2-135m): the rank of every matrix under --budget.

    The plan is JSON that people may edit; `lowrank compress MODEL --plan plan.json` follows it.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise LowrankError(f"{output} already exists; pass --overwrite to replace it or choose another -o")
    if output.is_dir():
        raise LowrankError(f"{output} is a folder; -o names the plan file to write")
    limits = RankLimits(min_rank=min_rank, max_rank=max_rank, round_to=round_to)
    started = time.perf_counter()
    if profile_file is not None:
        if texts:
            raise LowrankError("--profile plans from the calibration the profile was measured with; drop --calib "
                               "(or profile again with it)")
        plan = plan_from_profile_file(profile_file, model, budget, strategy, method, limits, list(overrides),
                                      include, exclude, trust_remote_code)
        plan.save(output)
        seconds = time.perf_counter() - started
        if quiet:
            click.echo(json.dumps({"output": str(output), "strategy": plan.strategy, **plan.summary(),
                                   "milliseconds": round(1000 * seconds, 1)}))
        else:
            click.echo(describe(plan))
            click.echo(f"budget {plan.budget['spec']} ({plan.budget['target_allowance']:,} target parameters allowed); "
                       f"strategy {plan.strategy}; planned from {profile_file} in {1000 * seconds:.0f} ms")
            click.echo(f"wrote {output}")
        return
    model = model or DEFAULT_MODEL
    loaded = load_model(model, dtype=DTYPES[dtype], device=resolve_device(device), trust_remote_code=trust_remote_code,
                        allow_pickle=allow_pickle, tokenizer_source=tokenizer_source)
    strategy = strategy or default_strategy(method, loaded.model)
    targets = find_targets(loaded.model, include, exclude)
    needs_text = (needs_spectra(strategy) and needs_statistics(method)) or strategy == "sensitivity"
    calibration = CalibrationConfig(texts=list(texts), samples=samples, seq_len=seq_len, seed=seed)
    windows = calibration_windows(loaded.model, loaded.tokenizer, calibration, batch_size) if needs_text else None
    plan, _ = plan_model(loaded.model, targets, budget, strategy, windows=windows, method=method, limits=limits,
                         overrides=list(overrides), batch_size=batch_size, sensitivity_samples=sensitivity_samples,
                         source=model, progress=not quiet)
    if windows is not None:
        plan.options.update({"samples": samples, "seq_len": seq_len, "seed": seed,
                             "calibration": list(map(str, texts)) or ["bundled:hamlet"]})
    plan.save(output)
    if quiet:
        click.echo(json.dumps({"output": str(output), "strategy": strategy, **plan.summary()}))
    else:
        click.echo(describe(plan))
        click.echo(f"budget {plan.budget['spec']} ({plan.budget['target_allowance']:,} target parameters allowed); "
                   f"strategy {strategy}; planned in {plan.options['planning_seconds']:.1f} s")
        click.echo(f"wrote {output} in {time.perf_counter() - started:.1f} s")


def plan_from_profile_file(profile_file, model, budget, strategy, method, limits, overrides, include, exclude,
                           trust_remote_code):
    """Load a saved profile (checked against MODEL's architecture when MODEL is given) and plan from it."""
    profile = Profile.load(profile_file)
    if model is not None:
        targets = model_targets_from_config(model, profile.options.get("include"), profile.options.get("exclude"),
                                            trust_remote_code)
        if targets is not None:
            profile.check_model(targets, where=f"profile {profile_file}")
        elif profile.source != model:  # not a local folder: the recorded source is all there is to compare
            raise LowrankError(f"profile {profile_file} was measured on {profile.source}, not {model}; "
                               f"profile {model} with `lowrank profile`")
    if include or exclude:
        wanted = name_filter(include, exclude)
        profile = Profile([m for m in profile.matrices if wanted(m.name)], source=profile.source,
                          whitened=profile.whitened, options=profile.options, model_params=profile.model_params)
    if strategy is None:  # as for a model: sensitivity where it was measured (a causal LM), uniform otherwise
        strategy = default_strategy(method)
        if strategy == "sensitivity" and not profile.priced:
            strategy = "uniform"
    return plan_profile(profile, budget, strategy, method=method, limits=limits, overrides=overrides)
