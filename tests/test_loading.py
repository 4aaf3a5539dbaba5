"""Resolving what the user names as a model, and loading it (dense or compressed) with its tokenizer."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from helpers import make_tiny_model, make_tiny_tokenizer, random_windows, save_tiny_model

from lowrank.checkpoint import save_compressed
from lowrank.compression import compress_model
from lowrank.errors import ModelLoadError
from lowrank.layers import LowRankLinear
from lowrank.loading import (BUILTIN_MODELS, LOADED_INPUTS, ModelLocation, load_model, load_tokenizer, locate,
                             model_class_for)


def logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


def test_locate_folders_gguf_files_and_hub_ids(tmp_path):
    folder = tmp_path / "model"
    save_tiny_model(folder)
    assert locate(str(folder)) == ModelLocation(str(folder))
    gguf = tmp_path / "ggufs" / "tiny.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")  # locate only names the file; reading it is from_pretrained's job
    assert locate(str(gguf)) == ModelLocation(str(gguf.parent), "tiny.Q4.gguf")
    assert locate(str(gguf.parent)) == ModelLocation(str(gguf.parent), "tiny.Q4.gguf")  # the folder's only GGUF
    assert locate("HuggingFaceTB/SmolLM2-135M") == ModelLocation("HuggingFaceTB/SmolLM2-135M", local=False)


def test_locate_the_built_in_model():
    package, gguf_file, _ = BUILTIN_MODELS["smollm2-135m"]
    location = locate("smollm2-135m")
    assert location.gguf_file == gguf_file and (Path(location.path) / gguf_file).is_file()
    assert Path(location.path).name == package


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: (root / "notes.txt").write_text("x") and root / "notes.txt", "is a file; pass the folder"),
    (lambda root: root, "is not a model folder (no config.json)"),
    (lambda root: (root / "model" / "model.safetensors").unlink() or root / "model", "has a config.json but no weights"),
    (lambda root: (root / "model" / "model.safetensors").rename(root / "model" / "pytorch_model.bin").parent,
     "holds only pickle weights"),
], ids=["missing", "a-file", "no-config", "no-weights", "pickle-only"])
def test_locate_explains_what_is_wrong(tmp_path, make, message):
    save_tiny_model(tmp_path / "model")
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        locate(str(make(tmp_path)))  # each message also says what to pass instead


def test_pickle_weights_are_located_only_when_allowed(tmp_path):
    folder = tmp_path / "model"
    save_tiny_model(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert locate(str(folder), allow_pickle=True) == ModelLocation(str(folder))


def test_model_class_for_reads_config_architectures():
    assert model_class_for(transformers.GPT2Config(architectures=["GPT2LMHeadModel"])) is transformers.GPT2LMHeadModel
    assert model_class_for(transformers.BertConfig(architectures=["BertForMaskedLM"])) is transformers.BertForMaskedLM
    unknown = transformers.LlamaConfig(architectures=["NoSuchModelClass"])
    assert model_class_for(unknown) is transformers.AutoModelForCausalLM


def test_load_model_reads_a_dense_folder_with_its_tokenizer(tmp_path):
    folder = tmp_path / "model"
    saved = save_tiny_model(folder, "gpt2")
    loaded = load_model(str(folder))
    windows = random_windows(2, 12)
    assert not loaded.compressed and loaded.source == str(folder) and not loaded.model.training
    assert type(loaded.model) is transformers.GPT2LMHeadModel
    assert torch.equal(logits(loaded.model, windows), logits(saved, windows))
    assert loaded.tokenizer("To be, or not").input_ids == make_tiny_tokenizer()("To be, or not").input_ids
    assert folder.resolve() in LOADED_INPUTS  # outputs may not overwrite it from now on
    half = load_model(str(folder), dtype=torch.float16, need_tokenizer=False)
    assert half.tokenizer is None and {p.dtype for p in half.model.parameters()} == {torch.float16}


def test_load_model_reads_a_compressed_folder(tmp_path):
    model = make_tiny_model("opt")
    plan = compress_model(model, ratio=0.5, method="svd", progress=False)
    save_tiny_model(tmp_path / "dense", "opt")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "dense")
    folder = save_compressed(model, tokenizer, plan, tmp_path / "compressed")
    loaded = load_model(str(folder))
    windows = random_windows(2, 12)
    assert loaded.compressed
    assert all(isinstance(loaded.model.get_submodule(n), LowRankLinear) for n in plan.factored)
    assert (logits(loaded.model, windows) - logits(model, windows)).abs().max() <= 1e-6


def test_load_tokenizer_names_the_tokenizer_option(tmp_path):
    folder = tmp_path / "model"
    save_tiny_model(folder)
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    with pytest.raises(ModelLoadError, match="holds no tokenizer files .*pass --tokenizer"):
        load_tokenizer(str(bare))
    with pytest.raises(ModelLoadError, match="tokenizer path ./no-such-folder does not exist; pass --tokenizer"):
        load_tokenizer("./no-such-folder")
    assert load_tokenizer(str(folder)).convert_ids_to_tokens(3) is not None
