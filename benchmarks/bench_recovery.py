"""Recovery on SmolLM2-135M compressed to ratio 0.6: how much of the gap to dense do equal step
budgets of cross-entropy and of distillation win back? And what does gradient checkpointing save?

    flock /tmp/lowrank-cpu.lock lowrank compress --ratio 0.6 -o /tmp/smollm2-r0.6 --quiet
    flock /tmp/lowrank-cpu.lock python benchmarks/bench_recovery.py --folder /tmp/smollm2-r0.6

Training text: bundled The Tempest + Julius Caesar. Evaluation: the shared protocol (first 40×512
windows of Macbeth, never trained on). The step budget is sized at run time: a few distillation
steps are timed, and both runs get the number of steps that fits `--budget-seconds` of
distillation, so the comparison is at equal steps and the whole benchmark fits ~20 minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from lowrank.calibration import sample_text_path  # noqa: E402
from lowrank.checkpoint import read_plan  # noqa: E402
from lowrank.model_info import count_parameters  # noqa: E402
from lowrank.loading import load_model  # noqa: E402
from lowrank.config import RecoveryConfig  # noqa: E402
from lowrank.recovery import training_windows  # noqa: E402
from lowrank.training import ranks_of, recover  # noqa: E402

TRAIN_TEXTS = ("tempest", "julius_caesar")

MEMORY_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[5])
import common
from lowrank.loading import load_model
from lowrank.config import RecoveryConfig
from lowrank.recovery import training_windows
from lowrank.training import recover
from lowrank.calibration import sample_text_path
folder, checkpointing, batch, seq = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
loaded = load_model(folder)
train = training_windows(loaded.tokenizer, [sample_text_path("tempest")], seq)
loaded_mib = common.rss_mib()
common.reset_peak_rss()
config = RecoveryConfig(loss="ce", steps=2, batch_size=batch, seq_len=seq, gradient_checkpointing=checkpointing)
result = recover(loaded.model, train, config, progress=False)
print(json.dumps({"after_load_mib": loaded_mib, "peak_mib": common.stage_peak_rss_mib(),
                  "seconds_per_step": result.seconds / 2}))
"""


def measure_memory(folder: str, checkpointing: bool, batch: int, seq_len: int) -> dict:
    """Peak RSS while a fresh process, holding only the compressed model, trains two steps."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, folder, "1" if checkpointing else "0", str(batch),
                          str(seq_len), str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, check=True)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["training_mib"] = record["peak_mib"] - record["after_load_mib"]
    return record


def memory_table(folder: str, batch: int, seq_len: int) -> dict:
    return {"batch_size": batch, "seq_len": seq_len,
            "without": measure_memory(folder, False, batch, seq_len),
            "with": measure_memory(folder, True, batch, seq_len)}


def time_steps(student, teacher, train, config: RecoveryConfig, steps: int = 3) -> float:
    """Seconds per distillation step, from a throw-away copy (the first step is not counted)."""
    probe = RecoveryConfig(**{**config.to_dict(), "steps": steps + 1, "loss": "distill"})
    result = recover(copy.deepcopy(student), train, probe, teacher=teacher, progress=False)
    seconds = [r["seconds"] for r in result.history if r["event"] == "train"]
    return (seconds[-1] - seconds[0]) / steps


def run(student, teacher, train, eval_windows, config: RecoveryConfig) -> dict:
    model = copy.deepcopy(student)
    ranks, n_params = ranks_of(model), count_parameters(model)
    result = recover(model, train, config, teacher=teacher if config.needs_teacher else None, progress=True)
    started = time.perf_counter()
    ppl = common.eval_ppl(model, eval_windows)
    losses = [r["loss"] for r in result.history if r["event"] == "train"]
    return {
        "loss": config.loss, "perplexity": ppl, "steps": result.steps, "tokens": result.tokens,
        "train_seconds": result.seconds, "eval_seconds": time.perf_counter() - started,
        "first_loss": losses[0], "last_loss": losses[-1],
        "ranks_unchanged": ranks_of(model) == ranks, "params_unchanged": count_parameters(model) == n_params,
        "tokens_per_s": result.tokens / result.seconds,
    }


def seconds_until(clock: str) -> float:
    """Seconds from now until today's local time HH:MM."""
    hours, minutes = map(int, clock.split(":"))
    now = time.localtime()
    return (hours * 60 + minutes) * 60 - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)


