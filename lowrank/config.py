"""The settings of every stage as versioned dataclasses: defaults in one place, checked on construction.

`CompressConfig`, `CalibrationConfig`, `RecoveryConfig` and `EvalConfig` are what the Python
entry points (lowrank.api), the CLI and recipes all build. Each validates itself in
`__post_init__` with a one-line `LowrankError` naming the field and the fix, and round-trips
through plain dicts (`to_dict` / `from_dict`), which refuse unknown keys and wrong types.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .budget import Budget, RankLimits, parse_overrides
from .calibration import DEFAULT_PLAN_SAMPLES, DEFAULT_UPDATE_SAMPLES
from .config_base import CONFIG_VERSION, DTYPE_NAMES, ConfigBase, at_least, check_dtype_and_device, check_regex
from .distill import HIDDEN_LAYERS, HIDDEN_LOSSES, LOSSES
from .errors import LowrankError
from .factorize import DEFAULT_DAMPING, METHODS
from .planner import STRATEGIES, check_ratio
from .profiling import DEFAULT_SENSITIVITY_SAMPLES
from .refinement import RefineOptions
from .shard_writer import parse_size
from .speed_model import parse_round_to

#: The file, in every output folder, that records the configs the folder was made with.
CONFIG_FILE = "lowrank_config.json"

MODES = ("factors", "lora")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
#: Peak learning rates that work without tuning: the factors themselves move gently, LoRA adapters start at zero.
DEFAULT_LR = {"factors": 1e-4, "lora": 1e-3}


# ---- the stages ---------------------------------------------------------------------------------

@dataclass
class CompressConfig(ConfigBase):
    """How to compress: method, budget (ratio, or budget which overrides it), planner and rank limits."""

    SECTION: ClassVar[str] = "compress"

    version: int = CONFIG_VERSION
    method: str = "whiten"              # whiten (SVD-LLM), asvd or svd (needs no calibration)
    ratio: float = 0.8                  # fraction of the target layers' parameters kept, when budget is None
    budget: str | float | None = None   # overrides ratio: 0.6, target:0.6, model:0.7 or a count such as 90M
    strategy: str | None = None         # None: planner.default_strategy(method, model)
    plan: str | None = None             # a plan file (lowrank plan): fixes every rank
    include: str | None = None          # regex: factor only matching modules
    exclude: str | None = None          # regex: never factor matching modules
    min_rank: int = 1
    max_rank: int | None = None
    round_to: int | str = 1             # every rank a multiple of this; "auto": what the device likes (timed)
    overrides: dict[str, int | float | str] | None = None  # regex → rank, fraction or "dense" (PEFT's rank_pattern)
    sequential: bool = True             # block by block, each from the compressed blocks' outputs
    update: bool | None = None          # least-squares refit of `up`; None: on when sequential
    damping: float = DEFAULT_DAMPING    # added to the Gram diagonal, relative to its mean
    batch_size: int = 8                 # calibration windows per forward pass
    plan_samples: int = DEFAULT_PLAN_SAMPLES  # sequential: windows the planner profiles (0: all of them)
    update_samples: int = DEFAULT_UPDATE_SAMPLES  # sequential: windows the least-squares update fits on (0: all)
    sensitivity_samples: int = DEFAULT_SENSITIVITY_SAMPLES  # sensitivity planner: windows backpropagated for the prices
    device: str = "auto"                # where the math runs (auto: CUDA if available)
    dtype: str = "float32"              # precision the model is loaded and saved in
    stream: bool | None = None          # read the checkpoint block by block from disk (lowrank.streaming);
                                        # None: whenever the source can be read so (streaming.should_stream)
    offload_dir: str | None = None      # with stream: boundary activations past the memory cap go here
    max_memory: str | None = None       # with stream: memory the run may use, e.g. 8GB (None: what is free now)
    max_shard_size: str = "2GB"         # largest output shard
    save_dtype: str = "source"          # with stream: dtype of the saved weights (source: the checkpoint's own)
    refine_steps: int = 0               # Adam steps per block on its factors against the dense block (0: off)
    refine_lr: float = 3e-3             # the refinement's learning rate, relative to each tensor's RMS
    refine_share: float = 0.125         # fraction of the calibration batches in each refinement step
    refine_norms: bool = False          # the refinement also trains the block's biases and norm weights
    refine_dense: bool = False          # the refinement also trains the block's linear layers the plan kept dense
    refine_holdout: float = 0.125       # share of the calibration batches the refinement never trains on (its stop signal)
    refine_refit: int = 0               # rounds of the closed-form refit of both factors in the update (0: `up` alone)
    refine_loss: str = "token"          # the refinement's loss: each token's error relative to its size, or plain mse

    def __post_init__(self) -> None:
        self._check_types()
        self._check_stream()
        if self.method not in METHODS:
            raise LowrankError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise LowrankError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        check_ratio(self.ratio)
        if self.budget is not None:
            Budget.parse(self.budget)
        if self.plan is not None and self.budget is not None:
            raise LowrankError("--plan already fixes every rank; drop --budget (or drop --plan to plan inline)")
        if isinstance(self.round_to, str):
            self.round_to = parse_round_to(self.round_to)  # "auto", or a number written as text
        self.limits()  # min_rank / max_rank / round_to messages
        parse_overrides(self.overrides)
        check_regex(self.SECTION, "--include", self.include)
        check_regex(self.SECTION, "--exclude", self.exclude)
        at_least(self.SECTION, "batch_size", self.batch_size, 1, "--batch-size")
        at_least(self.SECTION, "plan_samples", self.plan_samples, 0, "--plan-samples")
        at_least(self.SECTION, "update_samples", self.update_samples, 0, "--update-samples")
        at_least(self.SECTION, "sensitivity_samples", self.sensitivity_samples, 1, "--sensitivity-samples")
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise LowrankError(f"compress.damping must be a finite number ≥ 0, got {self.damping}")
        check_dtype_and_device(self)
        if self.refinement().enabled and (not self.sequential or self.method == "svd"):
            raise LowrankError("--refine-steps trains each block against the dense block on calibration windows, "
                               "block by block; add --sequential and --method whiten, or drop --refine-steps")
        if self.refinement().refit_rounds and (not self.sequential or self.update is False or self.method == "svd"):
            raise LowrankError("--refine-refit refits both factors inside the least-squares update, block by block; "
                               "add --sequential --update and --method whiten, or drop --refine-refit")

    def refinement(self) -> RefineOptions:
        """The block refinement's options (lowrank.refinement); steps 0 means none."""
        return RefineOptions(steps=self.refine_steps, lr=self.refine_lr, share=self.refine_share,
                             train_norms=self.refine_norms, train_dense=self.refine_dense,
                             holdout=self.refine_holdout, refit_rounds=self.refine_refit, loss=self.refine_loss)

    def _check_stream(self) -> None:
        if self.save_dtype not in ("source",) + DTYPE_NAMES:
            raise LowrankError(f"compress.save_dtype {self.save_dtype!r} is unknown; choose one of source, "
                               f"{', '.join(DTYPE_NAMES)}")
        parse_size(self.max_shard_size, "--max-shard-size")
        if self.max_memory is not None:
            parse_size(self.max_memory, "--max-memory")
        used = [flag for flag, value in (("--offload-dir", self.offload_dir), ("--max-memory", self.max_memory),
                                         ("--save-dtype", None if self.save_dtype == "source" else 1))
                if value is not None]
        if self.stream is False and used:
            raise LowrankError(f"{used[0]} applies to streaming compression; drop --no-stream")
        if not self.stream:
            return
        if not self.sequential:
            raise LowrankError("--stream compresses block by block on the compressed path; drop --one-shot")
        if self.method == "svd":
            raise LowrankError("--stream calibrates block by block, which method svd does not use; "
                               "pass --method whiten, or drop --stream")

    def limits(self) -> RankLimits:
        """The rank limits; `round_to="auto"` counts as 1 until `speed_model.resolve_round_to` decides it."""
        round_to = 1 if self.round_to == "auto" else self.round_to
        return RankLimits(min_rank=self.min_rank, max_rank=self.max_rank, round_to=round_to)


