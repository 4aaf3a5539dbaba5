"""Two gloo ranks give what one process gives: compress (whiten, sensitivity planner, sequential + update),
recover (DDP), and analyze; a rank that fails ends both with one line and nothing written.

The ranks are real processes: `lowrank ... --nproc 2` (torchrun, through torch.distributed.run) or
two `python -m lowrank` processes given the environment torchrun and accelerate set (RANK,
WORLD_SIZE, MASTER_ADDR, ...). Every test waits for the processes to exit, nothing else.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import PROBE, REPO, save_tiny_model
from lowrank import distributed

pytestmark = pytest.mark.usefixtures("one_thread")

#: 4 calibration batches of 2 windows, so each of 2 ranks holds 2 (and the sensitivity pass 2 of 4).
CALIBRATION = ["--samples", "8", "--seq-len", "16", "--batch-size", "2"]
#: A guard against a bug that hangs: far above the seconds a test takes, and a failure if reached.
GUARD_S = 240


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           distributed.TIMEOUT_ENV: "60", **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in extra:
            env.pop(name, None)
    return env


def lowrank(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m lowrank ARGS` in one process (with --nproc it starts torchrun itself); `env`: extra variables."""
    return subprocess.run([sys.executable, "-m", "lowrank", *args], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=GUARD_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(per_rank_args: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """One `python -m lowrank` per entry, as the ranks of one job (the environment torchrun/accelerate set)."""
    port, world = str(free_port()), str(len(per_rank_args))
    processes = [subprocess.Popen([sys.executable, "-m", "lowrank", *args], cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for r, args in enumerate(per_rank_args)]
    done = []
    for args, process in zip(per_rank_args, processes):
        out, err = process.communicate(timeout=GUARD_S)
        done.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return done


def error_lines(*results: subprocess.CompletedProcess) -> list[str]:
    return [line for r in results for line in r.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist") / "tiny"
    save_tiny_model(folder)
    text = tmp_path_factory.getbasetemp() / "calib.txt"
    text.write_text((REPO / "lowrank" / "data" / "texts" / "hamlet.txt").read_text(encoding="utf-8")[:20000])
    return folder


def calib(tiny: Path) -> str:
    return str(tiny.parents[1] / "calib.txt")


def products(folder: Path) -> dict[str, torch.Tensor]:
    """up·down of every factored layer (float64), and every other tensor as saved."""
    weights = {k: v.to(torch.float64) for k, v in load_file(folder / "model.safetensors").items()}
    out = {}
    for key, value in weights.items():
        if key.endswith(".up.weight"):
            out[key.removesuffix(".up.weight")] = value @ weights[key.removesuffix("up.weight") + "down.weight"]
        elif not key.endswith(".down.weight"):
            out[key] = value
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


# ---- the pure pieces ------------------------------------------------------------------------

def test_owners_balance_the_work_and_one_process_owns_everything():
    assert distributed.owners([5.0, 1.0, 1.0]) == [0, 0, 0]  # one process
    assert distributed.owners([5.0, 4.0, 3.0, 3.0, 1.0], ranks=2) == [0, 1, 1, 0, 1]  # loads 8 and 8
    assert distributed.owners([1.0, 1.0, 1.0, 1.0], ranks=3) == [0, 1, 2, 0]
    assert distributed.my_share(list(range(5))) == [0, 1, 2, 3, 4]


def test_strip_option_hands_the_rest_of_the_command_to_torchrun():
    argv = ["compress", "m", "--nproc", "2", "-o", "out", "--nproc=3", "-q"]
    assert distributed.strip_option(argv, "--nproc") == ["compress", "m", "-o", "out", "-q"]


@pytest.mark.parametrize("objective", ["embedding", "mlm"])
def test_skipping_another_ranks_batch_draws_what_its_backward_pass_draws(objective):
    """The seed gives the same probes and masks for any number of ranks: skipped batches advance the generator alike."""
    from helpers import make_tiny_model, random_windows
    from lowrank.sensitivity import BACKWARD, skip_draws

    model, batch = make_tiny_model("bert"), random_windows(3, 12)
    model.config.mask_token_id = 4  # the tiny vocabulary has no id 103
    ran, skipped = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    BACKWARD[objective](model, batch, ran)
    skip_draws(objective, model, batch, skipped)
    assert torch.equal(ran.get_state(), skipped.get_state())
    assert not torch.equal(skipped.get_state(), torch.Generator().manual_seed(7).get_state())


# ---- two ranks against one process ----------------------------------------------------------------

def compress_args(tiny: Path) -> list[str]:
    """whiten + sensitivity planner + sequential + update (the defaults, spelled out), the planner and the
    update each on a share of the windows, as the defaults are on 64 (the ranks' batches interleave); the
    prices on 3 windows, two batches of unequal size, one per rank."""
    return ["compress", str(tiny), "--calib", calib(tiny), *CALIBRATION, "--ratio", "0.6", "--method", "whiten",
            "--strategy", "sensitivity", "--sequential", "--update", "--plan-samples", "4", "--update-samples", "6",
            "--sensitivity-samples", "3", "-q"]


@pytest.fixture(scope="module")
def one_process(tiny) -> Path:
    """The compressed folder one process makes."""
    result = lowrank(*compress_args(tiny), "-o", "one", cwd=tiny.parent)
    assert result.returncode == 0, result.stderr
    return tiny.parent / "one"


def assert_same_compression(one: Path, two: Path) -> None:
    """Same ranks, same up·down of every layer and same output of every block (1e-6 relative)."""
    plan_one = json.loads((one / "lowrank_plan.json").read_text())
    plan_two = json.loads((two / "lowrank_plan.json").read_text())
    assert {n: m["rank"] for n, m in plan_one["modules"].items()} == \
        {n: m["rank"] for n, m in plan_two["modules"].items()}
    assert plan_one["strategy"] == "sensitivity" and any(m["rank"] for m in plan_one["modules"].values())
    for key in ("plan_samples", "update_samples", "sensitivity_samples"):  # the windows each stage read
        assert plan_two["options"].get(key) == plan_one["options"].get(key), key
    a, b = products(one), products(two)
    assert a.keys() == b.keys()
    factored = [k for k in a if not k.endswith("weight") and not k.endswith("bias")]
    assert factored, "no layer was factored"
    for key in a:
        assert relative(b[key], a[key]) < 1e-6, key
    import lowrank as lr

    with torch.no_grad():
        probe = torch.tensor(PROBE)
        out_one = lr.load(one)(input_ids=probe, output_hidden_states=True)
        out_two = lr.load(two)(input_ids=probe, output_hidden_states=True)
    for h1, h2 in zip(out_one.hidden_states, out_two.hidden_states):  # every block's output
        assert relative(h2, h1) < 1e-6
    assert relative(out_two.logits, out_one.logits) < 1e-6


def test_compress_on_two_ranks_matches_one_process(tiny, one_process, tmp_path):
    """`lowrank compress --nproc 2` (torchrun through torch.distributed.run) against one process.

    torchrun's log folder is the launcher's own and goes with the run: nothing is left in the temporary directory."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    two = lowrank(*compress_args(tiny), "-o", "two", "--nproc", "2", cwd=tmp_path, TMPDIR=str(scratch))
    assert two.returncode == 0, two.stderr
    assert len(two.stdout.strip().splitlines()) == 1, "only rank 0 prints the result"
    assert_same_compression(one_process, tmp_path / "two")
    assert list(scratch.iterdir()) == []


def test_accelerate_launch_matches_one_process(tiny, one_process, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m lowrank compress ...` (torchrun underneath; gloo on CPU)."""
    pytest.importorskip("accelerate")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "lowrank"]
    two = subprocess.run([*launch, *compress_args(tiny), "-o", "two"], cwd=tmp_path, env=_env(TMPDIR=str(tmp_path)),
                         capture_output=True, text=True, timeout=GUARD_S)  # torchrun's log folder: in tmp_path
    assert two.returncode == 0, two.stderr
    assert_same_compression(one_process, tmp_path / "two")


def test_analyze_calib_on_two_ranks_matches_one_process(tiny, tmp_path):
    common = ["analyze", str(tiny), "--calib", calib(tiny), *CALIBRATION, "-q"]
    one = lowrank(*common, "-o", "one", cwd=tmp_path)
    two = ranks([[*common, "-o", "two"]] * 2, cwd=tmp_path)
    assert one.returncode == 0 and all(r.returncode == 0 for r in two), one.stderr + two[0].stderr + two[1].stderr
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert a.keys() == b.keys() and a["whitened"] and b["whitened"]
    assert a == b


RECOVER = ["--steps", "4", "--batch-size", "4", "--seq-len", "16", "--lr", "1e-3", "--loss", "both", "-q"]


@pytest.fixture(scope="module")
def compressed(tiny) -> Path:
    folder = tiny.parent / "compressed"
    made = lowrank("compress", str(tiny), "--calib", calib(tiny), *CALIBRATION, "--ratio", "0.6", "-o", str(folder),
                   "-q", cwd=tiny.parent)
    assert made.returncode == 0, made.stderr
    return folder


@pytest.fixture(scope="module")
def recovered_by_one(tiny, compressed) -> Path:
    """Four steps of recovery (CE + distillation) in one process."""
    out = tiny.parent / "recovered-one"
    one = lowrank("recover", str(compressed), "--data", calib(tiny), *RECOVER, "-o", str(out), cwd=tiny.parent)
    assert one.returncode == 0, one.stderr
    return out


def curve(out: Path) -> list[float]:
    records = [json.loads(line) for line in out.with_name(out.name + ".train.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("event") == "train"]


def test_recover_with_ddp_on_two_ranks_matches_one_process(tiny, compressed, recovered_by_one, tmp_path):
    """The same loss curve (to 1e-4) with the distillation teacher on each rank's own half of every batch."""
    common = ["recover", str(compressed), "--data", calib(tiny), *RECOVER]
    two = ranks([[*common, "-o", "two"]] * 2, cwd=tmp_path)
    assert all(r.returncode == 0 for r in two), two[0].stderr + two[1].stderr
    assert two[1].stdout == "" and two[0].stdout.strip(), "only rank 0 prints the result"
    assert len(curve(recovered_by_one)) == 4
    assert curve(tmp_path / "two") == pytest.approx(curve(recovered_by_one), abs=1e-4, rel=1e-4)
    assert curve(recovered_by_one)[0] != curve(recovered_by_one)[-1]  # it trained
    a, b = products(recovered_by_one), products(tmp_path / "two")
    for key in a:
        assert relative(b[key], a[key]) < 1e-4, key


def test_two_ranks_resume_what_one_process_left(tiny, compressed, recovered_by_one, tmp_path):
    """Ctrl-C after the step-2 checkpoint of a 1-process run; --resume on 2 ranks ends it with the same curve."""
    import signal

    from helpers import start_cli_paused_at, wait_until_paused

    out = tmp_path / "resumed"
    args = ["recover", str(compressed), "--data", calib(tiny), *RECOVER, "--checkpoint-every", "2", "-o", str(out)]
    process = start_cli_paused_at(r"saved a checkpoint at step 2 ", *args, env=_env())
    try:
        assert "saved a checkpoint at step 2" in wait_until_paused(process)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=GUARD_S)
    finally:
        process.kill()
    assert process.returncode == 130 and not out.exists()
    resumed = ranks([[*args, "--resume"]] * 2, cwd=tmp_path)
    assert all(r.returncode == 0 for r in resumed), resumed[0].stderr + resumed[1].stderr
    assert curve(out) == pytest.approx(curve(recovered_by_one), abs=1e-4, rel=1e-4)
    assert not out.with_name(out.name + ".checkpoint").exists()


# ---- failing together -------------------------------------------------------------------------------

def test_a_rank_that_reads_a_bad_file_ends_both_with_one_line(tiny, tmp_path):
    bad = tmp_path / "weights.txt"
    bad.write_bytes(b"\x00\x01binary" * 100)
    common = ["compress", str(tiny), *CALIBRATION, "-o", "out", "-q"]
    results = ranks([[*common, "--calib", calib(tiny)], [*common, "--calib", str(bad)]], cwd=tmp_path)
    assert all(r.returncode != 0 for r in results)
    assert error_lines(*results) == [f"error: rank 1: {bad} looks like a binary file, not text; pass a .txt file"]
    assert not any("Traceback" in r.stderr for r in results)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*tmp*"))


def test_an_error_every_rank_meets_is_one_line(tiny, tmp_path):
    """An impossible budget fails on both ranks after they joined: one line between them, both exit non-zero."""
    results = ranks([["compress", str(tiny), *CALIBRATION, "--budget", "10", "-o", "out", "-q"]] * 2, cwd=tmp_path)
    assert all(r.returncode != 0 for r in results)
    lines = error_lines(*results)
    assert len(lines) == 1 and "budget" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_rank_that_never_comes_fails_on_the_timeout_not_a_hang(tiny, tmp_path):
    """WORLD_SIZE 2 but only rank 0 started: it gives up after LOWRANK_DIST_TIMEOUT with one line."""
    port = str(free_port())
    result = subprocess.run([sys.executable, "-m", "lowrank", "compress", str(tiny), *CALIBRATION, "-o", "out", "-q"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=GUARD_S,
                            env=_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                     MASTER_PORT=port, **{distributed.TIMEOUT_ENV: "3"}))
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1 and "could not join the other ranks" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
