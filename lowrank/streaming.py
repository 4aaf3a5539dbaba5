"""Streaming compression of a checkpoint larger than memory: profile pass → plan → compress pass, from disk.

`compress_streamed` is `lowrank.compress` for a checkpoint folder or .gguf file with `config.stream`:
the model stays on the meta device, blocks are read one at a time (`BlockSource`), the profile
(`stream_profile`) and the compressed blocks (`stream_compress`) are computed block by block, and
the output is written shard by shard into `.<output>.partial/` beside the output, renamed into
place when complete. That folder also keeps the profile, the plan and the finished shards, so
that `resume=True` continues an interrupted run (after checking it was made from the same inputs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed, hf_integration, stream_ranks
from .block_source import BlockSource, is_streamable, open_tensors
from .boundary_store import BoundaryStore
from .checkpoint import write_plan_and_extras
from .budget import RankLimits
from .calibration import leading_windows, planning_windows, warn_if_thin, window_count
from .model_planning import check_plan_matches, needs_statistics
from .config import CompressConfig
from .config_base import resolve_device, torch_dtype
from .errors import LowrankError
from .fileio import LOADED_INPUTS, check_output_dir, replace_folder
from .model_info import count_parameters, is_causal_lm
from .plan import Plan
from .planner import check_feasible, default_strategy, needs_spectra, plan_targets
from .profile import Profile
from .shard_writer import ShardWriter, parse_size
from .speed_model import resolve_round_to
from .stream_compress import compress_pass
from .stream_memory import GIB, available_bytes, check_fits, estimate
from .stream_profile import profile_streamed
from .targets import find_targets

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
PROFILE_FILE = "profile.safetensors"
PARTIAL_PLAN = "plan.json"


def partial_dir(output: str | Path) -> Path:
    """Where a streamed run writes as it goes: `.<name>.partial` beside the output."""
    out = Path(output).resolve()
    return out.parent / f".{out.name}.partial"


def run_identity(source: BlockSource, config: CompressConfig, windows: torch.Tensor) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the checkpoint's files, the config, the windows."""
    files = {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in source.files}
    return {"source": str(source.path.resolve()), "files": files, "config": config.to_dict(),
            "windows": hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()}


def check_streamable(source: str | Path) -> Path:
    """The folder or .gguf file `source`, when streaming can read it; else a one-line error naming the fix."""
    if Path(source).suffix == ".gguf" and Path(source).is_file():
        open_tensors(source)  # a damaged GGUF or an architecture the reader cannot map: its own one line
    if not is_streamable(str(source)):
        raise LowrankError(f"--stream reads a model folder with safetensors weights, a .gguf file or a hub id, and "
                           f"{source} is none of them; convert it (save_pretrained), or drop --stream and its options "
                           "(--offload-dir, --max-memory, --save-dtype)")
    open_tensors(source)  # a damaged safetensors shard: refused before any work
    return Path(source)


#: Peak memory of the in-memory default compress over the checkpoint's float32 weights, measured: SmolLM2-135M
#: 14× (7.6 GiB), random Llamas of 4 to 16 layers about 10× (issue 13). The larger is used.
IN_MEMORY_PEAK_FACTOR = 14


def should_stream(source: Any, config: CompressConfig, output: str | Path | None,
                  available: int | None = None) -> bool:
    """Whether `lowrank.compress` streams: `config.stream` when set; else (None, the default) when a
    streaming-only option (--offload-dir, --max-memory, --save-dtype) asks for it, or when the source
    can stream and loading it whole would not fit in `available` bytes (default: what is free now).

    A model that fits is still loaded whole by default: the streamed path's bad-input behaviour (its
    messages, Ctrl-C and disk-full handling) differs from the in-memory path's in a few rows of
    docs/robustness.md, and those rows are checked on models that fit.
    """
    if config.stream is not None:
        return config.stream
    if config.offload_dir is not None or config.max_memory is not None or config.save_dtype != "source":
        return True
    try:
        if not can_stream(source, config, output):
            return False
        needed = in_memory_peak_bytes(Path(source))
    except Exception:  # noqa: BLE001 — an unreadable folder: the in-memory loader names the problem
        return False
    free = available_bytes() if available is None else available
    if needed <= free:
        return False
    log.warning("%s would need about %.1f GiB loaded whole and %.1f GiB is free: compressing it block by block "
                "from disk (--no-stream loads it whole anyway)", source, needed / GIB, free / GIB)
    return True


def in_memory_peak_bytes(folder: Path) -> int:
    """What the in-memory default compress of a safetensors folder is expected to peak at (a rule of thumb)."""
    from safetensors import safe_open

    elements = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                elements += math.prod(handle.get_slice(name).get_shape())
    return IN_MEMORY_PEAK_FACTOR * 4 * elements


