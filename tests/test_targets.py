"""Target discovery across architectures, and the one place that knows Conv1D's orientation."""

import pytest
import torch
from helpers import TINY_ARCHITECTURES, make_tiny_model

from lowrank.errors import LowrankError
from lowrank.targets import find_block_list, find_targets, weight_matrix

# Linear layers per transformer block, and a name that must be among them.
EXPECTED = {
    "llama": (7, "model.layers.0.self_attn.q_proj"),
    "mistral": (7, "model.layers.1.mlp.down_proj"),
    "qwen2": (7, "model.layers.0.self_attn.k_proj"),
    "gpt2": (4, "transformer.h.0.attn.c_attn"),
    "opt": (6, "model.decoder.layers.0.fc1"),
    "bert": (6, "bert.encoder.layer.0.attention.self.query"),
}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_default_targets_are_the_block_linears(arch):
    model = make_tiny_model(arch)
    targets = find_targets(model)
    per_block, example = EXPECTED[arch]
    assert len(targets) == per_block * 2  # two blocks
    names = [t.name for t in targets]
    assert example in names
    assert not any("embed" in n or "lm_head" in n or "wte" in n or "pooler" in n for n in names)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_weight_matrix_is_out_by_in(arch):
    """x ↦ W x + b with W from weight_matrix reproduces every target, Conv1D included."""
    model = make_tiny_model(arch)
    for target in find_targets(model):
        module = model.get_submodule(target.name)
        weight = weight_matrix(module)
        assert weight.shape == target.shape
        x = torch.randn(3, target.in_features)
        expected = torch.nn.functional.linear(x, weight, module.bias)
        assert torch.allclose(module(x), expected, atol=1e-6)


def test_gpt2_conv1d_shapes():
    model = make_tiny_model("gpt2")
    c_attn = {t.name: t for t in find_targets(model)}["transformer.h.0.attn.c_attn"]
    assert c_attn.shape == (3 * 48, 48)  # fused q, k, v: out = 3 × hidden


def test_include_and_exclude():
    model = make_tiny_model("llama")
    only_mlp = find_targets(model, include=r"\.mlp\.")
    assert {t.name.rsplit(".", 1)[1] for t in only_mlp} == {"gate_proj", "up_proj", "down_proj"}
    no_k = find_targets(model, exclude=r"k_proj")
    assert len(no_k) == 12 and all("k_proj" not in t.name for t in no_k)
    with_head = find_targets(model, include=r"lm_head|q_proj")
    assert "lm_head" in [t.name for t in with_head]


def test_no_match_is_a_clear_error():
    model = make_tiny_model("llama")
    with pytest.raises(LowrankError, match="no linear layers to factor.*--include 'nothing_here'"):
        find_targets(model, include="nothing_here")


def test_block_list_found():
    prefix, blocks = find_block_list(make_tiny_model("opt"))
    assert prefix == "model.decoder.layers" and len(blocks) == 2


def test_name_filter_is_the_one_include_exclude_rule():
    from lowrank.targets import name_filter

    wanted = name_filter(r"mlp", r"down")
    assert wanted("model.layers.0.mlp.up_proj") and not wanted("model.layers.0.mlp.down_proj")
    assert not wanted("model.layers.0.self_attn.q_proj")
    assert name_filter()("anything") and not name_filter(None, ".")("anything")
