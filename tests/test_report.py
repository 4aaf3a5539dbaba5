"""Report folders: JSON valid against the schema and equal to the analysis, plots, markdown, the two CLI commands."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import torch

from helpers import make_tiny_model, random_windows, smollm2_calibration
from lowrank.calibration import collect_stats, sample_text_path, text_windows
from lowrank.checkpoint import save_compressed
from lowrank.cli import main
from lowrank.compression import compress_model
from lowrank.errors import LowrankError
from lowrank.evaluation import perplexity
from lowrank.factorize import output_error, whiten_factors
from lowrank.report import (
    analysis_to_dict,
    report_schema,
    validate_report,
    write_analysis_report,
    write_compressed_report,
)
from lowrank.profiling import profile_model
from lowrank.targets import find_targets, weight_matrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 300_000


def whitened_analysis(arch: str = "llama"):
    model = make_tiny_model(arch)
    targets = find_targets(model)
    stats = collect_stats(model, targets, random_windows(4, 16), progress=False)
    return profile_model(model, targets, stats, source=f"tiny-{arch}")


def check_pngs(folder, names):
    for name in names:
        data = (folder / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) < MAX_PNG_BYTES, f"{name} is {len(data)} bytes"


@pytest.fixture
def compressed_folder(tmp_path):
    model = make_tiny_model("llama")
    plan = compress_model(model, ratio=0.6, method="svd", progress=False, source="tiny-llama")
    return save_compressed(model, None, plan, tmp_path / "small"), plan


# ---- analysis reports ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_analysis_report_follows_the_schema_and_holds_every_number(arch, tmp_path):
    analysis = whitened_analysis(arch)
    out = write_analysis_report(analysis, tmp_path / "report")
    data = json.loads((out / "report.json").read_text())
    validate_report(data)
    assert data["kind"] == "analysis" and data["whitened"] is True
    assert set(data["plots"]) == {"spectra.png", "spectra-whitened.png", "rank95-heatmap.png", "loss-vs-params.png"}
    check_pngs(out, data["plots"])
    assert len(data["matrices"]) == len(analysis.matrices)
    for record, m in zip(data["matrices"], analysis.matrices):
        assert record["name"] == m.name and record["shape"] == list(m.shape)
        for label, whitened in (("weights", False), ("whitened", True)):
            stats = m.stats(whitened)
            assert record[label]["rank_for_energy"] == stats.rank_for_energy
            assert record[label]["effective_rank"] == pytest.approx(stats.effective_rank, rel=1e-5)
            assert record[label]["sigma"] == pytest.approx(m.spectrum(whitened).tolist(), rel=1e-5)
    budget = data["budgets"]["whitened"][1]  # ratio 0.8
    assert budget["ratio"] == 0.8
    assert budget["mean_loss"] == pytest.approx(analysis.uniform_budget(0.8, True)["mean_loss"], rel=1e-5)
    markdown = (out / "report.md").read_text()
    for heading in ("## Per layer type", "## Per depth", "## Most compressible", "## Least compressible",
                    "## What common budgets would give", "![", "rank95-heatmap.png"):
        assert heading in markdown


def test_data_free_report_has_no_whitened_parts(tmp_path):
    analysis = profile_model(make_tiny_model("llama"), source="tiny")
    out = write_analysis_report(analysis, tmp_path / "report")
    data = json.loads((out / "report.json").read_text())
    validate_report(data)
    assert data["whitened"] is False and "whitened" not in data["budgets"]
    assert all(m["whitened"] is None for m in data["matrices"])
    assert not (out / "spectra-whitened.png").exists()


def test_schema_rejects_broken_reports():
    data = analysis_to_dict(profile_model(make_tiny_model("llama")))
    data["plots"] = []
    validate_report(data)
    for breaking in (
        lambda d: d.update(version=2),
        lambda d: d.pop("matrices"),
        lambda d: d["matrices"][0]["weights"].update(effective_rank=-1.0),
        lambda d: d["matrices"][0]["weights"]["rank_for_energy"].pop("0.95"),
        lambda d: d.update(surprise=1),
        lambda d: d["budgets"]["weights"][0].update(target_ratio=1.5),
    ):
        broken = copy.deepcopy(data)
        breaking(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate_report(broken)
    jsonschema.Draft202012Validator.check_schema(report_schema())


def test_existing_output_needs_overwrite(tmp_path):
    analysis = profile_model(make_tiny_model("llama"))
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LowrankError, match="--overwrite"):
        write_analysis_report(analysis, out)
    assert (out / "keep.txt").read_text() == "mine"
    write_analysis_report(analysis, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "report.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folders left behind


# ---- compressed checkpoints ---------------------------------------------------------------------------------
def test_compressed_report_counts_parameters_per_type(compressed_folder, tmp_path):
    folder, plan = compressed_folder
    ppl = {"texts": ["x.txt"], "seq_len": 16, "windows": 2, "tokens": 30, "before": 10.0, "after": 12.5}
    out = write_compressed_report(plan, str(folder), tmp_path / "report", perplexity=ppl)
    data = json.loads((out / "report.json").read_text())
    validate_report(data)
    check_pngs(out, ["ranks.png"])
    assert data["method"] == "svd" and data["budget"] == plan.budget and data["strategy"] == plan.strategy
    assert sum(row["params"] for row in data["by_type"]) == plan.target_params
    assert sum(row["params_dense"] for row in data["by_type"]) == plan.target_params_dense
    q = next(row for row in data["by_type"] if row["type"] == "self_attn.q_proj")
    ranks = [plan.modules[f"model.layers.{i}.self_attn.q_proj"].rank for i in (0, 1)]
    assert all(k is not None for k in ranks)  # 48×48 at ratio 0.6 is factored
    assert q == {"type": "self_attn.q_proj", "matrices": 2, "factored": 2, "params_dense": 2 * 2304,
                 "params": sum(ranks) * 96, "ratio": pytest.approx(sum(ranks) * 96 / (2 * 2304), rel=1e-5)}
    markdown = (out / "report.md").read_text()
    assert "| before (source: tiny-llama) | 10.000 |" in markdown and "×1.250" in markdown


def test_cli_report_on_compressed_folder(compressed_folder, tmp_path, capsys):
    folder, plan = compressed_folder
    out = tmp_path / "report"
    assert main(["report", str(folder), "-o", str(out), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["target_params"] == plan.target_params
    data = json.loads((out / "report.json").read_text())
    validate_report(data)
    assert data["perplexity"] is None
    assert {m["name"]: m["rank"] for m in data["modules"]} == {n: m.rank for n, m in plan.modules.items()}
    assert main(["report", str(folder), "-o", str(out)]) == 1  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_cli_report_refuses_a_dense_folder(tmp_path, capsys):
    make_tiny_model("llama").save_pretrained(tmp_path / "dense")
    assert main(["report", str(tmp_path / "dense"), "-o", str(tmp_path / "r")]) == 1
    assert "not a compressed lowrank folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_analyze_data_free_on_folders(compressed_folder, tmp_path, capsys):
    folder, plan = compressed_folder
    make_tiny_model("gpt2").save_pretrained(tmp_path / "dense")
    for source, name in ((tmp_path / "dense", "dense-report"), (folder, "small-report")):
        out = tmp_path / name
        assert main(["analyze", str(source), "-o", str(out), "--quiet"]) == 0
        assert json.loads(capsys.readouterr().out)["whitened"] is False
        data = json.loads((out / "report.json").read_text())
        validate_report(data)
        check_pngs(out, data["plots"])
    small = json.loads((tmp_path / "small-report" / "report.json").read_text())
    assert [m["stored_rank"] for m in small["matrices"]] == [m.rank for m in plan.modules.values()]
    assert main(["analyze", str(folder), "--include", "nothing-matches", "-o", str(tmp_path / "x")]) == 1
    assert "error:" in capsys.readouterr().err


# ---- the real model ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_analysis_report_and_compressed_report(smollm2, smollm2_dense_folder, smollm2_compressed,
                                                          tmp_path, capsys):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    windows = smollm2_calibration(tokenizer)
    targets = find_targets(model)
    stats = collect_stats(model, targets, windows, progress=False)
    analysis = profile_model(model, targets, stats, source="smollm2-135m")
    assert len(analysis.matrices) == 30 * 7
    out = write_analysis_report(analysis, tmp_path / "whitened")
    data = json.loads((out / "report.json").read_text())
    validate_report(data)
    check_pngs(out, data["plots"])
    # on the real model too, the whitened truncation loss is the relative output error of whitened truncation
    name = "model.layers.5.self_attn.o_proj"
    m = next(m for m in analysis.matrices if m.name == name)
    weight, gram = weight_matrix(model.get_submodule(name)).detach().double(), stats[name].gram
    full = output_error(weight, torch.zeros_like(weight), gram)
    for k in (32, 192):
        approx = whiten_factors(weight, gram, k).matrix()
        assert m.loss_at_rank(k, whitened=True) == pytest.approx(output_error(weight, approx, gram) / full, rel=1e-3)

    # data-free, tensor by tensor, from a safetensors folder: the same σ(W) as in memory
    dense = smollm2_dense_folder  # the model saved with save_pretrained, once per session
    assert main(["analyze", str(dense), "-o", str(tmp_path / "free"), "--quiet"]) == 0
    free = json.loads((tmp_path / "free" / "report.json").read_text())
    assert [m["name"] for m in free["matrices"]] == [m.name for m in analysis.matrices]
    for record, m in zip(free["matrices"][::23], analysis.matrices[::23]):
        assert record["weights"]["sigma"] == pytest.approx(m.sigma.tolist(), rel=1e-4, abs=1e-6)

    # lowrank report with perplexity before (the source recorded in the plan) and after
    small = smollm2_compressed.model  # the session's shared compression, whose plan names `dense` as its source
    assert smollm2_compressed.plan.source == str(dense)
    macbeth = str(sample_text_path("macbeth"))
    args = ["report", str(smollm2_compressed.folder), "--text", macbeth, "--seq-len", "128", "--max-windows", "2",
            "-o", str(tmp_path / "report"), "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    validate_report(report)
    eval_windows = text_windows(tokenizer, [macbeth], None, 128, what="evaluation")[:2]
    expected_before = perplexity(model, eval_windows, progress=False).perplexity
    expected_after = perplexity(small, eval_windows, progress=False).perplexity
    assert report["perplexity"]["before"] == pytest.approx(expected_before, rel=1e-4)
    assert report["perplexity"]["after"] == pytest.approx(expected_after, rel=1e-3)
    assert report["perplexity"]["after"] > report["perplexity"]["before"]
    assert torch.isfinite(torch.tensor(report["perplexity"]["after"]))
