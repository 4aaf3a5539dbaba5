"""Compression on tiny models: methods, plans, ratio 1, generation after reload.

The compress → save → reload matrix over every architecture, method and mode is in test_checkpoint.py."""

import json

import pytest
import torch
import transformers
from helpers import CAUSAL_ARCHITECTURES, make_tiny_model, random_windows

from lowrank.calibration import collect_stats
from lowrank.checkpoint import read_plan, save_compressed
from lowrank.fileio import sha256_file
from lowrank.folder_format import PLAN_FILE
from lowrank.compression import apply_plan, compress_model
from lowrank.model_planning import uniform_plan
from lowrank.errors import LowrankError
from lowrank.factorize import output_error
from lowrank.targets import find_targets, weight_matrix


def logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


@pytest.mark.parametrize("arch", CAUSAL_ARCHITECTURES)
def test_reloaded_model_generates(arch, tmp_path):
    model = make_tiny_model(arch)
    windows = random_windows(4, 16)
    plan = compress_model(model, ratio=0.6, windows=windows, progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(save_compressed(model, None, plan, tmp_path / "c"))
    prompt = windows[:1, :5]
    generated = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 11) and torch.equal(generated, expected)


def test_methods_rank_by_output_error_on_a_real_forward():
    """Across every layer of a tiny Llama, whiten's output error is never above svd's or asvd's."""
    model = make_tiny_model("llama")
    windows = random_windows(8, 24)
    targets = find_targets(model)
    stats = collect_stats(model, targets, windows, progress=False)
    errors = {}
    for method in ("svd", "asvd", "whiten"):
        copy = make_tiny_model("llama")
        apply_plan(copy, uniform_plan(copy, targets, 0.5, method), stats, progress=False)
        errors[method] = {t.name: output_error(weight_matrix(model.get_submodule(t.name)).detach(),
                                               copy.get_submodule(t.name).merged_weight().detach(),
                                               stats[t.name].gram) for t in targets}
    for name in errors["whiten"]:
        assert errors["whiten"][name] <= errors["svd"][name] * 1.001 + 1e-9
        assert errors["whiten"][name] <= errors["asvd"][name] * 1.001 + 1e-9


def test_ratio_one_keeps_everything_dense_and_exact():
    model = make_tiny_model("llama")
    reference = make_tiny_model("llama")
    windows = random_windows(4, 16)
    plan = compress_model(model, ratio=1.0, windows=windows, progress=False)
    assert plan.factored == {} and plan.target_ratio == 1.0
    assert torch.equal(logits(model, windows), logits(reference, windows))


def test_svd_needs_no_calibration_and_plan_file_records_hashes(tmp_path):
    model = make_tiny_model("gpt2")
    plan = compress_model(model, ratio=0.5, method="svd", progress=False, round_to=4)
    assert all(rank % 4 == 0 for rank in plan.factored.values())
    out = save_compressed(model, None, plan, tmp_path / "gpt2")
    saved_plan, files = read_plan(out)
    assert saved_plan.factored == plan.factored and saved_plan.method == "svd"
    assert files == {"model.safetensors": sha256_file(out / "model.safetensors")}
    record = json.loads((out / PLAN_FILE).read_text())
    assert record["summary"]["target_ratio"] == pytest.approx(plan.target_ratio, abs=1e-6)
    assert record["summary"]["model_ratio"] == pytest.approx(plan.model_ratio, abs=1e-6)


def test_whiten_without_calibration_is_refused():
    with pytest.raises(LowrankError, match="needs calibration text"):
        compress_model(make_tiny_model("llama"), ratio=0.5, method="whiten")


def test_saving_over_an_existing_folder_needs_overwrite(tmp_path):
    model = make_tiny_model("llama")
    plan = compress_model(model, ratio=0.5, method="svd", progress=False)
    out = save_compressed(model, None, plan, tmp_path / "c")
    with pytest.raises(LowrankError, match="already exists"):
        save_compressed(model, None, plan, out)
    save_compressed(model, None, plan, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folders left


# ---- one pipeline: profile → plan → compress ----------------------------------------------------

@pytest.mark.parametrize("sequential", [False, True])
def test_the_model_is_marked_compressed_once(sequential, monkeypatch):
    """One factor/replace loop for one-shot and sequential alike: the quantizer config is attached once, at the end."""
    from lowrank import hf_integration

    calls = []
    real = hf_integration.attach
    monkeypatch.setattr(hf_integration, "attach", lambda model, ranks, method=None: calls.append(dict(ranks)) or
                        real(model, ranks, method))
    model = make_tiny_model("llama")
    plan = compress_model(model, ratio=0.6, strategy="global", windows=random_windows(4, 16), batch_size=2,
                          sequential=sequential, progress=False)
    assert calls == [plan.factored]


@pytest.mark.parametrize("method, strategy", [("whiten", "uniform"), ("whiten", "energy"), ("whiten", "global"),
                                              ("whiten", "sensitivity"), ("asvd", "global"), ("svd", "global"),
                                              ("svd", "energy")])
def test_a_saved_profile_plans_like_the_model_itself(method, strategy, tmp_path):
    """`plan --profile` and planning on the model agree: the same ranks from the same calibration."""
    from lowrank.model_planning import plan_model
    from lowrank.planner import plan_profile
    from lowrank.profile import Profile
    from lowrank.profiling import profile_with_calibration

    model = make_tiny_model("llama")
    windows = random_windows(4, 16)
    inline, _ = plan_model(model, find_targets(model), "0.6", strategy, windows=windows, method=method, batch_size=2,
                           sensitivity_samples=2, progress=False)
    profile = profile_with_calibration(model, windows, batch_size=2, sensitivity_samples=2, progress=False)
    from_file = plan_profile(Profile.load(profile.save(tmp_path / "p.safetensors")), "0.6", strategy, method=method)
    assert from_file.modules == inline.modules
    assert from_file.model_params == inline.model_params and from_file.budget == inline.budget
