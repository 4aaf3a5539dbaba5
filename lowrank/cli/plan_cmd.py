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
from ..calibration import warn_if_thin
from ..config import CalibrationConfig
from ..model_planning import needs_statistics, plan_model
from ..errors import LowrankError
from ..factorize import METHODS
from ..loading import DEFAULT_MODEL, load_model
from ..folder_profile import model_targets_from_config
from ..planner import DEFAULT_STRATEGY, STRATEGIES, default_strategy, needs_spectra, plan_profile
from ..profile import Profile
from ..profiling import DEFAULT_SENSITIVITY_SAMPLES
from ..speed_model import SpeedTable, load_timings, measure_table, parse_round_to
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
@click.option("--round-to", default="1", show_default=True, metavar="N|auto",
              help="Every rank a multiple of this (e.g. 8 for tensor cores). auto: the multiple the --device's "
                   "matrix multiply runs fastest at, measured there (8 on CUDA).")
@click.option("--speed", is_flag=True,
              help="Keep a matrix dense where its factored form would not be faster, judged from matmul timings "
                   "measured once on --device (stored in the plan).")
@click.option("--speed-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Rows per matmul when timing for --speed and --round-to auto: the tokens of one forward pass "
                   "the model will serve (prompt tokens × batch for prefill, the batch for decoding).")
@click.option("--timings", default=None, metavar="PLAN",
              help="With --speed or --round-to auto: reuse the timings stored in this plan (or timings JSON) "
                   "instead of measuring, so planning again gives the same ranks.")
@click.option("--include", default=None, help="Regex: plan only modules whose name matches (default: every "
              "linear layer in the transformer blocks).")
@click.option("--exclude", default=None, help="Regex: leave out modules whose name matches.")
@click.option("-o", "--output", default="plan.json", show_default=True, help="Plan file to write (JSON).")
@click.option("--overwrite", is_flag=True, help="Replace the plan file if it exists.")
@model_options
@quiet_option
@silence_transformers
def command(model, profile_file, budget, strategy, method, texts, samples, seq_len, seed, batch_size, sensitivity_samples,
            overrides, min_rank, max_rank, round_to, speed, speed_tokens, timings, include, exclude, output, overwrite, dtype, device,
            tokenizer_source, trust_remote_code, allow_pickle, quiet):
    """Write a plan for MODEL (default: smollm2-135m): the rank of every matrix under --budget.

    The plan is JSON that people may edit; `lowrank compress MODEL --plan plan.json` follows it.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise LowrankError(f"{output} already exists; pass --overwrite to replace it or choose another -o")
    if output.is_dir():
        raise LowrankError(f"{output} is a folder; -o names the plan file to write")
    round_to = parse_round_to(round_to)
    if timings is not None and not (speed or round_to == "auto"):
        raise LowrankError("--timings feeds --speed or --round-to auto; add one of them, or drop --timings")
    if speed and max_rank is not None:
        raise LowrankError("--max-rank factors every matrix, while --speed keeps slow ones dense; drop one of them")
    limits = RankLimits(min_rank=min_rank, max_rank=max_rank, round_to=1 if round_to == "auto" else round_to)
    timing = SpeedPlanning(round_to == "auto", speed, timings, resolve_device(device), DTYPES[dtype], speed_tokens,
                           not quiet)
    started = time.perf_counter()
    if profile_file is not None:
        if texts:
            raise LowrankError("--profile plans from the calibration the profile was measured with; drop --calib "
                               "(or profile again with it)")
        plan = plan_from_profile_file(profile_file, model, budget, strategy, method, limits, list(overrides),
                                      include, exclude, trust_remote_code, timing)
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
    if windows is not None and method == "whiten":
        warn_if_thin(windows, targets)
    limits, table = timing.resolve(limits, [t.shape for t in targets])
    plan, _ = plan_model(loaded.model, targets, budget, strategy, windows=windows, method=method, limits=limits,
                         overrides=list(overrides), batch_size=batch_size, sensitivity_samples=sensitivity_samples,
                         source=model, progress=not quiet, speed=table)
    timing.record(plan)
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
                           trust_remote_code, timing: "SpeedPlanning | None" = None):
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
    table = None
    if timing is not None:
        limits, table = timing.resolve(limits, [m.shape for m in profile.matrices])
    plan = plan_profile(profile, budget, strategy, method=method, limits=limits, overrides=overrides, speed=table)
    if timing is not None:
        timing.record(plan)
    return plan


class SpeedPlanning:
    """--round-to auto and --speed: the timings (measured once on the device, or read back) and what they decide."""

    def __init__(self, auto: bool, speed: bool, timings: str | None, device: str, dtype, tokens: int, progress: bool):
        self.auto, self.speed, self.timings, self.device, self.dtype, self.tokens, self.progress = \
            auto, speed, timings, device, dtype, tokens, progress
        self.table: SpeedTable | None = None

    def resolve(self, limits: RankLimits, shapes: list[tuple[int, int]]) -> tuple[RankLimits, SpeedTable | None]:
        """The limits with round_to decided, and the table for the planner's speed caps (None without --speed)."""
        if not (self.auto or self.speed):
            return limits, None
        if self.timings is not None:
            self.table = load_timings(self.timings)
        else:
            self.table = measure_table(shapes, self.device, self.dtype, tokens=self.tokens, progress=self.progress)
        if self.auto:
            limits = RankLimits(min_rank=limits.min_rank, max_rank=limits.max_rank, round_to=self.table.round_to())
        return limits, self.table if self.speed else None

    def record(self, plan) -> None:
        """Store the timings in the plan, so that `--timings PLAN` plans the same ranks again."""
        if self.table is not None:
            plan.options.update(timings=self.table.to_dict(), round_to_auto=self.auto, speed=self.speed)
