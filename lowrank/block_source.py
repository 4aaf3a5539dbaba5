"""A checkpoint read block by block: the model skeleton on the meta device, tensors from disk on demand.

`BlockSource` builds the model with accelerate's `init_empty_weights` (no memory for weights),
loads what lives outside the transformer blocks (embeddings, final norm, head) once, and
materializes one block at a time, tensor by tensor, in the compute dtype (float32 for bf16/fp16
sources). `free_block` sends a block back to the meta device. Nothing else of the checkpoint is
ever in memory. The tensors come from a reader: `SafetensorsTensors` for a model folder
(`safe_open`), `gguf_source.GGUFTensors` for a .gguf file (dequantized one tensor at a time).
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
        try:
            with safe_open(str(file), framework="pt") as handle:
                locations.update({name: file for name in handle.keys()})
        except Exception as exc:  # safetensors' own error type: a damaged or truncated header
            raise LowrankError(f"{file} is not a readable safetensors file ({str(exc).splitlines()[0][:160]}); "
                               "check the download or re-save the checkpoint") from None
    return locations


def is_streamable(source: str) -> bool:
    """True for what BlockSource reads: a local dense folder with safetensors weights, or a .gguf file of an
    architecture it maps (llama, qwen2, qwen3)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_source import is_streamable_gguf

        return is_streamable_gguf(path)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return False
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return "quantization_config" not in config


class SafetensorsTensors:
    """The tensors of a safetensors checkpoint folder, read one at a time (one file handle per shard)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        self.locations = tensor_locations(self.path)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.locations.values()))

    def config(self, trust_remote_code: bool = False):
        import transformers

        return transformers.AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)

    def bind(self, model: nn.Module) -> None:
        """Nothing to learn: the folder stores transformers' own names."""

    def names(self) -> set[str]:
        return set(self.locations)

    def read(self, names: list[str]):
        """Yield (name, tensor) for each of `names`, in its stored dtype."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.locations[name], []).append(name)
        for file, members in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in members:
                    yield name, handle.get_tensor(name)


def open_tensors(path: str | Path):
    """The tensor reader for `path`: a .gguf file, else a safetensors folder."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from .gguf_source import open_gguf

        return open_gguf(path)
    return SafetensorsTensors(path)


class BlockSource:
    """One checkpoint (folder or .gguf file): a meta-device model whose non-block tensors are loaded and whose
    blocks load on demand."""

    def __init__(self, path: str | Path, compute_dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False):
        from accelerate import init_empty_weights

        self.path = Path(path)
        self.folder = self.path if self.path.is_dir() else self.path.parent
        self.compute_dtype = compute_dtype
        self.tensors = open_tensors(self.path)
        self.config = self.tensors.config(trust_remote_code)
        model_class = model_class_for(self.config)
        with init_empty_weights():  # an Auto class (config without `architectures`) builds through from_config
            self.model = (model_class.from_config(self.config) if hasattr(model_class, "from_config")
                          else model_class(self.config))
        self.model.eval()
        self.tensors.bind(self.model)
        self.available = self.tensors.names()
        self.prefix, self.blocks = find_block_list(self.model)
        self.source_dtype = self._stored_dtype()
        self._outside = [name for name, _ in self._tensors(self.model) if not self._in_blocks(name)]
        self.load_outside()
        for name, tensor in self._tensors(self.model):
            if not self._in_blocks(name) and tensor.is_meta:
                raise LowrankError(f"{self.path}: tensor {name} is missing from the checkpoint; "
                                   "the checkpoint is incomplete or not a transformers checkpoint")

    # ---- what the checkpoint holds --------------------------------------------------------------
    def _in_blocks(self, name: str) -> bool:
        return name.startswith(self.prefix + ".")

    @staticmethod
    def _tensors(module: nn.Module):
        yield from module.named_parameters(remove_duplicate=False)
        yield from ((name, buffer) for name, buffer in module.named_buffers() if buffer.is_meta)

    @property
    def files(self) -> list[Path]:
        """The checkpoint's weight files (what a resumed run checks for changes)."""
        return self.tensors.files

    def _stored_dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first block weight (float32, bfloat16 or float16; float32 if quantized)."""
        name = next((n for n in sorted(self.available) if self._in_blocks(n) and n.endswith(".weight")), None)
        if name is None:
            raise LowrankError(f"{self.path}: no weights of {self.prefix} in the checkpoint; it does not match "
                               "its config")
        return next(iter(self.tensors.read([name])))[1].dtype

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
        """Fill `module`'s meta tensors from the checkpoint, tensor by tensor."""
        wanted = names if names is not None else [name for name, _ in self._tensors(module)]
        present = []
        for name in wanted:
            if prefix + name in self.available:
                present.append(prefix + name)
            elif names is None:
                raise LowrankError(f"{self.path}: tensor {prefix + name} is missing from the checkpoint; "
                                   "the checkpoint is incomplete or does not match its config")
        for full, tensor in self.tensors.read(present):
            name = full[len(prefix):]
            expected = _get_tensor(module, name).shape
            if tensor.shape != expected:
                raise LowrankError(f"{self.path}: tensor {full} has shape {list(tensor.shape)} but the config asks "
                                   f"for {list(expected)}; the checkpoint does not match its config")
            if tensor.is_floating_point():
                tensor = tensor.to(self.compute_dtype)
            _set_tensor(module, name, tensor)

    def load_block(self, index: int) -> nn.Module:
        """Materialize block `index` from disk (compute dtype, CPU) and return it."""
        block = self.blocks[index]
        self._load(block, self.block_name(index) + ".")
        return block

    def free_block(self, index: int) -> None:
        """Send block `index` back to the meta device: its memory is released (and handed back to the system)."""
        self.blocks[index].to("meta")
        release_freed_memory()

    def load_outside(self) -> None:
        """(Re)load the checkpoint's tensors outside the blocks (embeddings, final norm, head), tied as configured."""
        if self._outside and not any(_get_tensor(self.model, name).is_meta for name in self._outside):
            return  # loaded already
        self._load(self.model, "", names=self._outside)
        self.model.tie_weights()

    def free_outside(self) -> None:
        """Send the tensors outside the blocks back to the meta device while only blocks run (for a 1B Llama,
        embeddings and head are 0.5 GiB); `load_outside` brings them back from disk."""
        empty: dict[int, torch.Tensor] = {}  # tied weights stay tied (one meta tensor for both names)
        for name in self._outside:
            tensor = _get_tensor(self.model, name)
            if not tensor.is_meta:
                if id(tensor) not in empty:
                    empty[id(tensor)] = _like(tensor, torch.empty_like(tensor, device="meta"))
                owner_name, _, leaf = name.rpartition(".")
                owner = self.model.get_submodule(owner_name) if owner_name else self.model
                (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = empty[id(tensor)]


def release_freed_memory() -> None:
    """Ask glibc to return freed heap memory to the system. It keeps freed chunks below its mmap threshold
    (up to 32 MB) for reuse, and a block's many 16-32 MB temporaries then made the resident set grow block
    after block (+0.5 GiB over 8 blocks at hidden 1024; benchmarks/trace_memory.py --trim). No-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        pass


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _like(old: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a frozen Parameter where `old` is one, else as it is."""
    return nn.Parameter(tensor, requires_grad=False) if isinstance(old, nn.Parameter) else tensor


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter or buffer `name` of `module` by `tensor`."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor
