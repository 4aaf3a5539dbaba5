"""A GGUF file read tensor by tensor: the config from its metadata, one tensor dequantized at a time.

GGUF stores llama.cpp's tensor names (`blk.0.attn_q.weight`), often quantized, and for the Llama
family the rows of the query and key projections reordered for llama.cpp's rotary layout.
`GGUFTensors` maps the model's transformers names onto GGUF names with gguf's own name table,
dequantizes one tensor from the memory-mapped file when asked, and puts those rows back in
transformers' order: the values equal transformers' own GGUF load, which dequantizes the whole
file at once.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .errors import LowrankError

#: GGUF architectures read tensor by tensor → whether their query/key rows are in llama.cpp's rotary order.
#: Others (GPT-2's transposed blocks, BLOOM's fused heads, Gemma's shifted norms, MoE experts) are
#: rearranged by transformers in ways this reader does not repeat, and are refused.
STREAMED_ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def rotary_rows_to_transformers(values: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of a query/key projection's rows (or bias), head by head.

    llama.cpp stores each head's rows as (pairs, 2): row 2i and 2i+1 are the two halves of rotary
    pair i; transformers keeps the halves apart, (2, pairs). The swap is its own kind of transpose.
    """
    pairs = values.shape[0] // heads // 2
    grouped = values.reshape(heads, pairs, 2, *values.shape[1:])
    return grouped.transpose(1, 2).reshape(values.shape)


def read_architecture(path: Path):
    """Open `path` with gguf's memory-mapped reader; return (reader, architecture), or a one-line error."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise LowrankError(f"{path} names no architecture (general.architecture); it is not a model GGUF") from None
    except Exception as exc:  # gguf raises ValueError, IndexError, OSError... on a damaged file
        raise LowrankError(f"{path} is not a readable GGUF file ({_first_line(exc)}); check the download or "
                           "re-export it") from None
    return reader, architecture


class GGUFTensors:
    """The tensors of one GGUF file under transformers' names, read (and dequantized) one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader, self.architecture = read_architecture(self.path)
        if self.architecture not in STREAMED_ARCHITECTURES:
            known = ", ".join(STREAMED_ARCHITECTURES)
            raise LowrankError(f"{self.path}: streaming reads GGUF architectures {known}, not {self.architecture!r}; "
                               "drop --stream to load it whole (transformers dequantizes it), or convert it to "
                               "safetensors")
        self._stored = {tensor.name: tensor for tensor in self.reader.tensors}
        self._gguf_name: dict[str, str] = {}  # transformers name → GGUF name, once bound to a model
        self._heads: dict[str, int] = {}

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def config(self, trust_remote_code: bool = False):
        """The transformers config, from the GGUF metadata as transformers itself reads it."""
        import transformers

        return transformers.AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name,
                                                       trust_remote_code=trust_remote_code)

    def bind(self, model: torch.nn.Module) -> None:
        """Learn the GGUF name of each of `model`'s tensors (gguf's name table for this architecture)."""
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

        arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == self.architecture)
        table = get_tensor_name_map(arch, model.config.num_hidden_layers)
        for name in model.state_dict():
            module, _, kind = name.rpartition(".")
            parts = module.split(".")
            for start in range(len(parts)):  # `model.layers.0.x`, else `layers.0.x`: wrappers GGUF does not name
                found = table.get_name(".".join(parts[start:]))
                if found is not None and f"{found}.{kind}" in self._stored:
                    self._gguf_name[name] = f"{found}.{kind}"
                    break
        config = model.config
        if STREAMED_ARCHITECTURES[self.architecture]:
            heads = config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            for name, stored in self._gguf_name.items():
                if ".attn_q." in stored:
                    self._heads[name] = heads
                elif ".attn_k." in stored:
                    self._heads[name] = kv_heads

    def names(self) -> set[str]:
        """The transformers names this file holds (after `bind`)."""
        return set(self._gguf_name)

    def read(self, names: list[str]):
        """Yield (name, tensor) for each of `names`: dequantized to float32 (F16 kept), in transformers' layout."""
        from gguf import GGMLQuantizationType, dequantize

        for name in names:
            stored = self._stored[self._gguf_name[name]]
            if stored.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                values = torch.from_numpy(stored.data.copy())  # a copy: the file stays mapped read-only
            else:
                try:
                    values = torch.from_numpy(dequantize(stored.data, stored.tensor_type).copy())
                except NotImplementedError:
                    raise LowrankError(f"{self.path}: gguf cannot dequantize {stored.name} "
                                       f"({stored.tensor_type.name}); upgrade the gguf package") from None
            if name in self._heads:
                values = rotary_rows_to_transformers(values, self._heads[name])
            yield name, values


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFTensors:
    return GGUFTensors(path)


def open_gguf(path: str | Path) -> GGUFTensors:
    """The GGUFTensors of `path`, parsed once per process (gguf parses every metadata field up front, seconds
    for a large vocabulary), so that checking a source and then streaming it read the header once."""
    resolved = Path(path).resolve()
    info = resolved.stat()
    return _open_cached(str(resolved), info.st_size, info.st_mtime_ns)


def is_streamable_gguf(path: str | Path) -> bool:
    """True for a readable GGUF file of an architecture this reader maps."""
    try:
        open_gguf(path)
    except (LowrankError, OSError):
        return False
    return True
