"""The compressed checkpoint on disk: write it atomically, read it back, check it.

A folder holds the original `config.json` (plus a lowrank `quantization_config`), the factor
weights as safetensors (sharded when large), the tokenizer, and `lowrank_plan.json`: the plan
with the sha256 of every weight file. Nothing is ever pickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from . import hf_integration
from .errors import LowrankError
from .fileio import atomic_output_dir, sha256_file
from .folder_format import PLAN_FILE, read_plan_record, weight_files
from .model_info import model_class_for
from .plan import Plan
from .verify import check_weights_match_plan

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = "2GB"


def write_plan_and_extras(folder: Path, plan: Plan, extra_files: dict[str, str] | None = None) -> None:
    """The plan, with the sha256 of every weight file already in `folder`, and the extra text files."""
    record = plan.to_dict()
    record["files"] = {p.name: sha256_file(p) for p in weight_files(folder)}
    (folder / PLAN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text, encoding="utf-8")


def save_compressed(
    model: nn.Module,
    tokenizer,
    plan: Plan,
    out_dir: str | Path,
    overwrite: bool = False,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a compressed model as a folder that `lowrank.load` and `from_pretrained` read.

    `extra_files` (file name → text, e.g. the lowrank_config.json) are written in the same atomic step.
    """
    hf_integration.attach(model, plan.factored, plan.method)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_plan_and_extras(tmp, plan, extra_files)
    log.info("wrote %s", out_dir)
    return Path(out_dir)


def read_plan(folder: str | Path) -> tuple[Plan, dict[str, str]]:
    """The plan of a compressed folder and the recorded sha256 of its weight files."""
    data, files = read_plan_record(folder)
    return Plan.from_dict(data, where=str(Path(folder) / PLAN_FILE)), files


def load_compressed(folder: str | Path, dtype: torch.dtype | None = None, device: str | None = None):
    """Rebuild a compressed model from its folder (config → LowRankLinear skeleton → weights)."""
    import transformers

    hf_integration.register()
    folder = Path(folder)
    plan, _ = read_plan(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    quant = getattr(config, "quantization_config", None)
    ranks = quant.get("ranks") if isinstance(quant, dict) else getattr(quant, "ranks", None)
    if ranks != plan.factored:
        raise LowrankError(
            f"{folder}: the ranks in config.json and {PLAN_FILE} disagree; the folder was edited or mixed up, recompress it"
        )
    check_weights_match_plan(folder, plan)  # a clear message instead of transformers' size-mismatch report
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = model_class_for(config).from_pretrained(folder, **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    return model