def can_stream(source: Any, config: CompressConfig, output: str | Path | None) -> bool:
    """Whether streaming applies: a causal LM's local safetensors folder, an output folder, and no
    option that needs the whole model in memory (one-shot, a method other than whiten, --include, a load
    dtype other than float32)."""
    if output is None or not isinstance(source, (str, Path)) or not Path(source).is_dir():
        return False
    if not is_streamable(str(source)):
        return False
    if not (config.sequential and config.method == "whiten" and config.include is None
            and config.dtype == "float32"):
        return False
    architectures = json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    return any(name.endswith("ForCausalLM") for name in architectures)


def _open_partial(output: str | Path, identity: dict, resume: bool) -> Path:
    """The partial folder: fresh, or (resume) the interrupted run's after checking it matches `identity`."""
    partial = partial_dir(output)
    if resume and (partial / RUN_FILE).is_file():
        recorded = json.loads((partial / RUN_FILE).read_text(encoding="utf-8"))
        if recorded != identity:
            changed = next(key for key in identity if recorded.get(key) != identity[key])
            raise LowrankError(f"{partial} was made from other inputs ({changed} differs); rerun without --resume "
                               "to start over")
        return partial
    if resume:
        raise LowrankError(f"nothing to resume: {partial} does not exist; rerun without --resume")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    (partial / RUN_FILE).write_text(json.dumps(identity, indent=1) + "\n", encoding="utf-8")
    return partial


def _publish(partial: Path, output: str | Path) -> None:
    """Rename the finished partial folder onto `output` (replacing it, already allowed by check_output_dir)."""
    out = Path(output)
    for name in (RUN_FILE, PROFILE_FILE, PARTIAL_PLAN, "boundary.safetensors"):
        (partial / name).unlink(missing_ok=True)
    replace_folder(partial, out)


def _plan(source: BlockSource, targets, config: CompressConfig, strategy: str, windows: torch.Tensor,
          partial: Path, cap: int | None, device: str, progress: bool, seconds: dict[str, float]) -> Plan:
    """The plan: from config.plan, or planned on the (saved or freshly streamed) profile; stage times into `seconds`."""
    model_params = count_parameters(source.model)
    if config.plan:
        if not distributed.is_writer():
            return None  # rank 0's plan is handed out (stream_ranks.same_plan)
        plan = Plan.load(config.plan)
        check_plan_matches(plan, targets)
        return plan
    budget = config.budget if config.budget is not None else config.ratio
    check_feasible(targets, budget, model_params, config.limits(), config.overrides)
    spectra = None
    planned = planning_windows(windows, config.plan_samples)  # what the profile reads
    if needs_spectra(strategy):
        if stream_ranks.writer_answer(lambda: (partial / PROFILE_FILE).is_file()):
            profile = Profile.load(partial / PROFILE_FILE) if distributed.is_writer() else None
        else:
            profile = profile_streamed(source, targets, planned,
                                       BoundaryStore(cap, config.offload_dir),
                                       prices=strategy == "sensitivity", batch_size=config.batch_size,
                                       sensitivity_samples=config.sensitivity_samples,
                                       damping=config.damping, device=device, progress=progress,
                                       name=str(source.path),
                                       scratch_dir=config.offload_dir or (partial if distributed.is_writer() else None),
                                       plain=config.method == "svd")  # only plain SVD plans on σ(W)
            if distributed.is_writer():
                profile.save(partial / PROFILE_FILE)
        if not distributed.is_writer():
            return None
        spectra = {m.name: m for m in profile.matrices}
        seconds.update({f"profile_{k}": v for k, v in profile.options.get("seconds", {}).items()})
    started = time.perf_counter()
    plan = plan_targets(targets, model_params, budget, strategy, spectra=spectra, method=config.method,
                        limits=config.limits() or RankLimits(), overrides=config.overrides, source=str(source.path))
    seconds["planning"] = round(time.perf_counter() - started, 3)
    if spectra is not None:
        plan.options["plan_samples"] = window_count(planned)
    if strategy == "sensitivity":
        plan.options["sensitivity_samples"] = min(config.sensitivity_samples, window_count(planned))
    return plan


class StreamInterrupted(KeyboardInterrupt):
    """Ctrl-C during a streamed run, after its partial folder exists: the finished work stays there for --resume."""

    def __init__(self, partial: Path):
        self.hint = (f"interrupted; the finished blocks are kept in {partial} (rerun with --resume to continue, or "
                     "delete it); the input is untouched")
        super().__init__(self.hint)


