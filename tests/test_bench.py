"""`lowrank bench`: dense against compressed timings, memory and file sizes on tiny folders."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_tiny_model, random_windows, run_cli
from lowrank.bench import measure_speed, parameter_bytes, peak_memory, weight_file_bytes
from lowrank.config import BenchConfig
from lowrank.errors import LowrankError


@pytest.fixture
def compressed_folder(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "compressed"
    code, _, stderr = run_cli(capsys, "compress", tiny_model_folder, "--ratio", "0.5", "--samples", "4",
                              "--seq-len", "32", "-o", out, "--quiet")
    assert code == 0, stderr
    return out


def test_measure_speed_reports_medians_of_the_timed_runs():
    models = {"a": make_tiny_model("llama"), "b": make_tiny_model("gpt2")}
    results = measure_speed(models, random_windows(4, 16), [1, 4], new_tokens=3, repeats=3, warmup=1, progress=False)
    for rows in results.values():
        assert [r.batch_size for r in rows] == [1, 4]
        for r in rows:
            assert len(r.prefill_runs) == 3 and len(r.decode_runs) == 3
            assert r.prefill_seconds == sorted(r.prefill_runs)[1]
            assert r.decode_tokens_per_second == pytest.approx(r.batch_size * 3 / sorted(r.decode_runs)[1])


def test_parameter_bytes_counts_tied_weights_once():
    model = make_tiny_model("gpt2")  # GPT-2 ties its head to the token embedding
    expected = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                                                           [*model.parameters(), *model.buffers()]}.values())
    assert parameter_bytes(model) == expected
    assert parameter_bytes(model.to(torch.bfloat16)) < expected


def test_bench_cli_dense_against_compressed(compressed_folder, tiny_model_folder, tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "bench", compressed_folder, "--batch-sizes", "1,2", "--seq-len", "16",
                                   "--new-tokens", "3", "--repeats", "2", "--warmup", "1", "--no-memory", "--quiet",
                                   "--json", tmp_path / "bench.json")
    assert code == 0, stderr
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["dense"] == str(tiny_model_folder) and record["memory"] is None
    sizes = {name: sum(f.stat().st_size for f in folder.glob("*.safetensors"))
             for name, folder in (("dense", tiny_model_folder), ("compressed", compressed_folder))}
    assert record["file_bytes"] == sizes and sizes["compressed"] < sizes["dense"]
    for name in ("dense", "compressed"):
        assert [row["batch_size"] for row in record["speed"][name]] == [1, 2]
        assert all(len(row["prefill_runs"]) == 2 and row["prefill_seconds"] > 0 for row in record["speed"][name])
    assert stdout.count("| compressed |") == 2 and "| dense | 2 |" in stdout
    assert [row["batch_size"] for row in record["predicted"]] == [1, 2]
    assert record["clock"] == ("CPU time of the computing thread" if torch.get_num_threads() == 1 else "wall time")
    for row, dense in zip(record["predicted"], record["speed"]["dense"]):
        # the prediction swaps the linear layers' timed dense total for their factored total inside the dense prefill
        expected = (dense["prefill_seconds"] - row["linear_dense_seconds"] + row["linear_planned_seconds"]) \
            / dense["prefill_seconds"]
        assert row["predicted_prefill_ratio"] == pytest.approx(expected) and row["tokens"] == 16 * row["batch_size"]
        assert row["linear_ratio"] == pytest.approx(row["linear_planned_seconds"] / row["linear_dense_seconds"])


def test_bench_on_one_thread_times_cpu_time_and_restores_threads(compressed_folder, capsys):
    before = torch.get_num_threads()
    code, stdout, stderr = run_cli(capsys, "bench", compressed_folder, "--batch-sizes", "1", "--seq-len", "8",
                                   "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--no-memory",
                                   "--no-predict", "--threads", "1", "--quiet")
    assert code == 0, stderr
    assert "1 threads (CPU time of the computing thread)" in stdout and "prefill predicted" not in stdout
    assert torch.get_num_threads() == before


def test_peak_memory_is_at_least_the_weights(compressed_folder):
    memory = peak_memory(str(compressed_folder), [2], seq_len=16, new_tokens=2, dtype="float32", device="cpu")
    assert memory["peak_mib"]["2"] >= memory["weights_mib"] > 0


def test_weight_file_bytes_of_a_model_without_safetensors_files(tmp_path):
    model = make_tiny_model("llama")
    size, how = weight_file_bytes(str(tmp_path / "nothing-here"), model)
    assert how == "saved as safetensors" and parameter_bytes(model) < size < parameter_bytes(model) + 64 * 1024


def test_bad_bench_config_is_one_line():
    with pytest.raises(LowrankError, match="--batch-sizes 'x'"):
        BenchConfig(batch_sizes=["1", "x"])
    with pytest.raises(LowrankError, match="--repeats must be at least 1"):
        BenchConfig(repeats=0)
    with pytest.raises(LowrankError, match="--threads must be at least 1"):
        BenchConfig(threads=0)


def test_linear_macs_count_factors_by_rank():
    from lowrank.bench import linear_macs_per_token
    from lowrank.compression import compress_model

    model = make_tiny_model("llama")  # hidden 48, intermediate 96, 2 layers; k/v project to 2 heads × 12 = 24
    per_layer = 48 * 48 * 2 + 48 * 24 * 2 + 48 * 96 * 3
    assert linear_macs_per_token(model) == 2 * per_layer
    plan = compress_model(model, ratio=0.5, method="svd", strategy="uniform", progress=False)
    expected = sum(m.params for m in plan.modules.values())  # a matrix's MACs per token are its parameters
    assert linear_macs_per_token(model) == expected < 2 * per_layer
