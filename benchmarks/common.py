"""The protocol every SmolLM2 benchmark shares, so their numbers compare.

Calibration: 64 random windows of 512 tokens from Hamlet (seed 0).
Evaluation: the first 40 windows of 512 tokens of Macbeth (20,440 predicted tokens), a text
never used for calibration or training. Both texts ship in lowrank/data/texts.
"""

from __future__ import annotations

import copy
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from lowrank.calibration import text_windows
from lowrank.evaluation import perplexity
from lowrank.loading import load_model

REPORTS = Path(__file__).resolve().parent.parent / "reports"
CALIB_SAMPLES = 64
SEQ_LEN = 512
EVAL_WINDOWS = 40
SEED = 0


def load_smollm2():
    """The dense SmolLM2-135M (float32) and its tokenizer."""
    return load_model("smollm2-135m")


def calibration_windows(tokenizer, samples: int = CALIB_SAMPLES) -> torch.Tensor:
    return text_windows(tokenizer, None, samples, SEQ_LEN, SEED, default="hamlet")


def evaluation_windows(tokenizer, windows: int = EVAL_WINDOWS) -> torch.Tensor:
    return text_windows(tokenizer, None, None, SEQ_LEN, what="evaluation", default="macbeth")[:windows]


def eval_ppl(model, eval_windows: torch.Tensor) -> float:
    return perplexity(model, eval_windows, batch_size=4, progress=False).perplexity


def fresh_copy(model):
    """A deep copy to compress, leaving the dense model untouched."""
    return copy.deepcopy(model)


def cpu_seconds() -> float:
    """CPU time this process has used (all threads): unlike wall time, barely moved by other jobs on the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def minor_faults() -> int:
    """Minor page faults of this process so far: each a fresh page of memory touched for the first time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}; these memory probes need Linux")


def rss_mib() -> float:
    """Resident memory of this process now."""
    return _proc_status_mib("VmRSS")


def reset_peak_rss() -> None:
    """Restart the peak-RSS watermark (VmHWM) from the current RSS, so a later peak is one stage's own.

    ru_maxrss cannot do this, and a child process even inherits its parent's ru_maxrss across exec.
    Garbage and the heap glibc keeps after an earlier stage are given back first, so that they do not
    count as this stage's (they did in reports/refinement-one-run.md, whose later rows start higher).
    """
    import gc

    from lowrank.block_source import release_freed_memory

    gc.collect()
    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")


def stage_peak_rss_mib() -> float:
    """Peak resident memory since the last `reset_peak_rss`."""
    return _proc_status_mib("VmHWM")


def processor_name() -> str:
    """The processor's model name and the vector unit torch's kernels use ("AMD EPYC, AVX2"): hosts differ run to run."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def environment() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": processor_name(),
        "date": time.strftime("%Y-%m-%d"),
    }


def dense_baseline():
    """The dense model, its tokenizer, both window sets, its targets and its perplexity (printed)."""
    from lowrank.targets import find_targets

    loaded = load_smollm2()
    model, tokenizer = loaded.model, loaded.tokenizer
    calib = calibration_windows(tokenizer)
    evaluation = evaluation_windows(tokenizer)
    started = time.perf_counter()
    dense_ppl = eval_ppl(model, evaluation)
    print(f"dense: {dense_ppl:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return model, tokenizer, calib, evaluation, find_targets(model), dense_ppl


def write_report(name: str, data: dict, markdown: str) -> None:
    """reports/<name>.json (every number) and reports/<name>.md (a table for people)."""
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (REPORTS / f"{name}.md").write_text(markdown)