def markdown(data: dict) -> str:
    rows = data["results"]
    gap = rows["before"] - data["dense_perplexity"]
    lines = [
        "# Recovery: SmolLM2-135M compressed to ratio 0.6",
        "",
        f"Compressed folder: `{data['folder']}` (plan: method {data['plan']['method']}, strategy "
        f"{data['plan']['strategy']}, target ratio {data['plan']['target_ratio']:.3f}, "
        f"{data['plan']['modules_factored']}/{data['plan']['modules']} matrices factored).",
        f"Training: {', '.join(TRAIN_TEXTS)} ({data['train_windows']} windows of {data['config']['seq_len']} tokens); "
        f"mode {data['config']['mode']}, AdamW lr {data['config']['lr']:g}, warmup {data['config']['warmup']} + cosine, "
        f"batch {data['config']['batch_size']}, {data['steps']} steps for both runs "
        f"(sized from {data['seconds_per_distill_step']:.1f} s per distillation step and a "
        f"{data['budget_seconds']} s budget). Distillation temperature {data['config']['temperature']:g}; "
        f"teacher: the dense model.",
        f"Evaluation: {data['protocol']}.",
        "",
        "| model | perplexity | gap to dense closed | train time | tokens/s |",
        "|---|---:|---:|---:|---:|",
        f"| dense | {data['dense_perplexity']:.3f} | | | |",
        f"| compressed, before recovery | {rows['before']:.3f} | 0% | | |",
    ]
    for name in ("ce", "distill"):
        r = rows[name]
        closed = (rows["before"] - r["perplexity"]) / gap if gap > 0 else float("nan")
        label = "after cross-entropy recovery" if name == "ce" else "after distillation recovery"
        lines.append(f"| {label} | {r['perplexity']:.3f} | {closed:.0%} | {r['train_seconds']:.0f} s | "
                     f"{r['tokens_per_s']:.0f} |")
    v = data["verdict"]
    m = data["memory"]
    lines += [
        "",
        f"- Closes at least half the gap: {'yes' if v['half_gap_closed'] else 'no'} "
        f"(best: {v['best']}, {v['best_gap_closed']:.0%}).",
        f"- Distillation beats cross-entropy at equal steps: {'yes' if v['distill_beats_ce'] else 'no'}.",
        f"- Ranks and parameter counts unchanged after both runs: "
        f"{'yes' if v['ranks_and_params_unchanged'] else 'NO'}.",
        "",
        f"## Peak memory (RSS, fresh process, 2 CE steps of batch {m['batch_size']}×{m['seq_len']})",
        "",
        "\"After load\" is the resident memory once the compressed model is loaded; \"peak\" is the highest "
        "resident memory during the two training steps (Linux VmHWM, reset after loading), so \"training adds\" "
        "is what training itself costs: activations, gradients and AdamW state.",
        "",
        "| gradient checkpointing | after load | peak | training adds | seconds per step |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (("without", "off"), ("with", "on")):
        r = m[key]
        lines.append(f"| {label} | {r['after_load_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB | {r['training_mib']:.0f} MiB | {r['seconds_per_step']:.1f} |")
    lines += ["", f"Total benchmark time {data['total_seconds'] / 60:.1f} min; environment: "
              f"{json.dumps(data['environment'])}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/smollm2-r0.6", help="compressed SmolLM2 folder (ratio 0.6)")
    parser.add_argument("--budget-seconds", type=float, default=330, help="training time for the distillation run")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--finish-by", default=None, metavar="HH:MM",
                        help="shrink the step budget so the benchmark ends by this local time (shared machines)")
    parser.add_argument("--memory-only", action="store_true",
                        help="rerun only the memory probes and update reports/recovery.{json,md}")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.memory_only:
        data = json.loads((common.REPORTS / "recovery.json").read_text())
        data["memory"] = memory_table(args.folder, data["config"]["batch_size"], data["config"]["seq_len"])
        common.write_report("recovery", data, markdown(data))
        print(markdown(data))
        return

    plan, _ = read_plan(args.folder)
    dense = common.load_smollm2()
    eval_windows = common.evaluation_windows(dense.tokenizer)
    dense_ppl = common.eval_ppl(dense.model, eval_windows)
    print(f"dense perplexity {dense_ppl:.3f}", flush=True)
    student = load_model(args.folder).model
    before = common.eval_ppl(student, eval_windows)
    print(f"before recovery {before:.3f}", flush=True)
    train = training_windows(dense.tokenizer, [sample_text_path(t) for t in TRAIN_TEXTS], args.seq_len)

    base = RecoveryConfig(mode="factors", lr=args.lr, warmup=3, batch_size=args.batch_size, seq_len=args.seq_len,
                          temperature=args.temperature, seed=common.SEED)
    per_step = time_steps(student, dense.model, train, base)
    budget = args.budget_seconds
    if args.finish_by:
        eval_seconds = (time.perf_counter() - started) / 4  # two evaluations and two loads so far
        left = seconds_until(args.finish_by) - 2 * eval_seconds - 120  # final evals, memory probes
        budget = min(budget, left / 1.8)  # distillation plus a cheaper cross-entropy run
    steps = max(5, int(budget / per_step))
    print(f"{per_step:.1f} s per distillation step → {steps} steps per run", flush=True)
    results = {"before": before}
    for loss in ("ce", "distill"):
        config = RecoveryConfig(**{**base.to_dict(), "loss": loss, "steps": steps})
        results[loss] = run(student, dense.model, train, eval_windows, config)
        print(f"{loss}: perplexity {results[loss]['perplexity']:.3f}", flush=True)
    del student, dense
    memory = memory_table(args.folder, args.batch_size, args.seq_len)

    gap = before - dense_ppl
    closed = {k: (before - results[k]["perplexity"]) / gap for k in ("ce", "distill")}
    best = min(("ce", "distill"), key=lambda k: results[k]["perplexity"])
    data = {
        "folder": args.folder,
        "plan": {"method": plan.method, "strategy": plan.strategy, "budget": plan.budget, "source": plan.source,
                 **plan.summary()},
        "protocol": f"first {common.EVAL_WINDOWS}×{common.SEQ_LEN} windows of bundled Macbeth "
                    f"({eval_windows[:, 1:].numel():,} predicted tokens), never trained on",
        "train_texts": list(TRAIN_TEXTS), "train_windows": int(train.shape[0]),
        "config": {k: v for k, v in base.to_dict().items() if k not in ("loss", "steps")},
        "steps": steps, "seconds_per_distill_step": per_step, "budget_seconds": round(budget),
        "dense_perplexity": dense_ppl, "results": results, "gap_closed": closed, "memory": memory,
        "verdict": {
            "half_gap_closed": max(closed.values()) >= 0.5, "best": best, "best_gap_closed": closed[best],
            "distill_beats_ce": results["distill"]["perplexity"] < results["ce"]["perplexity"],
            "ranks_and_params_unchanged": all(results[k]["ranks_unchanged"] and results[k]["params_unchanged"]
                                              for k in ("ce", "distill")),
        },
        "environment": common.environment(),
        "total_seconds": time.perf_counter() - started,
    }
    common.write_report("recovery", data, markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
