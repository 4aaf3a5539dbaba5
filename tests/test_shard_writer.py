"""The shard writer: safetensors files written block by block, readable by safetensors and transformers' index."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lowrank.block_source import INDEX_FILE, SINGLE_FILE, tensor_locations
from lowrank.errors import LowrankError
from lowrank.shard_writer import ShardWriter, parse_size


def _blocks():
    generator = torch.Generator().manual_seed(0)
    return [{f"layers.{i}.w": torch.randn(64, 32, generator=generator), f"layers.{i}.b": torch.randn(64, generator=generator),
             f"layers.{i}.steps": torch.arange(5, dtype=torch.int64)} for i in range(4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_hold_every_tensor_in_the_asked_dtype(tmp_path, dtype):
    blocks = _blocks()
    writer = ShardWriter(tmp_path, max_shard_bytes=12_000, dtype=dtype)
    for i, block in enumerate(blocks):
        writer.add_block(i, block)
    files = writer.finish()
    assert len(files) > 1 and (tmp_path / INDEX_FILE).is_file()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(f.stat().st_size for f in files)
    locations = tensor_locations(tmp_path)
    for block in blocks:
        for name, tensor in block.items():
            with safe_open(str(locations[name]), framework="pt") as handle:
                stored = handle.get_tensor(name)
                assert handle.metadata()["lowrank_format_version"] == "2"
            expected = tensor.to(dtype) if tensor.is_floating_point() else tensor
            assert stored.dtype == expected.dtype and torch.equal(stored, expected), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX_FILE] + [f.name for f in files])


def test_a_shard_never_passes_the_cap_unless_one_block_does(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=20_000, dtype=torch.float32)  # a block is 8,488 bytes
    for i, block in enumerate(_blocks()):
        writer.add_block(i, block)
    assert [s["blocks"] for s in writer.progress["shards"]] == [[0, 1]]  # blocks 2 and 3 still being appended
    files = writer.finish()
    assert [f.stat().st_size < 20_000 + 1024 for f in files] == [True, True]


def test_small_model_is_one_file(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=10**9, dtype=torch.float32)
    writer.add_block(0, _blocks()[0])
    assert [f.name for f in writer.finish()] == [SINGLE_FILE]


@pytest.mark.parametrize("text,size", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1.5GiB", int(1.5 * 2**30)),
                                       ("4096", 4096), ("30KB", 30_000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "-1GB", "0", "3XB"])
def test_parse_size_refuses(text):
    with pytest.raises(LowrankError, match="is not a size"):
        parse_size(text)
