"""Peak memory and wall time of streamed against in-memory compression, on synthetic random Llamas.

    python benchmarks/bench_memory.py make /tmp/syn-11 --layers 11            # hidden 2048, MLP 5632 (≈0.6B)
    python benchmarks/bench_memory.py run /tmp/syn-11 --mode stream           # one measured run, in a child
    python benchmarks/bench_memory.py run /tmp/syn-11 --mode memory
    python benchmarks/bench_memory.py run /tmp/syn-11 --mode floor            # one dense forward pass
    python benchmarks/bench_memory.py report                                  # reports/memory.{json,md}

Every `run` is a separate process (`--child`), so its peak resident set (VmHWM in /proc/self/status)
is its own; the result is merged into reports/memory.json under a key naming the checkpoint and mode.
The default compress runs: sensitivity planner, sequential, update; calibration 8 windows of 256
random token ids (seed 0). The floor is one dense forward pass over the same windows, block by block
from disk (what the profile pass's forward does).
"""

from __future__ import annotations

import os

# Before torch starts its OpenMP runtime (as `import lowrank` does): idle OpenMP threads sleep
# instead of spinning. Without it, on shared cores, LAPACK's SVD and eigh ran up to 30× slower, and
# the first streamed rows of reports/memory.md (measured so) were mostly that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPORTS = Path(__file__).resolve().parent.parent / "reports"
RESULTS = REPORTS / "memory.json"


