"""Stage seconds: recorded where the work happens, summed per name, reported by compress_model."""

import pytest
from helpers import make_tiny_model, random_windows

from lowrank.compression import compress_model
from lowrank.stage_times import recording, stage, summary


def test_stages_add_up_inside_a_recording_and_nothing_outside():
    with stage("outside"):
        pass
    with recording() as seconds:
        for _ in range(3):
            with stage("work"):
                sum(range(1000))
        with recording() as inner:  # a nested run keeps its own stages
            with stage("inner"):
                pass
    assert list(seconds) == ["work"] and seconds["work"] > 0 and list(inner) == ["inner"]
    assert summary({"profile_a": 1.0, "profile_b": 2.0, "compress": 4.0}) == {
        "profile": 3.0, "profile_a": 1.0, "profile_b": 2.0, "compress": 4.0}


def test_compress_model_reports_every_stage_and_the_parts_fit_inside_their_stage():
    plan = compress_model(make_tiny_model("llama"), ratio=0.6, windows=random_windows(8, 24), progress=False)
    seconds = plan.options["stage_seconds"]
    assert {"profile_statistics", "profile_sensitivity", "profile_spectra", "planning", "compress_capture",
            "compress_statistics", "compress_factor", "compress_update", "compress_propagate", "compress"} <= set(seconds)
    assert seconds["profile"] == pytest.approx(sum(v for k, v in seconds.items() if k.startswith("profile_")), abs=2e-3)
    assert sum(v for k, v in seconds.items() if k.startswith("compress_")) <= seconds["compress"] + 5e-3
