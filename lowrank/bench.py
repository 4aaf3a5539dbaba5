"""Inference speed, dense against compressed, on one device in one run: prefill, decode, memory, file size.

Timings are medians of repeats after warm-up runs; the two models alternate repeat by repeat, so a
change in machine load hits both alike. On CUDA, times come from CUDA events. Peak memory is measured
in a fresh child process per model (a process's allocator keeps freed memory, which would hide the
second model's peak behind the first's).
"""

from __future__ import annotations

import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .agreement import cache_keyword, greedy_tokens, kv_cache


@dataclass
class SpeedResult:
    """One model at one batch size: medians over `repeats` runs."""

    batch_size: int
    seq_len: int
    new_tokens: int
    prefill_seconds: float            # the prompt's forward pass: KV cache and the last position's logits
    decode_tokens_per_second: float   # batch_size × new_tokens / time of the greedy decode steps
    prefill_runs: list[float] = field(default_factory=list)
    decode_runs: list[float] = field(default_factory=list)


class Timer:
    """Time of a block: CUDA events (after synchronizing) on GPU; on CPU `speed_model.clock`, the computing
    thread's CPU time when torch runs on one thread (immune to other processes on a shared machine), else wall time."""

    def __init__(self, device: torch.device):
        from .speed_model import clock

        self.cuda = device.type == "cuda"
        self.now = clock(device)

    def __enter__(self) -> "Timer":
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.began = self.now()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = self.now() - self.began


