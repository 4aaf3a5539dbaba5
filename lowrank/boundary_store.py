"""Calibration activations at block boundaries, kept in memory up to a cap and spilled to disk past it.

Streaming compression stores, for every block boundary, the hidden states of every calibration
batch. `BoundaryStore` holds them on CPU while they fit under `cap_bytes`; past the cap each
further batch goes to a safetensors file under `offload_dir` and is read back when asked for.
Without an `offload_dir` the cap is not enforced (the memory estimate refuses such runs first).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .errors import LowrankError


class BoundaryStore:
    """`put(level, batch, tensor)` / `get(level, batch)`: hidden states per boundary level and batch."""

    def __init__(self, cap_bytes: int | None = None, offload_dir: str | Path | None = None):
        self.cap_bytes = cap_bytes
        self.in_memory: dict[tuple[int, int], torch.Tensor] = {}
        self.on_disk: dict[tuple[int, int], Path] = {}
        self.held_bytes = 0
        self.spilled_bytes = 0
        self._dir: Path | None = None
        if offload_dir is not None:
            parent = Path(offload_dir)
            try:
                parent.mkdir(parents=True, exist_ok=True)
                self._dir = Path(tempfile.mkdtemp(prefix="lowrank-boundaries-", dir=parent))
            except OSError as exc:
                raise LowrankError(f"cannot write in --offload-dir {offload_dir} ({exc.strerror}); "
                                   "pass a writable folder") from None

    def put(self, level: int, batch: int, tensor: torch.Tensor) -> None:
        key = (level, batch)
        self.drop(level, batch)
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._dir is not None and self.cap_bytes is not None and self.held_bytes + size > self.cap_bytes:
            from safetensors.torch import save_file

            path = self._dir / f"boundary-{level}-{batch}.safetensors"
            save_file({"hidden": tensor}, str(path))
            self.on_disk[key] = path
            self.spilled_bytes += size
            return
        self.in_memory[key] = tensor
        self.held_bytes += size

    def get(self, level: int, batch: int) -> torch.Tensor:
        key = (level, batch)
        if key in self.in_memory:
            return self.in_memory[key]
        from safetensors.torch import load_file

        return load_file(str(self.on_disk[key]))["hidden"]

    def level(self, level: int, batches: int) -> list[torch.Tensor]:
        """Every batch of one boundary (read back from disk where spilled)."""
        return [self.get(level, b) for b in range(batches)]

    def drop(self, level: int, batch: int) -> None:
        key = (level, batch)
        tensor = self.in_memory.pop(key, None)
        if tensor is not None:
            self.held_bytes -= tensor.numel() * tensor.element_size()
        path = self.on_disk.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def drop_level(self, level: int, batches: int) -> None:
        for b in range(batches):
            self.drop(level, b)

    def close(self) -> None:
        """Forget everything and remove the spill folder."""
        self.in_memory.clear()
        self.on_disk.clear()
        self.held_bytes = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
