"""Speed-aware planning: the alignment chosen from timings, the speed cap per shape, timings stored and replayed."""

import json

import numpy as np
import pytest
import torch

from helpers import run_cli
from lowrank.budget import RankLimits
from lowrank.errors import LowrankError
from lowrank.planner import allocate, matrix_options
from lowrank.profile import MatrixProfile
from lowrank.speed_model import (ShapeTiming, SpeedTable, best_multiple, load_timings, measure_ranks, measure_table,
                                 parse_round_to, predicted_seconds, speed_limit)


def gemm_times(slow_unless_multiple_of: int, penalty: float = 0.3, ranks=range(33, 161)) -> dict[int, float]:
    """A linear trend in the rank, `penalty` slower at every rank that is not a multiple of the given number."""
    return {r: (1e-4 + 1e-5 * r) * (1 if r % slow_unless_multiple_of == 0 else 1 + penalty) for r in ranks}


@pytest.mark.parametrize("multiple", [1, 4, 8, 16, 32])
def test_best_multiple_finds_the_alignment_the_timings_reward(multiple):
    assert best_multiple(gemm_times(multiple)) == multiple


def test_best_multiple_prefers_the_finer_alignment_when_the_coarser_gains_little():
    times = gemm_times(8)
    for r in times:  # multiples of 16 are a further 1% faster: within the tolerance, so 8 still wins
        if r % 16 == 0:
            times[r] *= 0.99
    assert best_multiple(times) == 8
    for r in times:  # 10% faster: worth the coarser grid
        if r % 16 == 0:
            times[r] *= 0.9
    assert best_multiple(times) == 16


def test_speed_limit_is_the_last_rank_faster_than_dense():
    timing = ShapeTiming(dense=1.0, factored={8: 0.2, 16: 0.5, 24: 0.9, 32: 1.1, 40: 0.95})
    assert speed_limit(timing) == 24  # 40 beats dense again, but 32 does not: the cap stops at the first loss
    assert speed_limit(ShapeTiming(dense=1.0, factored={8: 1.2, 16: 1.5})) == 0
    assert timing.time_at(20) == pytest.approx(0.5 + 0.4 * (4 / 8))
    assert timing.time_at(None) == 1.0


def table(shapes: dict) -> SpeedTable:
    return SpeedTable(device="cpu", dtype="float32", tokens=512, threads=1,
                      shapes={shape: ShapeTiming(dense, factored) for shape, (dense, factored) in shapes.items()})


def test_matrix_options_drop_ranks_above_the_speed_cap():
    limits = RankLimits()
    assert matrix_options((16, 16), limits, speed_cap=3).ranks == [1, 2, 3, None]
    assert matrix_options((16, 16), limits, speed_cap=0).ranks == [None]
    assert matrix_options((16, 16), RankLimits(max_rank=4), speed_cap=0).ranks == [1, 2, 3, 4]  # dense not allowed


def profiles():
    sigma = np.linspace(2.0, 0.1, 8)
    a = MatrixProfile("a", (16, 16), torch.as_tensor(np.linspace(3.0, 0.1, 16)))
    b = MatrixProfile("b", (12, 8), torch.as_tensor(sigma))
    return [a, b], {"a": a, "b": b}


def test_speed_keeps_dense_what_the_timings_say_is_slower():
    targets, spectra = profiles()
    without = allocate(targets, 300, "global", spectra)
    assert without["a"].rank is not None  # on parameters alone, a is factored
    slow_a = table({(16, 16): (1.0, {r: 1.5 for r in range(1, 9)}), (12, 8): (1.0, {r: 0.1 * r for r in range(1, 5)})})
    with_speed = allocate(targets, 300, "global", spectra, speed=slow_a)
    assert with_speed["a"].rank is None  # every factored rank of a is slower than dense
    assert with_speed["b"].rank is not None and with_speed["b"].rank <= 4  # b's cap: rank 4 (0.4 < 1.0)
    assert sum(p.params for p in with_speed.values()) <= 300
    with pytest.raises(LowrankError, match="uniform strategy"):
        allocate(targets, 300, "uniform", spectra, speed=slow_a)
    with pytest.raises(LowrankError, match="no timings for a's shape 16x16"):
        allocate(targets, 300, "global", spectra, speed=table({(12, 8): (1.0, {1: 0.1})}))


def test_predicted_seconds_sum_the_table():
    speed = table({(16, 16): (2.0, {4: 0.5, 8: 1.0}), (12, 8): (1.0, {2: 0.25})})
    dense, planned = predicted_seconds({"a": ((16, 16), 6), "b": ((12, 8), None), "c": ((16, 16), None)}, speed)
    assert dense == pytest.approx(5.0) and planned == pytest.approx(0.75 + 1.0 + 2.0)


def test_a_table_survives_json_and_a_bad_one_is_named(tmp_path):
    speed = table({(16, 16): (2.0, {4: 0.5, 8: 1.0})})
    speed.alignment, speed.alignment_shape = gemm_times(8, ranks=range(33, 50)), (16, 16)
    again = SpeedTable.from_dict(json.loads(json.dumps(speed.to_dict())))
    assert again == speed and again.round_to() == speed.round_to() == 8
    broken = speed.to_dict()
    broken["shapes"]["16x16"]["dense"] = -1
    (tmp_path / "t.json").write_text(json.dumps(broken))
    with pytest.raises(LowrankError, match="not a valid speed table"):
        load_timings(str(tmp_path / "t.json"))
    assert SpeedTable(device="cuda:0", dtype="float16", tokens=1, threads=1).round_to() == 8


