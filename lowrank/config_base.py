"""What every config has in common: typed fields checked the same way from Python, the CLI and YAML.

`ConfigBase` gives each stage's dataclass its dict round trip (unknown keys and wrong types
refused with the valid choices named) and the small validators they share; `torch_dtype` and
`resolve_device` turn a config's names into torch's. A leaf module: it imports only `errors`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, ClassVar

import torch

from .errors import LowrankError

CONFIG_VERSION = 1
DTYPE_NAMES = ("float32", "float16", "bfloat16")


# ---- typed fields, checked the same way from Python, the CLI and YAML -------------------------

def _type_name(hint: Any) -> str:
    """'an integer', 'a number or null', 'a list of strings', ... for error messages."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if typing.get_origin(hint) is list:
        return "a list of strings"
    if typing.get_origin(hint) is dict:
        return "a mapping of pattern to rank"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is not None and origin not in (list, dict):  # a Union
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _wants_float(hint: Any) -> bool:
    """A float field (possibly optional) that takes no int of its own: ints given to it become floats."""
    args = typing.get_args(hint) if typing.get_origin(hint) not in (list, dict) else ()
    return hint is float or (float in args and int not in args)


class ConfigBase:
    """Type checks, dict round trips and one-line errors shared by every stage's config."""

    SECTION: ClassVar[str] = "config"

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    def _check_types(self) -> None:
        for name, hint in self.field_types().items():
            value = getattr(self, name)
            if not _matches(value, hint):
                raise LowrankError(f"{self.SECTION}.{name} must be {_type_name(hint)}, got {value!r}")
            if _wants_float(hint) and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))  # YAML's `lr: 1` is the number 1.0
            if isinstance(value, tuple):
                object.__setattr__(self, name, list(value))
        if self.version != CONFIG_VERSION:
            raise LowrankError(f"{self.SECTION}.version {self.version} is not supported (this lowrank reads version "
                               f"{CONFIG_VERSION}); upgrade lowrank or write version: {CONFIG_VERSION}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready values, every field included (defaults filled in)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None):
        """The config from a plain dict; unknown keys and wrong types are one-line errors."""
        where = where or cls.SECTION
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise LowrankError(f"{where} must be a mapping of settings, got {type(data).__name__}; "
                               f"valid keys: {', '.join(cls.field_types())}")
        valid = cls.field_types()
        for key in data:
            if key not in valid:
                raise LowrankError(f"unknown key {where}.{key}; valid keys: {', '.join(valid)}")
        try:
            return cls(**data)
        except LowrankError as exc:
            text = str(exc)
            if where != cls.SECTION and text.startswith(f"{cls.SECTION}."):
                text = where + text[len(cls.SECTION):]
            raise LowrankError(text) from None

    def replace(self, **changes):
        """A copy with `changes`, validated like a new config."""
        return dataclasses.replace(self, **changes)


def at_least(section: str, name: str, value: int | None, low: int, flag: str | None = None) -> None:
    if value is not None and value < low:
        what = flag or f"{section}.{name}"
        raise LowrankError(f"{what} must be at least {low}, got {value}")


def check_regex(section: str, flag: str, pattern: str | None) -> None:
    try:
        re.compile(pattern or "")
    except re.error as exc:
        raise LowrankError(f"{flag} {pattern!r} is not a valid regular expression ({exc})") from None


def check_dtype_and_device(config) -> None:
    if config.dtype not in DTYPE_NAMES:
        raise LowrankError(f"{config.SECTION}.dtype {config.dtype!r} is unknown; choose one of {', '.join(DTYPE_NAMES)}")
    if not config.device:
        raise LowrankError(f"{config.SECTION}.device is empty; write auto, cpu, cuda or cuda:N")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's `dtype` name (float32, float16, bfloat16)."""
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def resolve_device(device: str) -> str:
    """`auto` becomes cuda when a GPU is present, else cpu; a GPU asked for but absent is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LowrankError(f"--device {device} asked for a GPU but CUDA is not available; use --device cpu")
    return device
