"""Every bad input we know of, run through the `lowrank` CLI by one test.

Each row of `ROWS` is a bad model, text, budget, plan, output or environment given to a real
command. For every row the test asserts the promise of issue 7: a non-zero exit code, one line
on stderr (`error: ...`, no traceback), nothing left behind in the output's folder (no output,
no `.*.tmp-*` temporary folder), and every input file byte-for-byte unchanged.

The inputs are tiny random models from tests/helpers.py saved with `save_pretrained`, with an
offline character-level tokenizer, so the whole table runs in seconds. Ctrl-C is a real SIGINT:
in-process rows send it to the test process itself at the named stage; `test_ctrl_c_from_outside`
sends it from a parent process to a `lowrank` subprocess.

Set LOWRANK_ROBUSTNESS_TABLE=FILE to write the observed messages as the markdown table of
docs/robustness.md.

Cross-cutting (tests/ mirrors lowrank/ otherwise): every command's bad inputs in one table.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (TINY_ARCHITECTURES, VOCAB, hub_cache, make_tiny_model, tiny_gguf_model, write_foreign_gguf,
                     write_tiny_gguf)
from lowrank.checkpoint import save_compressed
from lowrank.folder_format import PLAN_FILE
from lowrank.cli import main
from lowrank.compression import compress_model
from lowrank.profiling import profile_with_calibration

SAMPLES = ["--samples", "2", "--seq-len", "16"]
NAN_MODULE = "model.layers.1.mlp.up_proj"
INF_MODULE = "model.layers.0.self_attn.k_proj"


# ---- inputs ---------------------------------------------------------------------------------

def char_tokenizer():
    """An offline tokenizer: one token per printable ASCII character, <unk> for the rest (VOCAB ids)."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 127))}}
    assert len(vocab) == VOCAB
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace("\n", " ")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def save_tiny_model(folder: Path, tokenizer=True, seed: int = 0) -> Path:
    """A tiny Llama (vocab matching `char_tokenizer`) saved with save_pretrained, plus its tokenizer."""
    model = make_tiny_model("llama", seed=seed)
    model.save_pretrained(folder)
    if tokenizer:
        char_tokenizer().save_pretrained(folder)
    return folder


def copy_model(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return dst


def poison(folder: Path, module: str, value: float) -> None:
    """Write `value` (NaN or Inf) into one entry of `module`'s weight."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[f"{module}.weight"][0, 0] = value
    save_file(tensors, path, metadata={"format": "pt"})


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create a file if anything ever unpickled it without weights_only."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def edit_plan(folder: Path, change: Callable[[dict], None], config_too: bool = False) -> None:
    """Apply `change` to the plan JSON of a compressed folder (and to config.json's ranks)."""
    path = folder / PLAN_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))
    if config_too:
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"]["ranks"] = {
            name: m["rank"] for name, m in data["modules"].items() if m.get("rank") is not None
        }
        config_path.write_text(json.dumps(config, indent=2))


@dataclass
class Inputs:
    root: Path
    sentinel: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, key: str) -> str:
        return str(self.paths[key])


