"""The guard: a compressed folder never loads as a silently broken model without lowrank.

Format 2 stores a one-element tensor under each factored module's dense weight name; a plain
transformers (lowrank absent, `plain_env`: a fresh virtual environment, tests/helpers.py) raises on
it. Format 1 folders, written before guards existed, still load and gain guards when saved again.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from helpers import FIXTURES, load_script, run_in
from safetensors.torch import load_file

import lowrank
from lowrank.checkpoint import save_compressed
from lowrank.folder_guard import (FORMAT_VERSION, GUARD_SHAPE, format_version_of, guard_key, guard_patterns, is_guard,
                                  unguarded_modules)
from lowrank.verify import verify_folder


def test_a_guard_sits_under_the_dense_weight_name_and_only_a_one_element_shape_is_one():
    assert guard_key("model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj.weight"
    assert is_guard((1,)) and is_guard([1])
    assert not is_guard((1, 1)) and not is_guard((48, 96)) and not is_guard(()) and not is_guard((2,))


def test_unguarded_modules_are_those_without_a_one_element_weight():
    shapes = {"a.weight": (1,), "b.weight": (48, 96), "c.down.weight": (4, 96)}
    assert unguarded_modules(["a", "b", "c"], shapes) == ["b", "c"]  # b holds a dense weight, c nothing
    assert unguarded_modules([], shapes) == []


def test_guard_patterns_match_the_guard_names_and_nothing_longer():
    [pattern] = guard_patterns(["model.layers.0.mlp.up_proj"])
    assert re.search(pattern, "model.layers.0.mlp.up_proj.weight")
    assert re.search(pattern, "base.model.layers.0.mlp.up_proj.weight")  # under a prefix
    assert not re.search(pattern, "model.layers.0.mlp.up_proj.down.weight")
    assert not re.search(pattern, "model.layers.0.mlp.up_projXweight")  # the dots are literal
    assert not re.search(pattern, "xmodel.layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize("config, version", [
    ({"quant_method": "lowrank"}, 1),  # lowrank 0.1.0 wrote no version
    ({"format_version": 2}, 2), ({"format_version": 7}, 7),
    ({"format_version": True}, None), ({"format_version": "2"}, None), (None, None), ([2], None),
])
def test_format_version_is_read_or_none(config, version):
    assert format_version_of(config) == version


def test_folder_holds_a_guard_per_factored_module(compressed):
    folder, _ = compressed
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_file(folder / "model.safetensors")
    assert config["format_version"] == FORMAT_VERSION == 2
    for name in config["ranks"]:
        assert tensors[f"{name}.weight"].shape == GUARD_SHAPE
    result = verify_folder(folder)
    assert result.ok and result.protected and result.format_version == 2


def test_plain_transformers_without_lowrank_raises(plain_env, compressed, tmp_path):
    folder, _ = compressed
    done = run_in(plain_env, load_script(folder, tmp_path / "logits.safetensors"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("RAISED RuntimeError"), done.stdout
    assert "mismatch" in done.stdout.lower() and "torch.Size([1])" in done.stdout + done.stderr  # the guard's shape
    assert not (tmp_path / "logits.safetensors").exists()
    assert "Unknown quantization type, got lowrank" in done.stderr  # transformers names the missing method


def test_ignore_mismatched_sizes_is_the_documented_gap(plain_env, compressed, tmp_path):
    """docs/format.md (Loading safety): with ignore_mismatched_sizes=True transformers re-initialises the guarded
    weights; no file content can stop it, but its load report still lists every one as MISMATCH."""
    folder, _ = compressed
    done = run_in(plain_env, load_script(folder, tmp_path / "l.safetensors", ignore_mismatched_sizes=True), tmp_path)
    assert done.stdout.startswith("LOADED"), done.stdout + done.stderr
    ranks = json.loads((folder / "config.json").read_text())["quantization_config"]["ranks"]
    assert re.search(r"size mismatch|shapes did not match", done.stderr, re.I)  # transformers 5 | 4.x words
    for name in ranks:  # transformers 5 folds the layer index into "layers.{0, 1}."; 4.x lists each weight
        module = name.rpartition(".layers.")[2].partition(".")[2]
        assert f"{module}.weight" in done.stderr, name


def test_version_1_folder_still_loads():
    """tests/fixtures/format-v1 was written by lowrank before guards existed (make_format_v1.py)."""
    folder = FIXTURES / "format-v1"
    expected = json.loads((FIXTURES / "format-v1-logits.json").read_text())
    probe = torch.tensor(expected["input_ids"])
    for model in (lowrank.load(folder), transformers.AutoModelForCausalLM.from_pretrained(folder)):
        with torch.no_grad():
            assert (model(input_ids=probe).logits - torch.tensor(expected["logits"])).abs().max() <= 1e-5
    result = verify_folder(folder)
    assert result.ok and result.format_version == 1 and not result.protected
    assert "NOT protected" in result.protection()


def test_resaving_a_version_1_folder_adds_guards(tmp_path):
    """lowrank.save_compressed and a plain save_pretrained of the loaded model both write format 2."""
    model = lowrank.load(FIXTURES / "format-v1")
    plan, _ = lowrank.checkpoint.read_plan(FIXTURES / "format-v1")
    result = verify_folder(save_compressed(model, None, plan, tmp_path / "v2"))
    assert result.ok and result.format_version == 2 and result.protected
    transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / "format-v1").save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["format_version"] == 2
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(tensors[f"{name}.weight"].shape == GUARD_SHAPE for name in plan.factored)
