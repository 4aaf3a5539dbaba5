"""How much memory a streamed compression needs, said before it starts, and a refusal when it will not fit.

Peak ≈ runtime + embeddings/head + max(profile pass, compress pass), where (docs/scale.md)
- profile pass  = one block + its Grams + its largest SVD's work + two boundaries of the calibration
  windows + every boundary of the sensitivity windows;
- compress pass = three copies of one block (dense copy for the update, factors) + Grams and
  cross-Grams + two boundaries + the block's layer inputs kept for the update; with block
  refinement (`--refine-steps`), two more boundaries (the dense path's inputs and outputs), Adam's
  state and gradients (three copies of the block, an upper bound) and the autograd activations of
  one calibration batch through it.
Boundary activations past the memory left go to `--offload-dir` when one is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_source import BlockSource
from .errors import LowrankError
from .targets import Target

#: Python, torch and transformers once imported, plus LAPACK work space (a streamed run of a 28 MB model peaked at 577 MiB).
RUNTIME_BYTES = 576 * 2**20
GIB = 2**30


def human(size: int) -> str:
    """A byte count as GiB (MiB below one GiB)."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.0f} MiB"


@dataclass
class MemoryEstimate:
    """The parts of the formula, in bytes."""

    block: int
    statistics: int
    boundaries_profile: int
    boundaries_compress: int
    outside: int
    runtime: int = RUNTIME_BYTES
    refinement: int = 0  # block refinement: optimizer state, gradients, one batch's autograd activations

    @property
    def profile_peak(self) -> int:
        return self.block + self.statistics + self.boundaries_profile

    @property
    def compress_peak(self) -> int:
        return 3 * self.block + 2 * self.statistics + self.refinement + self.boundaries_compress

    def total(self, activations_cap: int | None = None) -> int:
        """The peak, with boundary activations limited to `activations_cap` (None: all in memory)."""
        def capped(b: int) -> int:
            return b if activations_cap is None else min(b, activations_cap)

        profile = self.block + self.statistics + capped(self.boundaries_profile)
        compress = 3 * self.block + 2 * self.statistics + self.refinement + capped(self.boundaries_compress)
        return self.runtime + self.outside + max(profile, compress)

    def describe(self, activations_cap: int | None = None) -> str:
        spilled = "" if activations_cap is None else f", {human(activations_cap)} of them in memory"
        return (f"streaming: estimated peak memory {human(self.total(activations_cap))} (one block "
                f"{human(self.block)}, its statistics {human(self.statistics)}, boundary activations "
                f"{human(self.boundaries_profile)}{spilled}, embeddings and head {human(self.outside)}, "
                f"runtime {human(self.runtime)}"
                + (f", block refinement {human(self.refinement)}" if self.refinement else "") + ")")


def refinement_bytes(source: BlockSource, batch_size: int, seq_len: int) -> int:
    """Block refinement's extra memory: Adam's two moments and the gradients (3 × one block), and one
    batch's autograd activations (per token: ~12 hidden-sized and 4 MLP-sized vectors, one attention row per head)."""
    config = source.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    mlp = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
           or getattr(config, "n_inner", None) or 4 * hidden)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    activations = batch_size * seq_len * (12 * hidden + 4 * mlp + 2 * heads * seq_len) * 4
    return 3 * source.block_bytes(0) + activations


def estimate(source: BlockSource, targets: list[Target], windows: torch.Tensor, prices: bool,
             sensitivity_samples: int, refine: bool = False, batch_size: int = 8) -> MemoryEstimate:
    """The formula's parts for `source`, its targets and the calibration `windows` (`refine`: with block refinement)."""
    per_block: dict[str, int] = {}
    per_block_inputs: dict[str, int] = {}
    for target in targets:
        block = target.name[len(source.prefix) + 1:].split(".", 1)[0]
        # one float64 Gram per target: an upper bound, since targets reading one input share theirs
        per_block[block] = per_block.get(block, 0) + target.in_features ** 2 * 8
        per_block_inputs[block] = per_block_inputs.get(block, 0) + target.in_features
    widest = max(t.in_features for t in targets) ** 2 * 8 * 2  # one whitening's root and inverse
    biggest = max((t.out_features * min(t.shape) + t.out_features * t.in_features) * 8 for t in targets)  # W·S, U
    statistics = max(per_block.values(), default=0) + widest + biggest
    hidden = getattr(source.config, "hidden_size", None) or getattr(source.config, "n_embd", None) or 0
    per_level = windows.numel() * hidden * 4
    levels = len(source.blocks) + 1
    fisher_levels = min(sensitivity_samples, windows.shape[0]) * windows.shape[1] * hidden * 4 * levels if prices else 0
    # the update's dense-block inputs, kept from the statistics pass (upper bound: one per target)
    inputs_per_token = max(per_block_inputs.values(), default=0)
    return MemoryEstimate(block=source.block_bytes(0), statistics=statistics,
                          boundaries_profile=2 * per_level + fisher_levels,
                          boundaries_compress=(4 if refine else 2) * per_level + windows.numel() * inputs_per_token * 4,
                          outside=source.outside_bytes(),
                          refinement=refinement_bytes(source, batch_size, windows.shape[1]) if refine else 0)


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be used without swapping)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def activations_cap(est: MemoryEstimate, limit: int) -> int:
    """The boundary activations that fit in memory under `limit` (the rest spill to --offload-dir)."""
    fixed = est.runtime + est.outside + max(est.block + est.statistics,
                                            3 * est.block + 2 * est.statistics + est.refinement)
    return max(0, limit - fixed)


def check_fits(est: MemoryEstimate, limit: int, offload: bool) -> int | None:
    """Refuse a run whose estimate passes `limit`; return the activations cap to use (None: no cap needed)."""
    if est.total() <= limit:
        return None
    cap = activations_cap(est, limit)
    if offload and est.total(cap) <= limit:
        return cap
    hint = "pass --offload-dir DIR to spill boundary activations to disk, " if not offload else ""
    raise LowrankError(f"streaming needs about {human(est.total(cap if offload else None))} but "
                       f"{human(limit)} is available; {hint}use fewer --samples or a shorter --seq-len, "
                       "or --device cuda")
