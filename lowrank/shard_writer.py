"""Writing a compressed checkpoint shard by shard, so that the compressed model is never whole in memory.

`ShardWriter` takes one block's tensors at a time and appends their bytes to the current shard's
data file at once, so memory holds one block, never a shard. A shard holds whole blocks, at most
`max_shard_bytes` of them (a larger block gets a shard of its own). Flushing a shard writes the
safetensors header (8-byte length, JSON with every tensor's dtype, shape and byte offsets) and
then copies the data in. `finish` names the shards as transformers does (`model.safetensors`, or
`model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`). Each flushed shard is
recorded in `progress.json`, which is what `--resume` reads back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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


#: safetensors' names of the dtypes a checkpoint holds.
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a CPU tensor, as safetensors stores them."""
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


class ShardWriter:
    """Append blocks' tensors to the current shard in `folder`; flush it when the next block would pass the cap."""

    def __init__(self, folder: Path, max_shard_bytes: int, dtype: torch.dtype):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self.entries: dict[str, dict] = {}  # the current shard's header entries
        self.pending_bytes = 0
        self.pending_blocks: list[int] = []
        self.progress = self._read_progress()
        self._data_path = self.folder / "shard.data"
        self._data = open(self._data_path, "wb")  # a stale one (an interrupted shard) starts over

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
        """Append one block's tensors (full names); flush first if they would not fit, and after if the shard is full.

        `on_flush(index_of_last_flushed_block)` runs after a shard is on disk (the caller saves what
        a resumed run needs there).
        """
        size = sum(t.numel() * torch.empty((), dtype=self.dtype if t.is_floating_point() else t.dtype).element_size()
                   for t in tensors.values())
        if self.entries and self.pending_bytes + size > self.max_shard_bytes:
            self.flush(on_flush)
        for name, tensor in tensors.items():
            tensor = self._cast(tensor)
            data = tensor_bytes(tensor)
            self.entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                                  "data_offsets": [self.pending_bytes, self.pending_bytes + len(data)]}
            self._data.write(data)
            self.pending_bytes += len(data)
        if index is not None:
            self.pending_blocks.append(index)
        if self.pending_bytes >= self.max_shard_bytes:
            self.flush(on_flush)  # full: on disk now, so a resumed run need not redo these blocks

    def flush(self, on_flush=None) -> None:
        """Write the current shard (header, then its data) and record it."""
        if not self.entries:
            return
        self._data.close()
        name = f"part-{len(self.progress['shards']) + 1:05d}.safetensors"
        header = json.dumps({"__metadata__": {"format": "pt", **SAFETENSORS_METADATA}, **self.entries},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.folder / name, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        last = self.pending_blocks[-1] if self.pending_blocks else None
        if on_flush is not None and last is not None:
            on_flush(last)
        self.progress["shards"].append({"file": name, "keys": sorted(self.entries), "blocks": self.pending_blocks})
        self.progress["blocks"] += self.pending_blocks
        self._write_progress()
        self.entries, self.pending_bytes, self.pending_blocks = {}, 0, []
        self._data = open(self._data_path, "wb")

    def finish(self) -> list[Path]:
        """Flush the rest; rename the shards as transformers names them and write the index if more than one."""
        self.flush()
        self._data.close()
        self._data_path.unlink(missing_ok=True)
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