@torch.no_grad()
def time_once(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation of `new_tokens` tokens after `prompts`."""
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    timer = Timer(device)
    keyword = cache_keyword(model)
    # like generate(): the prompt's pass computes the logits of its last position only, where the model allows it
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with timer:
        output = model(input_ids=prompts, use_cache=True, **last_only)
    prefill = timer.seconds
    next_token = output.logits[:, -1].argmax(-1)
    with timer:
        cache = kv_cache(output)
        for _ in range(new_tokens):
            output = model(input_ids=next_token[:, None], use_cache=True, **{keyword: cache})
            cache = kv_cache(output)
            next_token = output.logits[:, -1].argmax(-1)
    return prefill, timer.seconds


def measure_speed(models: dict[str, nn.Module], prompts: torch.Tensor, batch_sizes: list[int], new_tokens: int,
                  repeats: int, warmup: int, progress: bool = True) -> dict[str, list[SpeedResult]]:
    """Per model, per batch size: prefill latency and decode throughput, the models alternating run by run."""
    from tqdm.auto import tqdm

    for model in models.values():
        model.eval()
    runs = {name: {b: ([], []) for b in batch_sizes} for name in models}
    steps = [(b, r) for b in batch_sizes for r in range(warmup + repeats)]
    for batch, run in tqdm(steps, desc="Timing", unit="run", disable=not progress):
        for name, model in models.items():
            prefill, decode = time_once(model, prompts[:batch], new_tokens)
            if run >= warmup:
                runs[name][batch][0].append(prefill)
                runs[name][batch][1].append(decode)
    return {name: [SpeedResult(b, prompts.shape[1], new_tokens, statistics.median(p),
                               b * new_tokens / statistics.median(d), p, d)
                   for b, (p, d) in per_batch.items()]
            for name, per_batch in runs.items()}


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers in memory (tied weights once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def linear_macs_per_token(model: nn.Module) -> int:
    """Multiply-adds per token of the model's linear layers below the head (what factoring changes)."""
    from .layers import LowRankLinear

    factored = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    skip = {id(model.get_output_embeddings())} | {id(f) for m in factored for f in (m.down, m.up)}
    dense = sum(m.in_features * m.out_features for m in model.modules()
                if isinstance(m, nn.Linear) and id(m) not in skip)
    return dense + sum(m.rank * (m.in_features + m.out_features) for m in factored)


def weight_file_bytes(source: str, model: nn.Module) -> tuple[int, str]:
    """Bytes of the safetensors weight files of `source`; for other sources (GGUF, hub), of the model saved as one.

    Returns the size and how it was obtained.
    """
    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    if files:
        return sum(f.stat().st_size for f in files), "safetensors files"
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")), "saved as safetensors"


# ---- peak memory, in a fresh child process -----------------------------------------------------

def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {key}")


def _child_peak_memory(request: dict) -> dict:
    """Run in a child: load the model, then one generation per batch size; the peak memory each needed."""
    from .config_base import torch_dtype
    from .loading import load_model

    device = request["device"]
    model = load_model(request["source"], dtype=torch_dtype(request["dtype"]), device=device,
                       need_tokenizer=False, tokenizer_source=request.get("tokenizer")).model.eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    result = {"weights_mib": parameter_bytes(model) / 2**20, "peak_mib": {}}
    for batch in request["batch_sizes"]:
        prompts = torch.randint(0, vocab, (batch, request["seq_len"]), generator=generator).to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            greedy_tokens(model, prompts, request["new_tokens"])
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            with torch.no_grad():  # fault in every weight page first: safetensors are memory-mapped, read on first use
                model(input_ids=prompts[:1, :8])
            Path("/proc/self/clear_refs").write_text("5")  # restart the peak-RSS watermark (VmHWM) from now
            base = _status_mib("VmRSS")
            greedy_tokens(model, prompts, request["new_tokens"])
            extra = _status_mib("VmHWM") - base
        result["peak_mib"][str(batch)] = result["weights_mib"] + max(extra, 0.0)
    return result


def peak_memory(source: str, batch_sizes: list[int], seq_len: int, new_tokens: int, dtype: str, device: str,
                tokenizer: str | None = None) -> dict:
    """Weights in memory plus the peak growth during one generation, per batch size (MiB).

    One fresh child process per batch size, so no batch inherits memory another one freed.
    """
    result: dict = {"peak_mib": {}}
    for batch in batch_sizes:
        request = {"source": str(source), "batch_sizes": [batch], "seq_len": seq_len, "new_tokens": new_tokens,
                   "dtype": dtype, "device": device, "tokenizer": tokenizer}
        done = subprocess.run([sys.executable, "-m", "lowrank.bench", json.dumps(request)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the memory probe for {source} failed: {last}")
        child = json.loads(done.stdout.strip().splitlines()[-1])
        result["weights_mib"] = child["weights_mib"]
        result["peak_mib"].update(child["peak_mib"])
    return result


def speed_table(results: dict[str, list[SpeedResult]], memory: dict[str, dict] | None, file_bytes: dict[str, int],
                dense: str, compressed: str) -> str:
    """A markdown table: one row per model and batch size, the compressed model's ratios to the dense one."""
    lines = ["| model | batch | prefill (s) | × dense | decode (tokens/s) | × dense | peak memory (MiB) | "
             "weight files (MiB) | × dense |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    dense_by_batch = {r.batch_size: r for r in results[dense]}
    for name in (dense, compressed):
        for r in results[name]:
            d = dense_by_batch[r.batch_size]
            peak = f"{memory[name]['peak_mib'][str(r.batch_size)]:.0f}" if memory else "–"
            lines.append(f"| {name} | {r.batch_size} | {r.prefill_seconds:.4f} | {r.prefill_seconds / d.prefill_seconds:.3f} | "
                         f"{r.decode_tokens_per_second:.1f} | "
                         f"{r.decode_tokens_per_second / d.decode_tokens_per_second:.3f} | {peak} | "
                         f"{file_bytes[name] / 2**20:.1f} | {file_bytes[name] / file_bytes[dense]:.4f} |")
    return "\n".join(lines)


def benchmark(folder: str, config=None, *, tokenizer: str | None = None, progress: bool = True) -> dict:
    """Dense (config.against, default the plan's source) against compressed `folder`: speed, memory, file size.

    Returns a JSON-ready record with the medians, every timed run, and a markdown table under "table".
    """
    from .config import BenchConfig

    config = config or BenchConfig()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _benchmark(folder, config, tokenizer, progress)
    finally:
        torch.set_num_threads(threads)


def _benchmark(folder: str, config, tokenizer: str | None, progress: bool) -> dict:
    from .api import plan_source
    from .calibration import text_windows
    from .config_base import resolve_device, torch_dtype
    from .errors import LowrankError
    from .loading import load_model

    dense_source = config.against or plan_source(folder)
    device = resolve_device(config.device)
    load = dict(dtype=torch_dtype(config.dtype), device=device, tokenizer_source=tokenizer)
    compressed = load_model(str(folder), **load)
    try:
        dense = load_model(str(dense_source), need_tokenizer=False, **load)
    except LowrankError as exc:
        raise LowrankError(f"cannot load the dense model {dense_source} ({exc}); pass --against with its path or name") \
            from None
    batches = config.batches()
    prompts = text_windows(compressed.tokenizer, None, None, config.seq_len, what="benchmark", default="macbeth")
    if prompts.shape[0] < max(batches):
        raise LowrankError(f"the benchmark text has {prompts.shape[0]} windows of {config.seq_len} tokens, fewer than "
                           f"batch {max(batches)}; lower --batch-sizes or --seq-len")
    names = {"dense": dense.model, "compressed": compressed.model}
    results = measure_speed(names, prompts[:max(batches)], batches, config.new_tokens, config.repeats, config.warmup,
                            progress)
    files = {"dense": weight_file_bytes(str(dense_source), dense.model)[0],
             "compressed": weight_file_bytes(str(folder), compressed.model)[0]}
    params = {"dense": parameter_bytes(dense.model), "compressed": parameter_bytes(compressed.model)}
    macs = {"dense": linear_macs_per_token(dense.model), "compressed": linear_macs_per_token(compressed.model)}
    del dense, compressed, names
    predicted = predict_prefill(folder, results, device, torch_dtype(config.dtype), config.seq_len,
                                min(config.repeats, 3)) if config.predict else None
    memory = None
    if config.memory:
        memory = {"dense": peak_memory(str(dense_source), batches, config.seq_len, config.new_tokens, config.dtype,
                                       device, tokenizer),
                  "compressed": peak_memory(str(folder), batches, config.seq_len, config.new_tokens, config.dtype,
                                            device, tokenizer)}
    return {"dense": str(dense_source), "compressed": str(folder), "device": device,
            "threads": torch.get_num_threads(), "clock": clock_name(torch.device(device)), "speed": to_dict(results), "memory": memory, "file_bytes": files,
            "parameter_bytes": params, "linear_macs_per_token": macs,
            "predicted_linear_speedup": macs["dense"] / macs["compressed"], "predicted": predicted,
            "config": config.to_dict(),
            "table": speed_table(results, memory, files, "dense", "compressed")}


def predict_prefill(folder: str, results: dict[str, list[SpeedResult]], device: str, dtype: torch.dtype,
                    seq_len: int, repeats: int) -> list[dict]:
    """Per batch size: the prefill ratio predicted from the plan's matmuls timed alone, beside the measured one.

    The rest of the prefill (attention, norms, embeddings) is the same in both models, so the prediction is
    (dense prefill − dense linear time + factored linear time) / dense prefill.
    """
    from .checkpoint import read_plan
    from .speed_model import measure_ranks, predicted_seconds

    plan, _ = read_plan(folder)
    modules = {name: (m.shape, m.rank) for name, m in plan.modules.items()}
    rows = []
    for dense_run, compressed_run in zip(results["dense"], results["compressed"]):
        tokens = dense_run.batch_size * seq_len
        table = measure_ranks(modules, device, dtype, tokens=tokens, repeats=repeats)
        linear_dense, linear_planned = predicted_seconds(modules, table)
        total = dense_run.prefill_seconds
        rows.append({"batch_size": dense_run.batch_size, "tokens": tokens, "linear_dense_seconds": linear_dense,
                     "linear_planned_seconds": linear_planned, "linear_ratio": linear_planned / linear_dense,
                     "predicted_prefill_ratio": (total - linear_dense + linear_planned) / total,
                     "measured_prefill_ratio": compressed_run.prefill_seconds / total})
    return rows


def clock_name(device: torch.device) -> str:
    """What the timings measure, for the record (see Timer)."""
    from .speed_model import clock

    if device.type == "cuda":
        return "CUDA events"
    return "CPU time of the computing thread" if clock(device) is time.thread_time else "wall time"


def to_dict(results: dict[str, list[SpeedResult]]) -> dict[str, list[dict]]:
    return {name: [asdict(r) for r in rows] for name, rows in results.items()}


if __name__ == "__main__":  # the memory probe's child process
    print(json.dumps(_child_peak_memory(json.loads(sys.argv[1]))))
