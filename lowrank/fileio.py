"""Writing outputs safely: atomic files and folders, checks before long work, sha256.

Every output is written to a temporary name beside its destination and renamed into place, so a
failure (disk full, Ctrl-C) leaves nothing half-written, and no output may replace or land inside
a checkpoint this process has read (its only copy, maybe).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import LowrankError

#: Local checkpoints (folders or .gguf files) read by this process: no output may replace them or land
#: inside them. lowrank.loading adds every local model it loads.
LOADED_INPUTS: set[Path] = set()


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
    for source in sorted(LOADED_INPUTS):
        check_output_spares_input(out_dir, source)


def replace_folder(finished: Path, out: Path) -> None:
    """Move the finished folder to `out` by renames; an existing `out` is swapped aside first, then deleted."""
    if out.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
        os.rmdir(backup)
        os.replace(out, backup)
        os.replace(finished, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(finished, out)


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
        replace_folder(tmp, out)
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


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` by a rename, else it is removed."""
    path = Path(path)
    check_output_spares_inputs(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.resolve().parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so it is never half-written."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