def make_checkpoint(folder: Path, layers: int, hidden: int, mlp: int, dtype: str, vocab: int = 32000) -> None:
    """A random Llama written shard by shard (one shard per block), never whole in memory."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 512),
                                      vocab_size=vocab, tie_word_embeddings=False, dtype=dtype,
                                      architectures=["LlamaForCausalLM"])
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch_dtype)

    def shard(i: int) -> dict[str, torch.Tensor]:
        if i == 0:
            return {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
                    "model.norm.weight": torch.ones(hidden, dtype=torch_dtype)}
        p = f"model.layers.{i - 1}."
        return {p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv, hidden),
                p + "self_attn.v_proj.weight": rand(kv, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
                p + "mlp.gate_proj.weight": rand(mlp, hidden), p + "mlp.up_proj.weight": rand(mlp, hidden),
                p + "mlp.down_proj.weight": rand(hidden, mlp),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch_dtype),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch_dtype)}

    weight_map, total, count = {}, 0, layers + 1
    for i in range(count):  # each shard made, written and dropped in turn
        tensors = shard(i)
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({key: name for key in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _watch(tracer, log: Path, started: float, every: float = 30.0) -> None:
    """Every `every` seconds, the stage running, VmHWM and the peak per stage so far, as one JSON line in `log`:
    a run stopped before its end still says how far it got and what it peaked at."""
    import threading

    def loop():
        while not tracer._stop.wait(every):
            snapshot = {"seconds": round(time.perf_counter() - started), "stage": tracer.stack[-1],
                        "peak_rss_bytes": vm_hwm_bytes(), "stage_peaks": dict(tracer.peaks)}
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(snapshot) + "\n")

    threading.Thread(target=loop, daemon=True).start()


def child(folder: Path, mode: str, samples: int, seq_len: int, offload: str | None, log: Path | None = None,
          keep: Path | None = None, max_memory: str | None = None) -> dict:
    """One measured run in this process; returns its numbers (with the peak VmRSS per stage where traced)."""
    import lowrank
    from lowrank.config import CompressConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trace_memory import Tracer, install

    tracer = Tracer(interval=0.02)
    install(tracer)
    tracer.__enter__()
    if log is not None:
        _watch(tracer, log, time.perf_counter())

    windows = torch.randint(0, 32000, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    result: dict = {}
    if mode == "floor":
        from lowrank.block_capture import capture_block_inputs, run_block
        from lowrank.block_source import BlockSource

        source = BlockSource(folder)
        captured = capture_block_inputs(source.model, windows, 8, "cpu")
        hidden = captured.hidden
        with torch.no_grad():
            for index in range(len(source.blocks)):
                block = source.load_block(index)
                hidden = [run_block(block, h, c, torch.device("cpu")) for h, c in zip(hidden, captured.calls[index])]
                source.free_block(index)
    else:
        out = Path(tempfile.mkdtemp(prefix="bench-memory-", dir="/tmp")) / "out"
        config = CompressConfig(stream=mode == "stream", offload_dir=offload, max_memory=max_memory)
        source = str(folder)
        if mode == "memory":  # today's path: the whole model loaded (no tokenizer in a synthetic folder)
            import transformers

            source = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        try:
            plan = lowrank.compress(source, config, windows, output=out, progress=False)
            result["stage_seconds"] = plan.options.get("stage_seconds")
            result["target_ratio"] = plan.summary()["target_ratio"]
            result["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            if keep is not None:  # for benchmarks/check_reload.py
                shutil.move(str(out), str(keep))
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
    tracer.__exit__(None, None, None)
    result.update({"wall_seconds": round(time.perf_counter() - started, 1), "peak_rss_bytes": vm_hwm_bytes(),
                   "stage_peaks": {label: tracer.peaks[label] for label in tracer.order}})
    return result


def checkpoint_facts(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    size = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    return {"layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
            "mlp": config["intermediate_size"], "dtype": config.get("dtype"), "checkpoint_bytes": size}


def _status_bytes(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run(folder: Path, mode: str, samples: int, seq_len: int, offload: str | None, stop_above: float | None = None,
        stop_after: float | None = None, keep: Path | None = None, max_memory: str | None = None) -> None:
    """One row: the child's numbers, or, when it passes `stop_above` GiB of RSS or `stop_after` seconds, the peak
    and stage it reached when stopped (marked unfinished). `max_memory`: the run's `--max-memory` (what makes
    boundary activations spill to `offload` on a machine with more free memory than that)."""
    facts = checkpoint_facts(folder)
    key = f"h{facts['hidden']}-{facts['layers']}L-{facts['dtype']}-{samples}x{seq_len}-{mode}{'-offload' if offload else ''}"
    key += f"-max{max_memory}" if max_memory else ""
    log = Path(tempfile.gettempdir()) / f"bench-memory-{key}.log"  # progress: one JSON line every 30 s
    log.unlink(missing_ok=True)
    print(f"progress in {log}", flush=True)
    command = [sys.executable, __file__, "--child", str(folder), mode, str(samples), str(seq_len), offload or "",
               str(log), str(keep or ""), max_memory or ""]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child_process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        stopped, hwm = None, 0
        while child_process.poll() is None:
            time.sleep(2)
            hwm = max(hwm, _status_bytes(child_process.pid, "VmHWM") or 0)
            rss = _status_bytes(child_process.pid, "VmRSS") or 0
            if stop_above is not None and rss > stop_above * 2**30:
                stopped = f"stopped at {rss / 2**30:.2f} GiB of RSS (limit {stop_above} GiB)"
            elif stop_after is not None and time.perf_counter() - started > stop_after:
                stopped = f"stopped unfinished after {stop_after:.0f} s"
            if stopped:
                child_process.kill()
                child_process.wait()
                break
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if stopped:
        numbers = _unfinished(log, stopped, hwm, round(time.perf_counter() - started, 1))
    elif child_process.returncode != 0:
        raise SystemExit(f"child failed: {stderr[-2000:]}")
    else:
        numbers = {"finished": True, **json.loads(stdout.strip().splitlines()[-1])}
    _record(key, {**facts, "mode": mode, "samples": samples, "seq_len": seq_len, "offload": bool(offload),
                  **({"max_memory": max_memory} if max_memory else {}), **numbers})


def _unfinished(log: Path, why: str, hwm: int = 0, wall: float | None = None) -> dict:
    """The numbers of a run stopped before its end: its progress log's last line (and the VmHWM last read)."""
    lines = log.read_text().splitlines() if log.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return {"finished": False, "stopped": why, "stage": last.get("stage"),
            "wall_seconds": wall if wall is not None else last.get("seconds", 0),
            "peak_rss_bytes": max(hwm, last.get("peak_rss_bytes", 0)), "stage_peaks": last.get("stage_peaks")}


def _record(key: str, row: dict) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[key] = row
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(key, json.dumps(row))


def record_stopped(folder: Path, mode: str, samples: int, seq_len: int, offload: bool, why: str) -> None:
    """A row for a run stopped by hand (its child killed), from the progress log the run left."""
    facts = checkpoint_facts(folder)
    key = f"h{facts['hidden']}-{facts['layers']}L-{facts['dtype']}-{samples}x{seq_len}-{mode}{'-offload' if offload else ''}"
    log = Path(tempfile.gettempdir()) / f"bench-memory-{key}.log"
    _record(key, {**facts, "mode": mode, "samples": samples, "seq_len": seq_len, "offload": offload,
                  **_unfinished(log, why)})


