"""Writing a compressed checkpoint shard by shard, so that the compressed model is never whole in memory.

`ShardWriter` takes one block's tensors at a time and writes them into safetensors shards of at
most `max_shard_bytes` (a shard holds whole blocks; a block larger than the cap gets a shard of
its own). `finish` names the shards as transformers does (`model.safetensors`, or
`model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`). Each flushed shard is
recorded in `progress.json`, which is what `--resume` reads back.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .block_source import INDEX_FILE, SINGLE_FILE
from .errors import LowrankError
from .folder_guard import SAFETENSORS_METADATA

PROGRESS_FILE = "progress.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """Bytes of a size such as 2GB, 500MB or 1.5GiB (a bare number is bytes)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = found.group(2).upper() if found else None
    if found is None or unit not in _UNITS or float(found.group(1)) <= 0:
        raise LowrankError(f"{flag} {text!r} is not a size; write a positive size such as 2GB, 500MB or 1.5GiB")
    return int(float(found.group(1)) * _UNITS[unit])


class ShardWriter:
    """Accumulate blocks' tensors in `folder`; flush a shard when the next block would pass the cap."""

    def __init__(self, folder: Path, max_shard_bytes: int, dtype: torch.dtype):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.pending_blocks: list[int] = []
        self.progress = self._read_progress()

    # ---- resume bookkeeping --------------------------------------------------------------------
    def _read_progress(self) -> dict:
        path = self.folder / PROGRESS_FILE
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        return {"shards": [], "blocks": []}

    @property
    def finished_blocks(self) -> list[int]:
        """Blocks already written into flushed shards (a resumed run starts after them)."""
        return list(self.progress["blocks"])

    def _write_progress(self) -> None:
        tmp = self.folder / (PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps(self.progress, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.folder / PROGRESS_FILE)

    # ---- writing --------------------------------------------------------------------------------
    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().to("cpu")
        return (tensor.to(self.dtype) if tensor.is_floating_point() else tensor).contiguous()

    def add_block(self, index: int | None, tensors: dict[str, torch.Tensor], on_flush=None) -> None:
        """Queue one block's tensors (full names); flush first if they would not fit, and after if the shard is full.

        `on_flush(index_of_last_flushed_block)` runs after a shard is on disk (the caller saves what
        a resumed run needs there).
        """
        cast = {name: self._cast(t) for name, t in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in cast.values())
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush(on_flush)
        self.pending.update(cast)
        self.pending_bytes += size
        if index is not None:
            self.pending_blocks.append(index)
        if self.pending_bytes >= self.max_shard_bytes:
            self.flush(on_flush)  # full: on disk now, so a resumed run need not redo these blocks

    def flush(self, on_flush=None) -> None:
        """Write the pending tensors as the next shard and record it."""
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.progress['shards']) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt", **SAFETENSORS_METADATA})
        last = self.pending_blocks[-1] if self.pending_blocks else None
        if on_flush is not None and last is not None:
            on_flush(last)
        self.progress["shards"].append({"file": name, "keys": sorted(self.pending), "blocks": self.pending_blocks})
        self.progress["blocks"] += self.pending_blocks
        self._write_progress()
        self.pending, self.pending_bytes, self.pending_blocks = {}, 0, []

    def finish(self) -> list[Path]:
        """Flush the rest; rename the shards as transformers names them and write the index if more than one."""
        self.flush()
        shards = self.progress["shards"]
        if len(shards) == 1:
            names = [SINGLE_FILE]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map, total = {}, 0
        for shard, final in zip(shards, names):
            path = self.folder / final
            os.replace(self.folder / shard["file"], path)
            total += path.stat().st_size
            weight_map.update({key: final for key in shard["keys"]})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)
        return [self.folder / n for n in names]
