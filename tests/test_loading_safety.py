"""A compressed folder never loads as a silently broken model, and loads wherever lowrank is installed.

Each check that matters runs in a fresh interpreter, from a folder outside the checkout, in a
temporary virtual environment that sees torch and transformers (a .pth file naming their
site-packages folder) but not the caller's lowrank: `plain_env` never gets lowrank, and
`installed_env` gets it with `pip install -e` from this checkout (start-up hook included).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import make_tiny_model, make_tiny_tokenizer, random_windows
from safetensors.torch import load_file

import lowrank
from lowrank.checkpoint import save_compressed
from lowrank.compression import compress_model
from lowrank.errors import LowrankError
from lowrank.folder_guard import FORMAT_VERSION, GUARD_SHAPE
from lowrank.verify import verify_folder

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
PROBE = [[5, 17, 42, 8, 63, 21, 9, 30, 77, 12]]


def _site_dir(module) -> str:
    """The site-packages folder a module was imported from."""
    path = Path(module.__file__).resolve().parent
    return str(path.parent)


def make_env(root: Path, extra_modules: tuple = ()) -> Path:
    """A venv (no pip) whose sys.path holds torch's and transformers' folders but not this lowrank."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    dirs = dict.fromkeys(_site_dir(m) for m in (torch, transformers, *extra_modules))
    dirs = sorted(dirs, key=lambda d: sys.path.index(d) if d in sys.path else len(sys.path))  # this process's order
    Path(purelib, "_lowrank_test_deps.pth").write_text("\n".join(dirs) + "\n")
    return python


def run_in(python: Path, code: str, cwd: Path, **env_changes) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter, outside the checkout, with no PYTHONPATH."""
    env = clean_env()
    env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env_changes)
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def clean_env() -> dict[str, str]:
    """This process's environment without PYTHONPATH (which may point at a checkout) or the hook switch."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOWRANK_AUTOLOAD")}


def pip_into(python: Path, *args: str) -> None:
    """Run pip for the environment of `python`."""
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args, "--quiet"], check=True,
                   capture_output=True, env=clean_env())


def hook_files(python: Path) -> list[str]:
    purelib = run_in(python, "import sysconfig; print(sysconfig.get_path('purelib'))", python.parent).stdout.strip()
    return sorted(p.name for p in Path(purelib).iterdir() if p.name.startswith(("lowrank-autoload", "lowrank_autoload")))


@pytest.fixture(scope="module")
def plain_env(tmp_path_factory) -> Path:
    python = make_env(tmp_path_factory.mktemp("plain-env"))
    found = run_in(python, "import importlib.util; print(importlib.util.find_spec('lowrank'))", python.parent)
    assert found.stdout.strip() == "None", found.stderr  # this environment really lacks lowrank
    version = run_in(python, "import transformers; print(transformers.__version__)", python.parent)
    assert version.stdout.strip() == transformers.__version__, version.stderr  # and has this transformers
    return python


@pytest.fixture(scope="module")
def installed_env(tmp_path_factory) -> Path:
    """A venv with lowrank installed editable from this checkout, as CI and developers install it."""
    python = make_env(tmp_path_factory.mktemp("installed-env"))
    pip_into(python, "install", "--ignore-installed", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(REPO))
    return python


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A format-2 compressed tiny Llama (with tokenizer) and its logits on PROBE through lowrank.load."""
    model = make_tiny_model("llama")
    plan = compress_model(model, ratio=0.5, windows=random_windows(4, 16), progress=False)
    folder = save_compressed(model, make_tiny_tokenizer(), plan, tmp_path_factory.mktemp("c") / "compressed")
    with torch.no_grad():
        reference = lowrank.load(folder)(input_ids=torch.tensor(PROBE)).logits
    return folder, reference


LOAD_AND_REPORT = """
import sys
assert not {"lowrank", "torch", "transformers"} & set(sys.modules), sorted(sys.modules)
import transformers
try:
    model = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, **KWARGS)
except Exception as exc:
    print("RAISED", type(exc).__name__, str(exc)[:200])
else:
    import torch
    from safetensors.torch import save_file
    with torch.no_grad():
        save_file({"logits": model(input_ids=torch.tensor(PROBE)).logits.contiguous()}, OUT)
    print("LOADED lowrank-imported:", "lowrank" in sys.modules)