def report() -> None:
    results = json.loads(RESULTS.read_text())
    gib = 2**30
    lines = ["# Memory and time: streamed against in-memory compression", "",
             "Synthetic random Llamas, default compress (sensitivity planner, sequential, update, ratio 0.8), random "
             "token windows. Each row is its own process; peak = VmHWM; *peak stage* is where the highest VmRSS was "
             "read (benchmarks/trace_memory.py's sampler). Written by `python benchmarks/bench_memory.py report` from "
             "reports/memory.json; the machine: 2 CPU cores, 24 GiB. Rows of a stop often shared the cores (the notes below "
             "say with what), so a wall time is a speed only where the notes say the machine was quiet.", "",
             "| run | layers | dtype | checkpoint | calibration | peak RSS | peak stage | finished | wall | stages (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in results.items():
        seconds = r.get("stage_seconds") or {}
        stages = ", ".join(f"{k} {seconds[k]:.0f}" for k in ("profile_forward", "profile_backward", "planning",
                                                               "compress") if k in seconds)
        peaks = r.get("stage_peaks") or {}
        top = max(peaks, key=peaks.get) if peaks else "–"
        finished = "yes" if r.get("finished", True) else f"no: {r.get('stopped')}, in {r.get('stage')}"
        cap = f" (--max-memory {r['max_memory']})" if r.get("max_memory") else ""
        lines.append(f"| {r['mode']}{' + offload' if r['offload'] else ''}{cap} | {r['layers']} (h {r['hidden']}) | "
                     f"{r['dtype']} | {r['checkpoint_bytes'] / gib:.2f} GiB | {r['samples']}×{r['seq_len']} | "
                     f"{r['peak_rss_bytes'] / gib:.2f} GiB | {top} | {finished} | {r['wall_seconds']:.0f} s | {stages} |")
    notes = (REPORTS / "memory-notes.md").read_text() if (REPORTS / "memory-notes.md").is_file() else ""
    (REPORTS / "memory.md").write_text("\n".join(lines) + "\n" + (f"\n{notes}" if notes else ""))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        folder, mode, samples, seq_len, offload, log, keep, max_memory = sys.argv[2:10]
        print(json.dumps(child(Path(folder), mode, int(samples), int(seq_len), offload or None, Path(log),
                               Path(keep) if keep else None, max_memory or None)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make")
    make.add_argument("folder", type=Path)
    make.add_argument("--layers", type=int, default=11)
    make.add_argument("--hidden", type=int, default=2048)
    make.add_argument("--mlp", type=int, default=5632)
    make.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    measure = sub.add_parser("run")
    measure.add_argument("folder", type=Path)
    measure.add_argument("--mode", choices=("stream", "memory", "floor"), default="stream")
    measure.add_argument("--samples", type=int, default=8)
    measure.add_argument("--seq-len", type=int, default=256)
    measure.add_argument("--offload-dir")
    measure.add_argument("--max-memory", help="the run's --max-memory, e.g. 2.5GB: boundaries past it spill to --offload-dir")
    measure.add_argument("--stop-above", type=float, help="stop the run past this many GiB of RSS (recorded unfinished)")
    measure.add_argument("--stop-after", type=float, help="stop the run after this many seconds (recorded unfinished)")
    measure.add_argument("--keep-output", type=Path, help="keep the compressed folder here (for check_reload.py)")
    stopped = sub.add_parser("stopped", help="record a run stopped by hand, from its progress log")
    stopped.add_argument("folder", type=Path)
    stopped.add_argument("--mode", choices=("stream", "memory", "floor"), default="stream")
    stopped.add_argument("--samples", type=int, default=8)
    stopped.add_argument("--seq-len", type=int, default=256)
    stopped.add_argument("--offload", action="store_true")
    stopped.add_argument("--why", required=True)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "make":
        make_checkpoint(args.folder, args.layers, args.hidden, args.mlp, args.dtype)
    elif args.command == "run":
        run(args.folder, args.mode, args.samples, args.seq_len, args.offload_dir, args.stop_above, args.stop_after,
            args.keep_output, args.max_memory)
    elif args.command == "stopped":
        record_stopped(args.folder, args.mode, args.samples, args.seq_len, args.offload, args.why)
    else:
        report()


if __name__ == "__main__":
    main()
