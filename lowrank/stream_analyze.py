"""The analyzer on a checkpoint read block by block: `lowrank analyze --calib --stream`.

It is the profile pass of streaming compression without the loss prices (`stream_profile`): each
block is read from disk, run on the calibration windows, its inputs' Grams give σ(W·S) of its
matrices, and it is freed. The Profile holds the same numbers as the in-memory analyzer's
(`calibration.collect_stats` then `profiling.profile_model`); memory holds one block, not the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import distributed, stream_ranks
from .block_source import BlockSource
from .boundary_store import BoundaryStore
from .calibration import text_windows, warn_if_thin
from .config import CalibrationConfig
from .factorize import DEFAULT_DAMPING
from .loading import load_tokenizer, local_checkpoint
from .profile import Profile
from .profiling import targets_of
from .shard_writer import parse_size
from .stream_memory import available_bytes, check_fits, estimate
from .stream_profile import profile_streamed
from .streaming import check_streamable


def analyze_streamed(
    source: str,
    calibration: CalibrationConfig | torch.Tensor,
    *,
    tokenizer: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    batch_size: int = 8,
    damping: float = DEFAULT_DAMPING,
    device: str = "cpu",
    offload_dir: str | None = None,
    max_memory: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Profile:
    """The whitened Profile of `source` (folder, .gguf, built-in name or hub id), one block in memory at a time.

    `calibration` is text (drawn into windows with the model's tokenizer, or `tokenizer`) or token windows.
    """
    location = local_checkpoint(source, progress)
    path = Path(location.path, location.gguf_file or "")
    check_streamable(path)
    if isinstance(calibration, torch.Tensor):
        windows = calibration
    else:
        loaded = load_tokenizer(tokenizer or location.path, None if tokenizer else location.gguf_file,
                                trust_remote_code)
        windows = text_windows(loaded, list(calibration.texts), calibration.samples, calibration.seq_len,
                               calibration.seed)
    blocks = BlockSource(path, torch.float32, trust_remote_code=trust_remote_code)
    targets = targets_of(blocks.model, include, exclude)
    warn_if_thin(windows, targets)
    limit = parse_size(max_memory, "--max-memory") if max_memory else stream_ranks.memory_share(available_bytes())
    with distributed.agreement("checking the memory"):  # several ranks: each holds its share of the batches
        cap = check_fits(estimate(blocks, targets, stream_ranks.my_windows(windows, batch_size), False, 0,
                                  batch_size=batch_size), limit, offload_dir is not None)
    own = stream_ranks.rank_folder(offload_dir)  # several ranks: rank K spills to OFFLOAD/rank-K
    try:
        profile = profile_streamed(blocks, targets, windows, BoundaryStore(cap, own), prices=False,
                                   batch_size=batch_size, damping=damping, device=device, progress=progress,
                                   name=source, output_stats=False)  # the analyzer's spectra, as in memory
    finally:
        stream_ranks.remove_rank_folder(offload_dir, own)
    if not isinstance(calibration, torch.Tensor):
        profile.options.update({"calibration": list(calibration.texts), "samples": calibration.samples,
                                "seq_len": calibration.seq_len, "seed": calibration.seed})
    return profile
