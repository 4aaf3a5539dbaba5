"""How much memory a streamed compression needs, said before it starts, and a refusal when it will not fit.

Peak ≈ runtime + max(the head's step, profile pass, compress pass), where (docs/scale.md)
- the head's step = embeddings and head (on disk the rest of the time) + one block + the logits of one
  slice of tokens (4 copies; a slice's are at most 16 MiB: `lowrank.head_gradient`);
- profile pass  = one block + its statistics + one batch through it + two boundaries of the calibration
  windows + two of the sensitivity windows (their other levels wait on disk);
- compress pass = two copies of one block (the dense tensors kept for the update beside the factors) +
  one batch through it + its statistics, or the update's Grams and cross-Grams when larger + two
  boundaries + the block's layer inputs kept for the update (over the windows it fits on,
  `--update-samples`); with block refinement (`--refine-steps`), two more boundaries (the dense path's
  inputs and outputs), Adam's state and gradients (three copies of the block, an upper bound) and the
  autograd activations of one calibration batch through it;
- one batch through it = one calibration batch's activations inside a block, without gradients.
- its statistics = the block's Gram matrices (float64, one per target: an upper bound) + a whitening's
  temporaries (one in × in beside its Gram, which becomes the whitening: the eigenvectors of the
  eigendecomposition fallback) + the largest SVD (W·S and U).
Boundary activations past the memory left go to `--offload-dir` when one is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_source import BlockSource
from .errors import LowrankError
from .head_gradient import slice_tokens
from .model_info import widths
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
    outside: int  # the head's step: embeddings and head, one block, the head's logits
    runtime: int = RUNTIME_BYTES
    refinement: int = 0  # block refinement: optimizer state, gradients, one batch's autograd activations
    update: int = 0  # the update's Grams and cross-Grams (after the factoring's statistics are freed)
    forward: int = 0  # one calibration batch's activations inside a block (beside the Grams it adds to)

    def compress_fixed(self) -> int:
        """The compress pass without its boundary activations."""
        return 2 * self.block + max(self.statistics, self.update) + self.forward + self.refinement

    def profile_fixed(self) -> int:
        """The profile pass without its boundary activations."""
        return self.block + self.statistics + self.forward

    @property
    def profile_peak(self) -> int:
        return self.profile_fixed() + self.boundaries_profile

    @property
    def compress_peak(self) -> int:
        return self.compress_fixed() + self.boundaries_compress

    def total(self, activations_cap: int | None = None) -> int:
        """The peak, with boundary activations limited to `activations_cap` (None: all in memory)."""
        def capped(b: int) -> int:
            return b if activations_cap is None else min(b, activations_cap)

        profile = self.profile_fixed() + capped(self.boundaries_profile)
        compress = self.compress_fixed() + capped(self.boundaries_compress)
        return self.runtime + max(self.outside, profile, compress)

    def describe(self, activations_cap: int | None = None) -> str:
        spilled = "" if activations_cap is None else f", {human(activations_cap)} of them in memory"
        return (f"streaming: estimated peak memory {human(self.total(activations_cap))} (one block "
                f"{human(self.block)}, its statistics {human(self.statistics)}, one batch through it "
                f"{human(self.forward)}, boundary activations "
                f"{human(max(self.boundaries_profile, self.boundaries_compress))}{spilled}, the head's step "
                f"{human(self.outside)}, runtime {human(self.runtime)}"
                + (f", block refinement {human(self.refinement)}" if self.refinement else "") + ")")


def refinement_bytes(source: BlockSource, batch_size: int, seq_len: int) -> int:
    """Block refinement's extra memory: Adam's two moments and the gradients (3 × one block), and one
    batch's autograd activations (per token: ~12 hidden-sized and 4 MLP-sized vectors, one attention row per head)."""
    config = source.config
    hidden, mlp = widths(config)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    activations = batch_size * seq_len * (12 * hidden + 4 * mlp + 2 * heads * seq_len) * 4
    return 3 * source.block_bytes(0) + activations


def estimate(source: BlockSource, targets: list[Target], windows: torch.Tensor, prices: bool,
             sensitivity_samples: int, refine: bool = False, batch_size: int = 8,
             update_windows: int | None = None) -> MemoryEstimate:
    """The formula's parts for `source`, its targets and the calibration `windows` (`refine`: with block
    refinement; `update_windows`: how many windows the update fits on, whose layer inputs are kept)."""
    per_block: dict[str, int] = {}
    per_block_inputs: dict[str, int] = {}
    for target in targets:
        block = target.name[len(source.prefix) + 1:].split(".", 1)[0]
        # one float64 Gram per target: an upper bound, since targets reading one input share theirs
        per_block[block] = per_block.get(block, 0) + target.in_features ** 2 * 8
        per_block_inputs[block] = per_block_inputs.get(block, 0) + target.in_features
    grams = max(per_block.values(), default=0)
    widest = max(t.in_features for t in targets) ** 2 * 8  # a whitening's temporary beside its Gram (eigh's vectors)
    biggest = max((t.out_features * min(t.shape) + t.out_features * t.in_features) * 8 for t in targets)  # W·S, U
    statistics = grams + widest + biggest
    hidden, mlp = widths(source.config)
    per_level = windows.numel() * hidden * 4
    sensitivity_windows = min(sensitivity_samples, windows.shape[0])
    fisher_levels = 2 * sensitivity_windows * windows.shape[1] * hidden * 4 if prices else 0  # the rest on disk
    vocab = getattr(source.config, "vocab_size", 0) or 0
    # one slice's logits, 4 copies (the loss gradient is taken a slice of tokens at a time: lowrank.head_gradient)
    fisher_batch = max(1, min(batch_size, 4, sensitivity_windows))
    slice_of = min(slice_tokens(vocab), fisher_batch * windows.shape[1]) if vocab else 0
    logits = 4 * slice_of * vocab * 4 if prices else 0
    # one batch through a block, without gradients: at most three MLP-wide tensors (gate, up, their product)
    # and two hidden-wide ones alive at once (the 1.1B shape at 64 × 512 passed an estimate without it by 4 %)
    forward = min(batch_size, windows.shape[0]) * windows.shape[1] * (3 * mlp + 2 * hidden) * 4
    # the update's dense-block inputs, kept from the statistics pass (upper bound: one per target)
    inputs_per_token = max(per_block_inputs.values(), default=0)
    kept_tokens = min(windows.shape[0], update_windows or windows.shape[0]) * windows.shape[1]
    return MemoryEstimate(block=source.block_bytes(0), statistics=statistics,
                          boundaries_profile=2 * per_level + fisher_levels,
                          boundaries_compress=(4 if refine else 2) * per_level + kept_tokens * inputs_per_token * 4,
                          outside=source.outside_bytes() + source.block_bytes(0) + logits,
                          refinement=refinement_bytes(source, batch_size, windows.shape[1]) if refine else 0,
                          update=2 * grams, forward=forward)


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
    fixed = est.runtime + max(est.profile_fixed(), est.compress_fixed())
    return max(0, limit - fixed) if est.runtime + est.outside <= limit else 0


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
