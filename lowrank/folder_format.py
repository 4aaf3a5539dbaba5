"""The compressed folder's layout: which files it holds and how its plan record is read.

A compressed folder holds config.json (with a lowrank `quantization_config`), safetensors weight
files, the tokenizer and PLAN_FILE: the plan as JSON plus the sha256 of every weight file.
This module knows the names and reads the JSON; `lowrank.plan` validates what it says.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LowrankError

PLAN_FILE = "lowrank_plan.json"


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors weight files, sorted by name."""
    return sorted(Path(folder).glob("*.safetensors"))


def is_compressed_folder(path: str | Path) -> bool:
    """True when `path` is a folder holding a lowrank plan record."""
    return (Path(path) / PLAN_FILE).is_file()


def read_plan_record(folder: str | Path) -> tuple[dict, dict[str, str]]:
    """The plan JSON of a compressed folder (to validate with Plan.from_dict) and the recorded sha256 of its files."""
    path = Path(folder) / PLAN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LowrankError(f"cannot read {path} ({exc}); the compressed folder is damaged, recompress it") from None
    files = data.pop("files", {}) if isinstance(data, dict) else {}
    return data, files
