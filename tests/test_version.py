"""One version number: the package, its metadata (pyproject.toml) and what it records in its files agree."""

import tomllib
from pathlib import Path

import lowrank
from lowrank.version import __version__


def test_version_is_the_one_in_pyproject():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert __version__ == pyproject["project"]["version"] == lowrank.__version__


def test_plans_and_profiles_record_it(tiny_llama):
    from lowrank.compression import compress_model
    from lowrank.profiling import profile_model

    plan = compress_model(tiny_llama, ratio=0.6, method="svd", progress=False)
    assert plan.tool_version == __version__
    assert profile_model(tiny_llama).metadata()["tool_version"] == __version__
