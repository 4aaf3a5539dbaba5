"""Block refinement: a few Adam steps on one compressed block's factors against the dense block's outputs.

After a block is factored (and its `up` factors refitted by least squares), its factors are
trained so that the compressed block, fed the compressed path's inputs X_c, reproduces what the
dense block made of the dense path's inputs X_d: the loss is mean ‖block_dense(X_d) −
block_compressed(X_c)‖² over the calibration windows, in mini-batches of whole calibration
batches. Unlike the least-squares update, which fits one factor of one matrix at a time, this
fits both factors of every matrix together through the attention, the MLP, the norms and the
residual (AA-SVD; BRECQ's block reconstruction). Ranks never change; only the factors train
(and, with `train_norms`, the block's biases and norm weights).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .block_capture import BlockCall, run_block
from .errors import LowrankError
from .layers import LowRankLinear

log = logging.getLogger(__name__)

#: Averages a tensor in place across the ranks of a distributed run (gradients, errors); identity alone.
Average = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class RefineOptions:
    """How a block is refined: `steps` Adam steps at `lr`, each on `share` of the calibration batches."""

    steps: int = 0               # 0: no refinement (the result is bit-identical to compressing without it)
    lr: float = 3e-3             # Adam's learning rate relative to each tensor's RMS (see `relative_groups`)
    share: float = 0.125         # fraction of the calibration batches in each step's mini-batch (at least one)
    train_norms: bool = False    # also train the block's biases and normalization weights
    seed: int = 0                # order in which the batches are visited

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise LowrankError(f"--refine-steps must be a whole number ≥ 0, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise LowrankError(f"--refine-lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.share, (int, float)) and 0 < self.share <= 1):
            raise LowrankError(f"--refine-share must lie in (0, 1] (the fraction of calibration batches per "
                               f"step), got {self.share!r}")

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def record(self) -> dict:
        """The settings as a saved plan records them."""
        return dataclasses.asdict(self)


@dataclass
class RefineResult:
    """The block's output error (mean squared, over every calibration batch) before and after."""

    before: float
    after: float
    kept: bool  # False: refinement made the error worse and the block was restored


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def trainable_parameters(block: nn.Module, train_norms: bool = False) -> list[nn.Parameter]:
    """The factors of every LowRankLinear in `block` (bias excluded); with `train_norms`, also every bias and norm weight."""
    chosen: dict[int, nn.Parameter] = {}
    for module in block.modules():
        if isinstance(module, LowRankLinear):
            chosen[id(module.down.weight)] = module.down.weight
            chosen[id(module.up.weight)] = module.up.weight
        if train_norms:
            for name, param in module.named_parameters(recurse=False):
                if name == "bias" or _is_norm(module):
                    chosen[id(param)] = param
    return list(chosen.values())


def relative_groups(params: list[nn.Parameter], lr: float) -> list[dict]:
    """One Adam parameter group per tensor, its learning rate `lr` × the tensor's RMS (1 for an all-zero tensor).

    Whitened factors differ in scale by orders of magnitude (a `down` of RMS 0.02 beside an `up`
    of RMS 1): one absolute rate either leaves the large ones still or wrecks the small ones.
    Adam moves every coordinate by about its learning rate per step, so this moves each tensor by
    about `lr` of its own size per step.
    """
    groups = []
    for p in params:
        rms = p.detach().float().pow(2).mean().sqrt().item()
        groups.append({"params": [p], "lr": lr * (rms if rms > 0 else 1.0)})
    return groups


def batch_schedule(n_batches: int, options: RefineOptions) -> list[list[int]]:
    """Which calibration batches each step uses: a seeded shuffle, walked in order and reshuffled when used up."""
    per_step = max(1, round(options.share * n_batches))
    generator = torch.Generator().manual_seed(options.seed)
    order: list[int] = []
    steps = []
    for _ in range(options.steps):
        step = []
        while len(step) < per_step:
            if not order:
                order = torch.randperm(n_batches, generator=generator).tolist()
            step.append(order.pop(0))
        steps.append(step)
    return steps


def _squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.float() - target.to(output.device).float()).pow(2).mean()


@torch.no_grad()
def block_output_error(block: nn.Module, inputs: list[torch.Tensor], calls: list[BlockCall],
                       dense_outputs: list[torch.Tensor], device: torch.device,
                       average: Average | None = None) -> float:
    """Mean squared difference between `block` run on `inputs` and `dense_outputs`, over every batch."""
    total = torch.zeros((), dtype=torch.float64)
    for h, call, target in zip(inputs, calls, dense_outputs):
        total += _squared_error(run_block(block, h, call, device), target).double().cpu()
    total /= max(1, len(inputs))
    if average is not None:
        average(total)
    return float(total)


def refine_block(
    dense_outputs: list[torch.Tensor],
    block: nn.Module,
    inputs: list[torch.Tensor],
    calls: list[BlockCall],
    options: RefineOptions,
    device: torch.device | str = "cpu",
    average: Average | None = None,
) -> RefineResult | None:
    """Train `block`'s factors in place so that block(`inputs`) approaches `dense_outputs`, batch by batch.

    `inputs` are the compressed path's hidden states at this block, `dense_outputs` the dense
    block's outputs on the dense path's inputs, per calibration batch; `calls` the block's other
    arguments. `average` (distributed runs) averages each gradient and each error across ranks.
    If the error over all batches ends higher than it began, the block is restored. Returns None
    when `options.steps` is 0 (nothing is run or changed).
    """
    if not options.enabled:
        return None
    if len(inputs) != len(dense_outputs) or len(inputs) != len(calls) or not inputs:
        raise LowrankError("block refinement needs the dense outputs of every calibration batch; "
                           "this is a bug in the producer of the block's inputs")
    device = torch.device(device)
    params = trainable_parameters(block, options.train_norms)
    if not params:
        return None
    flags = {id(p): p.requires_grad for p in block.parameters()}
    saved = [p.detach().clone() for p in params]
    was_training = block.training
    before = block_output_error(block, inputs, calls, dense_outputs, device, average)
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        block.eval()  # no dropout: the loss compares deterministic outputs
        optimizer = torch.optim.Adam(relative_groups(params, options.lr))
        with torch.enable_grad():
            for step in batch_schedule(len(inputs), options):
                optimizer.zero_grad(set_to_none=True)
                for b in step:
                    loss = _squared_error(run_block(block, inputs[b], calls[b], device), dense_outputs[b])
                    (loss / len(step)).backward()
                if average is not None:
                    for p in params:
                        if p.grad is not None:
                            average(p.grad)
                optimizer.step()
        del optimizer
    finally:
        for p in block.parameters():
            p.requires_grad_(flags[id(p)])
        block.train(was_training)
    after = block_output_error(block, inputs, calls, dense_outputs, device, average)
    kept = math.isfinite(after) and after <= before
    if not kept:
        with torch.no_grad():
            for p, old in zip(params, saved):
                p.copy_(old)
        log.info("refinement raised the block's output error (%.4g → %.4g); kept the factors from before", before, after)
    return RefineResult(before, after if kept else before, kept)
