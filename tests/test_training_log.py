"""A recovery run's JSON-lines log (cut back to the checkpoint on resume) and its loss plot."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from lowrank.training_log import TrainingLog, plot_history

HISTORY = [{"event": "train", "step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 7)] + [
    {"event": "eval", "step": 3, "eval_ppl": 20.0}, {"event": "eval", "step": 6, "eval_ppl": 17.5}]


def steps_in(path) -> list[tuple[str, int]]:
    return [(r["event"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def write_all(log: TrainingLog, records) -> None:
    for record in records:
        log.write(record)
    log.close()


def test_each_record_is_one_line_on_disk_as_soon_as_it_is_written(tmp_path):
    log = TrainingLog(tmp_path / "log.jsonl")
    log.write(HISTORY[0])
    assert json.loads((tmp_path / "log.jsonl").read_text()) == HISTORY[0]  # flushed before close
    write_all(log, HISTORY[1:3])
    assert steps_in(tmp_path / "log.jsonl") == [("train", 1), ("train", 2), ("train", 3)]


def test_a_resumed_log_keeps_the_lines_up_to_the_checkpoint_step_and_appends(tmp_path):
    path = tmp_path / "log.jsonl"
    write_all(TrainingLog(path), HISTORY)
    with path.open("a") as handle:
        handle.write("{torn line\n")  # a run killed mid-write
    write_all(TrainingLog(path, keep_until_step=3), [{"event": "train", "step": 4, "loss": 1.0}])
    assert steps_in(path) == [("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("train", 4)]


def test_a_fresh_run_starts_an_empty_log(tmp_path):
    path = tmp_path / "log.jsonl"
    write_all(TrainingLog(path), HISTORY)
    write_all(TrainingLog(path, keep_until_step=0), HISTORY[:1])
    assert steps_in(path) == [("train", 1)]


def test_no_path_writes_nothing(tmp_path):
    write_all(TrainingLog(None), HISTORY)
    assert list(tmp_path.iterdir()) == []


def test_plot_history_writes_a_700_by_400_png_and_no_temporary_file(tmp_path):
    path = tmp_path / "loss.png"
    plot_history(HISTORY, path, title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[:2] == (400, 700)  # figsize 7×4 inches at 100 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_a_failed_plot_leaves_the_previous_png_untouched(tmp_path):
    path = tmp_path / "loss.png"
    plot_history(HISTORY[:3], path)
    before = path.read_bytes()
    with pytest.raises(KeyError):
        plot_history(HISTORY + [{"event": "eval", "step": 7}], path)  # an eval record without its perplexity
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["loss.png"]
