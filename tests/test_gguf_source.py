"""A GGUF file read tensor by tensor (lowrank.gguf_source through BlockSource): transformers' values, streamed."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from helpers import make_tiny_tokenizer, random_windows, tiny_gguf_model, write_foreign_gguf, write_tiny_gguf

import lowrank
from lowrank.block_source import BlockSource
from lowrank.checkpoint import load_compressed
from lowrank.config import CompressConfig
from lowrank.errors import LowrankError
from lowrank.gguf_source import rotary_rows_to_transformers
from lowrank.layers import LowRankLinear
from lowrank.loading import local_checkpoint


def _streamed_state(path) -> tuple[BlockSource, dict[str, torch.Tensor]]:
    """Every tensor of a checkpoint as BlockSource reads it, block after block."""
    source = BlockSource(path)
    for index in range(len(source.blocks)):
        source.load_block(index)
    return source, source.model.state_dict()


def _products(folder) -> dict[str, torch.Tensor]:
    model = load_compressed(folder)
    return {name: m.merged_weight() for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def test_rotary_rows_undo_llama_cpp_order():
    rows = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of 8 rows (4 rotary pairs)
    llama_cpp = rows.reshape(2, 2, 4, 3).transpose(1, 2).reshape(16, 3)  # halves → interleaved pairs
    assert not torch.equal(llama_cpp, rows)
    assert torch.equal(rotary_rows_to_transformers(llama_cpp, heads=2), rows)
    assert torch.equal(rotary_rows_to_transformers(llama_cpp[:, 0], heads=2), rows[:, 0])  # a bias too


@pytest.mark.parametrize("arch,quantized", [("llama", None), ("llama", "Q8_0"), ("qwen2", None), ("qwen3", "Q8_0")])
def test_gguf_read_tensor_by_tensor_equals_transformers_load(tmp_path, arch, quantized):
    model = tiny_gguf_model(arch)
    write_tiny_gguf(tmp_path / "tiny.gguf", model, arch, quantized)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                                  dtype=torch.float32).state_dict()
    source, streamed = _streamed_state(tmp_path / "tiny.gguf")
    assert type(source.model) is type(model) and streamed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(streamed[name], reference[name]), name
    original = model.state_dict()  # the file holds the model (exactly, unless quantized): the writer is right
    error = max((original[n] - reference[n]).abs().max().item() for n in original)
    assert error == 0 if quantized is None else 0 < error < 0.01
    assert source.source_dtype == torch.float32 and source.files == [tmp_path / "tiny.gguf"]


def test_streamed_compression_of_a_gguf_equals_in_memory(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_gguf_model("llama"), "llama", "Q8_0")
    make_tiny_tokenizer().save_pretrained(tmp_path / "tok")
    windows = random_windows(12, 24)
    gguf = tmp_path / "tiny.gguf"
    dense = lowrank.compress(gguf, CompressConfig(), windows, output=tmp_path / "mem", tokenizer=tmp_path / "tok",
                             progress=False)
    streamed = lowrank.compress(gguf, CompressConfig(stream=True), windows, output=tmp_path / "str",
                                tokenizer=tmp_path / "tok", progress=False)
    assert streamed.factored == dense.factored and streamed.factored
    a, b = _products(tmp_path / "mem"), _products(tmp_path / "str")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), name


def test_corrupt_gguf_is_one_line(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_gguf_model("llama"), "llama")
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(LowrankError, match="cut.gguf is not a readable GGUF file"):
        BlockSource(tmp_path / "cut.gguf")


def test_unsupported_gguf_architecture_is_refused(tmp_path):
    write_foreign_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(LowrankError, match="streaming reads GGUF architectures llama, qwen2, qwen3, not 'gpt2'"):
        lowrank.compress(tmp_path / "gpt2.gguf", CompressConfig(stream=True), random_windows(2, 8),
                         output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_smollm2_gguf_every_tensor_equals_transformers_load(smollm2):
    location = local_checkpoint("smollm2-135m")
    source, streamed = _streamed_state(f"{location.path}/{location.gguf_file}")
    reference = smollm2.model.state_dict()
    assert streamed.keys() == reference.keys() and len(reference) > 200
    for name in reference:
        assert torch.equal(streamed[name], reference[name]), name
    assert source.model.lm_head.weight is source.model.model.embed_tokens.weight  # tied, as transformers ties them


@pytest.mark.slow
def test_real_smollm2_streamed_from_gguf_gives_the_in_memory_factors(smollm2, tmp_path, one_thread):
    """`lowrank compress smollm2-135m --stream` (the GGUF, block by block) = in memory: the default settings on the
    first six blocks (every block is still read from the file), small calibration.

    The in-memory side compresses a copy of the session's model, transformers' own load of the same GGUF (equal
    to the streamed tensors: the test above), rather than parsing the file a second time."""
    windows = torch.randint(0, smollm2.tokenizer.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    first_blocks = r"model\.layers\.[0-5]\."
    dense = lowrank.compress(copy.deepcopy(smollm2.model), CompressConfig(include=first_blocks), windows,
                             output=tmp_path / "mem", tokenizer=smollm2.tokenizer, progress=False)
    streamed = lowrank.compress("smollm2-135m", CompressConfig(include=first_blocks, stream=True), windows,
                                output=tmp_path / "str", progress=False)
    assert streamed.factored == dense.factored and len(dense.factored) > 10
    assert {name.split(".")[2] for name in dense.factored} <= set("012345")
    a, b = _products(tmp_path / "mem"), _products(tmp_path / "str")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), name


def test_is_streamable_knows_which_gguf_files_it_reads(tmp_path):
    from lowrank.block_source import is_streamable
    from lowrank.gguf_source import open_gguf

    llama = write_tiny_gguf(tmp_path / "llama.gguf", tiny_gguf_model("llama"), "llama")
    gpt2 = write_foreign_gguf(tmp_path / "gpt2.gguf", "gpt2")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(64))
    assert is_streamable(str(llama)) and not is_streamable(str(gpt2)) and not is_streamable(str(tmp_path / "junk.gguf"))
    assert open_gguf(llama) is open_gguf(tmp_path / "." / "llama.gguf")  # the header is parsed once per process
