"""A checkpoint folder read block by block: the model skeleton on the meta device, tensors from disk on demand.

`BlockSource` builds the model with accelerate's `init_empty_weights` (no memory for weights),
loads what lives outside the transformer blocks (embeddings, final norm, head) once, and
materializes one block at a time from the safetensors shards, tensor by tensor (`safe_open`), in
the compute dtype (float32 for bf16/fp16 sources). `free_block` sends a block back to the meta
device. Nothing else of the checkpoint is ever in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import LowrankError
from .model_info import model_class_for
from .targets import find_block_list

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def tensor_locations(folder: Path) -> dict[str, Path]:
    """Every tensor name of a safetensors checkpoint folder → the shard file holding it."""
    from safetensors import safe_open

    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LowrankError(f"{folder} holds no .safetensors weights; streaming reads safetensors checkpoints only")
    locations = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            locations.update({name: file for name in handle.keys()})
    return locations


def is_streamable(source: str) -> bool:
    """True for a local dense checkpoint folder with safetensors weights (what BlockSource reads)."""
    folder = Path(source)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return False
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return "quantization_config" not in config


class BlockSource:
    """One checkpoint folder: a meta-device model whose non-block tensors are loaded and whose blocks load on demand."""

    def __init__(self, folder: str | Path, compute_dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False):
        import transformers
        from accelerate import init_empty_weights

        self.folder = Path(folder)
        self.compute_dtype = compute_dtype
        self.config = transformers.AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        model_class = model_class_for(self.config)
        with init_empty_weights():  # an Auto class (config without `architectures`) builds through from_config
            self.model = (model_class.from_config(self.config) if hasattr(model_class, "from_config")
                          else model_class(self.config))
        self.model.eval()
        self.locations = tensor_locations(self.folder)
        self.prefix, self.blocks = find_block_list(self.model)
        self.source_dtype = self._stored_dtype()
        outside = [name for name, _ in self._tensors(self.model) if not self._in_blocks(name)]
        self._load(self.model, "", names=outside)
        self.model.tie_weights()
        for name, tensor in self._tensors(self.model):
            if not self._in_blocks(name) and tensor.is_meta:
                raise LowrankError(f"{self.folder}: tensor {name} is missing from the checkpoint; "
                                   "the folder is incomplete or not a transformers checkpoint")

    # ---- what the checkpoint holds --------------------------------------------------------------
    def _in_blocks(self, name: str) -> bool:
        return name.startswith(self.prefix + ".")

    @staticmethod
    def _tensors(module: nn.Module):
        yield from module.named_parameters(remove_duplicate=False)
        yield from ((name, buffer) for name, buffer in module.named_buffers() if buffer.is_meta)

    def _stored_dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first block weight (float32, bfloat16 or float16)."""
        from safetensors import safe_open

        name = next((n for n in self.locations if n.startswith(self.prefix + ".") and n.endswith(".weight")), None)
        if name is None:
            raise LowrankError(f"{self.folder}: no weights of {self.prefix} in the checkpoint; it does not match "
                               "its config.json")
        with safe_open(str(self.locations[name]), framework="pt") as handle:
            return handle.get_tensor(name).dtype

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def block_bytes(self, index: int = 0, dtype: torch.dtype | None = None) -> int:
        """Bytes of block `index`'s tensors in `dtype` (default: the compute dtype)."""
        size = torch.empty((), dtype=dtype or self.compute_dtype).element_size()
        return sum(t.numel() for _, t in self._tensors(self.blocks[index])) * size

    def outside_bytes(self) -> int:
        """Bytes of everything outside the blocks (embeddings, norms, head), tied weights once."""
        seen = {}
        for name, t in self.model.named_parameters():
            if not self._in_blocks(name):
                seen[t.data_ptr() if not t.is_meta else name] = t.numel() * t.element_size()
        return sum(seen.values())

    # ---- loading and freeing -----------------------------------------------------------------------
    def _load(self, module: nn.Module, prefix: str, names: list[str] | None = None) -> None:
        """Fill `module`'s meta tensors from the shards (one file handle per shard, tensor by tensor)."""
        from safetensors import safe_open

        wanted = names if names is not None else [name for name, _ in self._tensors(module)]
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            full = prefix + name
            if full in self.locations:
                by_file.setdefault(self.locations[full], []).append(name)
            elif names is None:
                raise LowrankError(f"{self.folder}: tensor {full} is missing from the checkpoint; "
                                   "the folder is incomplete or does not match its config.json")
        for file, members in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in members:
                    tensor = handle.get_tensor(prefix + name)
                    if tensor.is_floating_point():
                        tensor = tensor.to(self.compute_dtype)
                    _set_tensor(module, name, tensor)

    def load_block(self, index: int) -> nn.Module:
        """Materialize block `index` from disk (compute dtype, CPU) and return it."""
        block = self.blocks[index]
        self._load(block, self.block_name(index) + ".")
        return block

    def free_block(self, index: int) -> None:
        """Send block `index` back to the meta device: its memory is released."""
        self.blocks[index].to("meta")


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter or buffer `name` of `module` by `tensor`."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor
