"""Data-free profiles of a checkpoint folder, read one tensor at a time: the model is never built.

A dense folder (config.json + safetensors) is read through an empty meta-device skeleton of its
architecture, which names the target matrices and their orientation; a compressed lowrank folder
through its plan, each factored matrix's σ computed from its two factors without multiplying them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .errors import LowrankError, ModelLoadError
from .folder_format import PLAN_FILE, is_compressed_folder, read_plan_record
from .model_info import model_class_for
from .plan import Plan
from .profile import MatrixProfile, Profile
from .spectrum import DEFAULT_BATCH_BYTES, ShapeBatcher, factored_svdvals
from .targets import Target, find_targets, name_filter


class _TensorFiles:
    """Every tensor name of a folder's safetensors files, read one tensor at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{folder} holds no *.safetensors files to analyze")
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    self.where[key] = path
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def read(self, key: str) -> torch.Tensor:
        with self._safe_open(str(self.where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def total_params(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


def _checkpoint_key(files: _TensorFiles, name: str, suffix: str, prefixes: list[str]) -> str | None:
    """The key of `name + suffix` in the files, allowing for a base-model prefix added or dropped."""
    candidates = [name]
    for prefix in prefixes:
        if name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        else:
            candidates.append(f"{prefix}.{name}")
    for candidate in candidates:
        if candidate + suffix in files:
            return candidate + suffix
    return None


def _meta_targets(folder: Path, include: str | None, exclude: str | None, trust_remote_code: bool):
    """Targets of the model a folder holds, found on an empty (meta-device) skeleton: no weights read."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = model_class_for(config)._from_config(config)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the model architecture in {folder}: {str(exc).splitlines()[0][:200]}") from None
    targets = find_targets(skeleton, include, exclude)
    oriented = {t.name: type(skeleton.get_submodule(t.name)).__name__ == "Conv1D" for t in targets}
    prefixes = [p for p in {getattr(skeleton, "base_model_prefix", ""), "model"} if p]
    return targets, oriented, prefixes


def model_targets_from_config(source: str, include: str | None = None, exclude: str | None = None,
                              trust_remote_code: bool = False) -> list[Target] | None:
    """The target matrices of the model in folder `source`, from its config alone; None when it is not such a folder."""
    folder = Path(source)
    if not (folder / "config.json").is_file():
        return None
    return _meta_targets(folder, include, exclude, trust_remote_code)[0]


def _dense_folder_matrices(folder: Path, include, exclude, trust_remote_code):
    targets, transposed, prefixes = _meta_targets(folder, include, exclude, trust_remote_code)
    files = _TensorFiles(folder)
    keys = {}
    for t in targets:
        key = _checkpoint_key(files, t.name, ".weight", prefixes)
        if key is None:
            raise ModelLoadError(
                f"{folder}: no tensor {t.name}.weight in the safetensors files; the weight names do not follow "
                "the architecture, pass --calib to analyze the loaded model instead"
            )
        keys[t.name] = key

    def matrices() -> Iterator[tuple[str, torch.Tensor, int | None]]:
        for t in targets:
            tensor = files.read(keys[t.name])
            yield t.name, (tensor.T if transposed[t.name] else tensor), None

    return targets, matrices, files.total_params()


def _compressed_folder_matrices(folder: Path, include, exclude):
    data, _ = read_plan_record(folder)
    plan = Plan.from_dict(data, where=str(Path(folder) / PLAN_FILE))
    wanted = name_filter(include, exclude)
    targets = [Target(name, m.shape[0], m.shape[1], False) for name, m in plan.modules.items() if wanted(name)]
    if not targets:
        raise LowrankError(f"no module of {folder}'s plan matches --include/--exclude; check the regexes")
    files = _TensorFiles(folder)
    prefixes = ["model"]

    def key(name: str, suffix: str) -> str:
        found = _checkpoint_key(files, name, suffix, prefixes)
        if found is None:
            raise ModelLoadError(f"{folder}: tensor {name}{suffix} is missing; the compressed folder is damaged")
        return found

    def matrices() -> Iterator[tuple[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor], int | None]]:
        for t in targets:
            rank = plan.modules[t.name].rank
            if rank is None:
                yield t.name, files.read(key(t.name, ".weight")), None
            else:
                yield t.name, (files.read(key(t.name, ".up.weight")), files.read(key(t.name, ".down.weight"))), rank

    return targets, matrices, plan.model_params_after or files.total_params()


@torch.no_grad()
def profile_folder(
    folder: str | Path,
    include: str | None = None,
    exclude: str | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    progress: bool = False,
    trust_remote_code: bool = False,
    source: str | None = None,
) -> Profile:
    """Data-free spectra of a checkpoint folder, read one tensor at a time (the model is never built).

    A dense folder needs config.json and safetensors weights; a compressed lowrank folder is read
    through its plan, each factored matrix's σ computed from its two factors.
    """
    folder = Path(folder)
    if is_compressed_folder(folder):
        targets, matrices, model_params = _compressed_folder_matrices(folder, include, exclude)
    else:
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} is not a model folder (no config.json)")
        targets, matrices, model_params = _dense_folder_matrices(folder, include, exclude, trust_remote_code)
    batcher = ShapeBatcher(batch_bytes)
    ranks: dict[str, int | None] = {}
    for name, matrix, rank in tqdm(matrices(), total=len(targets), desc="Spectra", unit="matrix",
                                   disable=not progress):
        ranks[name] = rank
        if isinstance(matrix, tuple):
            batcher.done[name] = factored_svdvals(*matrix)
        else:
            batcher.add(name, matrix)
    sigma = batcher.finish()
    spectra = [MatrixProfile(t.name, t.shape, sigma[t.name], rank=ranks[t.name]) for t in targets]
    return Profile(spectra, source=source or str(folder), whitened=False, model_params=model_params)


def has_safetensors(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(folder.glob("*.safetensors"))