def compress_streamed(
    folder: str | Path,
    config: CompressConfig,
    windows: torch.Tensor,
    *,
    output: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    resume: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    extra_files: dict[str, str] | None = None,
    plan_options: dict[str, Any] | None = None,
) -> Plan:
    """Compress the checkpoint `folder` into `output`, one block in memory at a time; return the Plan.

    `plan_options` (the calibration's description) are recorded in the saved plan.
    """
    folder = check_streamable(folder)
    if not needs_statistics(config.method) or not config.sequential:
        raise LowrankError("--stream compresses sequentially with calibration statistics; use --method whiten "
                           "and --sequential")
    check_output_dir(output, overwrite or resume)
    LOADED_INPUTS.add(folder.resolve())
    source = BlockSource(folder, torch.float32, trust_remote_code=trust_remote_code)
    targets = find_targets(source.model, config.include, config.exclude)
    if config.method == "whiten":
        warn_if_thin(windows, targets)
    strategy = config.strategy or default_strategy(config.method, source.model)
    if strategy == "sensitivity" and config.strategy is None and not is_causal_lm(source.model):
        strategy = "global"  # an encoder's exact embedding prices need the whole model; streamed, it plans globally
    est = estimate(source, targets, stream_ranks.my_windows(windows, config.batch_size),  # this rank's share
                   strategy == "sensitivity", config.sensitivity_samples, refine=config.refinement().enabled,
                   batch_size=config.batch_size,
                   update_windows=leading_windows(windows, config.batch_size, config.update_samples))  # an upper bound
    limit = parse_size(config.max_memory, "--max-memory") if config.max_memory else \
        stream_ranks.memory_share(available_bytes())
    with distributed.agreement("checking the memory"):
        cap = check_fits(est, limit, config.offload_dir is not None)
    if progress:
        tqdm.write(est.describe(cap))
    log.info(est.describe(cap))
    device = resolve_device(config.device)
    config, timings = resolve_round_to(config, [t.shape for t in targets], device, progress)  # before the identity:
    identity = run_identity(source, config, windows)  # a resume must round alike
    with distributed.agreement("opening the partial folder"):  # rank 0 alone writes it
        partial = _open_partial(output, identity, resume) if distributed.is_writer() else partial_dir(output)
    own = stream_ranks.rank_folder(config.offload_dir)  # several ranks: each spills to its own rank-K
    try:
        return _run_passes(source, targets, replace(config, offload_dir=own), strategy, windows, partial, cap,
                           device, timings, output, tokenizer, extra_files, plan_options, progress)
    except KeyboardInterrupt as exc:
        raise StreamInterrupted(partial) from exc
    finally:
        stream_ranks.remove_rank_folder(config.offload_dir, own)


def _run_passes(source: BlockSource, targets, config: CompressConfig, strategy: str, windows: torch.Tensor,
                partial: Path, cap, device, timings, output, tokenizer, extra_files, plan_options,
                progress: bool) -> Plan:
    """Profile pass, plan, compress pass, then publish the partial folder as `output` (see the module doc)."""
    seconds: dict[str, float] = {}
    plan = stream_ranks.same_plan(_plan(source, targets, config, strategy, windows, partial, cap, device, progress,
                                        seconds))
    plan.method = config.method
    if timings is not None:
        plan.options.update(round_to=config.round_to, round_to_auto=True, timings=timings.to_dict())
    if distributed.is_writer():
        (partial / PARTIAL_PLAN).write_text(json.dumps(plan.to_dict(), indent=1) + "\n", encoding="utf-8")
    save_dtype = source.source_dtype if config.save_dtype == "source" else torch_dtype(config.save_dtype)
    writer = stream_ranks.shared_writer(lambda: ShardWriter(partial, parse_size(config.max_shard_size), save_dtype))
    started = time.perf_counter()
    parts = compress_pass(source, plan, {t.name: t for t in targets}, windows, writer,
                          BoundaryStore(cap, config.offload_dir), batch_size=config.batch_size,
                          update=config.update is not False, damping=config.damping, device=device, progress=progress,
                          refine=config.refinement(), update_samples=config.update_samples,
                          keep_inputs=cap is None)  # when memory is short, the update runs the dense block again
    writer.finish()
    seconds["compress"] = round(time.perf_counter() - started, 3)
    seconds.update({f"compress_{part}": value for part, value in parts.items()})
    plan.options["stage_seconds"] = seconds
    plan.options.update({"sequential": True, "update": config.update is not False, "streamed": True})
    if config.update is not False:
        plan.options["update_target"] = "dense"
        plan.options["update_samples"] = leading_windows(windows, config.batch_size, config.update_samples)
    if config.refinement().recorded:
        plan.options["refine"] = config.refinement().record()
    plan.options.update(plan_options or {})
    with distributed.agreement("saving"):  # rank 0 writes; the others learn whether it could
        if distributed.is_writer():
            for name in (PROFILE_FILE, "boundary.safetensors"):  # working files, not weights: out of the sha256s
                (partial / name).unlink(missing_ok=True)
            _write_metadata(source, plan, partial, save_dtype, tokenizer, extra_files)
            _publish(partial, output)
    return plan


def _write_metadata(source: BlockSource, plan: Plan, partial: Path, save_dtype: torch.dtype, tokenizer,
                    extra_files: dict[str, str] | None) -> None:
    """config.json (with the lowrank quantization_config), generation config, tokenizer, plan with sha256s."""
    hf_integration.attach(source.model, plan.factored, plan.method)
    source.model.config.dtype = save_dtype
    source.model.config.save_pretrained(partial)
    generation = getattr(source.model, "generation_config", None)
    if generation is not None and source.model.can_generate():
        generation.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    write_plan_and_extras(partial, plan, extra_files)