def test_round_to_parsing():
    assert parse_round_to("auto") == "auto" and parse_round_to("8") == 8 and parse_round_to(16) == 16
    for bad in ("0", "eight", "-8"):
        with pytest.raises(LowrankError, match="--round-to must be a positive integer or auto"):
            parse_round_to(bad)


def test_measured_timings_have_every_shape_and_rank(one_thread):
    measured = measure_table([(24, 16), (24, 16), (16, 24)], tokens=8, step=4, repeats=1, progress=False)
    assert set(measured.shapes) == {(24, 16), (16, 24)}
    assert sorted(measured.shapes[(24, 16)].factored) == [4, 8, 12]  # break-even 10: up to the first multiple past it
    assert all(t > 0 for t in measured.shapes[(24, 16)].factored.values()) and measured.alignment == {}
    exact = measure_ranks({"x": ((24, 16), 5), "y": ((16, 24), None)}, tokens=8, repeats=1)
    assert sorted(exact.shapes[(24, 16)].factored) == [5] and exact.shapes[(16, 24)].dense > 0


# ---- the CLI: plan --speed / --round-to auto, the timings stored, planning again from them ---------------

def test_plan_speed_stores_timings_and_replays_the_same_ranks(tiny_model_folder, tmp_path, capsys, one_thread):
    profile_file = tmp_path / "tiny.safetensors"
    code, _, _ = run_cli(capsys, "profile", tiny_model_folder, "--samples", "4", "--seq-len", "32",
                         "--sensitivity-samples", "2", "-o", profile_file, "--quiet")
    assert code == 0
    first, again = tmp_path / "first.json", tmp_path / "again.json"
    code, _, err = run_cli(capsys, "plan", "--profile", profile_file, "--budget", "0.6", "--speed", "--round-to",
                           "auto", "--device", "cpu", "-o", first, "--quiet")
    assert code == 0, err
    plan = json.loads(first.read_text())
    stored = SpeedTable.from_dict(plan["options"]["timings"])
    assert plan["options"]["speed"] is True and plan["options"]["round_to_auto"] is True
    assert plan["options"]["round_to"] == stored.round_to()
    for name, module in plan["modules"].items():
        cap = stored.limit(tuple(module["shape"]))
        assert module["rank"] is None or module["rank"] <= cap, name
    # the first shape's timings edited to make it slower factored at every rank: planning again keeps it dense
    for key, timing in plan["options"]["timings"]["shapes"].items():
        timing["factored"] = {r: 2 * timing["dense"] for r in timing["factored"]}
        break
    slow_shape = tuple(int(v) for v in key.split("x"))
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(plan))
    code, _, err = run_cli(capsys, "plan", "--profile", profile_file, "--budget", "0.8", "--speed", "--timings",
                           edited, "-o", again, "--quiet")
    assert code == 0, err
    replanned = json.loads(again.read_text())
    assert all(m["rank"] is None for m in replanned["modules"].values() if tuple(m["shape"]) == slow_shape)
    code, _, _ = run_cli(capsys, "plan", "--profile", profile_file, "--budget", "0.6", "--speed", "--round-to",
                         "auto", "--timings", first, "-o", tmp_path / "replay.json", "--quiet")
    assert code == 0
    assert json.loads((tmp_path / "replay.json").read_text())["modules"] == plan["modules"]  # same ranks, no timing


def test_plan_speed_bad_inputs(tiny_model_folder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", "--timings", tmp_path / "x.json", "-o", tmp_path / "p.json")
    assert code != 0 and "--timings feeds --speed or --round-to auto" in err
    code, _, err = run_cli(capsys, "plan", "--round-to", "fast", "-o", tmp_path / "p.json")
    assert code != 0 and "--round-to must be a positive integer or auto" in err
    code, _, err = run_cli(capsys, "plan", "--speed", "--max-rank", "4", "-o", tmp_path / "p.json")
    assert code != 0 and "drop one of them" in err


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_compress_round_to_auto_rounds_to_the_measured_multiple(tiny_model_folder, tmp_path, capsys, one_thread,
                                                                 stream):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compress", tiny_model_folder, "--round-to", "auto", stream, "--samples", "4",
                           "--seq-len", "32", "--device", "cpu", "-o", out, "-q")
    assert code == 0, err
    plan = json.loads((out / "lowrank_plan.json").read_text())
    multiple = plan["options"]["round_to"]
    assert plan["options"]["round_to_auto"] is True
    assert multiple == SpeedTable.from_dict(plan["options"]["timings"]).round_to()
    ranks = [m["rank"] for m in plan["modules"].values() if m["rank"]]
    assert ranks and all(rank % multiple == 0 for rank in ranks)
    assert json.loads((out / "lowrank_config.json").read_text())["compress"]["round_to"] == "auto"  # as asked
    again = tmp_path / "again"  # replaying the plan gives the same ranks, without timing again
    code, _, err = run_cli(capsys, "compress", tiny_model_folder, "--plan", out / "lowrank_plan.json", stream,
                           "--samples", "4", "--seq-len", "32", "-o", again, "-q")
    assert code == 0, err
    assert json.loads((again / "lowrank_plan.json").read_text())["modules"] == plan["modules"]
