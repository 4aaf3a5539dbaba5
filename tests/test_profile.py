"""The Profile record: what it says about uniform budgets, and its file (exact round trip, clear refusals)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import make_tiny_model, random_windows
from lowrank.errors import LowrankError
from lowrank.profile import MatrixProfile, Profile
from lowrank.profiling import profile_model, profile_with_calibration
from lowrank.targets import Target, find_targets


def test_uniform_budget_matches_hand_computation():
    model = make_tiny_model("llama")
    profile = profile_model(model)
    dense = profile.uniform_budget(1.0)
    assert dense["matrices_dense"] == len(profile.matrices)  # k = mn/(m+n) saves nothing
    assert dense["target_ratio"] == 1.0 and dense["mean_loss"] == 0.0
    half = profile.uniform_budget(0.5)
    q = profile.matrices[0]  # 48×48 → k = ⌊0.5·2304/96⌋ = 12
    assert q.shape == (48, 48)
    assert q.loss_at_rank(12) == pytest.approx(float((q.sigma[12:] ** 2).sum() / (q.sigma**2).sum()), rel=1e-12)
    losses = [m.loss_at_rank(int(0.5 * m.params // sum(m.shape))) for m in profile.matrices]
    assert half["mean_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    assert half["matrices_dense"] == 0 and half["target_ratio"] <= 0.5


def test_empty_profile_is_refused():
    with pytest.raises(LowrankError):
        Profile([])


def test_matrix_without_whitened_spectrum_says_how_to_get_one():
    m = MatrixProfile("x", (2, 2), torch.ones(2, dtype=torch.float64))
    with pytest.raises(LowrankError, match="--calib"):
        m.spectrum(True)


def test_file_round_trip_is_exact(tmp_path):
    model = make_tiny_model("llama")
    profile = profile_with_calibration(model, random_windows(4, 16), batch_size=2, sensitivity_samples=2,
                                       progress=False, source="tiny-llama")
    path = profile.save(tmp_path / "p.safetensors")
    again = Profile.load(path)
    assert again.source == "tiny-llama" and again.whitened and again.priced
    assert again.model_params == profile.model_params and again.options == profile.options
    assert again.fingerprint == profile.fingerprint
    for a, b in zip(profile.matrices, again.matrices):
        assert (a.name, a.shape, a.rank) == (b.name, b.shape, b.rank)
        for kind in ("sigma", "whitened", "price"):
            assert torch.equal(getattr(a, kind), getattr(b, kind))
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left


def test_another_model_is_refused():
    profile = profile_model(make_tiny_model("llama"))
    profile.check_model(find_targets(make_tiny_model("llama", seed=1)))  # same layout, other weights: fine
    with pytest.raises(LowrankError, match="measured on another model"):
        profile.check_model(find_targets(make_tiny_model("gpt2")))
    shapes = [Target(t.name, t.out_features + 1, t.in_features, False) for t in find_targets(make_tiny_model("llama"))]
    with pytest.raises(LowrankError, match=r"is \[48, 48\] there and \[49, 48\] here"):
        profile.check_model(shapes)


def test_bad_files_are_one_clear_error(tmp_path):
    with pytest.raises(LowrankError, match="does not exist; write one with `lowrank profile"):
        Profile.load(tmp_path / "missing.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(LowrankError, match="is not a lowrank profile"):
        Profile.load(tmp_path / "text.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(LowrankError, match="not a lowrank profile"):
        Profile.load(tmp_path / "weights.safetensors")
    meta = {"format": "lowrank-profile", "version": 99, "matrices": []}
    save_file({"w": torch.ones(2)}, str(tmp_path / "new.safetensors"), metadata={"lowrank_profile": json.dumps(meta)})
    with pytest.raises(LowrankError, match="newer than this lowrank"):
        Profile.load(tmp_path / "new.safetensors")
    meta = {"format": "lowrank-profile", "version": 1, "matrices": [{"name": "a", "shape": [2, 2]}]}
    save_file({"w": torch.ones(2)}, str(tmp_path / "bad.safetensors"), metadata={"lowrank_profile": json.dumps(meta)})
    with pytest.raises(LowrankError, match="damaged lowrank profile"):
        Profile.load(tmp_path / "bad.safetensors")


# ---- the CLI: profile once, then plan and analyze from the file ----------------------------------------

def test_profile_then_plan_and_analyze_without_the_model(tiny_model_folder, tmp_path, capsys):
    from helpers import run_cli

    profile_file = tmp_path / "tiny.safetensors"
    code, stdout, _ = run_cli(capsys, "profile", tiny_model_folder, "--samples", "4", "--seq-len", "32",
                              "--sensitivity-samples", "2", "-o", profile_file, "--quiet")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["whitened"] and summary["priced"] and summary["matrices"] == 14
    code, stdout, _ = run_cli(capsys, "plan", "--profile", profile_file, "--budget", "0.6", "-o", tmp_path / "a.json",
                              "--quiet")
    assert code == 0
    from_file = json.loads(stdout)
    assert from_file["strategy"] == "sensitivity" and from_file["target_ratio"] <= 0.6
    assert from_file["milliseconds"] < 1000  # no model is loaded: pure arithmetic on the saved vectors
    code, _, _ = run_cli(capsys, "plan", tiny_model_folder, "--budget", "0.6", "--samples", "4", "--seq-len", "32",
                         "--sensitivity-samples", "2", "-o", tmp_path / "b.json", "--quiet")
    assert code == 0
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    assert a["modules"] == b["modules"]  # the same ranks as planning on the model itself
    code, _, _ = run_cli(capsys, "plan", tiny_model_folder, "--profile", profile_file, "--budget", "0.6",
                         "-o", tmp_path / "c.json", "--quiet")
    assert code == 0  # the profile belongs to this model
    code, stdout, _ = run_cli(capsys, "analyze", "--profile", profile_file, "-o", tmp_path / "report", "--quiet")
    assert code == 0 and json.loads(stdout)["whitened"]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["matrices"]) == 14
