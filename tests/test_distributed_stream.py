"""Streamed compression (`--stream`) on two gloo ranks gives what one process gives, streamed or in memory;
each rank spills to its own subfolder of --offload-dir; an interrupted 2-rank run resumes on 2 ranks or on
one process; a rank that fails ends both with one line, no output and no rank's spill folder left.

The ranks are real processes (see test_distributed.py); every test waits for them to exit, and the
one look inside a running job waits for a log record rank 0 produces (a paused child), not for time.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import PROBE, start_cli_paused_at, wait_until_paused
from test_distributed import (GUARD_S, _env, assert_same_compression, compress_args, error_lines, free_port,
                              lowrank, one_process, ranks, relative, tiny)

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_process", "tiny"]  # module fixtures shared with test_distributed


def spill_limit(tiny: Path) -> str:
    """A --max-memory that leaves no room for boundary activations: every one of them spills to --offload-dir."""
    from lowrank.block_source import BlockSource
    from lowrank.stream_memory import estimate
    from lowrank.targets import find_targets

    source = BlockSource(tiny, torch.float32)
    est = estimate(source, find_targets(source.model), torch.zeros(8, 16, dtype=torch.long), True, 8, batch_size=2)
    return str(est.total(0))  # the estimate without activations: the cap on them is 0 bytes


def stream_args(tiny: Path, offload: Path, *extra: str) -> list[str]:
    return [*compress_args(tiny), "--stream", "--offload-dir", str(offload), "--max-memory", spill_limit(tiny), *extra]


@pytest.fixture(scope="module")
def one_streamed(tiny) -> Path:
    """The folder one process makes, streamed."""
    result = lowrank(*compress_args(tiny), "--stream", "-o", "one-streamed", cwd=tiny.parent)
    assert result.returncode == 0, result.stderr
    return tiny.parent / "one-streamed"


def shard_products(folder: Path) -> dict[str, torch.Tensor]:
    """up·down of every factored layer (float64) and every other tensor, from all the folder's shards."""
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update({k: v.to(torch.float64) for k, v in load_file(shard).items()})
    return {k.removesuffix(".up.weight"): v @ weights[k.removesuffix("up.weight") + "down.weight"]
            if k.endswith(".up.weight") else v for k, v in weights.items() if not k.endswith(".down.weight")}


def assert_same_sharded(one: Path, two: Path) -> None:
    """Same ranks, up·down and block outputs (1e-6 relative) for folders written in several shards."""
    import lowrank as lr

    ranks_of = lambda folder: {n: m["rank"] for n, m in json.loads((folder / "lowrank_plan.json").read_text())
                               ["modules"].items()}
    assert ranks_of(one) == ranks_of(two) and any(ranks_of(one).values())
    a, b = shard_products(one), shard_products(two)
    assert a.keys() == b.keys()
    for key in a:
        assert relative(b[key], a[key]) < 1e-6, key
    with torch.no_grad():
        out_one = lr.load(one)(input_ids=torch.tensor(PROBE), output_hidden_states=True)
        out_two = lr.load(two)(input_ids=torch.tensor(PROBE), output_hidden_states=True)
    for h1, h2 in zip(out_one.hidden_states, out_two.hidden_states):
        assert relative(h2, h1) < 1e-6


