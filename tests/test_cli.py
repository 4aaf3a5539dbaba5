"""The compress and eval commands on a tiny checkpoint folder, and issue 2's bad inputs.

Cross-cutting: the lowrank/cli/ package for the commands with no stage of their own (compress,
eval); each other command is tested with its stage (plan in test_planner.py, run in test_recipe.py, ...).
"""

import hashlib
import json

import pytest

from helpers import run_cli


def tree_digest(folder):
    """sha256 over every file's name and bytes: proves an input was not touched."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_compress_then_eval(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "compressed"
    before = tree_digest(tiny_model_folder)
    code, stdout, _ = run_cli(capsys, "compress", tiny_model_folder, "--ratio", "0.5", "--samples", "4", "--seq-len", "32",
                          "-o", out, "--quiet")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["output"] == str(out) and 0.45 < summary["target_ratio"] <= 0.5
    assert summary["model_params"] < summary["model_params_dense"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert tree_digest(tiny_model_folder) == before

    code, stdout, _ = run_cli(capsys, "eval", out, "--seq-len", "32", "--max-windows", "5", "--quiet",
                          "--json", tmp_path / "ppl.json")
    assert code == 0 and stdout.startswith("perplexity ")
    record = json.loads((tmp_path / "ppl.json").read_text())
    assert record["tokens"] == 5 * 31 and record["windows"] == 5 and record["perplexity"] > 1


def test_compress_prints_both_ratios(tiny_model_folder, tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "compress", tiny_model_folder, "--method", "svd", "--ratio", "0.6",
                          "-o", tmp_path / "svd")
    assert code == 0
    assert "target layers:" in stdout and "whole model:" in stdout and "ratio 0." in stdout


def test_help_explains_every_option(capsys):
    for command in ("compress", "eval"):
        code, stdout, _ = run_cli(capsys, command, "--help")
        assert code == 0
        for option in (["--ratio", "--method", "--calib", "--samples", "--seq-len", "--seed", "--output",
                        "--overwrite", "--quiet", "--round-to"] if command == "compress" else
                       ["--text", "--seq-len", "--quiet"]):
            assert option in stdout
        assert "[default:" in stdout


@pytest.mark.parametrize("case", ["missing model", "ratio zero", "ratio above one", "output exists",
                                  "calibration too short", "no targets"])
def test_bad_input_is_one_line_and_leaves_nothing(case, tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("far too short")
    args = {
        "missing model": ["compress", tmp_path / "no-such-model", "-o", out],
        "ratio zero": ["compress", tiny_model_folder, "--ratio", "0", "-o", out],
        "ratio above one": ["compress", tiny_model_folder, "--ratio", "1.5", "-o", out],
        "output exists": ["compress", tiny_model_folder, "-o", tiny_model_folder],
        "calibration too short": ["compress", tiny_model_folder, "--calib", short, "--samples", "4", "-o", out],
        "no targets": ["compress", tiny_model_folder, "--include", "nothing_matches", "--samples", "2",
                       "--seq-len", "16", "-o", out],
    }[case]
    before = tree_digest(tiny_model_folder)
    code, _, stderr = run_cli(capsys, *args)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr
    expected = {"missing model": "does not exist", "ratio zero": "outside (0, 1]", "ratio above one": "outside (0, 1]",
                "output exists": "already exists", "calibration too short": "fewer than one window",
                "no targets": "no linear layers to factor"}[case]
    assert expected in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert tree_digest(tiny_model_folder) == before
