"""Hub ids (lowrank.hub_source): downloaded with huggingface_hub, safe files only, then streamed from disk.

There is no network here: the tests lay a download out as huggingface_hub caches it and run the
real huggingface_hub code offline (its HF_HUB_CACHE and HF_HUB_OFFLINE settings), not a mock.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hub_cache, random_windows, run_cli, save_tiny_model

import lowrank
from lowrank.checkpoint import load_compressed
from lowrank.config import CompressConfig
from lowrank.errors import LowrankError
from lowrank.hub_source import SAFE_FILES, download_checkpoint
from lowrank.layers import LowRankLinear

REPO = "lowrank-test/tiny-llama"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (what HF_HUB_CACHE=... HF_HUB_OFFLINE=1 set at start-up)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _products(folder) -> dict[str, torch.Tensor]:
    return {n: m.merged_weight() for n, m in load_compressed(folder).named_modules() if isinstance(m, LowRankLinear)}


def test_only_safe_files_are_downloaded():
    from huggingface_hub.utils import filter_repo_objects

    listing = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
               "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
               "training_args.bin", "optimizer.pt", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "model-q4.gguf", "README.md", "original/consolidated.pth"]
    fetched = set(filter_repo_objects(listing, allow_patterns=SAFE_FILES))
    assert fetched == {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                       "model.safetensors.index.json", "pytorch_model.bin.index.json", "tokenizer.json",
                       "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"}


def test_a_cached_hub_id_streams_like_its_folder(tmp_path, offline_cache):
    save_tiny_model(tmp_path / "src", "llama")
    snapshot = hub_cache(offline_cache, REPO, tmp_path / "src")
    assert download_checkpoint(REPO) == snapshot
    windows = random_windows(12, 24)
    from_hub = lowrank.compress(REPO, CompressConfig(stream=True), windows, output=tmp_path / "hub", progress=False)
    local = lowrank.compress(tmp_path / "src", CompressConfig(stream=True), windows, output=tmp_path / "local",
                             progress=False)
    assert from_hub.factored == local.factored and from_hub.source == str(snapshot)
    hub, folder = _products(tmp_path / "hub"), _products(tmp_path / "local")
    assert hub.keys() == folder.keys()
    for name in hub:
        assert torch.equal(hub[name], folder[name])


def test_cli_streams_a_cached_hub_id_with_its_tokenizer(tmp_path, offline_cache, capsys, monkeypatch):
    save_tiny_model(tmp_path / "src", "llama")
    hub_cache(offline_cache, REPO, tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "compress", REPO, "--stream", "--samples", "2", "--seq-len", "16", "-o", "out",
                             "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer.json").is_file()  # the snapshot's tokenizer calibrated and was saved
    assert run_cli(capsys, "verify", "out")[0] == 0


def test_a_hub_id_neither_cached_nor_reachable_is_one_line(offline_cache):
    with pytest.raises(LowrankError, match="hub model lowrank-test/not-cached is not in the local cache and the "
                                           "Hub cannot be reached"):
        download_checkpoint("lowrank-test/not-cached")


def test_a_pickle_only_repository_is_refused(tmp_path, offline_cache):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"not unpickled")
    hub_cache(offline_cache, "lowrank-test/pickles", tmp_path / "src")
    with pytest.raises(LowrankError, match="has only pickle weights"):
        lowrank.compress("lowrank-test/pickles", CompressConfig(stream=True), random_windows(2, 8),
                         output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_malformed_hub_id_is_one_line(offline_cache):
    with pytest.raises(LowrankError, match="neither a local path nor a valid hub id"):
        download_checkpoint("owner/name/extra")
