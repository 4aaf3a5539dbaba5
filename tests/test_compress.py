"""One-shot compression end to end on tiny models of every supported architecture:
compress → save → reload (lowrank.load and transformers' from_pretrained) → same logits."""

import json

import pytest
import torch
import transformers
from conftest import CAUSAL_ARCHITECTURES, TINY_ARCHITECTURES, make_tiny_model, random_windows

import lowrank
from lowrank.calibration import collect_stats
from lowrank.checkpoint import PLAN_FILE, read_plan, save_compressed, sha256_file
from lowrank.compress import apply_plan, compress_model, count_parameters, uniform_plan
from lowrank.errors import LowrankError
from lowrank.factorize import output_error
from lowrank.layers import LowRankLinear
from lowrank.targets import find_targets, weight_matrix


def logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_compress_save_reload_same_logits(arch, tmp_path):
    model = make_tiny_model(arch)
    windows = random_windows(6, 16)
    plan = compress_model(model, ratio=0.5, method="whiten", windows=windows, progress=False)
    assert plan.factored and all(isinstance(model.get_submodule(n), LowRankLinear) for n in plan.factored)
    # The plan's accounting is the model's real parameter count.
    assert plan.model_params_after == count_parameters(model)
    before = logits(model, windows)
    assert torch.isfinite(before).all()

    out = save_compressed(model, None, plan, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lowrank"
    assert config["quantization_config"]["ranks"] == plan.factored
    assert config["quantization_config"]["format_version"] == 2

    reloaded = lowrank.load(out)
    assert (logits(reloaded, windows) - before).abs().max() < 1e-5
    auto_cls = transformers.AutoModelForMaskedLM if arch == "bert" else transformers.AutoModelForCausalLM
    via_hf = auto_cls.from_pretrained(out)
    assert (logits(via_hf, windows) - before).abs().max() < 1e-5
    assert count_parameters(via_hf) == plan.model_params_after


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
