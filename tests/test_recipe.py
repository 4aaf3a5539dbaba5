"""Recipes: every file in recipes/ validates, runs (or dry-runs) on tiny models, and matches the plain CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import run_cli, save_tiny_model
from lowrank.config import CompressConfig
from lowrank.errors import LowrankError
from lowrank.recipe import RECIPE_FILE, apply_overrides, read_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
#: The tiny architecture each recipe's model belongs to, and the --set that fit it (tiny GPT-2 has 128 positions).
TINY = {
    "smollm2-default.yaml": ("llama", []),
    "smollm2-0.6-recover.yaml": ("llama", []),
    "llama3-8b-svdllm-20.yaml": ("llama", []),
    "llama3-8b-svdllm-40.yaml": ("llama", []),
    "mistral-7b-svdllm-20.yaml": ("mistral", []),
    "mistral-7b-svdllm-40.yaml": ("mistral", []),
    "gpt2.yaml": ("gpt2", ["calibration.seq_len=64", "calibration.samples=8"]),
    "bert-base.yaml": ("bert", []),
    "minilm-l6.yaml": ("bert", ["calibration.seq_len=32", "recover.seq_len=32", "recover.steps=2"]),
}
SMALL = ["calibration.samples=4", "calibration.seq_len=32", "eval.seq_len=32", "eval.max_windows=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def sets(*assignments: str) -> list[str]:
    return [arg for a in assignments for arg in ("--set", a)]


def test_every_recipe_is_known_to_this_test():
    assert sorted(r.name for r in RECIPES) == sorted(TINY)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_resolves_to_itself(path):
    recipe = read_recipe(path)
    resolved = yaml.safe_load(recipe.to_yaml())
    assert read_recipe_data(resolved).to_dict() == recipe.to_dict()  # the resolved form reads back unchanged


def read_recipe_data(data):
    from lowrank.recipe import recipe_from_dict

    return recipe_from_dict(data)


def test_the_svd_llm_recipes_follow_the_papers_protocol():
    for name, ratio in (("llama3-8b-svdllm-20.yaml", 0.8), ("llama3-8b-svdllm-40.yaml", 0.6),
                        ("mistral-7b-svdllm-20.yaml", 0.8), ("mistral-7b-svdllm-40.yaml", 0.6)):
        recipe = read_recipe(Path(RECIPES[0].parent / name))
        assert (recipe.compress.method, recipe.compress.strategy, recipe.compress.ratio) == ("whiten", "uniform", ratio)
        assert recipe.compress.budget is None  # the ratio counts over the target layers, as SVD-LLM's code does
        assert (recipe.calibration.texts, recipe.calibration.samples, recipe.calibration.seq_len) == \
            (["wikitext2"], 256, 2048)


def test_the_default_recipe_is_the_plain_command():
    recipe = read_recipe(RECIPES[0].parent / "smollm2-default.yaml")
    assert recipe.model == "smollm2-135m" and recipe.compress == CompressConfig()
    assert recipe.stages[0].kind == "compress" and recipe.stages[0].output == "smollm2-135m-whiten-r0.8"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_dry_runs_on_a_tiny_model_of_its_architecture(path, tmp_path, capsys, monkeypatch):
    arch, extra = TINY[path.name]
    model = tmp_path / f"tiny-{arch}"
    save_tiny_model(model, arch)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "run", str(path), "--dry-run", *sets(f"model={model}", *extra))
    assert code == 0, err
    assert "would keep" in out and "whole model" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]  # nothing written


def test_the_default_recipe_gives_bit_for_bit_the_factors_of_lowrank_compress(tmp_path, capsys, monkeypatch):
    model = tmp_path / "tiny"
    save_tiny_model(model)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "run", str(RECIPES[0].parent / "smollm2-default.yaml"),
                             *sets(f"model={model}", "stages.0.output=by-recipe", "stages.1.output=by-recipe-report",
                                   *SMALL))
    assert code == 0, err
    code, _, err = run_cli(capsys, "compress", str(model), "--samples", "4", "--seq-len", "32", "-o", "by-cli", "-q")
    assert code == 0, err
    recipe_weights = load_file(str(tmp_path / "by-recipe" / "model.safetensors"))
    cli_weights = load_file(str(tmp_path / "by-cli" / "model.safetensors"))
    assert recipe_weights.keys() == cli_weights.keys() and any(k.endswith(".up.weight") for k in cli_weights)
    for name, tensor in cli_weights.items():
        assert torch.equal(recipe_weights[name], tensor), name
    # the resolved recipe (defaults filled in) lies in every output; the configs match the CLI's
    for folder in ("by-recipe", "by-recipe-report"):
        resolved = yaml.safe_load((tmp_path / folder / RECIPE_FILE).read_text())
        assert resolved["compress"]["ratio"] == 0.8 and resolved["model"] == str(model)
    assert json.loads((tmp_path / "by-recipe" / "lowrank_config.json").read_text()) == \
        json.loads((tmp_path / "by-cli" / "lowrank_config.json").read_text())
    report = json.loads((tmp_path / "by-recipe-report" / "report.json").read_text())
    assert report["perplexity"]["windows"] == 2 and report["perplexity"]["before"] > 1


def test_resume_skips_a_verified_stage_and_reruns_a_missing_one(tmp_path, capsys, monkeypatch):
    model = tmp_path / "tiny"
    save_tiny_model(model)
    monkeypatch.chdir(tmp_path)
    args = ["run", str(RECIPES[0].parent / "smollm2-0.6-recover.yaml"),
            *sets(f"model={model}", *SMALL, "recover.steps=2", "recover.seq_len=32", "recover.eval_windows=2",
                  "recover.eval_every=0", "recover.batch_size=2", "compress.method=svd")]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    outputs = ["smollm2-r0.6", "smollm2-r0.6-recovered", "smollm2-r0.6-report", "smollm2-r0.6-recovered-report"]
    assert all((tmp_path / o).is_dir() for o in outputs)
    config = json.loads((tmp_path / "smollm2-r0.6-recovered" / "lowrank_config.json").read_text())
    assert config["compress"]["method"] == "svd" and config["recover"]["steps"] == 2
    weights = tmp_path / "smollm2-r0.6" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    import shutil

    shutil.rmtree(tmp_path / "smollm2-r0.6-recovered-report")
    code, out, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert out.count("skipped") == 3 and "[4/4] report" in out
    assert weights.stat().st_mtime_ns == stamp and (tmp_path / "smollm2-r0.6-recovered-report" / "report.json").is_file()
    # without --resume the existing outputs are refused, as the plain commands refuse them
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and "already exists" in err
    # --resume never skips an output made with other settings
    code, _, err = run_cli(capsys, *args, "--set", "recover.steps=3", "--resume")
    assert code == 1 and "smollm2-r0.6-recovered was made with other settings (recover.steps 2, not 3)" in err


@pytest.mark.parametrize("change, message", [
    ({"ratio": 0.5}, r"unknown key ratio in the recipe; valid keys: version, description, model"),
    ({"compress": {"ratoi": 0.5}}, r"unknown key compress.ratoi; valid keys: version, method, ratio"),
    ({"compress": {"ratio": "most"}}, r"compress.ratio must be a number, got 'most'"),
    ({"stages": [{"stage": "quantize", "output": "x"}]}, r"stages\[0\].stage must be one of compress, recover"),
    ({"stages": [{"stage": "compress"}]}, r"stages\[0\] \(compress\) has no output"),
    ({"stages": [{"stage": "report", "output": "r"}]}, r"no compress or recover stage comes before it"),
    ({"stages": [{"stage": "compress", "output": "x", "ratio": 1}]}, r"unknown key stages\[0\].ratio"),
    ({"stages": [{"stage": "compress", "output": "x"}, {"stage": "recover", "output": "y"}]}, r"has no data"),
])
def test_bad_recipes_are_one_line_errors(change, message):
    from lowrank.recipe import recipe_from_dict

    data = {"model": "m", "stages": [{"stage": "compress", "output": "out"}], **change}
    with pytest.raises(LowrankError, match=message) as err:
        recipe_from_dict(data)
    assert "\n" not in str(err.value)


def test_set_overrides_are_typed_and_checked():
    data = {"model": "m", "stages": [{"stage": "compress", "output": "out"}]}
    changed = apply_overrides(data, ["compress.ratio=0.6", "stages.0.output=elsewhere", "calibration.texts=[a, b]"])
    assert changed["compress"]["ratio"] == 0.6 and changed["stages"][0]["output"] == "elsewhere"
    assert changed["calibration"]["texts"] == ["a", "b"] and "compress" not in data  # the input is not modified
    for bad, message in (("compress.ratio", "is not KEY=VALUE"), ("compresss.ratio=1", "unknown key compresss"),
                         ("stages.3.output=x", "stages.3 is not a stage")):
        with pytest.raises(LowrankError, match=message):
            apply_overrides(data, [bad])


def test_the_recovery_recipe_is_the_commands_of_the_script_it_replaced(tmp_path, capsys, monkeypatch):
    """recipes/smollm2-0.6-recover.yaml = compress, recover, report ×2 as recipes/smollm2-compress-recover.sh ran them
    (here on a tiny model with small windows): the same recovered weights bit for bit, the same perplexities."""
    from lowrank.calibration import sample_text_path

    model = tmp_path / "tiny"
    save_tiny_model(model)
    monkeypatch.chdir(tmp_path)
    small = ["--samples", "4", "--seq-len", "32"]
    text = {name: str(sample_text_path(name)) for name in ("tempest", "julius_caesar", "hamlet", "macbeth")}
    commands = [
        ["compress", str(model), "--ratio", "0.6", *small, "-o", "sh"],
        ["recover", "sh", "--data", text["tempest"], "--data", text["julius_caesar"], "--eval", text["hamlet"],
         "--eval-windows", "8", "--eval-every", "10", "--steps", "4", "--lr", "2e-4", "--warmup", "3",
         "--seq-len", "32", "-o", "sh-recovered"],
        ["report", "sh", "--text", text["macbeth"], "--max-windows", "40", "--seq-len", "32", "-o", "sh-report"],
        ["report", "sh-recovered", "--text", text["macbeth"], "--max-windows", "40", "--seq-len", "32",
         "-o", "sh-recovered-report"],
    ]
    for argv in commands:
        code, _, err = run_cli(capsys, *argv, "-q")
        assert code == 0, err
    code, _, err = run_cli(capsys, "run", str(RECIPES[0].parent / "smollm2-0.6-recover.yaml"), "-q",
                           *sets(f"model={model}", "calibration.samples=4", "calibration.seq_len=32", "eval.seq_len=32",
                                 "recover.steps=4", "recover.seq_len=32"))
    assert code == 0, err
    a = load_file(str(tmp_path / "sh-recovered" / "model.safetensors"))
    b = load_file(str(tmp_path / "smollm2-r0.6-recovered" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for script, recipe in (("sh-report", "smollm2-r0.6-report"), ("sh-recovered-report", "smollm2-r0.6-recovered-report")):
        by_script = json.loads((tmp_path / script / "report.json").read_text())["perplexity"]
        by_recipe = json.loads((tmp_path / recipe / "report.json").read_text())["perplexity"]
        assert by_script == by_recipe and by_recipe["windows"] > 1
