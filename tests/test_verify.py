"""verify_folder: a sound compressed folder passes; every kind of damage is one named problem.

Each test damages a copy of one tiny compressed Llama (format 2, with guards) in one way and checks
that verify reports exactly that damage, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model, random_windows
from safetensors.torch import load_file, save_file

from lowrank.checkpoint import save_compressed
from lowrank.compression import compress_model
from lowrank.errors import LowrankError
from lowrank.folder_format import PLAN_FILE
from lowrank.plan import Plan
from lowrank.verify import check_finite_weights, check_weights_match_plan, verify_folder


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    model = make_tiny_model("llama")
    plan = compress_model(model, ratio=0.5, windows=random_windows(4, 16), progress=False)
    assert plan.factored  # the damage below needs factored modules
    return save_compressed(model, None, plan, tmp_path_factory.mktemp("v") / "compressed")


def damaged_copy(good_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good_folder, tmp_path / "copy"))


def rewrite_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write new weights and record their sha256, so that only the tensors themselves are wrong."""
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    record = json.loads((folder / PLAN_FILE).read_text())
    record["files"]["model.safetensors"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / PLAN_FILE).write_text(json.dumps(record))


def first_factored(folder: Path) -> tuple[str, int]:
    ranks = json.loads((folder / "config.json").read_text())["quantization_config"]["ranks"]
    name = sorted(ranks)[0]
    return name, ranks[name]


def test_a_sound_folder_passes_and_counts_what_it_checked(good_folder):
    result = verify_folder(good_folder)
    record = json.loads((good_folder / PLAN_FILE).read_text())
    n_factored = sum(1 for m in record["modules"].values() if m["rank"] is not None)
    assert result.ok and result.problems == []
    assert result.files == 1 and result.tensors == len(load_file(good_folder / "model.safetensors"))
    assert (result.factored, result.dense) == (n_factored, len(record["modules"]) - n_factored)
    assert result.format_version == 2 and result.protected and result.unguarded == []
    assert f"{result.tensors} tensors agree with the plan ({n_factored} factored" in result.summary()


def test_a_flipped_byte_is_a_sha256_problem(good_folder, tmp_path):
    folder = damaged_copy(good_folder, tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x01  # a low mantissa bit of the last tensor: still finite, still readable
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert verify_folder(folder).problems == [
        "weight file model.safetensors does not match its recorded sha256; it was modified or damaged"]


def test_a_nan_is_a_problem_naming_the_tensor_and_the_count(good_folder, tmp_path):
    folder = damaged_copy(good_folder, tmp_path)
    name, _ = first_factored(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[f"{name}.up.weight"][0, :2] = torch.tensor([float("nan"), float("inf")])
    rewrite_weights(folder, tensors)
    assert verify_folder(folder).problems == [f"{name}.up.weight in model.safetensors holds 2 NaN/Inf value(s)"]


def test_a_rank_edited_in_config_json_is_a_problem(good_folder, tmp_path):
    folder = damaged_copy(good_folder, tmp_path)
    name, rank = first_factored(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["ranks"][name] = rank + 1
    (folder / "config.json").write_text(json.dumps(config))
    assert verify_folder(folder).problems == [
        "the ranks in config.json's quantization_config disagree with lowrank_plan.json"]


def test_a_factor_of_the_wrong_rank_is_a_shape_problem(good_folder, tmp_path):
    folder = damaged_copy(good_folder, tmp_path)
    name, rank = first_factored(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[f"{name}.down.weight"] = tensors[f"{name}.down.weight"][: rank - 1].clone()
    rewrite_weights(folder, tensors)
    in_features = tensors[f"{name}.down.weight"].shape[1]
    assert verify_folder(folder).problems == [
        f"{name}.down.weight has shape {[rank - 1, in_features]}, the plan (rank {rank}) needs {[rank, in_features]}"]
    record = json.loads((folder / PLAN_FILE).read_text())
    record.pop("files")
    with pytest.raises(LowrankError, match=f"the weights do not match {PLAN_FILE}: {name}.down.weight has shape"):
        check_weights_match_plan(folder, Plan.from_dict(record))


def test_a_missing_weight_file_and_a_stray_one_are_problems(good_folder, tmp_path):
    folder = damaged_copy(good_folder, tmp_path)
    (folder / "model.safetensors").rename(folder / "other.safetensors")
    problems = verify_folder(folder).problems
    assert f"weight file model.safetensors is missing (recorded in {PLAN_FILE})" in problems
    assert f"weight file other.safetensors is not recorded in {PLAN_FILE}; it does not belong to this folder" in problems


def test_what_is_not_a_compressed_folder_is_refused(good_folder, tmp_path):
    with pytest.raises(LowrankError, match="is not a folder"):
        verify_folder(tmp_path / "absent")
    with pytest.raises(LowrankError, match=f"has no {PLAN_FILE}, so it is not a compressed lowrank folder"):
        verify_folder(tmp_path)


def test_check_finite_weights_names_the_module_and_the_count(tiny_llama):
    check_finite_weights(tiny_llama)  # a sound model passes
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[0, :3] = float("nan")
    with pytest.raises(LowrankError, match=r"the weight of module model\.layers\.1\.mlp\.down_proj holds 3 NaN/Inf"):
        check_finite_weights(tiny_llama)


def test_verify_flags_a_missing_guard(good_folder, tmp_path):
    from safetensors.torch import save_file

    folder = shutil.copytree(good_folder, tmp_path / "unguarded")
    tensors = load_file(folder / "model.safetensors")
    name = next(iter(json.loads((folder / "config.json").read_text())["quantization_config"]["ranks"]))
    del tensors[f"{name}.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    result = verify_folder(folder)
    assert not result.protected and result.unguarded == [name]
    assert any(f"{name} lacks its guard" in p for p in result.problems)
