"""The entry points lowrank.compress / recover / evaluate / report, as the README shows them, on tiny models."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import lowrank
from helpers import make_tiny_model, random_windows, save_tiny_model
from lowrank import CalibrationConfig, CompressConfig, EvalConfig, RecoveryConfig
from lowrank.calibration import sample_text_path
from lowrank.compression import compress_model
from lowrank.config import CONFIG_FILE
from lowrank.errors import LowrankError


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_readme_pipeline_runs_on_a_tiny_model(tmp_path, monkeypatch):
    """The README's ten lines, with a tiny model in place of smollm2-135m and small windows."""
    model_dir = tmp_path / "tiny"
    save_tiny_model(model_dir)
    texts = tmp_path / "my_texts"
    texts.mkdir()
    shutil.copy(sample_text_path("hamlet"), texts / "hamlet.txt")
    shutil.copy(sample_text_path("tempest"), tmp_path / "train.txt")
    monkeypatch.chdir(tmp_path)

    plan = lowrank.compress(str(model_dir), CompressConfig(ratio=0.8),
                            CalibrationConfig(texts=["my_texts/"], samples=8, seq_len=32), output="out/")
    assert 0.7 < plan.target_ratio <= 0.8 and plan.factored
    result = lowrank.recover("out/", RecoveryConfig(steps=3, seq_len=32, batch_size=2), data=["train.txt"],
                             output="out-rec/")
    assert result.steps == 3
    model = lowrank.load("out-rec/")
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, lowrank.LowRankLinear)}
    assert ranks == plan.factored

    saved = json.loads((tmp_path / "out-rec" / CONFIG_FILE).read_text())
    assert saved["compress"]["ratio"] == 0.8 and saved["calibration"]["texts"] == ["my_texts/"]
    assert saved["recover"]["steps"] == 3 and saved["recover"]["data"] == ["train.txt"]
    ppl = lowrank.evaluate("out-rec/", EvalConfig(seq_len=32, max_windows=2))
    assert ppl.windows == 2 and ppl.perplexity > 1


def test_a_model_in_memory_is_compressed_in_place_exactly_as_compress_model_does():
    windows = random_windows(8, 24)
    by_api, by_function = make_tiny_model("qwen2"), make_tiny_model("qwen2")
    plan = lowrank.compress(by_api, CompressConfig(ratio=0.6, strategy="energy"), windows, progress=False)
    reference = compress_model(by_function, ratio=0.6, strategy="energy", windows=windows, progress=False)
    assert plan.factored == reference.factored
    for (name, a), (_, b) in zip(by_api.state_dict().items(), by_function.state_dict().items()):
        assert torch.equal(a, b), name


def test_dry_run_plans_without_factoring():
    model = make_tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    plan = lowrank.compress(model, CompressConfig(ratio=0.6, strategy="uniform"), dry_run=True, progress=False)
    assert plan.factored and plan.strategy == "uniform"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing swapped


def test_recover_in_memory_and_the_errors_of_a_wrong_call(tmp_path):
    dense = make_tiny_model("llama")
    student = copy.deepcopy(dense)
    compress_model(student, ratio=0.5, method="svd", progress=False)
    result = lowrank.recover(student, RecoveryConfig(loss="distill", steps=2, batch_size=4), random_windows(8, 16),
                             teacher=dense, progress=False)
    assert result.steps == 2
    with pytest.raises(LowrankError, match="needs data as a tensor of token windows"):
        lowrank.recover(student, RecoveryConfig(steps=1), ["train.txt"])
    with pytest.raises(LowrankError, match="needs output="):
        lowrank.recover(str(tmp_path), RecoveryConfig(steps=1), ["train.txt"])
