"""all-MiniLM-L6-v2 compressed by whiten under uniform, global and sensitivity (exact embedding prices),
at ratios 0.9 and 0.8, then the best 0.8 model recovered by embedding distillation: one run, one protocol.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_encoders.py   (writes reports/encoders.json and the table in encoders.md)

Calibration: sentences of Hamlet drawn at random (seed 0) until CALIB_TOKENS tokens, each framed
by [CLS] … [SEP] as the encoder sees it, batched by equal length (lowrank.sentences; what
`lowrank compress` does for an encoder). Evaluation: every sentence of Macbeth (never used for
calibration or training), embedded by the compressed and the dense model as the model pools
(mean, normalized): mean and min cosine, self-retrieval top-1 and recall@10 among all of them.
Recovery runs recipes/minilm-l6.yaml's recover stage (its settings and data, read when the recovery
starts) on the best 0.8 model, trained on the sentences of its data as `lowrank recover` trains an encoder.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from common import cpu_seconds
from lowrank.api import compress
from lowrank.calibration import load_text, sample_text_path
from lowrank.config import CompressConfig
from lowrank.encoder_eval import agreement, sentence_embeddings
from lowrank.recipe import read_recipe, resolve_texts
from lowrank.recovery import training_sentences
from lowrank.sentences import sentence_batches, split_sentences
from lowrank.loading import load_model
from lowrank.model_info import count_parameters
from lowrank.planner import ENCODER_STRATEGY
from lowrank.training import recover

REPORTS = Path(__file__).resolve().parent.parent / "reports"
MODEL = "all-minilm-l6-v2"
RATIOS = (0.9, 0.8)
STRATEGIES = ("uniform", "global", "sensitivity")
CALIB_TOKENS, CALIB_MAX_LENGTH, BATCH_SIZE, SEED = 16384, 128, 8, 0
EVAL_SENTENCES = None  # every sentence of Macbeth
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "minilm-l6.yaml"
GOALS = {0.9: 0.97, 0.8: 0.93}
RECOVERED_GOAL = 0.97


def markdown(record: dict) -> str:
    """The one-run table of reports/encoders.md from the run's record: every strategy at both ratios, then recovery, against the goals."""
    lines = [f"Written by `benchmarks/bench_encoders.py` from one run ({record['model']}, {record['dense_params']:,} "
             f"parameters; {record.get('date', '')}). Calibration: {record['calibration']}; "
             f"evaluation: {record['evaluation']} (never calibrated or trained on), each embedded by the "
             "compressed and the dense model (mean pooling, normalized, as the model's sentence-transformers "
             "config says). Cosine: between the two embeddings of the same sentence. Recall@10 / top-1: "
             "self-retrieval of each compressed embedding among all dense ones.", "",
             "| ratio | strategy | parameters | mean cosine | min cosine | top-1 | recall@10 | goal (mean cosine) | "
             "CPU s | wall s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for row in record["rows"] + ([record["recovered"]] if record.get("recovered") else []):
        goal = RECOVERED_GOAL if "recovery" in row["strategy"] else GOALS[row["ratio"]]
        met = "met" if row["mean_cosine"] >= goal else f"missed by {goal - row['mean_cosine']:.3f}"
        label = row["strategy"] + (" (default)" if row["strategy"] == ENCODER_STRATEGY else "")
        lines.append(f"| {row['ratio']} | {label} | {row['params']:,} | {row['mean_cosine']:.4f} | "
                     f"{row['min_cosine']:.4f} | {row['top1']:.4f} | {row['recall_at_10']:.4f} | ≥ {goal} ({met}) | "
                     f"{row.get('cpu_seconds', '–')} | {row['seconds']} |")
    if record.get("recovered"):
        settings = {k: record["recovered"]["recovery"].get(k)
                    for k in ("loss", "steps", "lr", "relative_lr", "warmup", "batch_size", "seq_len")}
        lines += ["", "CPU s: CPU time of the compression (or, on the recovered row, of the recovery's training), "
                  "all threads; wall s: wall-clock on 2 CPU cores shared with other jobs (it says more about the "
                  f"load than the method). Recovery settings (recipes/minilm-l6.yaml): {json.dumps(settings)}, on "
                  f"the sentences of {', '.join(Path(t).stem.replace('bundled:', '') for t in record['recovered'].get('recovery_data', []))} "
                  "([CLS] … [SEP], batched by equal length)."]
    lines.append("")
    return "\n".join(lines)


TABLE_START, TABLE_END = "<!-- one-run-table:start -->", "<!-- one-run-table:end -->"


def write_report(record: dict) -> None:
    """reports/encoders.md's one-run table (between its markers) from the record; the rest of the page stays."""
    page = REPORTS / "encoders.md"
    text = page.read_text() if page.is_file() else f"{TABLE_START}\n{TABLE_END}\n"
    before, rest = text.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    page.write_text(f"{before}{TABLE_START}\n{markdown(record)}{TABLE_END}{after}")


def calibration_label() -> str:
    return (f"sentences of hamlet drawn until {CALIB_TOKENS:,} tokens ([CLS] … [SEP], batched by equal length, "
            "no padding)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--no-recovery", action="store_true")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite encoders.md from encoders.json")
    parser.add_argument("--from-log", help="build encoders.json from the JSON lines a run printed (a run cut short)")
    args = parser.parse_args()
    if args.from_log:
        printed = [json.loads(line) for line in Path(args.from_log).read_text().splitlines() if line.startswith("{")]
        record = {"model": MODEL, "dense_params": count_parameters(load_model(MODEL, need_tokenizer=False).model),
                  "calibration": calibration_label(), "evaluation": "every sentence of macbeth",
                  "rows": [r for r in printed if "recovery" not in r["strategy"]],
                  "recovered": next((r for r in printed if "recovery" in r["strategy"]), None)}
        (REPORTS / "encoders.json").write_text(json.dumps(record, indent=2) + "\n")
        args.markdown_only = True
    if args.markdown_only:
        write_report(json.loads((REPORTS / "encoders.json").read_text()))
        return
    torch.manual_seed(SEED)
    dense = load_model(MODEL)
    tokenizer = dense.tokenizer
    calibration = sentence_batches(tokenizer, load_text([sample_text_path("hamlet")]), token_budget=CALIB_TOKENS,
                                   max_length=CALIB_MAX_LENGTH, batch_size=BATCH_SIZE, seed=SEED)
    sentences = split_sentences(load_text([sample_text_path("macbeth")]))[:EVAL_SENTENCES]
    reference = sentence_embeddings(dense.model, tokenizer, sentences)
    rows, compressed = [], {}
    for ratio in args.ratios:
        for strategy in args.strategies:
            model = copy.deepcopy(dense.model)
            started, started_cpu = time.perf_counter(), cpu_seconds()
            compress(model, CompressConfig(ratio=ratio, strategy=strategy, batch_size=BATCH_SIZE), calibration,
                     progress=False)
            seconds, cpu = time.perf_counter() - started, cpu_seconds() - started_cpu
            row = {"ratio": ratio, "strategy": strategy, "params": count_parameters(model), "seconds": round(seconds, 1),
                   "cpu_seconds": round(cpu, 1),
                   **agreement(sentence_embeddings(model, tokenizer, sentences), reference)}
            rows.append(row)
            compressed[(ratio, strategy)] = model
            print(json.dumps(row), flush=True)
    recovered = None
    low = [r for r in rows if r["ratio"] == min(args.ratios)]
    if not args.no_recovery and low:
        best = max(low, key=lambda r: r["mean_cosine"])
        model = compressed[(best["ratio"], best["strategy"])]
        recipe = read_recipe(RECIPE)  # read now, when the recovery starts: the settings a user runs
        config = recipe.recover.replace(checkpoint_every=0)
        data = next(stage.data for stage in recipe.stages if stage.kind == "recover")
        started_cpu = cpu_seconds()
        train = training_sentences(tokenizer, resolve_texts(data), config)  # what `lowrank recover` trains on
        result = recover(model, train, config, teacher=dense.model, progress=False)
        recovered = {"ratio": best["ratio"], "strategy": best["strategy"] + " + recovery",
                     "params": count_parameters(model), "seconds": round(result.seconds, 1),
                     "cpu_seconds": round(cpu_seconds() - started_cpu, 1),
                     "recovery": config.to_dict(), "recovery_data": data, **agreement(sentence_embeddings(model, tokenizer, sentences), reference)}
        print(json.dumps(recovered), flush=True)
    record = {"model": MODEL, "dense_params": count_parameters(dense.model), "calibration": calibration_label(),
              "evaluation": f"every sentence of macbeth ({len(sentences)})", "rows": rows, "recovered": recovered,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (REPORTS / "encoders.json").write_text(json.dumps(record, indent=2) + "\n")
    write_report(record)
    print("wrote", REPORTS / "encoders.json")


if __name__ == "__main__":
    main()