def build_inputs(root: Path) -> Inputs:
    inputs = Inputs(root=root, sentinel=root.parent / "pickle-ran-code")
    p = inputs.paths
    p["model"] = save_tiny_model(root / "model")
    p["no_tokenizer"] = copy_model(p["model"], root / "no_tokenizer", drop=("tokenizer*", "special_tokens*"))
    p["not_model"] = root / "not_model"
    p["not_model"].mkdir()
    (p["not_model"] / "notes.txt").write_text("my holiday photos\n")
    p["no_weights"] = copy_model(p["model"], root / "no_weights", drop=("*.safetensors",))
    p["bad_config"] = copy_model(p["model"], root / "bad_config")
    (p["bad_config"] / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    p["corrupt"] = copy_model(p["model"], root / "corrupt")
    (p["corrupt"] / "model.safetensors").write_bytes(os.urandom(4096))
    p["truncated"] = copy_model(p["model"], root / "truncated")
    weights = (p["model"] / "model.safetensors").read_bytes()
    (p["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    p["broken_gguf"] = root / "broken.gguf"
    p["broken_gguf"].write_bytes(b"GGUF" + os.urandom(2048))
    p["cut_gguf"] = root / "cut.gguf"
    whole = write_tiny_gguf(root / "tiny.gguf", tiny_gguf_model("llama"), "llama").read_bytes()
    p["cut_gguf"].write_bytes(whole[: len(whole) // 2])
    (root / "tiny.gguf").unlink()
    p["gpt2_gguf"] = write_foreign_gguf(root / "gpt2.gguf", "gpt2")
    p["pickle"] = copy_model(p["model"], root / "pickle", drop=("*.safetensors",))
    torch.save(load_file(p["model"] / "model.safetensors"), p["pickle"] / "pytorch_model.bin")
    p["evil_pickle"] = copy_model(p["model"], root / "evil_pickle", drop=("*.safetensors",))
    with open(p["evil_pickle"] / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _RunsCodeWhenUnpickled(inputs.sentinel)}, handle, protocol=2)
    p["unsupported"] = copy_model(p["model"], root / "unsupported")
    config = json.loads((p["unsupported"] / "config.json").read_text())
    config.update(model_type="no-such-architecture", architectures=["NoSuchArchitectureForCausalLM"])
    (p["unsupported"] / "config.json").write_text(json.dumps(config))
    p["nan"] = copy_model(p["model"], root / "nan")
    poison(p["nan"], NAN_MODULE, float("nan"))
    p["inf"] = copy_model(p["model"], root / "inf")
    poison(p["inf"], INF_MODULE, float("inf"))
    p["overflows_fp16"] = copy_model(p["model"], root / "overflows_fp16")
    tensors = load_file(p["overflows_fp16"] / "model.safetensors")
    save_file({k: v * 3000 if ".mlp." in k else v for k, v in tensors.items()},
              p["overflows_fp16"] / "model.safetensors", metadata={"format": "pt"})

    texts = root / "texts"
    texts.mkdir()
    p["empty_text"] = texts / "empty.txt"
    p["empty_text"].write_text("")
    p["blank_text"] = texts / "blank.txt"
    p["blank_text"].write_text(" \n\n\t \n")
    p["binary_text"] = texts / "weights.txt"
    p["binary_text"].write_bytes(bytes(range(256)) * 8)
    p["latin1_text"] = texts / "latin1.txt"
    p["latin1_text"].write_bytes("Où est la fenêtre? ".encode("latin-1") * 20)
    p["short_text"] = texts / "short.txt"
    p["short_text"].write_text("To be, or not to be.\n")
    p["no_sentence_text"] = texts / "no_sentence.txt"
    p["no_sentence_text"].write_text("Exit. Enter Ghost. Flourish. Alarum.\n" * 20)
    p["empty_folder"] = texts / "no_txt_here"
    p["empty_folder"].mkdir()
    p["good_text"] = texts / "good.txt"
    p["good_text"].write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 20)

    p["existing_out"] = root / "existing_out"
    p["existing_out"].mkdir()
    (p["existing_out"] / "precious.txt").write_text("results of last week's run\n")

    # A compressed folder, and damaged copies of it: files the tool reads back.
    model = make_tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(1, VOCAB, (4, 16), generator=generator)
    plan = compress_model(model, ratio=0.8, windows=windows, progress=False, source="tiny")
    p["compressed"] = save_compressed(model, char_tokenizer(), plan, root / "compressed")
    p["tampered_weights"] = copy_model(p["compressed"], root / "tampered_weights")
    tensors = load_file(p["tampered_weights"] / "model.safetensors")
    tensors[f"{NAN_MODULE}.down.weight"][0, 0] += 1.0
    save_file(tensors, p["tampered_weights"] / "model.safetensors", metadata={"format": "pt"})
    p["plan_rank_edited"] = copy_model(p["compressed"], root / "plan_rank_edited")
    edit_plan(p["plan_rank_edited"], lambda d: d["modules"][NAN_MODULE].update(rank=7), config_too=True)
    p["plan_missing_module"] = copy_model(p["compressed"], root / "plan_missing_module")
    edit_plan(p["plan_missing_module"],
              lambda d: d["modules"].update({"model.layers.9.mlp.up_proj": {"shape": [96, 48], "rank": 8}}),
              config_too=True)
    p["plan_rank_too_big"] = copy_model(p["compressed"], root / "plan_rank_too_big")
    edit_plan(p["plan_rank_too_big"], lambda d: d["modules"][NAN_MODULE].update(rank=49))
    p["plan_unknown_key"] = copy_model(p["compressed"], root / "plan_unknown_key")
    edit_plan(p["plan_unknown_key"], lambda d: d.update(ranks_per_layer={"0": 8}))
    p["plan_wrong_type"] = copy_model(p["compressed"], root / "plan_wrong_type")
    edit_plan(p["plan_wrong_type"], lambda d: d["modules"][NAN_MODULE].update(rank="12"))
    p["plan_not_json"] = copy_model(p["compressed"], root / "plan_not_json")
    (p["plan_not_json"] / PLAN_FILE).write_text("{ this is not json")
    p["weights_missing"] = copy_model(p["compressed"], root / "weights_missing", drop=("*.safetensors",))
    p["format_newer"] = copy_model(p["compressed"], root / "format_newer")
    config = json.loads((p["format_newer"] / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (p["format_newer"] / "config.json").write_text(json.dumps(config, indent=2))
    p["guard_missing"] = copy_model(p["compressed"], root / "guard_missing")
    _rewrite_weights(p["guard_missing"], lambda tensors: tensors.pop(f"{NAN_MODULE}.weight"))

    # Plan files for `compress --plan`, edited from the plan of the compressed folder.
    plans = root / "plans"
    plans.mkdir()
    valid = json.loads((p["compressed"] / PLAN_FILE).read_text())
    valid.pop("files")
    edits = {
        "missing_module": lambda d: d["modules"].update({"model.layers.9.mlp.up_proj": {"shape": [96, 48], "rank": 8}}),
        "rank_too_big": lambda d: d["modules"][NAN_MODULE].update(rank=49),
        "wrong_shape": lambda d: d["modules"][NAN_MODULE].update(shape=[48, 96]),
        "unknown_key": lambda d: d.update(layers={"0": 8}),
        "wrong_type": lambda d: d["modules"][NAN_MODULE].update(rank=12.5),
        "modules_not_object": lambda d: d.update(modules=[NAN_MODULE, 12]),
    }
    for name, edit in edits.items():
        data = copy.deepcopy(valid)
        edit(data)
        p[f"planfile_{name}"] = plans / f"{name}.json"
        p[f"planfile_{name}"].write_text(json.dumps(data, indent=2))
    # Profiles for `plan --profile` and `analyze --profile`.
    p["profile"] = profile_with_calibration(make_tiny_model("llama"), windows, batch_size=2, sensitivity_samples=2,
                                            progress=False, source=str(p["model"])).save(root / "profile.safetensors")
    p["profile_plain"] = profile_with_calibration(make_tiny_model("llama"), None, progress=False,
                                                  source=str(p["model"])).save(root / "plain.safetensors")
    p["gpt2_model"] = root / "gpt2_model"
    make_tiny_model("gpt2").save_pretrained(p["gpt2_model"])
    p["bert_model"] = root / "bert_model"
    make_tiny_model("bert").save_pretrained(p["bert_model"])
    char_tokenizer().save_pretrained(p["bert_model"])
    bert = make_tiny_model("bert")
    bert_plan = compress_model(bert, ratio=0.8, method="svd", progress=False, source=str(p["bert_model"]))
    p["bert_compressed"] = save_compressed(bert, char_tokenizer(), bert_plan, root / "bert_compressed")
    p["planfile_not_json"] = plans / "not_json.json"
    p["planfile_not_json"].write_text('{"modules": {"model.layers.0.mlp.up_proj": ')

    # Recipes for `lowrank run`: one good (its output, relative, lands in the work folder) and bad ones.
    recipes = root / "recipes"
    recipes.mkdir()
    good = {"model": str(p["model"]), "calibration": {"samples": 2, "seq_len": 16},
            "stages": [{"stage": "compress", "output": "out"}]}
    bad = {"good": good, "unknown_key": {**good, "ratio": 0.5}, "wrong_type": {**good, "compress": {"ratio": "most"}},
           "bad_stage": {**good, "stages": [{"stage": "quantize", "output": "out"}]}}
    for name, data in bad.items():
        p[f"recipe_{name}"] = recipes / f"{name}.yaml"
        p[f"recipe_{name}"].write_text(json.dumps(data))  # JSON is YAML
    p["recipe_existing_output"] = recipes / "existing_output.yaml"
    p["recipe_existing_output"].write_text(json.dumps({**good, "stages": [{"stage": "compress",
                                                                            "output": str(p["existing_out"])}]}))
    p["recipe_not_yaml"] = recipes / "not_yaml.yaml"
    p["recipe_not_yaml"].write_text("model: [unclosed\nstages: {")
    return inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    return build_inputs(tmp_path_factory.mktemp("robustness") / "inputs")


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (and the set of paths, so added files show too)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---- environment faults -------------------------------------------------------------------------

def interrupt_at(monkeypatch, owner, attr: str, on_call: int = 1) -> None:
    """Deliver a real SIGINT to this process on the `on_call`-th call of `owner.attr` (function or method)."""
    original = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == on_call:
            signal.raise_signal(signal.SIGINT)  # Python runs the SIGINT handler before this call returns
            raise AssertionError("SIGINT did not interrupt the stage")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)


def interrupt_loading(monkeypatch, work):
    import lowrank.loading

    interrupt_at(monkeypatch, lowrank.loading, "model_class_for")  # config read, weights not yet


def interrupt_calibrating(monkeypatch, work):
    from lowrank.calibration import StatsCollector

    interrupt_at(monkeypatch, StatsCollector, "end_batch")  # after the first calibration batch


def interrupt_factoring(monkeypatch, work):
    import importlib

    interrupt_at(monkeypatch, importlib.import_module("lowrank.compression"), "replace_module", on_call=3)


def interrupt_saving(monkeypatch, work):
    import lowrank.checkpoint

    interrupt_at(monkeypatch, lowrank.checkpoint, "sha256_file")  # weights written to the temporary folder


def offline_hub(monkeypatch, work):
    """huggingface_hub offline (HF_HUB_OFFLINE=1) with a cache beside the work folder holding one pickle-only repo."""
    from huggingface_hub import constants

    cache, repo = work.parent / "hf-cache", work.parent / "pickle-repo"
    if not cache.exists():
        repo.mkdir()
        (repo / "config.json").write_text('{"model_type": "llama"}')
        (repo / "pytorch_model.bin").write_bytes(b"never unpickled")
        hub_cache(cache, "lowrank-test/pickles", repo)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def hide_lm_eval(monkeypatch, work):
    """lm-evaluation-harness made unimportable the way Python marks a missing module."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)


def one_rank_of_two(monkeypatch, work, **changes):
    """The environment torchrun gives rank 0 of 2 (nothing listens at the address: no rank ever joins)."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29599", **changes}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def world_without_rank(monkeypatch, work):
    one_rank_of_two(monkeypatch, work, RANK=None)


def world_size_not_a_number(monkeypatch, work):
    one_rank_of_two(monkeypatch, work, WORLD_SIZE="two")


def timeout_not_a_number(monkeypatch, work):
    one_rank_of_two(monkeypatch, work, LOWRANK_DIST_TIMEOUT="soon")


def file_size_limit(monkeypatch, work):
    """RLIMIT_FSIZE: the kernel refuses to grow any file past 64 KiB (EFBIG), as a full disk would.

    Returns the function that lifts the limit again.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))

    def restore():
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)

    return restore


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs: the tiny compressed model does not fit on it."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the file-size-limit row covers the same fault")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    os.chdir(tmp_path)  # leave the mount before unmounting it (monkeypatch restores the cwd later)
    subprocess.run(["umount", str(mount)], check=True)


# ---- the table ---------------------------------------------------------------------------------

@dataclass
class Row:
    id: str
    group: str
    tried: str
    argv: Callable[[Inputs, Path], list[str]]
    expect: str  # a fragment of the one-line message (regex)
    setup: Callable | None = None
    on_small_disk: bool = False
    exit_code: int = 1


def compress(*args: str) -> Callable[[Inputs, Path], list[str]]:
    """argv of `lowrank compress` on a tiny model; {key} in args names an input, OUT the output."""

    def build(inputs: Inputs, work: Path) -> list[str]:
        resolved = [str(work / "out") if a == "OUT" else a.format(**{k: str(v) for k, v in inputs.paths.items()})
                    for a in args]
        return ["compress", *resolved, "-q"]

    return build


def command(*args: str) -> Callable[[Inputs, Path], list[str]]:
    def build(inputs: Inputs, work: Path) -> list[str]:
        return [str(work / "out") if a == "OUT" else a.format(**{k: str(v) for k, v in inputs.paths.items()})
                for a in args]

    return build


ROWS = [
    # Model input
    Row("nonexistent-path", "model", "a model path that does not exist",
        compress("{model}-missing", "-o", "OUT", *SAMPLES), r"does not exist"),
    Row("not-a-model-folder", "model", "a folder that is not a model (no config.json)",
        compress("{not_model}", "-o", "OUT", *SAMPLES), r"is not a model folder"),
    Row("config-without-weights", "model", "a model folder whose weight files are missing",
        compress("{no_weights}", "-o", "OUT", *SAMPLES), r"no weights"),
    Row("config-not-json", "model", "a config.json that is not valid JSON",
        compress("{bad_config}", "-o", "OUT", *SAMPLES), r"cannot load model"),
    Row("corrupt-safetensors", "model", "model.safetensors replaced by random bytes",
        compress("{corrupt}", "-o", "OUT", *SAMPLES), r"cannot load model"),
    Row("truncated-safetensors", "model", "model.safetensors cut to half its length",
        compress("{truncated}", "-o", "OUT", *SAMPLES), r"cannot load model"),
    Row("broken-gguf", "model", "a .gguf file that is not GGUF",
        compress("{broken_gguf}", "-o", "OUT", *SAMPLES), r"cannot load model"),
    Row("pickle-refused", "model", "a checkpoint with only pickle weights (pytorch_model.bin), no --allow-pickle",
        compress("{pickle}", "-o", "OUT", *SAMPLES), r"pickle weights .* --allow-pickle"),
    Row("pickle-that-runs-code", "model",
        "pickle weights that would run code when unpickled, even with --allow-pickle (weights_only)",
        compress("{evil_pickle}", "-o", "OUT", "--allow-pickle", *SAMPLES), r"weights_only mode refuses"),
    Row("unsupported-architecture", "model", "a config.json naming an architecture transformers does not know",
        compress("{unsupported}", "-o", "OUT", *SAMPLES), r"does not know the model type 'no-such-architecture'"),
    Row("no-targets", "model", "--include matching no linear layer",
        compress("{model}", "-o", "OUT", "--include", "no_such_layer", *SAMPLES), r"no linear layers to factor"),
    Row("all-targets-excluded", "model", "--exclude removing every linear layer",
        compress("{model}", "-o", "OUT", "--exclude", ".", *SAMPLES), r"no linear layers to factor"),
    Row("invalid-regex", "model", "--include that is not a valid regular expression",
        compress("{model}", "-o", "OUT", "--include", "(q_proj", *SAMPLES), r"not a valid regular expression"),
    Row("nan-in-weights", "model", "a NaN in one weight matrix",
        compress("{nan}", "-o", "OUT", *SAMPLES), re.escape(NAN_MODULE) + r" holds 1 NaN/Inf"),
    Row("inf-in-weights", "model", "an Inf in one weight matrix (method svd: no calibration)",
        compress("{inf}", "-o", "OUT", "--method", "svd"), re.escape(INF_MODULE) + r" holds 1 NaN/Inf"),
    Row("eval-nan-in-weights", "model", "`lowrank eval` on a model with a NaN in one weight matrix",
        command("eval", "{nan}", "--seq-len", "16", "--max-windows", "1", "-q"),
        re.escape(NAN_MODULE) + r" holds 1 NaN/Inf"),
    Row("eval-fp16-overflow", "model", "`lowrank eval --dtype float16` on a model whose activations overflow fp16",
        command("eval", "{overflows_fp16}", "--dtype", "float16", "--seq-len", "16", "--max-windows", "1", "-q"),
        r"NaN or Inf"),
    # Budgets and plans
    Row("ratio-zero", "budget", "--ratio 0", compress("{model}", "-o", "OUT", "--ratio", "0", *SAMPLES),
        r"ratio 0.0 is outside \(0, 1\]"),
    Row("ratio-above-one", "budget", "--ratio 1.5", compress("{model}", "-o", "OUT", "--ratio", "1.5", *SAMPLES),
        r"ratio 1.5 is outside \(0, 1\]"),
    Row("ratio-negative", "budget", "--ratio -0.2", compress("{model}", "-o", "OUT", "--ratio=-0.2", *SAMPLES),
        r"outside \(0, 1\]"),
    Row("ratio-nan", "budget", "--ratio nan", compress("{model}", "-o", "OUT", "--ratio", "nan", *SAMPLES),
        r"ratio nan is outside"),
    Row("ratio-not-a-number", "budget", "--ratio half", compress("{model}", "-o", "OUT", "--ratio", "half"),
        r"'half' is not a valid float", exit_code=2),
    Row("round-to-zero", "budget", "--round-to 0", compress("{model}", "-o", "OUT", "--round-to", "0", *SAMPLES),
        r"--round-to must be a positive integer"),
    Row("round-to-word", "budget", "`--round-to fast`: neither a number nor auto",
        compress("{model}", "-o", "OUT", "--round-to", "fast", *SAMPLES), r"--round-to must be a positive integer or auto"),
    Row("budget-infeasible", "budget", "--budget 1K, below the smallest plan that can exist",
        compress("{model}", "-o", "OUT", "--budget", "1K", *SAMPLES), r"the budget cannot be met"),
    Row("budget-zero", "budget", "--budget 0", compress("{model}", "-o", "OUT", "--budget", "0", *SAMPLES),
        r"budget '0' must be positive"),
    Row("budget-zero-count", "budget", "--budget 0K", compress("{model}", "-o", "OUT", "--budget", "0K", *SAMPLES),
        r"budget '0K' keeps no parameters"),
    Row("budget-not-a-count", "budget", "--budget banana", compress("{model}", "-o", "OUT", "--budget", "banana", *SAMPLES),
        r"'banana' is not a parameter count"),
    Row("plan-names-missing-module", "plan", "--plan naming a module the model lacks",
        compress("{model}", "-o", "OUT", "--plan", "{planfile_missing_module}", *SAMPLES),
        r"names module 'model.layers.9.mlp.up_proj', which is not a linear layer of this model"),
    Row("plan-rank-above-min-dim", "plan", "--plan giving a rank above min(out, in)",
        compress("{model}", "-o", "OUT", "--plan", "{planfile_rank_too_big}", *SAMPLES),
        r"rank 49 exceeds min\(out, in\) = 48"),
    Row("plan-wrong-shape", "plan", "--plan giving a module the wrong shape (a plan for another model)",
        compress("{model}", "-o", "OUT", "--plan", "{planfile_wrong_shape}", *SAMPLES),
        r"shape \[48, 96\] but the model has \[96, 48\]"),
    Row("plan-unknown-key", "plan", "--plan with an unknown key",
        compress("{model}", "-o", "OUT", "--plan", "{planfile_unknown_key}", *SAMPLES), r"unknown key 'layers'"),
    Row("plan-wrong-type", "plan", "--plan with a rank of the wrong type (12.5)",
        compress("{model}", "-o", "OUT", "--plan", "{planfile_wrong_type}", *SAMPLES),
        r"\.rank must be a positive integer or null \(dense\), got 12.5"),
    Row("plan-modules-not-object", "plan", "--plan whose modules are a list, not an object",
        compress("{model}", "-o", "OUT", "--plan", "{planfile_modules_not_object}", *SAMPLES),
        r"'modules' must be a non-empty object"),
    Row("plan-not-json", "plan", "--plan that is not valid JSON",
        compress("{model}", "-o", "OUT", "--plan", "{planfile_not_json}", *SAMPLES), r"is not valid JSON"),
    Row("plan-missing", "plan", "--plan naming a file that does not exist",
        compress("{model}", "-o", "OUT", "--plan", "{planfile_not_json}.missing", *SAMPLES), r"does not exist"),
    # Calibration text
    Row("calib-missing", "text", "--calib naming a file that does not exist",
        compress("{model}", "-o", "OUT", "--calib", "{good_text}.missing", *SAMPLES), r"is not a file, a folder"),
    Row("calib-empty", "text", "an empty calibration file",
        compress("{model}", "-o", "OUT", "--calib", "{empty_text}", *SAMPLES), r"text given is empty"),
    Row("calib-whitespace", "text", "a calibration file of only blank lines",
        compress("{model}", "-o", "OUT", "--calib", "{blank_text}", *SAMPLES), r"text given is empty"),
    Row("calib-binary", "text", "a binary file passed as calibration text",
        compress("{model}", "-o", "OUT", "--calib", "{binary_text}", *SAMPLES), r"looks like a binary file"),
    Row("calib-not-utf8", "text", "calibration text in Latin-1, not UTF-8",
        compress("{model}", "-o", "OUT", "--calib", "{latin1_text}", *SAMPLES), r"is not UTF-8 text"),
    Row("calib-too-short", "text", "calibration text shorter than one window (21 tokens, --seq-len 32)",
        compress("{model}", "-o", "OUT", "--calib", "{short_text}", "--samples", "2", "--seq-len", "32"),
        r"has 21 tokens, fewer than one window of 32; give more text or lower --seq-len"),
    Row("calib-folder-without-txt", "text", "a calibration folder holding no .txt files",
        compress("{model}", "-o", "OUT", "--calib", "{empty_folder}", *SAMPLES), r"holds no .txt files"),
    Row("samples-zero", "text", "--samples 0",
        compress("{model}", "-o", "OUT", "--samples", "0", "--seq-len", "16"), r"--samples must be at least 1"),
    Row("seq-len-one", "text", "--seq-len 1",
        compress("{model}", "-o", "OUT", "--samples", "2", "--seq-len", "1"), r"--seq-len must be at least 2"),
    # Environment
    Row("missing-tokenizer", "environment", "a model folder without tokenizer files",
        compress("{no_tokenizer}", "-o", "OUT", *SAMPLES), r"holds no tokenizer files .* pass --tokenizer"),
    Row("tokenizer-path-missing", "environment", "--tokenizer naming a folder that does not exist",
        compress("{no_tokenizer}", "-o", "OUT", "--tokenizer", "{model}-nope/tok", *SAMPLES),
        r"tokenizer path .*model-nope/tok does not exist"),
    Row("output-exists", "environment", "-o naming a folder that already exists",
        compress("{model}", "-o", "{existing_out}", *SAMPLES), r"already exists; choose another -o path or pass --overwrite"),
    Row("output-is-input", "environment", "-o naming the input model itself, with --overwrite",
        compress("{model}", "-o", "{model}", "--overwrite", *SAMPLES), r"would overwrite or write into the input"),
    Row("output-inside-input", "environment", "-o naming a folder inside the input model",
        compress("{model}", "-o", "{model}/compressed", *SAMPLES), r"would overwrite or write into the input"),
    Row("output-parent-missing", "environment", "-o inside a folder that does not exist",
        compress("{model}", "-o", "{model}-nope/sub/out", *SAMPLES), r"does not exist; create it first"),
    Row("disk-full", "environment", "output on a full disk (a 160 KiB tmpfs)",
        compress("{model}", "-o", "OUT", *SAMPLES), r"failed \(No space left on device\); free disk space",
        on_small_disk=True),
    Row("file-size-limit", "environment", "output files capped at 64 KiB by RLIMIT_FSIZE (a disk-full fault without root)",
        compress("{model}", "-o", "OUT", *SAMPLES), r"failed \(File too large\); free disk space",
        setup=file_size_limit),
    Row("ctrl-c-loading", "environment", "Ctrl-C (SIGINT) while loading the model",
        compress("{model}", "-o", "OUT", *SAMPLES), r"interrupted; nothing was written",
        setup=interrupt_loading, exit_code=130),
    Row("ctrl-c-calibrating", "environment", "Ctrl-C (SIGINT) while calibrating",
        compress("{model}", "-o", "OUT", *SAMPLES), r"interrupted; nothing was written",
        setup=interrupt_calibrating, exit_code=130),
    Row("ctrl-c-factoring", "environment", "Ctrl-C (SIGINT) while factoring",
        compress("{model}", "-o", "OUT", *SAMPLES), r"interrupted; nothing was written",
        setup=interrupt_factoring, exit_code=130),
    Row("ctrl-c-sequential", "environment", "Ctrl-C (SIGINT) while compressing block by block (--sequential)",
        compress("{model}", "-o", "OUT", "--sequential", *SAMPLES), r"interrupted; nothing was written",
        setup=interrupt_factoring, exit_code=130),
    Row("ctrl-c-saving", "environment", "Ctrl-C (SIGINT) while saving (weights already in the temporary folder)",
        compress("{model}", "-o", "OUT", *SAMPLES), r"interrupted; nothing was written",
        setup=interrupt_saving, exit_code=130),
    Row("ctrl-c-saving-overwrite", "environment", "Ctrl-C while saving over an existing output with --overwrite",
        compress("{model}", "-o", "{existing_out}", "--overwrite", *SAMPLES), r"interrupted; nothing was written",
        setup=interrupt_saving, exit_code=130),
    # Files the tool reads back
    Row("verify-weights-modified", "read-back", "`lowrank verify` on a folder whose weight file was modified",
        command("verify", "{tampered_weights}"), r"failed verification: weight file model.safetensors does not match its recorded sha256"),
    Row("verify-plan-rank-edited", "read-back", "`lowrank verify` on a folder whose plan rank no longer matches the weights",
        command("verify", "{plan_rank_edited}"), r"needs \[7, 48\] \(and 1 more, listed above\)"),
    Row("verify-weights-missing", "read-back", "`lowrank verify` on a folder whose weight file is gone",
        command("verify", "{weights_missing}"), r"failed verification: weight file model.safetensors is missing"),
    Row("load-plan-rank-edited", "read-back", "loading (`lowrank eval`) a folder whose plan ranks do not match the weights",
        command("eval", "{plan_rank_edited}", "--seq-len", "16", "--max-windows", "1", "-q"),
        r"the weights do not match lowrank_plan.json: .*the plan \(rank 7\) needs"),
    Row("folder-plan-rank-above-min-dim", "read-back", "a compressed folder whose plan gives a rank above min(out, in)",
        command("eval", "{plan_rank_too_big}", "--seq-len", "16", "--max-windows", "1", "-q"),
        r"rank 49 exceeds min\(out, in\) = 48"),
    Row("folder-plan-names-missing-module", "read-back",
        "a compressed folder whose plan (and config) name a module the model lacks",
        command("eval", "{plan_missing_module}", "--seq-len", "16", "--max-windows", "1", "-q"),
        r"model.layers.9.mlp.up_proj is factored in the plan but the weights lack"),
    Row("folder-plan-unknown-key", "read-back", "a compressed folder whose plan has an unknown key",
        command("eval", "{plan_unknown_key}", "--seq-len", "16", "--max-windows", "1", "-q"),
        r"unknown key 'ranks_per_layer'"),
    Row("folder-plan-wrong-type", "read-back", "a compressed folder whose plan has a rank of the wrong type (\"12\")",
        command("eval", "{plan_wrong_type}", "--seq-len", "16", "--max-windows", "1", "-q"),
        r"\.rank must be a positive integer or null"),
    Row("folder-plan-not-json", "read-back", "a compressed folder whose plan file is not JSON",
        command("verify", "{plan_not_json}"), r"failed verification: cannot read .*lowrank_plan.json"),
    Row("verify-format-newer", "read-back", "`lowrank verify` on a folder of a newer format version (3)",
        command("verify", "{format_newer}"), r"format_version is 3; this lowrank reads 1, 2: upgrade lowrank"),
    Row("load-format-newer", "read-back", "loading (`lowrank eval`) a folder of a newer format version (3)",
        command("eval", "{format_newer}", "--seq-len", "16", "--max-windows", "1", "-q"),
        r"format version 3 is not one this lowrank reads \(1, 2\); upgrade lowrank"),
    Row("verify-guard-missing", "read-back", "`lowrank verify` on a format-2 folder missing one module's guard tensor",
        command("verify", "{guard_missing}"),
        r"lacks its guard .*transformers without lowrank would load random weights for it"),
    Row("verify-not-compressed", "read-back", "`lowrank verify` on a dense model folder",
        command("verify", "{model}"), r"no lowrank_plan.json"),
    Row("verify-folder-missing", "read-back", "`lowrank verify` on a folder that does not exist",
        command("verify", "{compressed}-missing"), r"is not a folder; pass a compressed lowrank folder"),
    # The other commands' obvious bad inputs
    Row("plan-model-missing", "commands", "`lowrank plan` on a model path that does not exist",
        command("plan", "{model}-missing", "-o", "OUT", *SAMPLES, "-q"), r"does not exist"),
    Row("plan-output-exists", "commands", "`lowrank plan -o` naming a file that exists",
        command("plan", "{model}", "-o", "{existing_out}/precious.txt", *SAMPLES, "-q"), r"already exists"),
    Row("analyze-model-missing", "commands", "`lowrank analyze` on a model path that does not exist",
        command("analyze", "{model}-missing", "-o", "OUT", *SAMPLES, "-q"), r"does not exist"),
    Row("analyze-output-exists", "commands", "`lowrank analyze -o` naming a folder that exists",
        command("analyze", "{model}", "-o", "{existing_out}", *SAMPLES, "-q"), r"already exists"),
    Row("report-folder-missing", "commands", "`lowrank report` on a folder that does not exist",
        command("report", "{compressed}-missing", "-o", "OUT", "-q"), r"not a compressed lowrank folder"),
    Row("report-dense-folder", "commands", "`lowrank report` on a dense (not compressed) model folder",
        command("report", "{model}", "-o", "OUT", "-q"), r"not a compressed lowrank folder"),
    Row("report-output-exists", "commands", "`lowrank report -o` naming a folder that exists",
        command("report", "{compressed}", "-o", "{existing_out}", "-q"), r"already exists"),
    Row("recover-folder-missing", "commands", "`lowrank recover` on a folder that does not exist",
        command("recover", "{compressed}-missing", "--data", "{good_text}", "-o", "OUT", "--steps", "1", "-q"),
        r"does not exist", exit_code=2),
    Row("recover-dense-folder", "commands", "`lowrank recover` on a dense (not compressed) model folder",
        command("recover", "{model}", "--data", "{good_text}", "-o", "OUT", "--steps", "1", "-q"),
        r"not a compressed lowrank folder"),
    Row("plan-output-into-input", "commands", "`lowrank plan -o MODEL/config.json --overwrite`: a plan over the input's file",
        command("plan", "{model}", "-o", "{model}/config.json", "--overwrite", *SAMPLES, "-q"),
        r"would overwrite or write into the input"),
    Row("eval-encoder-no-reference", "encoders", "`lowrank eval` on a dense encoder (BERT) without --against",
        command("eval", "{bert_model}", "--text", "{good_text}", "-q"), r"pass --against with the dense model"),
    Row("eval-encoder-against-plan-of-dense", "encoders",
        "`lowrank eval --against` alone on a dense encoder, which has no plan to name its source",
        command("eval", "{bert_model}", "--against", "--text", "{good_text}", "-q"),
        r"pass --against with the dense model"),
    Row("eval-encoder-one-sentence", "encoders", "`lowrank eval --max-sentences 1`: no self-retrieval among one",
        command("eval", "{bert_model}", "--against", "{bert_model}", "--max-sentences", "1", "-q"),
        r"--max-sentences must be at least 2"),
    Row("eval-encoder-text-without-sentences", "encoders", "`lowrank eval` on an encoder with text of one sentence",
        command("eval", "{bert_model}", "--against", "{bert_model}", "--text", "{short_text}", "-q"),
        r"holds 1 sentence\(s\) .* give more text"),
    Row("eval-encoder-reference-missing", "encoders", "`lowrank eval --against` on an encoder, naming a path that does not exist",
        command("eval", "{bert_model}", "--against", "{bert_model}-missing", "--text", "{good_text}", "-q"),
        r"does not exist"),
    Row("eval-encoder-reference-alias-missing", "encoders",
        "`lowrank eval --reference` (the alias of --against) naming a path that does not exist",
        command("eval", "{bert_model}", "--reference", "{bert_model}-missing", "--text", "{good_text}", "-q"),
        r"does not exist"),
    Row("compress-encoder-text-without-sentences", "encoders",
        "`lowrank compress` of an encoder on text with no sentence of four words (it calibrates on sentences)",
        command("compress", "{bert_model}", "-o", "OUT", "--calib", "{no_sentence_text}", "--seq-len", "32", "-q"),
        r"holds no sentence of at least 4 words"),
    Row("recover-hidden-layers-unknown", "encoders", "`lowrank recover --hidden-layers middle`",
        command("recover", "{compressed}", "--data", "{good_text}", "-o", "OUT", "--loss", "cosine",
                "--hidden-layers", "middle", "-q"), r"Invalid value for '--hidden-layers'", exit_code=2),
    Row("recover-encoder-loss-with-eval-text", "encoders", "`lowrank recover --loss cosine --eval TEXT`: no perplexity",
        command("recover", "{compressed}", "--data", "{good_text}", "-o", "OUT", "--loss", "cosine",
                "--eval", "{good_text}", "-q"), r"picks the best weights by perplexity, which --loss cosine"),
    Row("recover-encoder-with-a-language-model-loss", "encoders",
        "`lowrank recover` of a compressed encoder with the default --loss distill (an encoder has no logits)",
        command("recover", "{bert_compressed}", "--data", "{good_text}", "-o", "OUT", "--steps", "1", "-q"),
        r"is an encoder, which has no next-token logits for --loss distill; pass --loss embedding"),
    Row("recover-relative-lr-with-a-value", "encoders", "`lowrank recover --relative-lr=yes`: a flag takes no value",
        command("recover", "{compressed}", "--data", "{good_text}", "-o", "OUT", "--relative-lr=yes", "-q"),
        r"Option '--relative-lr' does not take a value", exit_code=2),
    Row("recover-output-exists", "commands", "`lowrank recover -o` naming a folder that exists",
        command("recover", "{compressed}", "--data", "{good_text}", "-o", "{existing_out}", "--steps", "1", "-q"),
        r"already exists"),
    # Saved profiles (`lowrank profile`, `plan --profile`, `analyze --profile`)
    Row("profile-model-missing", "profile", "`lowrank profile` on a model path that does not exist",
        command("profile", "{model}-missing", "-o", "OUT", *SAMPLES, "-q"), r"does not exist"),
    Row("profile-output-exists", "profile", "`lowrank profile -o` naming a file that exists",
        command("profile", "{model}", "-o", "{existing_out}/precious.txt", *SAMPLES, "-q"), r"already exists"),
    Row("profile-output-is-folder", "profile", "`lowrank profile -o` naming a folder",
        command("profile", "{model}", "-o", "{existing_out}", "--overwrite", *SAMPLES, "-q"),
        r"is a folder; -o names the profile file"),
    Row("profile-data-free-with-calib", "profile", "`lowrank profile --data-free --calib FILE`: a contradiction",
        command("profile", "{model}", "--data-free", "--calib", "{good_text}", "-o", "OUT", "-q"),
        r"--data-free and --calib contradict each other"),
    Row("plan-profile-missing", "profile", "`lowrank plan --profile` naming a file that does not exist",
        command("plan", "--profile", "{profile}.missing", "-o", "OUT", "-q"),
        r"profile file .* does not exist; write one with `lowrank profile"),
    Row("plan-profile-not-safetensors", "profile", "`lowrank plan --profile` naming a text file",
        command("plan", "--profile", "{good_text}", "-o", "OUT", "-q"), r"is not a lowrank profile"),
    Row("plan-profile-weights-file", "profile", "`lowrank plan --profile` naming a model's weights (safetensors, no profile)",
        command("plan", "--profile", "{model}/model.safetensors", "-o", "OUT", "-q"),
        r"is a safetensors file but not a lowrank profile"),
    Row("plan-profile-other-model", "profile", "`lowrank plan MODEL --profile FILE` with a profile of another model",
        command("plan", "{gpt2_model}", "--profile", "{profile}", "-o", "OUT", "-q"),
        r"was measured on another model .*; profile this model with `lowrank profile`"),
    Row("plan-profile-without-prices", "profile", "`--strategy sensitivity` from a data-free profile (no loss prices)",
        command("plan", "--profile", "{profile_plain}", "--strategy", "sensitivity", "-o", "OUT", "-q"),
        r"needs loss prices, which this profile lacks"),
    Row("plan-profile-with-calib", "profile", "`lowrank plan --profile FILE --calib TEXT`: the profile is already calibrated",
        command("plan", "--profile", "{profile}", "--calib", "{good_text}", "-o", "OUT", "-q"), r"drop --calib"),
    Row("plan-profile-infeasible", "profile", "`lowrank plan --profile` with a budget below the smallest plan",
        command("plan", "--profile", "{profile}", "--budget", "1K", "-o", "OUT", "-q"), r"the budget cannot be met"),
    Row("analyze-profile-missing", "profile", "`lowrank analyze --profile` naming a file that does not exist",
        command("analyze", "--profile", "{profile}.missing", "-o", "OUT", "-q"), r"does not exist"),
    Row("analyze-profile-and-model", "profile", "`lowrank analyze MODEL --profile FILE`: two sources at once",
        command("analyze", "{model}", "--profile", "{profile}", "-o", "OUT", "-q"), r"drop MODEL and --calib"),
    # Recipes (`lowrank run`)
    Row("run-recipe-missing", "recipe", "`lowrank run` on a recipe file that does not exist",
        command("run", "{recipe_good}.missing", "-q"), r"recipe .*good.yaml.missing does not exist"),
    Row("run-recipe-not-yaml", "recipe", "a recipe that is not valid YAML",
        command("run", "{recipe_not_yaml}", "-q"), r"is not valid YAML at line 2, column 7"),
    Row("run-unknown-key", "recipe", "a recipe with an unknown top-level key (ratio: outside compress:)",
        command("run", "{recipe_unknown_key}", "-q"), r"unknown key ratio in the recipe; valid keys: version"),
    Row("run-wrong-type", "recipe", "a recipe with a value of the wrong type (compress.ratio: most)",
        command("run", "{recipe_wrong_type}", "-q"), r"compress.ratio must be a number, got 'most'"),
    Row("run-unknown-stage", "recipe", "a recipe with a stage lowrank does not have (quantize)",
        command("run", "{recipe_bad_stage}", "-q"), r"stages\[0\].stage must be one of compress, recover, eval, report"),
    Row("run-set-not-assignment", "recipe", "`--set compress.ratio` without =VALUE",
        command("run", "{recipe_good}", "--set", "compress.ratio", "-q"), r"is not KEY=VALUE"),
    Row("run-set-unknown-key", "recipe", "`--set compress.ratoi=0.5`: a misspelt config field",
        command("run", "{recipe_good}", "--set", "compress.ratoi=0.5", "-q"),
        r"unknown key compress.ratoi; valid keys: version, method, ratio"),
    Row("run-set-out-of-range", "recipe", "`--set compress.ratio=1.5`: a value outside its range",
        command("run", "{recipe_good}", "--set", "compress.ratio=1.5", "-q"), r"ratio 1.5 is outside \(0, 1\]"),
    Row("run-set-wrong-type", "recipe", "`--set calibration.samples=many`: a value of the wrong type",
        command("run", "{recipe_good}", "--set", "calibration.samples=many", "-q"),
        r"calibration.samples must be an integer, got 'many'"),
    Row("run-resume-unverified-output", "recipe", "`lowrank run --resume` where a stage's output exists but is not a "
        "compressed folder that passes `lowrank verify`",
        command("run", "{recipe_existing_output}", "--resume", "-q"),
        r"stage 1 \(compress\): output .*existing_out already exists but is not a whole, verified output; remove it"),
    Row("run-model-missing", "recipe", "`--set model=` naming a model that does not exist",
        command("run", "{recipe_good}", "--set", "model={model}-missing", "-q"), r"does not exist"),
    Row("run-dry-run-model-missing", "recipe", "`lowrank run --dry-run` on a recipe whose model does not exist",
        command("run", "{recipe_good}", "--dry-run", "--set", "model={model}-missing", "-q"), r"does not exist"),
    Row("run-output-is-input", "recipe", "`--set stages.0.output=MODEL --overwrite`: a stage writing over the input",
        command("run", "{recipe_good}", "--set", "stages.0.output={model}", "--overwrite", "-q"),
        r"would overwrite or write into the input"),
    # Streaming (`lowrank compress --stream`)
    Row("stream-pickle-folder", "stream", "`--stream` on a checkpoint with only pickle weights",
        compress("{pickle}", "-o", "OUT", "--stream", "--allow-pickle", *SAMPLES),
        r"--stream reads a model folder with safetensors weights, a .gguf file or a hub id"),
    Row("stream-corrupt-safetensors", "stream", "`--stream` on a folder whose model.safetensors is random bytes",
        compress("{corrupt}", "-o", "OUT", "--stream", *SAMPLES), r"is not a readable safetensors file"),
    Row("stream-gguf", "stream", "`--stream` on a .gguf file that is not GGUF",
        compress("{broken_gguf}", "-o", "OUT", "--stream", *SAMPLES), r"broken.gguf is not a readable GGUF file"),
    Row("stream-gguf-truncated", "stream", "`--stream` on a GGUF file cut to half its length",
        compress("{cut_gguf}", "-o", "OUT", "--stream", *SAMPLES), r"cut.gguf is not a readable GGUF file"),
    Row("stream-gguf-architecture", "stream", "`--stream` on a GGUF of an architecture the reader does not map (gpt2)",
        compress("{gpt2_gguf}", "-o", "OUT", "--stream", *SAMPLES),
        r"streaming reads GGUF architectures llama, qwen2, qwen3, not 'gpt2'; drop --stream"),
    Row("stream-hub-not-cached", "stream", "`--stream` on a hub id that is not cached, offline",
        compress("lowrank-test/not-cached", "-o", "OUT", "--stream", *SAMPLES),
        r"hub model lowrank-test/not-cached is not in the local cache and the Hub cannot be reached",
        setup=offline_hub),
    Row("stream-hub-pickle-only", "stream", "`--stream` on a hub repository whose weights are pickles only",
        compress("lowrank-test/pickles", "-o", "OUT", "--stream", *SAMPLES),
        r"hub model lowrank-test/pickles has only pickle weights", setup=offline_hub),
    Row("stream-hub-id-malformed", "stream", "`--stream` on a name that is neither a path nor a hub id (a/b/c)",
        compress("owner/name/extra", "-o", "OUT", "--stream", *SAMPLES),
        r"neither a local path nor a valid hub id", setup=offline_hub),
    Row("analyze-stream-without-calib", "stream", "`lowrank analyze --stream` without --calib",
        command("analyze", "{model}", "--stream", "-o", "OUT", "-q"), r"--stream streams the calibration pass"),
    Row("analyze-offload-without-stream", "stream", "`lowrank analyze --calib --offload-dir` without --stream",
        command("analyze", "{model}", "--calib", "{good_text}", "--offload-dir", "spill", "-o", "OUT", *SAMPLES, "-q"),
        r"--offload-dir applies to a streamed analysis; add --stream"),
    Row("analyze-stream-memory-too-small", "stream", "`lowrank analyze --calib --stream --max-memory 1MB`",
        command("analyze", "{model}", "--calib", "{good_text}", "--stream", "--max-memory", "1MB", "-o", "OUT",
                *SAMPLES, "-q"), r"streaming needs about .* pass --offload-dir DIR"),
    Row("analyze-stream-gguf-architecture", "stream", "`lowrank analyze --calib --stream` on a gpt2 GGUF",
        command("analyze", "{gpt2_gguf}", "--calib", "{good_text}", "--stream", "-o", "OUT", *SAMPLES, "-q"),
        r"streaming reads GGUF architectures llama, qwen2, qwen3, not 'gpt2'"),
    Row("stream-one-shot", "stream", "`--stream --one-shot`", compress("{model}", "-o", "OUT", "--stream", "--one-shot",
                                                                       *SAMPLES), r"drop --one-shot"),
    Row("stream-method-svd", "stream", "`--stream --method svd` (no calibration to stream)",
        compress("{model}", "-o", "OUT", "--stream", "--method", "svd"), r"which method svd does not use"),
    Row("stream-memory-too-small", "stream", "`--stream --max-memory 1MB`: the estimate does not fit",
        compress("{model}", "-o", "OUT", "--stream", "--max-memory", "1MB", *SAMPLES),
        r"streaming needs about .* pass --offload-dir DIR"),
    Row("stream-memory-not-a-size", "stream", "`--max-memory lots`",
        compress("{model}", "-o", "OUT", "--stream", "--max-memory", "lots", *SAMPLES), r"--max-memory 'lots' is not a size"),
    Row("stream-shard-size-zero", "stream", "`--max-shard-size 0`",
        compress("{model}", "-o", "OUT", "--max-shard-size", "0", *SAMPLES), r"--max-shard-size '0' is not a size"),
    Row("stream-offload-with-no-stream", "stream", "`--offload-dir` with `--no-stream`",
        compress("{model}", "-o", "OUT", "--no-stream", "--offload-dir", "spill", *SAMPLES),
        r"--offload-dir applies to streaming compression; drop --no-stream"),
    Row("stream-resume-nothing", "stream", "`--stream --resume` with no interrupted run to continue",
        compress("{model}", "-o", "OUT", "--stream", "--resume", *SAMPLES), r"nothing to resume"),
    Row("stream-resume-with-no-stream", "stream", "`--resume` with `--no-stream`",
        compress("{model}", "-o", "OUT", "--no-stream", "--resume", *SAMPLES),
        r"--resume continues a streamed run; drop --no-stream"),
    Row("stream-options-unreadable-source", "stream", "`--offload-dir` (asks for streaming) on a source streaming cannot read",
        compress("{compressed}", "-o", "OUT", "--offload-dir", "spill", *SAMPLES),
        r"--stream reads a model folder .* drop --stream and its options"),
    # Block refinement (`lowrank compress --refine-steps`)
    Row("refine-steps-negative", "refine", "`--refine-steps -1`",
        compress("{model}", "-o", "OUT", "--refine-steps=-1", *SAMPLES), r"--refine-steps must be a whole number ≥ 0"),
    Row("refine-steps-not-a-number", "refine", "`--refine-steps many`",
        compress("{model}", "-o", "OUT", "--refine-steps", "many", *SAMPLES), r"'many' is not a valid integer", exit_code=2),
    Row("refine-lr-zero", "refine", "`--refine-steps 2 --refine-lr 0`",
        compress("{model}", "-o", "OUT", "--refine-steps", "2", "--refine-lr", "0", *SAMPLES),
        r"--refine-lr must be a finite number > 0"),
    Row("refine-lr-nan", "refine", "`--refine-steps 2 --refine-lr nan`",
        compress("{model}", "-o", "OUT", "--refine-steps", "2", "--refine-lr", "nan", *SAMPLES),
        r"--refine-lr must be a finite number > 0"),
    Row("refine-share-above-one", "refine", "`--refine-share 1.5`",
        compress("{model}", "-o", "OUT", "--refine-steps", "2", "--refine-share", "1.5", *SAMPLES),
        r"--refine-share must lie in \(0, 1\]"),
    Row("refine-one-shot", "refine", "`--refine-steps 2 --one-shot` (refinement works block by block)",
        compress("{model}", "-o", "OUT", "--refine-steps", "2", "--one-shot", *SAMPLES), r"add --sequential"),
    Row("refine-method-svd", "refine", "`--refine-steps 2 --method svd` (no calibration statistics)",
        compress("{model}", "-o", "OUT", "--refine-steps", "2", "--method", "svd", *SAMPLES), r"--method whiten"),
    Row("refine-holdout-one", "refine", "`--refine-holdout 1` (no batch would be left to train on)",
        compress("{model}", "-o", "OUT", "--refine-steps", "2", "--refine-holdout", "1", *SAMPLES),
        r"--refine-holdout must lie in \[0, 1\)"),
    Row("refine-refit-negative", "refine", "`--refine-refit -1`",
        compress("{model}", "-o", "OUT", "--refine-refit=-1", *SAMPLES), r"--refine-refit must be a whole number ≥ 0"),
    Row("refine-loss-unknown", "refine", "`--refine-loss l1` (not a loss the refinement knows)",
        compress("{model}", "-o", "OUT", "--refine-steps", "2", "--refine-loss", "l1", *SAMPLES),
        r"'l1' is not one of 'token', 'mse'", exit_code=2),
    Row("refine-refit-no-update", "refine", "`--refine-refit 1 --no-update` (the refit is part of the update)",
        compress("{model}", "-o", "OUT", "--refine-refit", "1", "--no-update", *SAMPLES), r"add --sequential --update"),
    Row("plan-samples-negative", "speed", "`--plan-samples -1` (windows the planner profiles)",
        compress("{model}", "-o", "OUT", "--plan-samples=-1", *SAMPLES), r"--plan-samples must be at least 0"),
    Row("update-samples-negative", "speed", "`--update-samples -1` (windows the update fits on)",
        compress("{model}", "-o", "OUT", "--update-samples=-1", *SAMPLES), r"--update-samples must be at least 0"),
    Row("plan-samples-not-a-number", "speed", "`--plan-samples all` (a count; 0 means all)",
        compress("{model}", "-o", "OUT", "--plan-samples", "all", *SAMPLES), r"'all' is not a valid integer",
        exit_code=2),
    Row("sensitivity-samples-zero", "speed", "`--sensitivity-samples 0` (windows the sensitivity planner backpropagates)",
        compress("{model}", "-o", "OUT", "--sensitivity-samples", "0", *SAMPLES),
        r"--sensitivity-samples must be at least 1, got 0"),
    Row("sensitivity-samples-not-a-number", "speed", "`--sensitivity-samples many` (a count of windows)",
        compress("{model}", "-o", "OUT", "--sensitivity-samples", "many", *SAMPLES), r"'many' is not a valid integer",
        exit_code=2),
    # Agreement, zero-shot tasks and speed (`lowrank eval --against/--tasks`, `lowrank bench`)
    Row("eval-against-dense-folder", "evaluation", "`lowrank eval MODEL --against` on a dense folder (no plan, no source)",
        command("eval", "{model}", "--against", "--seq-len", "16", "--prompt-tokens", "8", "-q"), r"records no dense source; pass --against DENSE"),
    Row("eval-against-source-unloadable", "evaluation", "`lowrank eval FOLDER --against` when the plan's source cannot be loaded",
        command("eval", "{compressed}", "--against", "--seq-len", "16", "--prompt-tokens", "8", "--max-windows", "1", "-q"),
        r"cannot load the dense model tiny .*pass --against with its path or name", setup=offline_hub),
    Row("eval-against-missing", "evaluation", "`lowrank eval FOLDER --against PATH` naming a path that does not exist",
        command("eval", "{compressed}", "--against", "{model}-missing", "--seq-len", "16", "--prompt-tokens", "8", "-q"),
        r"cannot load the dense model .*does not exist"),
    Row("eval-prompt-longer-than-window", "evaluation", "`--prompt-tokens 40 --seq-len 16`: prompts longer than the windows",
        command("eval", "{compressed}", "--against", "{model}", "--prompt-tokens", "40", "--seq-len", "16", "-q"),
        r"--prompt-tokens 40 is longer than --seq-len 16"),
    Row("eval-generated-tokens-zero", "evaluation", "`--generated-tokens 0`",
        command("eval", "{compressed}", "--against", "{model}", "--generated-tokens", "0", "-q"),
        r"--generated-tokens must be at least 1"),
    Row("eval-tasks-extra-missing", "evaluation", "`lowrank eval --tasks` without lm-evaluation-harness installed",
        command("eval", "{model}", "--tasks", "arc_easy", "-q"), r"pip install 'lowrank\[eval\]'",
        setup=hide_lm_eval),
    Row("eval-task-path-missing", "evaluation", "`--task-path` naming a folder that does not exist",
        command("eval", "{model}", "--tasks", "mine", "--task-path", "{model}-missing", "-q"),
        r"--task-path .* is not a folder"),
    Row("eval-task-unknown", "evaluation", "`--tasks no_such_task` (with lm-eval installed)",
        command("eval", "{model}", "--tasks", "no_such_task", "-q"),
        r"lm-eval knows no task no_such_task|pip install 'lowrank\[eval\]'"),
    Row("bench-dense-folder", "evaluation", "`lowrank bench` on a dense folder without --against",
        command("bench", "{model}", "-q"), r"records no dense source; pass --against DENSE"),
    Row("bench-folder-missing", "evaluation", "`lowrank bench` on a folder that does not exist",
        command("bench", "{compressed}-missing", "-q"), r"is not a compressed folder"),
    Row("bench-against-missing", "evaluation", "`lowrank bench --against PATH` naming a path that does not exist",
        command("bench", "{compressed}", "--against", "{model}-missing", "-q"), r"cannot load the dense model"),
    Row("bench-batch-sizes-bad", "evaluation", "`lowrank bench --batch-sizes 1,x`",
        command("bench", "{compressed}", "--batch-sizes", "1,x", "-q"), r"--batch-sizes 'x' is not a positive integer"),
    Row("bench-repeats-zero", "evaluation", "`lowrank bench --repeats 0`",
        command("bench", "{compressed}", "--repeats", "0", "-q"), r"--repeats must be at least 1"),
    Row("bench-batch-beyond-text", "evaluation", "`lowrank bench --batch-sizes 100000`: more prompts than the text has",
        command("bench", "{compressed}", "--against", "{model}", "--batch-sizes", "100000", "--no-memory", "-q"),
        r"fewer than batch 100000; lower --batch-sizes or --seq-len"),
    Row("bench-threads-zero", "evaluation", "`lowrank bench --threads 0`",
        command("bench", "{compressed}", "--threads", "0", "-q"), r"--threads must be at least 1"),
    # Speed-aware plans (`lowrank plan --speed`, `--round-to auto`, `--timings`)
    Row("plan-round-to-word", "commands", "`lowrank plan --round-to fast`: neither a number nor auto",
        command("plan", "--profile", "{profile}", "--round-to", "fast", "-o", "OUT", "-q"),
        r"--round-to must be a positive integer or auto"),
    Row("plan-timings-alone", "commands", "`lowrank plan --timings FILE` without --speed or --round-to auto",
        command("plan", "--profile", "{profile}", "--timings", "{good_text}", "-o", "OUT", "-q"),
        r"--timings feeds --speed or --round-to auto"),
    Row("plan-timings-not-json", "commands", "`lowrank plan --speed --timings FILE` naming a file that is not JSON",
        command("plan", "--profile", "{profile}", "--speed", "--timings", "{good_text}", "-o", "OUT", "-q"),
        r"cannot read timings from .* pass a plan written by `lowrank plan --speed`"),
    Row("plan-speed-max-rank", "commands", "`lowrank plan --speed --max-rank 4`: every matrix factored, yet slow ones dense",
        command("plan", "--profile", "{profile}", "--speed", "--max-rank", "4", "-o", "OUT", "-q"),
        r"--max-rank factors every matrix, while --speed keeps slow ones dense"),
    Row("plan-speed-uniform", "commands", "`lowrank plan --speed --strategy uniform`",
        command("plan", "--profile", "{profile}", "--speed", "--strategy", "uniform", "--device", "cpu", "-o", "OUT",
                "-q"), r"--speed trades ranks between matrices, which the uniform strategy does not"),
    # Several ranks (torchrun, accelerate launch, --nproc)
    Row("nproc-zero", "distributed", "`lowrank compress --nproc 0`",
        compress("{model}", "-o", "OUT", "--nproc", "0", *SAMPLES), r"--nproc '0' is not a number of processes"),
    Row("recover-nproc-not-a-number", "distributed", "`lowrank recover --nproc two`",
        command("recover", "{compressed}", "--data", "{good_text}", "-o", "OUT", "--nproc", "two", "-q"),
        r"--nproc 'two' is not a number of processes"),
    Row("nproc-inside-a-rank", "distributed", "`--nproc 2` in a process torchrun already started as a rank",
        compress("{model}", "-o", "OUT", "--nproc", "2", *SAMPLES), r"already one rank of a run; drop --nproc",
        setup=one_rank_of_two),
    Row("world-size-without-rank", "distributed", "WORLD_SIZE=2 set by hand, without RANK",
        compress("{model}", "-o", "OUT", *SAMPLES), r"WORLD_SIZE is 2 but RANK is not set", setup=world_without_rank),
    Row("world-size-not-a-number", "distributed", "WORLD_SIZE=two",
        compress("{model}", "-o", "OUT", *SAMPLES), r"WORLD_SIZE='two' is not a number", setup=world_size_not_a_number),
    Row("dist-timeout-not-a-number", "distributed", "LOWRANK_DIST_TIMEOUT=soon under torchrun",
        compress("{model}", "-o", "OUT", *SAMPLES), r"LOWRANK_DIST_TIMEOUT='soon' is not a positive number",
        setup=timeout_not_a_number),
]

#: What each row printed, collected for the table in docs/robustness.md (see LOWRANK_ROBUSTNESS_TABLE).
OBSERVED: dict[str, str] = {}


GROUPS = {"model": "model input", "budget": "budget", "plan": "plan", "text": "calibration text",
          "environment": "environment", "read-back": "files read back", "commands": "other commands",
          "recipe": "recipes (lowrank run)", "profile": "saved profiles", "stream": "streaming",
          "evaluation": "evaluation and speed (eval --against/--tasks, bench)", "encoders": "encoders",
          "refine": "block refinement", "speed": "speed options (--plan-samples, --update-samples, --sensitivity-samples)",
          "distributed": "several ranks (torchrun, accelerate, --nproc)"}
ROBUSTNESS_DOC = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"
TABLE_MARKERS = ("<!-- robustness-table:start -->", "<!-- robustness-table:end -->")


def markdown_table(observed: dict[str, str]) -> str:
    """The docs/robustness.md table: one row per bad input, what the user saw, and the test row that checks it."""
    lines = [f"**{len(ROWS)} bad inputs tried**, each run through the CLI by "
             "`tests/test_robustness_cli.py::test_bad_input_is_refused_cleanly[ROW]`, which asserts a non-zero "
             "exit code, one line on stderr and no traceback, nothing left in the output's folder (no output, no "
             "`.*.tmp-*`), and every input file unchanged (sha256 before and after). Paths are shown relative.",
             "", "| | bad input | what the user sees | test row |", "|---|---|---|---|"]
    for row in ROWS:
        message = observed.get(row.id, "(not run)").replace("|", "\\|").replace("`", "'")
        lines.append(f"| {GROUPS[row.group]} | {row.tried} | `{message}` | `[{row.id}]` |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def write_table():
    yield
    target = os.environ.get("LOWRANK_ROBUSTNESS_TABLE")
    if target:
        Path(target).write_text(markdown_table(OBSERVED))


def test_robustness_table_lists_every_row():
    """docs/robustness.md's table and this file's rows stay in step (regenerate with LOWRANK_ROBUSTNESS_TABLE)."""
    text = ROBUSTNESS_DOC.read_text(encoding="utf-8")
    table = text[text.index(TABLE_MARKERS[0]):text.index(TABLE_MARKERS[1])]
    assert f"**{len(ROWS)} bad inputs tried**" in table
    rows = re.findall(r"^\|.*`\[([a-z0-9-]+)\]` \|$", table, flags=re.M)
    assert rows == [row.id for row in ROWS]


def _sanitize(message: str, inputs: Inputs, work: Path) -> str:
    for path, name in ((work, ""), (inputs.root, "")):
        message = message.replace(f"{path}/", name).replace(str(path), ".")
    return message


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_bad_input_is_refused_cleanly(row: Row, inputs: Inputs, tmp_path, request, monkeypatch, capsys):
    work = request.getfixturevalue("small_disk") if row.on_small_disk else tmp_path / "work"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    before_inputs = tree_hashes(inputs.root)
    before_work = sorted(os.listdir(work))
    argv = row.argv(inputs, work)
    capsys.readouterr()
    undo = row.setup(monkeypatch, work) if row.setup else None
    try:
        code = main(argv)
    finally:
        if undo:
            undo()
    out, err = capsys.readouterr()

    lines = [line for line in err.splitlines() if line.strip()]
    OBSERVED[row.id] = _sanitize(lines[-1] if lines else "", inputs, work)
    assert code == row.exit_code != 0, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err + out
    assert "unexpected" not in lines[0], lines[0]  # an unexpected error is a bug, even in one line
    assert re.search(row.expect, lines[0]), lines[0]
    assert sorted(os.listdir(work)) == before_work, "output or temporary files left behind"
    assert not list(inputs.root.parent.rglob(".*.tmp-*")), "temporary files left behind"
    assert tree_hashes(inputs.root) == before_inputs, "an input file changed"
    assert not inputs.sentinel.exists(), "unpickling ran code"


def test_pickle_checkpoint_loads_with_allow_pickle(inputs, tmp_path, capsys):
    """The other side of the pickle rows: a plain tensors-only pickle loads once allowed, read weights_only."""
    out = tmp_path / "out"
    code = main(["compress", inputs["pickle"], "-o", str(out), "--allow-pickle", *SAMPLES, "-q"])
    assert code == 0, capsys.readouterr().err
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("ok: ")


def test_transformers_reads_pickles_weights_only(inputs):
    """transformers' .bin loader refuses pickled objects that are not tensors (what --allow-pickle relies on)."""
    from transformers.modeling_utils import load_state_dict

    with pytest.raises(Exception, match="Weights only load failed"):
        load_state_dict(str(inputs.paths["evil_pickle"] / "pytorch_model.bin"))
    assert not inputs.sentinel.exists()
    state = load_state_dict(str(inputs.paths["pickle"] / "pytorch_model.bin"))
    assert torch.equal(state["model.embed_tokens.weight"],
                       load_file(inputs.paths["model"] / "model.safetensors")["model.embed_tokens.weight"])


def test_short_calibration_text_warns_once_and_compresses(inputs, tmp_path):
    """Text for 1 window of 16 but 2 asked for: the CLI warns once on stderr, overlaps windows and succeeds.

    The 32 tokens are also fewer than the widest layer's 96 inputs: the second warning, and no other line.
    """
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", "import sys; from lowrank.cli import main; sys.exit(main())",
                           "compress", inputs["model"], "-o", str(out), "--calib", inputs["short_text"], *SAMPLES, "-q"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, done.stderr
    assert lines[1] == ("WARNING lowrank.calibration: the calibration holds 32 tokens, fewer than the 96 inputs of "
                        "model.layers.0.mlp.down_proj (14 of 14 target layers have more inputs than that): their input "
                        "statistics are singular and their factors fit only the directions the calibration reached; "
                        "give at least 96 tokens, many times that for good factors (raise --samples or --seq-len, or "
                        "give more text)")
    found = re.fullmatch(r"WARNING lowrank\.calibration: calibration text has 21 tokens, enough for 1 non-overlapping "
                         r"windows of 16 but 2 were requested; using 2 overlapping windows, which cover (\d+) distinct "
                         r"tokens \((\d+)% of the text\); give more text for independent windows", lines[0])
    assert found, lines[0]
    assert 16 <= int(found[1]) <= 21 and int(found[2]) == round(100 * int(found[1]) / 21)
    assert main(["verify", str(out)]) == 0


def test_the_intact_folders_pass(inputs, tmp_path, capsys):
    """The rows fail for the reason given: the untouched model compresses and its output verifies."""
    out = tmp_path / "out"
    assert main(["compress", inputs["model"], "-o", str(out), *SAMPLES, "-q"]) == 0
    assert main(["verify", str(out)]) == 0
    assert main(["verify", inputs["compressed"]]) == 0
    assert capsys.readouterr().out.count("ok: ") == 2


def _rewrite_weights(folder: Path, change: Callable[[dict], None]) -> None:
    """Change the tensors of a compressed folder and record the new sha256, as a careless tool would."""
    from lowrank.fileio import sha256_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    edit_plan(folder, lambda d: d["files"].update({path.name: sha256_file(path)}))


@pytest.mark.parametrize("damage, problem", [
    (lambda t: t.update({"model.layers.0.mlp.extra.down.weight": torch.zeros(4, 48)}),
     "unexpected tensor model.layers.0.mlp.extra.down.weight: module model.layers.0.mlp.extra is not factored in the plan"),
    (lambda t: t.update({f"{NAN_MODULE}.weight": torch.zeros(96, 48)}),
     f"{NAN_MODULE} is factored in the plan but the weights still hold its dense {NAN_MODULE}.weight"),
    (lambda t: t.pop(f"{NAN_MODULE}.up.weight"),
     f"{NAN_MODULE} is factored in the plan but the weights lack {NAN_MODULE}.up.weight"),
    (lambda t: t[f"{NAN_MODULE}.up.weight"].__setitem__((0, 0), float("inf")),
     f"{NAN_MODULE}.up.weight in model.safetensors holds 1 NaN/Inf value(s)"),
], ids=["unexpected-factor", "dense-weight-left", "factor-missing", "inf-in-factor"])
def test_verify_names_each_mismatch(damage, problem, inputs, tmp_path):
    """Damage that keeps the recorded sha256 consistent is still caught, by shape, name or value."""
    from lowrank.verify import verify_folder

    folder = copy_model(inputs.paths["compressed"], tmp_path / "folder")
    _rewrite_weights(folder, damage)
    assert verify_folder(folder).problems == [problem]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_verify_accepts_every_tiny_architecture(arch, tmp_path):
    """Sound folders of every architecture verify and load (GPT-2's Conv1D stores dense weights transposed)."""
    from lowrank.checkpoint import load_compressed
    from lowrank.verify import verify_folder

    from lowrank.plan import ModulePlan, Plan
    from lowrank.targets import find_targets

    model = make_tiny_model(arch)
    targets = find_targets(model)
    plan = Plan({t.name: ModulePlan(t.shape, min(t.shape) // 4 if i % 2 == 0 else None)  # every other one dense
                 for i, t in enumerate(targets)}, method="svd")
    compress_model(model, method="svd", plan=plan, progress=False)
    folder = save_compressed(model, None, plan, tmp_path / arch)
    result = verify_folder(folder)
    assert result.ok, result.problems
    assert result.factored == len(plan.factored) == (len(targets) + 1) // 2
    assert result.dense == len(targets) // 2
    assert isinstance(load_compressed(folder).get_submodule(next(iter(plan.factored))), type(
        model.get_submodule(next(iter(plan.factored)))))


def test_verify_sharded_folder(inputs, tmp_path):
    """A folder saved in several shards verifies; a missing shard is named."""
    from lowrank.verify import verify_folder

    model = make_tiny_model("llama")
    plan = compress_model(model, ratio=0.5, method="svd", progress=False)
    folder = save_compressed(model, char_tokenizer(), plan, tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1
    result = verify_folder(folder)
    assert result.ok and result.files == len(shards) and result.factored == len(plan.factored)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    lost = index[f"{NAN_MODULE}.down.weight"]
    (folder / lost).unlink()
    problems = verify_folder(folder).problems
    assert problems[0] == f"weight file {lost} is missing (recorded in {PLAN_FILE})"
    assert f"{NAN_MODULE} is factored in the plan but the weights lack {NAN_MODULE}.down.weight" in problems


# ---- Ctrl-C from another process ----------------------------------------------------------------

STAGES = ("loading", "calibrating", "factoring", "saving")

#: A `lowrank compress` process that runs once per stage and, inside that stage, tells the parent
#: (a line "in STAGE" on stdout) and waits for it to send SIGINT. One process keeps imports to one.
CHILD = r"""
import sys, time
from pathlib import Path
import lowrank.calibration, lowrank.checkpoint, lowrank.compression, lowrank.loading
from lowrank.cli import main

folder, stages, argv = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
places = {"loading": (lowrank.loading, "model_class_for", 1),
          "calibrating": (lowrank.calibration.StatsCollector, "end_batch", 1),
          "factoring": (sys.modules["lowrank.compression"], "replace_module", 3),
          "saving": (lowrank.checkpoint, "sha256_file", 1)}
for stage in stages:
    owner, attr, on_call = places[stage]
    original, calls = getattr(owner, attr), [0]
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == on_call:
            print("in", stage, flush=True)
            while True:
                time.sleep(0.01)  # the parent's SIGINT ends this wait with KeyboardInterrupt
        return original(*args, **kwargs)
    setattr(owner, attr, wrapper)
    code = main([a.replace("OUT", str(folder / f"out-{stage}")) for a in argv])
    setattr(owner, attr, original)
    print(stage, code, flush=True)
"""


def test_ctrl_c_from_outside(inputs, tmp_path):
    """A parent sends SIGINT to a `lowrank compress` process inside each stage: exit 130, nothing written."""
    before = tree_hashes(inputs.root)
    argv = ["compress", inputs["model"], "--no-stream", "-o", "OUT", *SAMPLES, "-q"]  # streamed: test_streaming
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), ",".join(STAGES), *argv], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for stage in STAGES:
            lines.append(child.stdout.readline().strip())  # blocks until the child is inside the stage
            assert lines[-1] == f"in {stage}", f"the child never reached the {stage} stage: {lines} {child.communicate()}"
            child.send_signal(signal.SIGINT)
            lines.append(child.stdout.readline().strip())  # the stage's exit code, once main has returned
        out, err = child.communicate()
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert lines == [line for stage in STAGES for line in (f"in {stage}", f"{stage} 130")] and not out, (lines, out)
    # click writes a newline on Ctrl-C; the 32 calibration tokens, fewer than the model's widest input, warn once
    # in every stage that gets past loading
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING lowrank.calibration: "
                                                                                       "the calibration holds 32")]
    assert lines == ["error: interrupted; nothing was written and the input is untouched"] * len(STAGES), err
    assert err.count("the calibration holds 32 tokens") == len(STAGES) - 1, err
    assert list(tmp_path.iterdir()) == [], "output or temporary files left behind"
    assert tree_hashes(inputs.root) == before


# ---- the real model ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_compressed_folder_verifies_and_damage_is_caught(smollm2_compressed, tmp_path):
    """SmolLM2-135M: a fresh compressed folder verifies; a changed byte and a NaN are caught and named."""
    from lowrank.errors import LowrankError
    from lowrank.verify import check_finite_weights, verify_folder

    plan = smollm2_compressed.plan  # the session's shared compression, damaged here only in copies
    folder = copy_model(smollm2_compressed.folder, tmp_path / "compressed")
    result = verify_folder(folder)
    assert result.ok, result.problems
    assert result.factored == len(plan.factored) == 210 and result.dense == len(plan.modules) - 210

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # tensor data follows the 8-byte length and the JSON header
    data[start + 4 * ((len(data) - start) // 8)] ^= 0xFF  # lowest mantissa byte of a float32 mid-file: still finite
    weights.write_bytes(bytes(data))
    assert verify_folder(folder).problems == [
        "weight file model.safetensors does not match its recorded sha256; it was modified or damaged"]

    name = "model.layers.7.mlp.down_proj"
    model = copy.deepcopy(smollm2_compressed.model)
    with torch.no_grad():
        model.get_submodule(name).up.weight[3, 5] = float("nan")
    with pytest.raises(LowrankError, match=f"module {re.escape(name)}.up holds 1 NaN/Inf"):
        check_finite_weights(model)
