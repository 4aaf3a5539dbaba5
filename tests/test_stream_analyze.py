"""`lowrank analyze --calib --stream` (lowrank.stream_analyze): the in-memory analyzer's numbers, block by block."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_ARCHITECTURES, random_windows, run_cli, save_tiny_model, tiny_gguf_model, write_tiny_gguf

from lowrank.calibration import collect_stats, sample_text_path
from lowrank.errors import LowrankError
from lowrank.loading import load_model
from lowrank.profiling import profile_model, targets_of
from lowrank.stream_analyze import analyze_streamed


def _in_memory_analysis(path: str, windows: torch.Tensor):
    """What `lowrank analyze --calib` computes without --stream."""
    model = load_model(path, need_tokenizer=False).model
    targets = targets_of(model)
    return profile_model(model, targets, collect_stats(model, targets, windows, batch_size=8), source=path)


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal up to float64 rounding: the same Grams, singular values computed one matrix at a time or batched."""
    return got.shape == ref.shape and bool(((got - ref).abs() <= 1e-10 * ref.max()).all())


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_streamed_analysis_equals_the_in_memory_analyzer(tmp_path, arch):
    save_tiny_model(tmp_path, arch)
    windows = random_windows(12, 24)
    reference = _in_memory_analysis(str(tmp_path), windows)
    streamed = analyze_streamed(str(tmp_path), windows, progress=False)
    assert [m.name for m in streamed.matrices] == [m.name for m in reference.matrices]
    assert streamed.whitened and streamed.model_params == reference.model_params
    for ref, got in zip(reference.matrices, streamed.matrices):
        assert torch.equal(got.sigma, ref.sigma), ref.name
        assert _close(got.whitened, ref.whitened), ref.name
        assert got.price is None


def test_streamed_analysis_of_a_gguf(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_gguf_model("llama"), "llama", "Q8_0")
    windows = random_windows(8, 24)
    reference = _in_memory_analysis(str(tmp_path / "tiny.gguf"), windows)
    streamed = analyze_streamed(str(tmp_path / "tiny.gguf"), windows, progress=False)
    for ref, got in zip(reference.matrices, streamed.matrices, strict=True):
        assert _close(got.whitened, ref.whitened), ref.name


def test_cli_analyze_stream_writes_the_same_report(tmp_path, capsys, monkeypatch):
    save_tiny_model(tmp_path / "model", "llama")
    monkeypatch.chdir(tmp_path)
    common = ["analyze", "model", "--calib", sample_text_path("hamlet"), "--samples", "4", "--seq-len", "16", "-q"]
    assert run_cli(capsys, *common, "-o", "memory")[0] == 0
    code, out, err = run_cli(capsys, *common, "--stream", "-o", "streamed")
    assert code == 0, err
    memory = json.loads((tmp_path / "memory" / "report.json").read_text())
    streamed = json.loads((tmp_path / "streamed" / "report.json").read_text())
    assert memory["matrices"] and len(memory["matrices"]) == len(streamed["matrices"])
    for a, b in zip(memory["matrices"], streamed["matrices"]):
        assert a.keys() == b.keys() and a["name"] == b["name"]
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-6), (a["name"], key)
            else:
                assert b[key] == a[key], (a["name"], key)


def test_streamed_analysis_refuses_what_it_cannot_stream(tmp_path):
    (tmp_path / "pickle").mkdir()
    model = save_tiny_model(tmp_path / "model", "llama")
    (tmp_path / "pickle" / "config.json").write_bytes((tmp_path / "model" / "config.json").read_bytes())
    torch.save(model.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")
    with pytest.raises(LowrankError, match="--stream reads a model folder with safetensors weights"):
        analyze_streamed(str(tmp_path / "pickle"), random_windows(2, 8), progress=False)
