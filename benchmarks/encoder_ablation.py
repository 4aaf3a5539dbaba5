"""One all-MiniLM-L6-v2 compression per configuration, measured on the first N sentences of Macbeth.

Run:  python benchmarks/encoder_ablation.py 400 '{"ratio":0.9,"strategy":"global"}' \
          '{"ratio":0.9,"strategy":"sensitivity","calib":"sentences","tokens":16384}'

Each argument after N is a JSON object: CompressConfig fields, plus "calib" ("windows": 64 random
windows of 128 tokens of Hamlet, the old protocol; "sentences": sentences of Hamlet drawn until
"tokens" tokens, lowrank.sentences) . One JSON line per configuration: the CPU seconds of the
compression and the agreement with the dense embeddings (mean / min cosine, top-1, recall@10).
This is how the ablation rows of reports/encoders.md were measured, one cheap idea at a time.
"""

from __future__ import annotations

import copy
import json
import sys

import torch

from common import cpu_seconds
from lowrank.api import compress
from lowrank.calibration import load_text, sample_text_path, text_windows
from lowrank.config import CompressConfig
from lowrank.encoder_eval import agreement, sentence_embeddings
from lowrank.loading import load_model
from lowrank.sentences import sentence_batches, split_sentences


def main() -> None:
    torch.manual_seed(0)
    dense = load_model("all-minilm-l6-v2")
    tokenizer = dense.tokenizer
    sentences = split_sentences(load_text([sample_text_path("macbeth")]))[:int(sys.argv[1])]
    reference = sentence_embeddings(dense.model, tokenizer, sentences)
    hamlet = load_text([sample_text_path("hamlet")])
    for spec in sys.argv[2:]:
        settings = json.loads(spec)
        calib = settings.pop("calib", "windows")
        tokens = settings.pop("tokens", None)
        if calib == "windows":
            windows = text_windows(tokenizer, None, 64, 128, 0, default="hamlet")
        else:
            windows = sentence_batches(tokenizer, hamlet, token_budget=tokens, max_length=128,
                                       batch_size=settings.get("batch_size", 8))
        model = copy.deepcopy(dense.model)
        started = cpu_seconds()
        compress(model, CompressConfig(**settings), windows, progress=False)
        result = agreement(sentence_embeddings(model, tokenizer, sentences), reference)
        print(json.dumps({"calib": calib, "tokens": tokens, **settings, "cpu_s": round(cpu_seconds() - started, 1),
                          **{k: round(v, 4) for k, v in result.items()}}), flush=True)


if __name__ == "__main__":
    main()