def test_streamed_on_two_ranks_matches_one_process_streamed_and_in_memory(tiny, one_streamed, one_process, tmp_path):
    """`--stream --nproc 2`, every boundary spilled: the same compression as one process, streamed or not."""
    offload = tmp_path / "offload"
    two = lowrank(*stream_args(tiny, offload), "-o", "two", "--nproc", "2", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert len(two.stdout.strip().splitlines()) == 1, "only rank 0 prints the result"
    assert json.loads((tmp_path / "two" / "lowrank_plan.json").read_text())["options"]["streamed"] is True
    assert_same_compression(one_streamed, tmp_path / "two")
    assert_same_compression(one_process, tmp_path / "two")
    assert list(offload.iterdir()) == [], "each rank removes its own rank-K subfolder"
    assert not list(tmp_path.glob(".*partial*"))


@pytest.fixture(scope="module")
def interrupted(tiny, tmp_path_factory) -> tuple[Path, list[str]]:
    """A 2-rank streamed run, Ctrl-C on rank 0 right after it saved the boundary behind block 0.

    While rank 0 is paused there (rank 1 waits for it in a collective), each rank's own subfolder
    of --offload-dir holds its spilled boundary batches.
    """
    where = tmp_path_factory.mktemp("interrupted")
    args = [*stream_args(tiny, where / "offload", "--max-shard-size", "1"), "-o", str(where / "out")]
    port = str(free_port())
    env = [_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port) for r in range(2)]
    rank0 = start_cli_paused_at(r"^saved the boundary after block 0,", *args, env=env[0])
    rank1 = subprocess.Popen([sys.executable, "-m", "lowrank", *args], env=env[1], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert "gathered from 2 ranks" in wait_until_paused(rank0)
        spilled = {r: list((where / "offload" / f"rank-{r}").rglob("boundary-*.safetensors")) for r in range(2)}
        rank0.send_signal(signal.SIGINT)
        _, err0 = rank0.communicate(timeout=GUARD_S)
        _, err1 = rank1.communicate(timeout=GUARD_S)
    finally:
        rank0.kill()
        rank1.kill()
    assert spilled[0] and spilled[1], "each rank spills its own batches into its own rank-K folder"
    assert rank0.returncode == 130 and rank1.returncode != 0, err0 + err1
    partial = where / ".out.partial"
    assert [line for line in (err0 + err1).splitlines() if line.startswith("error:")] == [
        f"error: interrupted; the finished blocks are kept in {partial} (rerun with --resume to continue, or delete "
        "it); the input is untouched"]
    assert not (where / "out").exists() and list((where / "offload").iterdir()) == []
    assert json.loads((partial / "progress.json").read_text())["blocks"] == [0]
    assert (partial / "boundary.safetensors").is_file()
    shutil.copytree(partial, where / "spare" / partial.name)  # for the resume on one process
    return where, args


def test_an_interrupted_two_rank_stream_resumes_on_two_ranks(interrupted, one_streamed):
    where, args = interrupted
    resumed = ranks([[*args, "--resume"]] * 2, cwd=where)
    assert all(r.returncode == 0 for r in resumed), resumed[0].stderr + resumed[1].stderr
    assert_same_sharded(one_streamed, where / "out")


def test_what_two_ranks_left_resumes_on_one_process(interrupted, one_streamed, tmp_path):
    """The saved boundary is in one process's batch order, whatever the number of ranks that wrote it."""
    where, args = interrupted
    shutil.copytree(where / "spare" / ".out.partial", tmp_path / ".out.partial")
    args = [a if a != str(where / "out") else str(tmp_path / "out") for a in args]
    resumed = lowrank(*args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_sharded(one_streamed, tmp_path / "out")


def test_a_rank_that_fails_in_a_streamed_run_ends_both_and_leaves_no_spill(tiny, tmp_path):
    """Rank 1 cannot create its offload subfolder once the run started: one line, both exit ≠ 0, no output, no
    rank folder left.

    Rank 0's partial folder stays (it holds only what rank 0 wrote and checked, for --resume).
    """
    (tmp_path / "a-file").write_text("x")
    not_a_folder = tmp_path / "a-file" / "offload"  # as on a node whose offload disk is not there
    offload = tmp_path / "offload"
    results = ranks([[*stream_args(tiny, offload), "-o", "out"],
                     [*stream_args(tiny, not_a_folder), "-o", "out"]], cwd=tmp_path)
    assert all(r.returncode != 0 for r in results)
    assert error_lines(*results) == [f"error: rank 1: cannot write in --offload-dir {not_a_folder / 'rank-1'} "
                                     "(Not a directory); pass a writable folder"]
    assert not any("Traceback" in r.stderr for r in results)
    assert not (tmp_path / "out").exists()
    assert list(offload.iterdir()) == [], "rank 0 removed its rank-0 folder"
    assert sorted(p.name for p in (tmp_path / ".out.partial").iterdir()) == ["run.json"]


def test_streamed_analyze_on_two_ranks_matches_one_process(tiny, tmp_path):
    """`analyze --calib --stream` on 2 ranks, every boundary spilled to its rank's folder: the same report."""
    from test_distributed import CALIBRATION, calib

    common = ["analyze", str(tiny), "--calib", calib(tiny), *CALIBRATION, "--stream", "-q"]
    one = lowrank(*common, "-o", "one", cwd=tmp_path)
    offload = tmp_path / "offload"
    two = ranks([[*common, "--offload-dir", str(offload), "--max-memory", spill_limit(tiny), "-o", "two"]] * 2,
                cwd=tmp_path)
    assert one.returncode == 0 and all(r.returncode == 0 for r in two), one.stderr + two[0].stderr + two[1].stderr
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    for report in (a, b):
        del report["options"]["seconds"]  # the stages' wall times
    assert a["whitened"] and a == b
    assert list(offload.iterdir()) == []
