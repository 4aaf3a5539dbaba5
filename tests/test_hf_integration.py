"""lowrank's transformers quantizer, and the start-up hook that registers it without `import lowrank`.

Each check runs in a fresh interpreter, from a folder outside the checkout, in a temporary virtual
environment (tests/helpers.py: make_env) that sees torch and transformers but not the caller's
lowrank: `installed_env` gets lowrank with `pip install -e` from this checkout, start-up hook
(lowrank_autoload.py, lowrank-autoload.pth) included.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import FIXTURES, REPO, clean_env, hook_files, load_script, make_env, pip_into, run_in
from safetensors.torch import load_file

import lowrank
from lowrank.errors import LowrankError
from lowrank.folder_guard import FORMAT_VERSION


def test_installed_lowrank_loads_without_import(installed_env, compressed, tmp_path):
    folder, reference = compressed
    out = tmp_path / "logits.safetensors"
    done = run_in(installed_env, load_script(folder, out), tmp_path)
    assert done.stdout.strip() == "LOADED lowrank-imported: True", done.stdout + done.stderr
    assert (load_file(out)["logits"] - reference).abs().max() <= 1e-5
    assert "UNEXPECTED" not in done.stderr and "MISMATCH" not in done.stderr  # the guards are skipped quietly


def test_wheel_install_loads_without_import_and_uninstalls_cleanly(compressed, tmp_path):
    """Users install a wheel: the hook ships in it, works, and `pip uninstall` takes it away."""
    folder, reference = compressed
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    subprocess.run([*pip_wheel, "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, env=clean_env())
    [wheel] = (tmp_path / "dist").glob("lowrank-*.whl")
    python = make_env(tmp_path / "env")
    pip_into(python, "install", "--ignore-installed", "--no-deps", "--no-index", str(wheel))
    assert hook_files(python) == ["lowrank-autoload.pth", "lowrank_autoload.py"]
    out = tmp_path / "logits.safetensors"
    done = run_in(python, load_script(folder, out), tmp_path)
    assert done.stdout.strip() == "LOADED lowrank-imported: True", done.stdout + done.stderr
    assert (load_file(out)["logits"] - reference).abs().max() <= 1e-5
    pip_into(python, "uninstall", "--yes", "lowrank")
    assert hook_files(python) == []


def test_editable_uninstall_removes_the_hook(tmp_path):
    python = make_env(tmp_path / "env")
    pip_into(python, "install", "--ignore-installed", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(REPO))
    assert hook_files(python) == ["lowrank-autoload.pth"]  # the module itself stays in the checkout
    pip_into(python, "uninstall", "--yes", "lowrank")
    assert hook_files(python) == []


def test_import_lowrank_with_the_hook_installed_is_quiet(installed_env, tmp_path):
    """`import lowrank` imports transformers.quantizers itself; the hook must leave that registration alone."""
    code = "import lowrank, transformers.quantizers.auto as auto; print(auto.AUTO_QUANTIZER_MAPPING['lowrank'].__name__)"
    done = run_in(installed_env, code, tmp_path, PYTHONWARNINGS="error::RuntimeWarning")
    assert done.stdout.strip() == "LowrankQuantizer" and "RuntimeWarning" not in done.stderr, done.stderr


def test_autoload_switched_off_leaves_the_guard(installed_env, compressed, tmp_path):
    folder, _ = compressed
    done = run_in(installed_env, load_script(folder, tmp_path / "l.safetensors"), tmp_path, LOWRANK_AUTOLOAD="0")
    assert done.stdout.startswith("RAISED RuntimeError"), done.stdout + done.stderr


def test_autoload_startup_cost_under_5ms(installed_env, tmp_path):
    """`python -X importtime`: the hook's own import during start-up, best of 5 runs (the cores are shared)."""
    costs = []
    for _ in range(5):
        done = run_in(installed_env, "pass", tmp_path, PYTHONPROFILEIMPORTTIME="1")
        found = re.findall(r"import time:\s+\d+ \|\s+(\d+) \|\s+lowrank_autoload$", done.stderr, re.M)
        assert len(found) == 1, done.stderr[-2000:]
        imported = set(re.findall(r"\|\s+(\S+)$", done.stderr, re.M))
        assert not {"torch", "transformers", "lowrank"} & imported  # the hook imports none of them
        costs.append(int(found[0]))
    print(f"lowrank_autoload start-up cost (µs, editable install): {costs}")
    assert min(costs) < 5000


def test_newer_format_is_refused(compressed, tmp_path):
    folder = shutil.copytree(compressed[0], tmp_path / "future")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowrankError, match="format version 3 is not one this lowrank reads"):
        lowrank.load(folder)


def test_lm_eval_reads_the_folder_through_the_hook(compressed, tmp_path):
    """`lm_eval --model hf` on a compressed folder, offline, on the local task in tests/fixtures/lm_eval."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install -e '.[eval]'")
    folder, _ = compressed
    python = make_env(tmp_path / "env", extra_modules=(lm_eval,))
    pip_into(python, "install", "--ignore-installed", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(REPO))
    task = shutil.copytree(FIXTURES / "lm_eval", tmp_path / "task")
    code = ("import sys; from lm_eval.__main__ import cli_evaluate\n"
            f"sys.argv = ['lm_eval', '--model', 'hf', '--model_args', 'pretrained={folder},dtype=float32',"
            " '--tasks', 'lowrank_tiny_text', '--include_path', '.', '--device', 'cpu', '--batch_size', '1',"
            " '--output_path', 'results']\n"
            "cli_evaluate()\n")
    done = run_in(python, code, task, HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    assert done.returncode == 0, done.stderr[-3000:]
    [result_file] = (task / "results").rglob("results_*.json")
    measured = json.loads(result_file.read_text())["results"]["lowrank_tiny_text"]["byte_perplexity,none"]
    expected = byte_perplexity(folder, task / "lowrank_tiny_text.jsonl")
    print(f"lm-eval byte_perplexity {measured:.6f}, computed here {expected:.6f}")
    assert measured == pytest.approx(expected, rel=1e-4)


def byte_perplexity(folder: Path, jsonl: Path) -> float:
    """exp(−Σ log p(text) / bytes), each text scored after the BOS token (EOS when there is none), as
    lm-eval's rolling log-likelihood does for texts shorter than the context."""
    model, tokenizer = lowrank.load(folder), transformers.AutoTokenizer.from_pretrained(folder)
    total, n_bytes = 0.0, 0
    for line in jsonl.read_text().splitlines():
        text = json.loads(line)["text"]
        ids = tokenizer(text, add_special_tokens=False).input_ids
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        inputs = torch.tensor([[prefix, *ids[:-1]]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=inputs).logits.double(), dim=-1)[0]
        total += logprobs[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        n_bytes += len(text.encode("utf-8"))
    return float(torch.exp(torch.tensor(-total / n_bytes)))
