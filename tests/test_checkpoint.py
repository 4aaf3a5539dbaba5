"""The compressed folder on disk: the compress → save → reload round trip over every tiny
architecture, method and mode, and the folder's own helpers (atomic writes, plan, hashes)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import TINY_ARCHITECTURES, make_tiny_model, random_windows

import lowrank
from lowrank.checkpoint import read_plan, save_compressed
from lowrank.fileio import atomic_output_dir, atomic_write_text, check_output_dir, check_output_spares_input, sha256_file
from lowrank.folder_format import PLAN_FILE, is_compressed_folder
from lowrank.compression import compress_model
from lowrank.model_info import count_parameters
from lowrank.errors import LowrankError
from lowrank.layers import LowRankLinear

#: (method, mode) pairs of the matrix; "sequential" is compress_model's default mode (block by block,
#: with the least-squares update). Plain SVD reads no calibration statistics, so its one-shot and
#: sequential runs are the same computation: it is run once, and the test asserts the sameness.
METHOD_MODES = [
    pytest.param("svd", "one-shot = sequential", id="svd-one-shot=sequential"),
    pytest.param("asvd", "one-shot", id="asvd-one-shot"),
    pytest.param("asvd", "sequential", id="asvd-sequential"),
    pytest.param("whiten", "one-shot", id="whiten-one-shot"),
    pytest.param("whiten", "sequential", id="whiten-sequential"),
]


def logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


def factor_tensors(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if ".down." in name or ".up." in name}


@pytest.mark.parametrize("method, mode", METHOD_MODES)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_compress_save_reload_round_trip(arch, method, mode, tmp_path):
    """Reloaded outputs equal the compressed model's; ranks and parameter count are the plan's."""
    model = make_tiny_model(arch)
    dense_params = count_parameters(model)
    windows = random_windows(6, 16)
    sequential = mode == "sequential" or method == "svd"
    plan = compress_model(model, ratio=0.5, method=method, windows=windows, sequential=sequential, progress=False)
    if method == "svd":  # the same computation without the sequential machinery
        other = make_tiny_model(arch)
        compress_model(other, ratio=0.5, method=method, windows=windows, sequential=False, progress=False)
        assert factor_tensors(other).keys() == factor_tensors(model).keys()
        assert all(torch.equal(a, factor_tensors(model)[n]) for n, a in factor_tensors(other).items())
    assert plan.method == method and plan.options.get("sequential", False) == (mode == "sequential")
    assert len(plan.factored) >= 6 and all(0 < rank for rank in plan.factored.values())

    expected_params = dense_params - sum(plan.modules[n].shape[0] * plan.modules[n].shape[1]
                                         - rank * sum(plan.modules[n].shape) for n, rank in plan.factored.items())
    assert count_parameters(model) == plan.model_params_after == expected_params
    before = logits(model, windows)
    assert torch.isfinite(before).all()

    folder = save_compressed(model, None, plan, tmp_path / "out")
    reloaded = lowrank.load(folder)
    assert (logits(reloaded, windows) - before).abs().max() <= 1e-6
    assert count_parameters(reloaded) == expected_params
    for name, rank in plan.factored.items():
        layer = reloaded.get_submodule(name)
        out_features, in_features = plan.modules[name].shape
        assert isinstance(layer, LowRankLinear) and layer.rank == rank
        assert layer.down.weight.shape == (rank, in_features) and layer.up.weight.shape == (out_features, rank)
    assert not any(isinstance(reloaded.get_submodule(n), LowRankLinear) for n in plan.modules if n not in plan.factored)
    assert read_plan(folder)[0].factored == plan.factored
    auto_cls = transformers.AutoModelForMaskedLM if arch == "bert" else transformers.AutoModelForCausalLM
    via_transformers = auto_cls.from_pretrained(folder)
    assert (logits(via_transformers, windows) - before).abs().max() <= 1e-6


def test_folder_records_the_plan_the_ranks_and_the_hash_of_each_weight_file(tmp_path):
    model = make_tiny_model("llama")
    plan = compress_model(model, ratio=0.5, method="svd", progress=False, source="tiny")
    folder = save_compressed(model, None, plan, tmp_path / "out")
    assert is_compressed_folder(folder) and not is_compressed_folder(tmp_path)
    record = json.loads((folder / PLAN_FILE).read_text())
    assert record["files"] == {"model.safetensors": sha256_file(folder / "model.safetensors")}
    read_back, files = read_plan(folder)
    assert read_back.factored == plan.factored and read_back.source == "tiny" and files == record["files"]
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "lowrank" and quant["ranks"] == plan.factored


def test_sha256_file_is_the_digest_of_the_bytes(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    data = bytes(range(256)) * 9000  # larger than one read chunk of a small size
    path.write_bytes(data)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_atomic_output_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("the work failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or backup folder left


def test_atomic_write_text_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_output_checks_refuse_existing_outputs_and_the_input(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(LowrankError, match="already exists; choose another -o path or pass --overwrite"):
        check_output_dir(tmp_path / "exists", overwrite=False)
    assert check_output_dir(tmp_path / "exists", overwrite=True) == tmp_path / "exists"
    with pytest.raises(LowrankError, match="does not exist; create it first"):
        check_output_dir(tmp_path / "no" / "out", overwrite=False)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for clash in (model_dir, model_dir / "inside"):
        with pytest.raises(LowrankError, match="would overwrite or write into the input"):
            check_output_spares_input(clash, model_dir)
    check_output_spares_input(tmp_path / "beside", model_dir)  # a sibling is fine


def test_reading_a_damaged_plan_is_one_clear_error(tmp_path):
    model = make_tiny_model("gpt2")
    folder = save_compressed(model, None, compress_model(model, ratio=0.5, method="svd", progress=False), tmp_path / "out")
    (folder / PLAN_FILE).write_text("{ not json")
    with pytest.raises(LowrankError, match="the compressed folder is damaged, recompress it"):
        read_plan(folder)