@dataclass
class CalibrationConfig(ConfigBase):
    """The calibration windows: which text, how many windows of how many tokens, drawn with which seed."""

    SECTION: ClassVar[str] = "calibration"

    version: int = CONFIG_VERSION
    texts: list[str] = field(default_factory=list)  # .txt files, folders, hf:PATH[:CONFIG[:SPLIT]], wikitext2; [] = Hamlet
    samples: int = 64                   # windows drawn at random
    seq_len: int = 512                  # tokens per window
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.texts, (tuple, list)):
            self.texts = [str(t) for t in self.texts]
        self._check_types()
        at_least(self.SECTION, "samples", self.samples, 1, "--samples")
        if self.seq_len < 2:
            raise LowrankError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")


@dataclass
class RecoveryConfig(ConfigBase):
    """Every knob of a recovery run; the defaults suit a small model on a CPU.

    Two defaults had drifted between the CLI and the API; each now has one value, here:
    - `lr=None` means the mode's default (DEFAULT_LR: 1e-4 for factors, 1e-3 for LoRA adapters).
      The CLI already did this; the API gave LoRA 1e-4, too small for adapters that start at zero.
      It is resolved on construction, so `to_dict()` records the rate used.
    - `checkpoint_every=50` (the CLI's; the API had 0): a long run survives Ctrl-C by default, for
      the cost of writing the factors every 50 steps. Only folder-level recovery writes checkpoints.
    """

    SECTION: ClassVar[str] = "recover"

    version: int = CONFIG_VERSION
    mode: str = "factors"          # "factors": train the factors; "lora": LoRA adapters on them, merged after
    loss: str = "distill"          # "ce", "distill" (KL to the dense teacher), "both"; encoders: "cosine", "mse", "embedding"
    hidden_layers: str = "last"    # hidden-state losses: match the teacher's "last" layer or "all" layers
    steps: int = 200               # optimizer steps
    lr: float | None = None        # peak learning rate; None: DEFAULT_LR[mode]
    relative_lr: bool = False      # lr relative to each tensor's RMS (one rate per tensor) instead of absolute
    min_lr_ratio: float = 0.1      # the cosine decays to lr·min_lr_ratio
    warmup: int = 10               # linear warmup steps
    weight_decay: float = 0.0
    batch_size: int = 4            # windows per micro-batch
    grad_accum: int = 1            # micro-batches per optimizer step
    seq_len: int = 256             # tokens per training window
    clip: float = 1.0              # max gradient norm (0: no clipping)
    temperature: float = 1.0       # distillation temperature
    distill_weight: float = 0.5    # weight of the distillation term when loss="both"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    teacher: str | None = None     # dense model to distil from; None: the source recorded in the folder's plan
    eval_texts: list[str] = field(default_factory=list)  # held-out text that picks the best weights; [] = none
    eval_windows: int = 16         # first N windows of eval_texts (0: all)
    eval_every: int = 0            # evaluate every N steps (0: only before and after)
    eval_batch_size: int = 4
    patience: int = 0              # stop after N evaluations without improvement (0: never)
    checkpoint_every: int = 50     # write a resumable checkpoint every N steps (0: never)
    gradient_checkpointing: bool = False
    precision: str = "auto"        # autocast: auto = bfloat16/float16 on CUDA, float32 on CPU
    seed: int = 0
    dtype: str = "float32"         # precision the model is loaded, trained and saved in
    device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.eval_texts, (tuple, list)):
            self.eval_texts = [str(t) for t in self.eval_texts]
        self._check_types()
        if self.mode in MODES and self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        self.validate()

    def validate(self) -> None:
        """Raise a one-line LowrankError naming the first bad option."""
        if self.mode not in MODES:
            raise LowrankError(f"unknown --mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.loss not in LOSSES:
            raise LowrankError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.hidden_layers not in HIDDEN_LAYERS:
            raise LowrankError(f"unknown --hidden-layers {self.hidden_layers!r}; choose one of {', '.join(HIDDEN_LAYERS)}")
        if self.loss in HIDDEN_LOSSES and self.eval_texts:
            raise LowrankError(f"--eval picks the best weights by perplexity, which --loss {self.loss} (an encoder) "
                               "has not; drop --eval and measure with `lowrank eval`")
        if self.precision not in PRECISIONS:
            raise LowrankError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise LowrankError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise LowrankError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        for name in ("warmup", "eval_every", "patience", "checkpoint_every", "eval_windows"):
            if getattr(self, name) < 0:
                raise LowrankError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.lr is None or not (self.lr > 0 and math.isfinite(self.lr)):
            raise LowrankError(f"--lr must be a positive number, got {self.lr}")
        if self.clip < 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise LowrankError("--clip and weight decay must be ≥ 0 and min_lr_ratio in [0, 1]")
        if self.temperature <= 0:
            raise LowrankError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.distill_weight <= 1:
            raise LowrankError(f"--distill-weight must lie in [0, 1], got {self.distill_weight}")
        check_dtype_and_device(self)

    @property
    def needs_teacher(self) -> bool:
        return self.loss in ("distill", "both") + HIDDEN_LOSSES


@dataclass
class EvalConfig(ConfigBase):
    """Evaluation: perplexity on text, agreement with a dense model, zero-shot tasks; window length, precision;
    for an encoder, how many sentences (embedding agreement with the dense model instead of perplexity)."""

    SECTION: ClassVar[str] = "eval"

    version: int = CONFIG_VERSION
    texts: list[str] = field(default_factory=list)  # [] = Macbeth, bundled and never used for calibration
    seq_len: int = 512
    max_windows: int | None = None     # only the first N windows (None: all of the text)
    batch_size: int = 4
    dtype: str = "float32"
    device: str = "auto"
    # agreement with the dense model (lowrank.agreement): None = perplexity only; "plan" = the plan's source.
    # An encoder is always measured against its dense model: this one, else the plan's source.
    against: str | None = None
    prompts: int = 16                  # greedy-generation prompts: the first tokens of the first N windows
    prompt_tokens: int = 32
    generated_tokens: int = 32
    # zero-shot tasks through lm-evaluation-harness (lowrank.lm_harness); [] = none
    tasks: list[str] = field(default_factory=list)
    task_path: str | None = None       # a folder of local lm-eval task YAML files (lm-eval's include_path)
    task_limit: int | None = None      # only the first N examples of each task
    max_sentences: int | None = None   # encoders: only the first N sentences (None: all of the text)

    def __post_init__(self) -> None:
        if isinstance(self.texts, (tuple, list)):
            self.texts = [str(t) for t in self.texts]
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        self._check_types()
        if self.seq_len < 2:
            raise LowrankError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        at_least(self.SECTION, "max_windows", self.max_windows, 1, "--max-windows")
        at_least(self.SECTION, "max_sentences", self.max_sentences, 2, "--max-sentences")
        at_least(self.SECTION, "batch_size", self.batch_size, 1, "--batch-size")
        at_least(self.SECTION, "prompts", self.prompts, 1, "--prompts")
        at_least(self.SECTION, "prompt_tokens", self.prompt_tokens, 1, "--prompt-tokens")
        at_least(self.SECTION, "generated_tokens", self.generated_tokens, 1, "--generated-tokens")
        at_least(self.SECTION, "task_limit", self.task_limit, 1, "--task-limit")
        if self.against is not None and self.prompt_tokens > self.seq_len:
            raise LowrankError(f"--prompt-tokens {self.prompt_tokens} is longer than --seq-len {self.seq_len}; "
                               "prompts are the first tokens of the evaluation windows")
        check_dtype_and_device(self)


@dataclass
class BenchConfig(ConfigBase):
    """Inference speed, dense against compressed: batch sizes, prompt length, decoded tokens, repeats, precision."""

    SECTION: ClassVar[str] = "bench"

    version: int = CONFIG_VERSION
    against: str | None = None         # the dense model; None = the source recorded in the folder's plan
    batch_sizes: list[str] = field(default_factory=lambda: ["1", "8"])
    seq_len: int = 512                 # prompt tokens (prefill)
    new_tokens: int = 32               # greedy tokens decoded after the prompt, with the KV cache
    repeats: int = 5                   # timed repeats per measurement; the median is reported
    warmup: int = 1                    # untimed runs first
    memory: bool = True                # peak memory, measured in a fresh child process per model
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None         # CPU threads for torch (None: torch's default); 1 times with CPU time
    predict: bool = True               # also time the plan's matmuls alone: the predicted prefill ratio

    def __post_init__(self) -> None:
        if isinstance(self.batch_sizes, (tuple, list)):
            self.batch_sizes = [str(b).strip() for b in self.batch_sizes]
        self._check_types()
        for value in self.batch_sizes:
            if not value.isdigit() or int(value) < 1:
                raise LowrankError(f"--batch-sizes {value!r} is not a positive integer; give e.g. --batch-sizes 1,8")
        if not self.batch_sizes:
            raise LowrankError("--batch-sizes is empty; give e.g. --batch-sizes 1,8")
        at_least(self.SECTION, "seq_len", self.seq_len, 1, "--seq-len")
        at_least(self.SECTION, "new_tokens", self.new_tokens, 1, "--new-tokens")
        at_least(self.SECTION, "repeats", self.repeats, 1, "--repeats")
        at_least(self.SECTION, "warmup", self.warmup, 0, "--warmup")
        if self.threads is not None:
            at_least(self.SECTION, "threads", self.threads, 1, "--threads")
        check_dtype_and_device(self)

    def batches(self) -> list[int]:
        return [int(b) for b in self.batch_sizes]


def read_config_record(folder: str | Path) -> dict[str, Any]:
    """The configs a saved folder was made with (its lowrank_config.json), or {} when it has none."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LowrankError(f"cannot read {path} ({exc}); the folder is damaged, remake it") from None
    if not isinstance(record, dict):
        raise LowrankError(f"{path} is not a JSON object; the folder is damaged, remake it")
    return record


CONFIG_CLASSES: dict[str, type[ConfigBase]] = {
    "compress": CompressConfig, "calibration": CalibrationConfig, "recover": RecoveryConfig, "eval": EvalConfig,
}