"""


def load_script(folder: Path, out: Path, **kwargs) -> str:
    return f"FOLDER, OUT, PROBE, KWARGS = {str(folder)!r}, {str(out)!r}, {PROBE!r}, {kwargs!r}\n" + LOAD_AND_REPORT


# ---- 1. without lowrank: a plain load raises ----------------------------------------------------------

def test_folder_holds_a_guard_per_factored_module(compressed):
    folder, _ = compressed
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_file(folder / "model.safetensors")
    assert config["format_version"] == FORMAT_VERSION == 2
    for name in config["ranks"]:
        assert tensors[f"{name}.weight"].shape == GUARD_SHAPE
    result = verify_folder(folder)
    assert result.ok and result.protected and result.format_version == 2


def test_plain_transformers_without_lowrank_raises(plain_env, compressed, tmp_path):
    folder, _ = compressed
    done = run_in(plain_env, load_script(folder, tmp_path / "logits.safetensors"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("RAISED RuntimeError"), done.stdout
    assert "mismatch" in done.stdout.lower() and "torch.Size([1])" in done.stdout + done.stderr  # the guard's shape
    assert not (tmp_path / "logits.safetensors").exists()
    assert "Unknown quantization type, got lowrank" in done.stderr  # transformers names the missing method


def test_ignore_mismatched_sizes_is_the_documented_gap(plain_env, compressed, tmp_path):
    """docs/format.md (Loading safety): with ignore_mismatched_sizes=True transformers re-initialises the guarded
    weights; no file content can stop it, but its load report still lists every one as MISMATCH."""
    folder, _ = compressed
    done = run_in(plain_env, load_script(folder, tmp_path / "l.safetensors", ignore_mismatched_sizes=True), tmp_path)
    assert done.stdout.startswith("LOADED"), done.stdout + done.stderr
    ranks = json.loads((folder / "config.json").read_text())["quantization_config"]["ranks"]
    assert re.search(r"size mismatch|shapes did not match", done.stderr, re.I)  # transformers 5 | 4.x words
    for name in ranks:  # transformers 5 folds the layer index into "layers.{0, 1}."; 4.x lists each weight
        module = name.rpartition(".layers.")[2].partition(".")[2]
        assert f"{module}.weight" in done.stderr, name


# ---- 2. lowrank installed, never imported: from_pretrained just works ----------------------------------

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


def test_version_1_folder_still_loads():
    """tests/fixtures/format-v1 was written by lowrank before guards existed (make_format_v1.py)."""
    folder = FIXTURES / "format-v1"
    expected = json.loads((FIXTURES / "format-v1-logits.json").read_text())
    probe = torch.tensor(expected["input_ids"])
    for model in (lowrank.load(folder), transformers.AutoModelForCausalLM.from_pretrained(folder)):
        with torch.no_grad():
            assert (model(input_ids=probe).logits - torch.tensor(expected["logits"])).abs().max() <= 1e-5
    result = verify_folder(folder)
    assert result.ok and result.format_version == 1 and not result.protected
    assert "NOT protected" in result.protection()


def test_resaving_a_version_1_folder_adds_guards(tmp_path):
    """lowrank.save_compressed and a plain save_pretrained of the loaded model both write format 2."""
    model = lowrank.load(FIXTURES / "format-v1")
    plan, _ = lowrank.checkpoint.read_plan(FIXTURES / "format-v1")
    result = verify_folder(save_compressed(model, None, plan, tmp_path / "v2"))
    assert result.ok and result.format_version == 2 and result.protected
    transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / "format-v1").save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["format_version"] == 2
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(tensors[f"{name}.weight"].shape == GUARD_SHAPE for name in plan.factored)


def test_newer_format_is_refused(compressed, tmp_path):
    folder = shutil.copytree(compressed[0], tmp_path / "future")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowrankError, match="format version 3 is not one this lowrank reads"):
        lowrank.load(folder)


def test_verify_flags_a_missing_guard(compressed, tmp_path):
    from safetensors.torch import save_file

    folder = shutil.copytree(compressed[0], tmp_path / "unguarded")
    tensors = load_file(folder / "model.safetensors")
    name = next(iter(json.loads((folder / "config.json").read_text())["quantization_config"]["ranks"]))
    del tensors[f"{name}.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    result = verify_folder(folder)
    assert not result.protected and result.unguarded == [name]
    assert any(f"{name} lacks its guard" in p for p in result.problems)


# ---- 3. other engines -------------------------------------------------------------------------------

def test_vllm_entry_point_is_declared_and_refuses(installed_env, tmp_path):
    code = ("import importlib.metadata as m, sys\n"
            "[ep] = [e for e in m.entry_points(group='vllm.general_plugins') if e.name == 'lowrank']\n"
            "print(ep.value, ep.dist.name)\n"
            "register = ep.load()\n"
            "print(register(), 'vllm' in sys.modules)\n")
    done = run_in(installed_env, code, tmp_path)
    assert done.stdout.split() == ["lowrank.vllm_plugin:register", "lowrank", "None", "False"], done.stderr
    from lowrank.vllm_plugin import refuse

    with pytest.raises(LowrankError, match=r"vLLM cannot serve it yet; load it with transformers instead "
                                           r"\(pip install lowrank.*\(format version 2\)"):
        refuse({"quant_method": "lowrank", "format_version": 2})


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
