"""The compressed checkpoint on disk: write it atomically, read it back, check it.

A folder holds the original `config.json` (plus a lowrank `quantization_config`), the factor
weights as safetensors (sharded when large), the tokenizer, and `lowrank_plan.json`: the plan
with the sha256 of every weight file. Nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import LowrankError
from .plan import Plan

log = logging.getLogger(__name__)

PLAN_FILE = "lowrank_plan.json"
DEFAULT_SHARD_SIZE = "2GB"


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless `overwrite`; call this before any long work starts."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise LowrankError(f"output {out} already exists; choose another -o path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LowrankError(f"output {out} exists and is not a folder; remove it or choose another -o path")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise LowrankError(f"the folder {parent} for output {out.name} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise LowrankError(f"cannot write in {parent}; choose an -o path in a writable folder")
    check_output_spares_inputs(out)
    return out


def check_output_spares_input(out_dir: str | Path, source: str | Path) -> None:
    """Refuse an output folder that is, contains or sits inside the input checkpoint (its only copy, maybe)."""
    src = Path(source).expanduser()
    if not src.exists():
        return
    src, out = src.resolve(), Path(out_dir).expanduser().resolve()
    clash = out == src or out in src.parents or (src.is_dir() and src in out.parents)
    if clash:
        raise LowrankError(f"output {out_dir} would overwrite or write into the input {source}; "
                           "choose an -o path outside the input")


def check_output_spares_inputs(out_dir: str | Path) -> None:
    """Refuse an output that would replace or write into any checkpoint this process has loaded."""
    from .loading import LOADED_INPUTS

    for source in sorted(LOADED_INPUTS):
        check_output_spares_input(out_dir, source)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` by a rename.

    On any failure, Ctrl-C included, the temporary folder is removed and an existing
    `out_dir` is left exactly as it was.
    """
    out = check_output_dir(out_dir, overwrite)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rmdir(backup)
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(exc):
            raise LowrankError(f"writing {out} failed ({write_failure_reason(exc)}); free disk space or choose "
                               "another -o path; nothing was written") from exc
        raise


def is_write_failure(exc: BaseException) -> bool:
    """An error from the file system (disk full, file too large, read-only), from Python or safetensors."""
    return isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError" and "os error" in str(exc))


def write_failure_reason(exc: BaseException) -> str:
    """The operating system's words for a write failure, e.g. 'No space left on device'."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text.rsplit("I/O error:", 1)[-1].split("(os error")[0].strip() or text.splitlines()[0]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so it is never half-written."""
    path = Path(path)
    check_output_spares_inputs(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


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
    from . import hf_integration

    hf_integration.attach(model, plan.factored, plan.method)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = plan.to_dict()
        record["files"] = {p.name: sha256_file(p) for p in weight_files(tmp)}
        (tmp / PLAN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    log.info("wrote %s", out_dir)
    return Path(out_dir)


def is_compressed_folder(path: str | Path) -> bool:
    return (Path(path) / PLAN_FILE).is_file()


def read_plan(folder: str | Path) -> tuple[Plan, dict[str, str]]:
    """The plan of a compressed folder and the recorded sha256 of its weight files."""
    path = Path(folder) / PLAN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LowrankError(f"cannot read {path} ({exc}); the compressed folder is damaged, recompress it") from None
    files = data.pop("files", {}) if isinstance(data, dict) else {}
    return Plan.from_dict(data, where=str(path)), files


def load_compressed(folder: str | Path, dtype: torch.dtype | None = None, device: str | None = None):
    """Rebuild a compressed model from its folder (config → LowRankLinear skeleton → weights)."""
    import transformers

    from . import hf_integration
    from .loading import model_class_for
    from .verify import check_weights_match_plan

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
