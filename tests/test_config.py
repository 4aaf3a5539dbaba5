"""The stage configs: defaults in one place, validation, dict round trips, and the CLI built on them."""

from __future__ import annotations

import dataclasses
import inspect
import json

import click
import pytest

from helpers import run_cli, save_tiny_model
from lowrank import api
from lowrank.bench import benchmark
from lowrank.cli import cli
from lowrank.config import (CONFIG_CLASSES, CONFIG_FILE, DEFAULT_LR, CalibrationConfig, CompressConfig, EvalConfig,
                            RecoveryConfig)
from lowrank.errors import LowrankError

UNSET = getattr(click.core, "UNSET", object())

#: Each command, the entry point it calls (whose keyword defaults its CLI-only options must share).
COMMANDS = {"compress": api.compress, "recover": api.recover, "eval": api.evaluate, "bench": benchmark}
#: CLI option name → entry-point keyword, where they differ.
ENTRY_NAMES = {"tokenizer_source": "tokenizer"}


def field_default(cls, name):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_cli_option_is_a_config_field_with_the_same_default(name):
    import importlib

    module = importlib.import_module(f"lowrank.cli.{name}_cmd")
    command = cli.commands[name]
    entry = inspect.signature(COMMANDS[name]).parameters
    checked = []
    context = click.Context(command)
    for param in command.params:
        default = param.get_default(context)
        if default is UNSET:  # click ≥ 8.2 marks "no default given": the command then receives () or None
            default = None
        default = list(default or ()) if getattr(param, "multiple", False) else default
        if param.name in module.CLI_ONLY:
            if isinstance(param, click.Option):  # -o, --overwrite, --quiet, loading switches: entry-point keywords
                keyword = ENTRY_NAMES.get(param.name, param.name)
                if keyword in entry and not param.required:
                    assert default == entry[keyword].default, \
                        f"--{param.name} defaults to {default!r} but {keyword}= to {entry[keyword].default!r}"
            continue
        owners = [cls for cls in module.CONFIGS if param.name in {f.name for f in dataclasses.fields(cls)}]
        assert owners, f"`lowrank {name}` option {param.name} is neither a config field nor listed in CLI_ONLY"
        expected = field_default(owners[0], param.name)
        if isinstance(expected, list) and isinstance(default, str):  # a comma-separated option (--batch-sizes 1,8)
            default = default.split(",")
        assert default == expected, f"--{param.name}: CLI default {default!r}, {owners[0].__name__} default {expected!r}"
        checked.append(param.name)
    assert len(checked) >= 4


def test_the_drifted_defaults_are_one_value_now():
    """checkpoint_every was 50 in the CLI and 0 in the API; the LoRA lr 1e-3 in the CLI and 1e-4 in the API."""
    assert RecoveryConfig().checkpoint_every == 50
    assert RecoveryConfig().lr == DEFAULT_LR["factors"] == 1e-4
    assert RecoveryConfig(mode="lora").lr == DEFAULT_LR["lora"] == 1e-3
    assert RecoveryConfig(mode="lora", lr=5e-4).lr == 5e-4


@pytest.mark.parametrize("cls", list(CONFIG_CLASSES.values()))
def test_dict_round_trip_and_version(cls):
    config = cls()
    data = config.to_dict()
    assert data["version"] == 1
    assert cls.from_dict(json.loads(json.dumps(data))) == config


@pytest.mark.parametrize("cls, data, message", [
    (CompressConfig, {"ratoi": 0.5}, r"unknown key compress.ratoi; valid keys: version, method, ratio"),
    (CompressConfig, {"ratio": "0.5"}, r"compress.ratio must be a number, got '0.5'"),
    (CompressConfig, {"ratio": 1.5}, r"ratio 1.5 is outside \(0, 1\]"),
    (CompressConfig, {"method": "pca"}, r"unknown method 'pca'; choose one of whiten, asvd, svd"),
    (CompressConfig, {"strategy": "best"}, r"unknown strategy 'best'; choose one of uniform"),
    (CompressConfig, {"sequential": "yes"}, r"compress.sequential must be true or false"),
    (CompressConfig, {"round_to": 0}, r"--round-to must be a positive integer"),
    (CompressConfig, {"budget": "banana"}, r"'banana' is not a parameter count"),
    (CompressConfig, {"include": "(q"}, r"not a valid regular expression"),
    (CompressConfig, {"dtype": "int8"}, r"compress.dtype 'int8' is unknown; choose one of float32"),
    (CompressConfig, {"version": 2}, r"compress.version 2 is not supported"),
    (CalibrationConfig, {"samples": 0}, r"--samples must be at least 1"),
    (CalibrationConfig, {"texts": "hamlet.txt"}, r"calibration.texts must be a list of strings"),
    (RecoveryConfig, {"mode": "full"}, r"unknown --mode 'full'; choose one of factors, lora"),
    (RecoveryConfig, {"steps": 2.5}, r"recover.steps must be an integer, got 2.5"),
    (EvalConfig, {"max_windows": 0}, r"--max-windows must be at least 1"),
    (EvalConfig, [1, 2], r"eval must be a mapping of settings"),
])
def test_bad_values_are_one_line_errors_naming_the_field(cls, data, message):
    with pytest.raises(LowrankError, match=message) as err:
        cls.from_dict(data)
    assert "\n" not in str(err.value)


def test_ints_become_floats_and_tuples_lists():
    assert CompressConfig(ratio=1).ratio == 1.0 and isinstance(CompressConfig(ratio=1).ratio, float)
    assert CalibrationConfig(texts=("a.txt",)).texts == ["a.txt"]


def test_the_config_used_is_saved_and_reported(tmp_path, capsys):
    model = tmp_path / "tiny"
    save_tiny_model(model)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compress", str(model), "--ratio", "0.6", "--samples", "4", "--seq-len", "32",
                           "--round-to", "2", "-o", str(out), "-q")
    assert code == 0, err
    record = json.loads((out / CONFIG_FILE).read_text())
    assert CompressConfig.from_dict(record["compress"]) == CompressConfig(ratio=0.6, round_to=2)
    assert CalibrationConfig.from_dict(record["calibration"]) == CalibrationConfig(samples=4, seq_len=32)
    code, stdout, err = run_cli(capsys, "report", str(out), "-o", str(tmp_path / "rep"))
    assert code == 0, err
    assert "compress config: method=whiten, ratio=0.6" in stdout and "round_to=2" in stdout
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["config"]["compress"]["ratio"] == 0.6
    assert "- calibration config: texts=[], samples=4, seq_len=32" in (tmp_path / "rep" / "report.md").read_text()


def test_config_rejects_bad_options_with_one_line():
    for bad in (dict(mode="full"), dict(loss="l1"), dict(steps=0), dict(lr=-1.0), dict(temperature=0.0),
                dict(seq_len=1), dict(distill_weight=1.5)):
        with pytest.raises(LowrankError) as err:
            RecoveryConfig(**bad).validate()
        assert "\n" not in str(err.value)
