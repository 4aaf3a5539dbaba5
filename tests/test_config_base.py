"""What every config shares (lowrank.config_base): typed fields, dict round trips, one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from lowrank.config_base import (CONFIG_VERSION, ConfigBase, at_least, check_dtype_and_device, check_regex,
                                 resolve_device, torch_dtype)
from lowrank.errors import LowrankError


@dataclass
class ToyConfig(ConfigBase):
    """A config of every field kind the real ones use."""

    SECTION = "toy"
    version: int = CONFIG_VERSION
    rate: float = 0.5
    steps: int = 3
    name: str | None = None
    texts: list[str] = field(default_factory=list)
    dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self) -> None:
        self._check_types()
        at_least(self.SECTION, "steps", self.steps, 1)
        check_dtype_and_device(self)


def test_round_trip_fills_defaults_and_converts_ints_for_floats():
    config = ToyConfig.from_dict({"rate": 1, "texts": ("a.txt",)})
    assert config.rate == 1.0 and isinstance(config.rate, float)
    assert config.texts == ["a.txt"]
    assert ToyConfig.from_dict(config.to_dict()) == config
    assert config.to_dict() == {"version": CONFIG_VERSION, "rate": 1.0, "steps": 3, "name": None, "texts": ["a.txt"],
                                "dtype": "float32", "device": "auto"}


@pytest.mark.parametrize("data, message", [
    ({"steps": "many"}, r"^toy.steps must be an integer, got 'many'$"),
    ({"stepz": 2}, r"^unknown key toy.stepz; valid keys: version, rate, steps, name, texts, dtype, device$"),
    ({"steps": 0}, r"^toy.steps must be at least 1, got 0$"),
    ({"dtype": "float8"}, r"^toy.dtype 'float8' is unknown; choose one of float32, float16, bfloat16$"),
    ({"version": CONFIG_VERSION + 1}, r"^toy.version 2 is not supported"),
    ([1, 2], r"^toy must be a mapping of settings, got list"),
])
def test_bad_values_are_one_line_errors_naming_the_field(data, message):
    with pytest.raises(LowrankError, match=message):
        ToyConfig.from_dict(data)


def test_errors_name_the_place_the_config_came_from():
    with pytest.raises(LowrankError, match=r"^recipe.toy.steps must be at least 1, got 0$"):
        ToyConfig.from_dict({"steps": 0}, where="recipe.toy")


def test_replace_validates_like_a_new_config():
    assert ToyConfig().replace(steps=5).steps == 5
    with pytest.raises(LowrankError, match="at least 1"):
        ToyConfig().replace(steps=-1)


def test_regex_dtype_and_device_names():
    check_regex("toy", "--include", r"q_proj|k_proj")
    with pytest.raises(LowrankError, match=r"^--include '\(q' is not a valid regular expression"):
        check_regex("toy", "--include", "(q")
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("float16") is torch.float16
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LowrankError, match="CUDA is not available; use --device cpu"):
            resolve_device("cuda:1")
