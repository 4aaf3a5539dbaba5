"""Data-free profiles of checkpoint folders, read tensor by tensor, against the model in memory."""

from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_model
from lowrank.checkpoint import save_compressed
from lowrank.compression import compress_model
from lowrank.errors import ModelLoadError
from lowrank.folder_profile import has_safetensors, profile_folder
from lowrank.profiling import profile_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_folder_read_tensor_by_tensor_equals_model_in_memory(arch, tmp_path):
    model = make_tiny_model(arch)
    model.save_pretrained(tmp_path / "model")
    assert has_safetensors(tmp_path / "model")
    from_folder = profile_folder(tmp_path / "model")
    in_memory = profile_model(model)
    assert [m.name for m in from_folder.matrices] == [m.name for m in in_memory.matrices]
    for a, b in zip(from_folder.matrices, in_memory.matrices):
        assert a.shape == b.shape  # GPT-2's Conv1D is stored (in, out); shapes stay (out, in)
        assert torch.allclose(a.sigma, b.sigma, atol=1e-8)
    assert not from_folder.whitened
    if arch == "gpt2":
        assert from_folder.matrices[0].shape == (144, 48)  # c_attn: 3·48 outputs


def test_compressed_folder_spectra_come_from_the_factors(tmp_path):
    model = make_tiny_model("llama")
    original = profile_model(model)
    plan = compress_model(model, ratio=0.5, method="svd", progress=False)
    save_compressed(model, None, plan, tmp_path / "small")
    profile = profile_folder(tmp_path / "small")
    assert [m.name for m in profile.matrices] == list(plan.modules)
    for m, before in zip(profile.matrices, original.matrices):
        k = plan.modules[m.name].rank
        assert m.rank == k
        # plain SVD truncation keeps the top k singular values exactly and zeroes the rest
        assert torch.allclose(m.sigma[:k], before.sigma[:k], rtol=1e-4)
        assert float(m.sigma[k:].abs().max()) < 1e-5 * float(before.sigma[0])
    loaded = profile_model(model)  # the compressed model in memory, LowRankLinear merged
    assert [m.rank for m in loaded.matrices] == [m.rank for m in profile.matrices]
    assert all(torch.allclose(a.sigma, b.sigma, atol=1e-5) for a, b in zip(loaded.matrices, profile.matrices))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        profile_folder(tmp_path)
