"""Inference speed of compressed SmolLM2-135M folders against the dense model: reports/inference.{json,md}.

Run:  python benchmarks/bench_inference.py FOLDER [FOLDER ...] [--against smollm2-135m] [--device cpu]
Per folder, `lowrank bench`'s measurement (lowrank.bench.benchmark): dense and compressed on the same
device in the same process, alternating run by run, batch 1 and 8, prompts of 512 tokens of Macbeth,
32 greedy tokens decoded with the KV cache; medians of 5 runs after 1 warm-up (CUDA events on GPU);
peak memory from a fresh child process per model and batch; weight files in bytes. The perplexity
column comes from reports/agreement.json when it holds the folder.
"""

from __future__ import annotations

import argparse
import json
import os

from common import REPORTS, environment, write_report

from lowrank.bench import benchmark
from lowrank.config import BenchConfig

NAME = "inference"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--against", default="smollm2-135m")
    parser.add_argument("--labels", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; 1 times the computing thread's CPU time (robust on a shared machine)")
    args = parser.parse_args()
    labels = args.labels.split(";") if args.labels else args.folders
    agreement_file = REPORTS / "agreement.json"
    ppl = {}
    if agreement_file.exists():
        data = json.loads(agreement_file.read_text())
        ppl = {row["folder"]: row for row in data["rows"]}
    config = BenchConfig(against=args.against, device=args.device, repeats=args.repeats, threads=args.threads)
    runs = []
    lines = ["# Inference speed, dense against compressed", ""]
    for label, folder in zip(labels, args.folders):
        before = load_average()
        record = benchmark(folder, config, progress=False)
        record.update(label=label, load_before=before, load_after=load_average())
        runs.append(record)
        scores = ppl.get(folder)
        quality = (f"perplexity {scores['perplexity']:.2f} (dense {scores['dense_perplexity']:.2f}) on Macbeth, "
                   "reports/agreement.md" if scores else "perplexity: not in reports/agreement.json")
        macs = record["linear_macs_per_token"]
        lines += [f"## {label}", "", f"`{folder}`; {quality}. Load average before/after: {before} / "
                  f"{record['load_after']}.", "", record["table"], "",
                  f"Predicted: the linear layers below the head do {macs['compressed']:,} multiply-adds per token "
                  f"instead of {macs['dense']:,}, a speed-up of ×{record['predicted_linear_speedup']:.2f} for those "
                  "layers (attention, norms and the head are unchanged).", ""]
        files, params = record["file_bytes"], record["parameter_bytes"]
        file_ratio, param_ratio = files["compressed"] / files["dense"], params["compressed"] / params["dense"]
        lines += [f"Weight files: {file_ratio:.4f} of dense; parameters (tied weights once): {param_ratio:.4f} of "
                  f"dense; the files' overhead over the parameter ratio: {100 * (file_ratio / param_ratio - 1):+.2f}%.", ""]
        if record["predicted"]:
            lines += ["| batch | linear layers, timed alone: dense (s) | factored (s) | ratio | prefill ratio "
                      "predicted | measured |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
            lines += [f"| {row['batch_size']} | {row['linear_dense_seconds']:.3f} | {row['linear_planned_seconds']:.3f} | "
                      f"{row['linear_ratio']:.3f} | {row['predicted_prefill_ratio']:.3f} | "
                      f"{row['measured_prefill_ratio']:.3f} |" for row in record["predicted"]]
            lines += ["", "Predicted: the dense prefill with its linear layers' time (each timed alone at the "
                      "batch's tokens) swapped for the factored layers' time.", ""]
        print(record["table"], flush=True)
    lines += [f"{runs[0]['device']}, {runs[0]['threads']} threads ({runs[0]['clock']}), float32; prompts of {config.seq_len} tokens; "
              f"{config.new_tokens} decoded; medians of {config.repeats} runs after {config.warmup} warm-up, the two "
              "models alternating run by run. Prefill: the prompt's forward pass building the KV cache and the last "
              "position's logits (as generate() does). Peak memory: the weights plus the peak growth of resident "
              "memory during one generation, in a fresh process per model and batch.", "",
              "Where the time goes, rank alignment, the speed caps and the default plan: "
              "[inference-notes.md](inference-notes.md).", "",
              "```bash"] + [f"lowrank bench {r['compressed']} --against {args.against} --device {args.device}"
                            + (f" --threads {args.threads}" if args.threads else "") + f" --repeats {args.repeats}"
                            for r in runs] + ["```", "", f"Produced by `python benchmarks/bench_inference.py` "
                                              f"({environment()}).", ""]
    write_report(NAME, {"runs": runs, "environment": environment()}, "\n".join(lines))


if __name__ == "__main__":
    main()
