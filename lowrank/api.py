"""One entry point per stage: `compress`, `recover`, `evaluate`, each taking a source and a config.

A source is a model name, folder, .gguf file or hub id (loaded with lowrank.loading), or a model
already in memory. The CLI and recipes call exactly these functions with the configs they build.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .agreement import AgreementResult, agreement
from .calibration import load_text, planning_windows, sample_text_path, text_windows, warn_if_thin, window_count
from .checkpoint import read_plan, save_compressed
from .compression import compress_model
from .model_planning import check_plan_matches, needs_statistics, plan_model
from .config import CONFIG_FILE, CalibrationConfig, CompressConfig, EvalConfig, RecoveryConfig, read_config_record
from .config_base import resolve_device, torch_dtype
from .encoder_eval import EncoderAgreement, compare_encoders
from .encoders import is_encoder
from .fileio import check_output_dir, check_output_spares_input
from .folder_format import is_compressed_folder
from .errors import LowrankError
from .evaluation import perplexity
from .lm_harness import require_lm_eval, run_tasks
from .loading import load_model, load_tokenizer, local_checkpoint
from .plan import Plan
from .sentences import sentence_batches
from .planner import default_strategy, needs_spectra
from .recovery import recover_folder
from .report import write_compressed_report
from .streaming import can_stream, check_streamable, compress_streamed, should_stream
from .speed_model import resolve_round_to
from .targets import find_targets
from .training import recover as train_in_memory
from .verify import check_finite_weights

log = logging.getLogger(__name__)


def config_record(config: CompressConfig, calibration: CalibrationConfig | None) -> dict[str, Any]:
    """The JSON record of the configs a compressed folder was made with (its lowrank_config.json)."""
    record: dict[str, Any] = {"compress": config.to_dict()}
    if calibration is not None:
        record["calibration"] = calibration.to_dict()
    return record


def _open_source(source: "str | Path | nn.Module", tokenizer, dtype: str, device: str, *, trust_remote_code: bool,
                 allow_pickle: bool, need_tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """The model and tokenizer of a source: a model in memory as it is, anything else through load_model.

    `tokenizer` is a tokenizer object for a model in memory, or a folder/hub id for one to load.
    """

    if isinstance(source, nn.Module):
        return source, None if isinstance(tokenizer, (str, Path)) else tokenizer
    loaded = load_model(str(source), dtype=torch_dtype(dtype), device=device, trust_remote_code=trust_remote_code,
                        allow_pickle=allow_pickle, tokenizer_source=str(tokenizer) if tokenizer is not None else None,
                        need_tokenizer=need_tokenizer)
    return loaded.model, loaded.tokenizer


def _calibration_windows(tokenizer, calibration: "CalibrationConfig | torch.Tensor | list | None", *,
                         sentences: bool = False, batch_size: int = 8) -> "torch.Tensor | list[torch.Tensor]":
    """Token windows from a CalibrationConfig (with `sentences`, an encoder's sentence batches holding
    samples × seq_len tokens), or the windows / batches given, checked."""

    if isinstance(calibration, torch.Tensor):
        if calibration.ndim != 2 or calibration.dtype not in (torch.int32, torch.int64):
            raise LowrankError("calibration windows must be a 2-D tensor of token ids (n_windows, seq_len)")
        return calibration
    if isinstance(calibration, list):  # ready batches of token ids, e.g. an encoder's sentences (lowrank.sentences)
        if not calibration or any(not isinstance(b, torch.Tensor) or b.ndim != 2
                                  or b.dtype not in (torch.int32, torch.int64) for b in calibration):
            raise LowrankError("calibration batches must be a non-empty list of 2-D tensors of token ids (b, seq_len)")
        return calibration
    calibration = calibration or CalibrationConfig()
    if tokenizer is None:
        raise LowrankError("calibration text needs a tokenizer; pass tokenizer=, or token windows as calibration")
    if sentences:  # an encoder: whole sentences with their special tokens, as it is used (lowrank.sentences)
        text = load_text(list(calibration.texts) or [sample_text_path("hamlet")])
        return sentence_batches(tokenizer, text, token_budget=calibration.samples * calibration.seq_len,
                                max_length=min(calibration.seq_len, getattr(tokenizer, "model_max_length", 10**9)),
                                batch_size=batch_size, seed=calibration.seed)
    return text_windows(tokenizer, list(calibration.texts), calibration.samples, calibration.seq_len, calibration.seed)


def calibration_windows(model: nn.Module, tokenizer, calibration: CalibrationConfig, batch_size: int = 8):
    """The calibration `lowrank compress` uses for `model`: windows of running text for a language model,
    sentence batches (lowrank.sentences) for an encoder. `lowrank plan` and `profile` use it too."""
    return _calibration_windows(tokenizer, calibration, sentences=is_encoder(model), batch_size=batch_size)


def compress(
    source: "str | Path | nn.Module",
    config: CompressConfig | None = None,
    calibration: "CalibrationConfig | torch.Tensor | None" = None,
    *,
    output: str | Path | None = None,
    tokenizer=None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    dry_run: bool = False,
    extra_files: dict[str, str] | None = None,
    resume: bool = False,
) -> Plan:
    """Compress `source` by `config`, calibrated on `calibration`; save it to `output` when given.

    A model in memory is compressed in place, and `calibration` may then be a tensor of token
    windows (n, seq_len). A name or path is loaded first (`tokenizer` names the tokenizer's folder
    when the model's lacks one). The output folder, written atomically, holds the weights, the
    plan and lowrank_config.json (these configs). Returns the Plan that was followed.
    With `config.stream` (or a streaming-only option) a safetensors folder, .gguf file or hub id is
    compressed block by block from disk (lowrank.streaming.should_stream); `resume` continues an
    interrupted streamed run.
    """

    config = config or CompressConfig()
    distributed.init_from_environment()  # under torchrun or accelerate: join the other ranks
    progress = progress and distributed.is_writer()
    if not dry_run and (resume or should_stream(source, config, output)):
        return _compress_streamed(source, config, calibration, output=output, tokenizer=tokenizer,
                                  overwrite=overwrite, resume=resume, trust_remote_code=trust_remote_code,
                                  progress=progress, extra_files=extra_files)
    if progress and not dry_run and config.stream is None and can_stream(source, config, output):
        log.info("%s can be compressed block by block from disk with --stream (memory: one block, not the model)",
                 source)
    plan = Plan.load(config.plan) if config.plan else None
    in_memory = isinstance(source, nn.Module)
    if output is not None:
        check_output_dir(output, overwrite)
        if not in_memory:
            check_output_spares_input(output, str(source))
    compute_device = resolve_device(config.device)
    sequential = config.sequential and needs_statistics(config.method)  # svd uses no statistics: nothing to sequence
    # sequential: the model waits on CPU and its blocks visit the compute device one at a time
    model, tokenizer_object = _open_source(source, tokenizer, config.dtype, "cpu" if sequential else compute_device,
                                           trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    strategy = config.strategy or default_strategy(config.method, model)
    if dry_run:
        return _plan_only(model, tokenizer_object, config, strategy, calibration,
                          None if in_memory else str(source), progress)
    windows = None
    if needs_statistics(config.method) or (plan is None and strategy == "sensitivity"):
        windows = _calibration_windows(tokenizer_object, calibration, sentences=is_encoder(model),
                                       batch_size=config.batch_size)
    asked = config  # recorded as asked ("auto" included); the plan holds what auto measured
    config, timings = resolve_round_to(config, [t.shape for t in find_targets(model, config.include, config.exclude)],
                                       compute_device, progress)
    plan = compress_model(model, ratio=config.ratio, budget=config.budget, strategy=strategy, plan=plan,
                          method=config.method, windows=windows, include=config.include, exclude=config.exclude,
                          round_to=config.round_to, limits=config.limits(), overrides=config.overrides,
                          batch_size=config.batch_size, damping=config.damping, progress=progress,
                          source=None if in_memory else str(source), sequential=sequential, update=config.update,
                          device=compute_device, refine=config.refinement(), plan_samples=config.plan_samples,
                          update_samples=config.update_samples, sensitivity_samples=config.sensitivity_samples)
    if timings is not None:  # --round-to auto: what was measured, so that the plan replays without timing again
        plan.options.update(round_to=config.round_to, round_to_auto=True, timings=timings.to_dict())
    texts_config = calibration if isinstance(calibration, CalibrationConfig) else CalibrationConfig()
    if isinstance(calibration, torch.Tensor):
        plan.options.update({"samples": calibration.shape[0], "seq_len": calibration.shape[1]})
    elif isinstance(windows, list):  # sentences
        plan.options.update({"calibration_unit": "sentences", "sentences": window_count(windows),
                             "tokens": sum(b.numel() for b in windows)})
        if not isinstance(calibration, list):
            plan.options.update({"seq_len": texts_config.seq_len, "seed": texts_config.seed,
                                 "calibration": list(texts_config.texts) or ["bundled:hamlet"]})
    else:
        plan.options.update({"samples": texts_config.samples if windows is not None else 0,
                             "seq_len": texts_config.seq_len, "seed": texts_config.seed,
                             "calibration": list(texts_config.texts) or ["bundled:hamlet"]})
    if output is not None:
        record = config_record(asked, None if isinstance(calibration, (torch.Tensor, list)) else texts_config)
        with distributed.agreement("saving"):  # rank 0 writes; the others learn whether it could
            if distributed.is_writer():
                save_compressed(model, tokenizer_object, plan, output, overwrite=overwrite,
                                max_shard_size=config.max_shard_size,
                                extra_files={CONFIG_FILE: json.dumps(record, indent=2) + "\n", **(extra_files or {})})
    return plan


def _compress_streamed(source, config: CompressConfig, calibration, *, output, tokenizer, overwrite: bool,
                       resume: bool, trust_remote_code: bool, progress: bool, extra_files) -> Plan:
    """`compress` for config.stream: a folder, .gguf file or hub id, read block by block, written shard by shard."""

    if config.stream is False:
        raise LowrankError("--resume continues a streamed run; drop --no-stream")
    if isinstance(source, nn.Module) or output is None:
        raise LowrankError("--stream reads a model folder from disk and writes its output as it goes; "
                           "pass a folder as source and an output folder")
    check_output_dir(output, overwrite or resume)
    location = local_checkpoint(str(source), progress)  # a hub id is downloaded here; a built-in name is its GGUF
    source = Path(location.path, location.gguf_file or "")
    check_output_spares_input(output, str(source))
    check_streamable(source)
    if isinstance(calibration, torch.Tensor):
        windows, texts_config = _calibration_windows(None, calibration), None
        options = {"samples": calibration.shape[0], "seq_len": calibration.shape[1]}
    else:
        texts_config = calibration or CalibrationConfig()
        tokenizer_object = load_tokenizer(str(tokenizer or location.path), None if tokenizer else location.gguf_file,
                                          trust_remote_code)
        windows = _calibration_windows(tokenizer_object, texts_config)
        tokenizer = tokenizer_object
        options = {"samples": texts_config.samples, "seq_len": texts_config.seq_len, "seed": texts_config.seed,
                   "calibration": list(texts_config.texts) or ["bundled:hamlet"]}
    record = config_record(config, texts_config)
    return compress_streamed(source, config, windows, output=output, tokenizer=tokenizer if not isinstance(
                                 tokenizer, (str, Path)) else None, overwrite=overwrite, resume=resume,
                             trust_remote_code=trust_remote_code, progress=progress, plan_options=options,
                             extra_files={CONFIG_FILE: json.dumps(record, indent=2) + "\n", **(extra_files or {})})


def _plan_only(model: nn.Module, tokenizer, config: CompressConfig, strategy: str,
               calibration: "CalibrationConfig | torch.Tensor | None", source: str | None, progress: bool) -> Plan:
    """The plan `compress` would follow, without factoring anything (calibrating only where planning needs it)."""

    targets = find_targets(model, config.include, config.exclude)
    if config.plan:
        plan = Plan.load(config.plan)
        check_plan_matches(plan, targets)
        return plan
    needs_text = (needs_spectra(strategy) and needs_statistics(config.method)) or strategy == "sensitivity"
    windows = _calibration_windows(tokenizer, calibration, sentences=is_encoder(model),
                                   batch_size=config.batch_size) if needs_text else None
    if windows is not None and config.method == "whiten":
        warn_if_thin(windows, targets)
    if windows is not None and config.sequential and needs_statistics(config.method):
        windows = planning_windows(windows, config.plan_samples)  # what compress's planner profiles
    plan, _ = plan_model(model, targets, config.budget if config.budget is not None else config.ratio, strategy,
                         windows=windows, method=config.method, limits=config.limits(), overrides=config.overrides,
                         batch_size=config.batch_size, damping=config.damping, source=source, progress=progress,
                         reuse_statistics=not config.sequential,  # as compress profiles
                         sensitivity_samples=config.sensitivity_samples)
    return plan


def recover(
    source: "str | Path | nn.Module",
    config: RecoveryConfig | None = None,
    data: "list[str | Path] | torch.Tensor | None" = None,
    *,
    output: str | Path | None = None,
    eval_windows: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    extra_files: dict[str, str] | None = None,
):
    """Fine-tune the factors of a compressed `source` on `data` to win back accuracy.

    A saved folder is recovered into `output` (required then; lowrank.recovery.recover_folder):
    `data` is training text, `config.eval_texts` picks the best weights. A model in memory is
    trained in place (lowrank.training.recover): `data` is then a tensor of token windows, with
    optional `eval_windows` and `teacher` models. Returns the RecoveryResult.
    """

    config = config or RecoveryConfig()
    distributed.init_from_environment()  # under torchrun or accelerate: train with DDP
    progress = progress and distributed.is_writer()
    if isinstance(source, nn.Module):
        if not isinstance(data, torch.Tensor):
            raise LowrankError("recovering a model in memory needs data as a tensor of token windows (n, seq_len)")
        if output is not None:
            raise LowrankError("output= saves a recovered folder; pass a folder as source, or save the model yourself")
        return train_in_memory(source, data, config, eval_windows=eval_windows, teacher=teacher, progress=progress)
    if output is None:
        raise LowrankError(f"recovering {source} needs output=, the folder to write the recovered model to")
    if not data or isinstance(data, torch.Tensor):
        raise LowrankError("recovery needs training text; pass data=[...] with .txt files or a folder")
    if isinstance(data, (str, Path)):
        data = [data]
    return recover_folder(source, output, list(data), config, resume=resume, overwrite=overwrite, progress=progress,
                          extra_files=extra_files)


def _evaluation_windows(tokenizer, config: EvalConfig, windows: torch.Tensor | None) -> torch.Tensor:
    """The windows to score: `windows` as given, else non-overlapping windows of the config's text; at most max_windows."""
    if windows is None:
        if tokenizer is None:
            raise LowrankError("evaluating text needs a tokenizer; pass tokenizer=, or token windows as windows=")
        windows = text_windows(tokenizer, list(config.texts), None, config.seq_len, what="evaluation",
                               default="macbeth")
    return windows if config.max_windows is None else windows[:config.max_windows]


def evaluate(
    source: "str | Path | nn.Module",
    config: EvalConfig | None = None,
    *,
    tokenizer=None,
    windows: torch.Tensor | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
):
    """Perplexity of `source` (a name, folder, .gguf, hub id or a model in memory) on `config.texts`.

    An encoder (BERT and kin) has no perplexity: it is compared with its dense reference on the
    sentences of the text instead, and an EncoderAgreement is returned (lowrank.encoder_eval).

    The text is cut into non-overlapping windows of `config.seq_len` tokens (the first
    `config.max_windows` of them); pass `windows` to score token windows you made yourself.
    Returns the PerplexityResult.
    """

    config = config or EvalConfig()
    model, tokenizer_object = _open_source(source, tokenizer, config.dtype, resolve_device(config.device),
                                           trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                           need_tokenizer=windows is None)
    check_finite_weights(model)
    if is_encoder(model) and windows is None:
        return _evaluate_encoder(source, model, tokenizer_object, config, against=config.against,
                                 trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress)
    windows = _evaluation_windows(tokenizer_object, config, windows)
    return perplexity(model, windows, batch_size=config.batch_size, progress=progress)


def compare(
    source: "str | Path | nn.Module",
    config: EvalConfig | None = None,
    *,
    against: "str | Path | nn.Module | None" = None,
    tokenizer=None,
    windows: torch.Tensor | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> AgreementResult:
    """Agreement of `source` (usually a compressed folder) with a dense model, on the same windows.
    An encoder is compared on the sentences of the text instead (EncoderAgreement, as `evaluate` does).

    The dense model is `against`, else `config.against`; "plan" (or nothing) means the source recorded in the
    folder's plan. Returns both perplexities, top-1 agreement, KL(dense ‖ compressed) and generation agreement.
    """

    config = config or EvalConfig()
    against = against if against is not None else config.against
    device = resolve_device(config.device)
    model, tokenizer_object = _open_source(source, tokenizer, config.dtype, device, trust_remote_code=trust_remote_code,
                                           allow_pickle=allow_pickle, need_tokenizer=windows is None)
    check_finite_weights(model)
    if is_encoder(model) and windows is None:  # sentence embeddings, not next-token agreement
        return _evaluate_encoder(source, model, tokenizer_object, config, against=against,
                                 trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress)
    if against is None or against == "plan":
        against = plan_source(source)
    try:
        dense, _ = _open_source(against, None, config.dtype, device, trust_remote_code=trust_remote_code,
                                allow_pickle=allow_pickle, need_tokenizer=False)
    except LowrankError as exc:
        raise LowrankError(f"cannot load the dense model {against} ({exc}); pass --against with its path or name") \
            from None
    windows = _evaluation_windows(tokenizer_object, config, windows)
    return agreement(dense, model, windows, batch_size=config.batch_size, prompts=config.prompts,
                     prompt_tokens=config.prompt_tokens, generated_tokens=config.generated_tokens, progress=progress)


def evaluate_tasks(
    source: "str | Path | nn.Module",
    config: EvalConfig,
    *,
    tokenizer=None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness's zero-shot metrics of `source` on `config.tasks` (needs the extra lowrank[eval])."""

    if config.task_path is not None and not Path(config.task_path).is_dir():
        raise LowrankError(f"--task-path {config.task_path} is not a folder; give the folder holding the task YAML files")
    require_lm_eval()
    model, tokenizer_object = _open_source(source, tokenizer, config.dtype, resolve_device(config.device),
                                           trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if tokenizer_object is None:
        raise LowrankError("lm-eval tasks need a tokenizer; pass tokenizer= with the model's tokenizer")
    check_finite_weights(model)
    return run_tasks(model, tokenizer_object, list(config.tasks), task_path=config.task_path, limit=config.task_limit,
                     batch_size=config.batch_size)


def plan_source(source) -> str:
    """The dense model a compressed folder was made from, as its plan records it."""
    if isinstance(source, nn.Module) or not is_compressed_folder(source):
        raise LowrankError(f"{source if not isinstance(source, nn.Module) else 'the model'} is not a compressed folder, "
                           "so it records no dense source; pass --against DENSE")
    plan, _ = read_plan(source)
    if not plan.source:
        raise LowrankError(f"the plan of {source} records no source model; pass --against DENSE")
    return plan.source


def _evaluate_encoder(source, model: nn.Module, tokenizer, config: EvalConfig, *, against, trust_remote_code: bool,
                      allow_pickle: bool, progress: bool) -> EncoderAgreement:
    """An encoder's sentence embeddings against its dense model (`against`, else the plan's source)."""

    reference = against if against not in (None, "plan") else None
    if reference is None and not isinstance(source, nn.Module) and is_compressed_folder(str(source)):
        reference = read_plan(str(source))[0].source
    if reference is None:
        raise LowrankError(f"{type(model).__name__} is an encoder, measured against its dense original; "
                           "pass --against with the dense model")
    if tokenizer is None:
        raise LowrankError("evaluating an encoder needs a tokenizer; pass tokenizer= (or --tokenizer)")
    dense = _open_source(reference, None, config.dtype, resolve_device(config.device),
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, need_tokenizer=False)[0]
    text = load_text(list(config.texts) or [sample_text_path("macbeth")])
    return compare_encoders(model, dense, tokenizer, text, max_sentences=config.max_sentences,
                            max_length=config.seq_len, batch_size=max(config.batch_size, 1), progress=progress)


def report(
    folder: str | Path,
    config: EvalConfig | None = None,
    *,
    output: str | Path,
    source: str | None = None,
    before: bool = True,
    overwrite: bool = False,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a report on the compressed `folder` to `output`: ranks, parameters, the configs it was made with.

    With an EvalConfig, also the perplexity of the source model (`source`, default: the plan's;
    `before=False` skips it) and of `folder` on the same windows. Returns report.json's content.
    """

    if not is_compressed_folder(folder):
        raise LowrankError(f"{folder} is not a compressed lowrank folder (no lowrank_plan.json); "
                           "make one with `lowrank compress`, or use `lowrank analyze` on a dense model")
    check_output_dir(output, overwrite)
    check_output_spares_input(output, folder)
    plan, _ = read_plan(folder)
    ppl = None
    if config is not None:
        load_kwargs = {"dtype": torch_dtype(config.dtype), "device": resolve_device(config.device),
                       "tokenizer_source": tokenizer, "trust_remote_code": trust_remote_code,
                       "allow_pickle": allow_pickle}
        ppl = measure_perplexity(str(folder), (source or plan.source) if before else None, config, load_kwargs,
                                 progress)
    write_compressed_report(plan, str(folder), output, overwrite=overwrite, perplexity=ppl,
                            config=read_config_record(folder))
    return json.loads((Path(output) / "report.json").read_text(encoding="utf-8"))


def measure_perplexity(folder: str, source: str | None, config: EvalConfig, load_kwargs: dict,
                       progress: bool) -> dict[str, Any]:
    """Perplexity of the source model (before) and of the compressed folder (after), on the same windows."""

    after_model = load_model(folder, **load_kwargs)
    texts = list(config.texts)
    windows = text_windows(after_model.tokenizer, texts, None, config.seq_len, what="evaluation", default="macbeth")
    if config.max_windows is not None:
        windows = windows[:config.max_windows]
    after = perplexity(after_model.model, windows, batch_size=config.batch_size, progress=progress)
    del after_model
    before = None
    if source is not None:
        try:
            before_model = load_model(source, **load_kwargs)
        except LowrankError as exc:
            raise LowrankError(f"cannot load the source model recorded in the plan ({exc}); "
                               "pass --source with its path or name") from None
        before = perplexity(before_model.model, windows, batch_size=config.batch_size, progress=progress).perplexity
    return {"texts": texts or ["bundled:macbeth"], "seq_len": after.seq_len, "windows": after.windows,
            "tokens": after.tokens, "before": before, "after": after.perplexity}


def saved_configs(folder: str | Path) -> dict[str, Any]:
    """The configs a compressed or recovered folder was made with ({} for folders from before configs)."""
    return read_config_record(folder)
