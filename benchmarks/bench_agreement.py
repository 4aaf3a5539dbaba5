"""Agreement of compressed SmolLM2-135M folders with the dense model: reports/agreement.{json,md}.

Run:  python benchmarks/bench_agreement.py FOLDER [FOLDER ...] [--against smollm2-135m]
(rows for other folders already in reports/agreement.json are kept)
Each folder is scored against the dense model on the benchmark protocol's evaluation windows (the
first 40 windows of 512 tokens of Macbeth): both perplexities, top-1 next-token agreement, mean and
95th-percentile KL(dense ‖ compressed), and the fraction of 16 prompts (the first 32 tokens of the
first 16 windows) whose first 32 greedy tokens match. The same as, per folder:
  lowrank eval FOLDER --against smollm2-135m --max-windows 40 --json FILE
"""

from __future__ import annotations

import argparse
import json
import time

from common import EVAL_WINDOWS, REPORTS, environment, write_report

from lowrank import EvalConfig, compare

NAME = "agreement"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--against", default="smollm2-135m")
    parser.add_argument("--labels", default=None, help="semicolon-separated row labels (default: the folder names)")
    args = parser.parse_args()
    labels = args.labels.split(";") if args.labels else args.folders
    config = EvalConfig(max_windows=EVAL_WINDOWS, against=args.against)  # texts: Macbeth, the default
    previous = REPORTS / f"{NAME}.json"  # rows of earlier runs (other folders) are kept, in their order
    rows = json.loads(previous.read_text())["rows"] if previous.exists() else []
    rows = [row for row in rows if row["folder"] not in args.folders]
    for label, folder in zip(labels, args.folders):
        started = time.perf_counter()
        result = compare(folder, config, progress=False)
        rows.append({"label": label, "folder": folder, "seconds": round(time.perf_counter() - started, 1),
                     **result.to_dict()})
        print(f"{label}: ppl {result.perplexity:.3f} (dense {result.dense_perplexity:.3f}), top-1 "
              f"{result.top1_agreement:.4f}, KL {result.kl_mean:.4f} / p95 {result.kl_p95:.4f}, generation "
              f"{result.generation_agreement:.3f}", flush=True)
    first = rows[0]
    lines = ["# Agreement with the dense model", "",
             f"SmolLM2-135M folders against the dense `{args.against}`, on the first {first['windows']} windows of "
             f"{first['seq_len']} tokens of Macbeth ({first['tokens']:,} predicted tokens; never used for calibration "
             f"or training). Generation: {first['prompts']} prompts (the first {first['prompt_tokens']} tokens of the "
             f"first windows), {first['generated_tokens']} greedy tokens each, with the KV cache; a prompt agrees when "
             "all of them match.", "",
             "| model | perplexity | top-1 agreement | KL mean (nats) | KL p95 (nats) | generation agreement |",
             "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| dense ({args.against}) | {first['dense_perplexity']:.2f} | 1 | 0 | 0 | 1 |"]
    for row in rows:
        agreed = round(row["generation_agreement"] * row["prompts"])
        lines.append(f"| {row['label']} | {row['perplexity']:.2f} | {row['top1_agreement']:.4f} | "
                     f"{row['kl_mean']:.4f} | {row['kl_p95']:.4f} | {row['generation_agreement']:.3f} "
                     f"({agreed}/{row['prompts']}) |")
    lines += ["", "Each row, from the command line:", "", "```bash"]
    lines += [f"lowrank eval {row['folder']} --against {args.against} --max-windows "
              f"{EVAL_WINDOWS} --json agreement.json" for row in rows]
    lines += ["```", "", f"Produced by `python benchmarks/bench_agreement.py` ({environment()}).", ""]
    write_report(NAME, {"against": args.against, "rows": rows, "environment": environment()}, "\n".join(lines))


if __name__ == "__main__":
    main()
