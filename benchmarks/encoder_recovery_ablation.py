"""Recovery of all-MiniLM-L6-v2 at ratio 0.8, one training configuration per argument, on the first N Macbeth sentences.

Run:  OMP_NUM_THREADS=1 nice -n 10 python benchmarks/encoder_recovery_ablation.py 300 \
          '{"data":"windows","lr":1e-4,"steps":200,"batch_size":16,"seq_len":32}' \
          '{"data":"sentences","lr":1e-3,"steps":200,"batch_size":16,"seq_len":128}'

The 0.8 model is compressed once with the default settings (sensitivity, sentences of Hamlet until
16,384 tokens, as benchmarks/bench_encoders.py does) and cached in a folder (--cache, default
/tmp/minilm-r0.8-default); every configuration starts from a fresh load of it. Each argument is a JSON
object: RecoveryConfig fields (loss defaults to "embedding", checkpoint_every to 0), plus "data":
"windows" (framed windows of seq_len tokens of Julius Caesar and The Tempest, the old protocol) or
"sentences" (their sentences, [CLS] … [SEP], batched by equal length; lowrank.sentences). One JSON
line per configuration: CPU seconds of the training and the agreement with the dense embeddings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import cpu_seconds
from lowrank.api import compress
from lowrank.calibration import load_text, sample_text_path
from lowrank.config import CompressConfig, RecoveryConfig
from lowrank.encoder_eval import agreement, sentence_embeddings
from lowrank.loading import load_model
from lowrank.sentences import framed_windows, sentence_batches, split_sentences
from lowrank.training import recover


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sentences", type=int, help="evaluate on the first N sentences of Macbeth")
    parser.add_argument("configs", nargs="+", help="JSON objects: RecoveryConfig fields plus data")
    parser.add_argument("--cache", default="/tmp/minilm-r0.8-default")
    parser.add_argument("--texts", nargs="+", default=["julius_caesar", "tempest"])
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = load_model("all-minilm-l6-v2")
    tokenizer = dense.tokenizer
    if not Path(args.cache).is_dir():
        calibration = sentence_batches(tokenizer, load_text([sample_text_path("hamlet")]), token_budget=16384,
                                       max_length=128, batch_size=8, seed=0)
        compress("all-minilm-l6-v2", CompressConfig(ratio=0.8, batch_size=8), calibration, output=args.cache,
                 progress=False)
    sentences = split_sentences(load_text([sample_text_path("macbeth")]))[:args.sentences]
    reference = sentence_embeddings(dense.model, tokenizer, sentences)
    text = load_text([sample_text_path(name) for name in args.texts])
    start = load_model(args.cache).model
    print(json.dumps({"config": "start", **{k: round(v, 4) for k, v in
                                            agreement(sentence_embeddings(start, tokenizer, sentences), reference).items()}}),
          flush=True)
    for spec in args.configs:
        settings = {"loss": "embedding", "checkpoint_every": 0, **json.loads(spec)}
        data = settings.pop("data", "sentences")
        config = RecoveryConfig(**settings)
        if data == "windows":
            train = framed_windows(tokenizer, text, config.seq_len)
        else:
            train = sentence_batches(tokenizer, text, token_budget=None, max_length=config.seq_len,
                                     batch_size=config.batch_size, seed=config.seed, what="training")
        model = load_model(args.cache).model
        started = cpu_seconds()
        result = recover(model, train, config, teacher=dense.model, progress=False)
        cpu = cpu_seconds() - started
        scores = agreement(sentence_embeddings(model, tokenizer, sentences), reference)
        print(json.dumps({"config": spec, "texts": args.texts, "cpu_s": round(cpu, 1), "steps": result.steps,
                          "tokens": result.tokens, "final_loss": round(result.history[-1]["loss"], 5),
                          **{k: round(v, 4) for k, v in scores.items()}}), flush=True)


if __name__ == "__main__":
    main()
