"""Block refinement: a few Adam steps on one compressed block's factors against the dense block's outputs.

After a block is factored (and its `up` factors refitted by least squares), its factors are
trained so that the compressed block, fed the compressed path's inputs X_c, reproduces what the
dense block made of the dense path's inputs X_d: the loss is mean ‖block_dense(X_d) −
block_compressed(X_c)‖² over the calibration windows, in mini-batches of whole calibration
batches. Unlike the least-squares update, which fits one factor of one matrix at a time, this
fits both factors of every matrix together through the attention, the MLP, the norms and the
residual (AA-SVD; BRECQ's block reconstruction). Ranks never change; only the factors train
(and, with `train_norms`, the block's biases and norm weights; with `train_dense`, the linear
layers the plan kept dense, whose shapes do not change either).
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
from .targets import is_linear

log = logging.getLogger(__name__)

#: What the refinement's loss compares: "token" divides each token's squared error by the dense output's mean
#: square at that token (what the next block's norm sees), "mse" is the plain mean squared error.
LOSSES = ("token", "mse")


#: Looks at the held-out error in a row without a new best after which a block's refinement stops.
PATIENCE = 2

#: Averages a tensor in place across the ranks of a distributed run (gradients, errors); identity alone.
Average = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class RefineOptions:
    """How a block is refined: `steps` Adam steps at `lr`, each on `share` of the calibration batches."""

    steps: int = 0               # 0: no refinement (the result is bit-identical to compressing without it)
    lr: float = 3e-3             # Adam's learning rate relative to each tensor's RMS (see `relative_groups`)
    share: float = 0.125         # fraction of the calibration batches in each step's mini-batch (at least one)
    train_norms: bool = False    # also train the block's biases and normalization weights
    train_dense: bool = False    # also train the block's linear layers the plan kept dense (their shapes stay)
    seed: int = 0                # order in which the batches are visited
    holdout: float = 0.125       # share of the calibration batches never trained on: their error picks the best step
    refit_rounds: int = 0        # the update refits both factors in closed form, this many rounds (0: `up` alone)
    loss: str = "token"          # "token": each token's error relative to the dense token's size; "mse": plain

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise LowrankError(f"--refine-steps must be a whole number ≥ 0, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise LowrankError(f"--refine-lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.share, (int, float)) and 0 < self.share <= 1):
            raise LowrankError(f"--refine-share must lie in (0, 1] (the fraction of calibration batches per "
                               f"step), got {self.share!r}")
        if not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise LowrankError(f"--refine-holdout must lie in [0, 1) (the fraction of calibration batches kept out of "
                               f"training to pick the best step; 0: none), got {self.holdout!r}")
        if self.loss not in LOSSES:
            raise LowrankError(f"--refine-loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not isinstance(self.refit_rounds, int) or isinstance(self.refit_rounds, bool) or self.refit_rounds < 0:
            raise LowrankError(f"--refine-refit must be a whole number ≥ 0 (rounds of the closed-form refit of both "
                               f"factors; 0: off), got {self.refit_rounds!r}")

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    @property
    def recorded(self) -> bool:
        """Whether a saved plan records these options: refinement steps, or the refit of both factors."""
        return self.enabled or self.refit_rounds > 0

    def record(self) -> dict:
        """The settings as a saved plan records them."""
        return dataclasses.asdict(self)


@dataclass
class RefineResult:
    """The block's output error (mean squared, on the held-out batches, else on every batch) before and after."""

    before: float
    after: float
    kept: bool  # False: no step lowered the error and the block was restored
    best_step: int = 0  # the step whose factors the block kept (0: those from before refinement)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def trainable_parameters(block: nn.Module, train_norms: bool = False, train_dense: bool = False) -> list[nn.Parameter]:
    """What refinement trains in `block`: the factors of every LowRankLinear (not their bias); with `train_norms`,
    also every bias and norm weight; with `train_dense`, also the weight of every linear layer the plan kept dense."""
    chosen: dict[int, nn.Parameter] = {}
    factor_layers: set[int] = set()
    for module in block.modules():
        if isinstance(module, LowRankLinear):
            chosen[id(module.down.weight)] = module.down.weight
            chosen[id(module.up.weight)] = module.up.weight
            factor_layers.update((id(module.down), id(module.up)))
    for module in block.modules():
        if train_dense and is_linear(module) and id(module) not in factor_layers:
            chosen[id(module.weight)] = module.weight
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


def holdout_split(n_batches: int, holdout: float) -> tuple[list[int], list[int]]:
    """(training, held-out) batch indices: round(`holdout` × n) batches spread evenly, at least one, none with
    `holdout` 0 or a single batch (then the error on every batch is the signal)."""
    if holdout <= 0 or n_batches < 2:
        return list(range(n_batches)), []
    count = min(n_batches - 1, max(1, round(holdout * n_batches)))
    held = sorted(n_batches - 1 - round(i * n_batches / count) for i in range(count))
    return [b for b in range(n_batches) if b not in held], held


def check_interval(steps: int) -> int:
    """Steps between two looks at the held-out error: about 8 looks per block."""
    return max(1, steps // 8)


def block_loss(output: torch.Tensor, target: torch.Tensor, loss: str = "token") -> torch.Tensor:
    """Mean squared difference of two block outputs (…, hidden); with "token", relative to each dense token's size.

    A few tokens of a decoder's residual stream (the first one above all) carry nearly all of its
    energy, and each next block reads the stream through an RMS norm: in plain MSE those tokens'
    errors drown everyone else's, though the norm scales them away.
    """
    target = target.to(output.device).float()
    error = (output.float() - target).pow(2)
    if loss == "token":
        error = error / target.pow(2).mean(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return error.mean()


@torch.no_grad()
def block_output_error(block: nn.Module, inputs: list[torch.Tensor], calls: list[BlockCall],
                       dense_outputs: list[torch.Tensor], device: torch.device,
                       average: Average | None = None, loss: str = "token") -> float:
    """The `block_loss` between `block` run on `inputs` and `dense_outputs`, averaged over the batches."""
    total = torch.zeros((), dtype=torch.float64)
    for h, call, target in zip(inputs, calls, dense_outputs):
        total += block_loss(run_block(block, h, call, device), target, loss).double().cpu()
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
    A share of the batches (`options.holdout`) is never trained on: every few steps their error is
    measured, the block keeps the factors of the step where it was lowest (those from before, if no
    step lowered it), and training stops once `PATIENCE` looks in a row found no new best. Returns None
    when `options.steps` is 0 (nothing is run or changed).
    """
    if not options.enabled:
        return None
    if len(inputs) != len(dense_outputs) or len(inputs) != len(calls) or not inputs:
        raise LowrankError("block refinement needs the dense outputs of every calibration batch; "
                           "this is a bug in the producer of the block's inputs")
    device = torch.device(device)
    params = trainable_parameters(block, options.train_norms, options.train_dense)
    if not params:
        return None
    training, held = holdout_split(len(inputs), options.holdout)
    watched = held or training  # no held-out batch: the error on the batches it trains on decides
    # every rank of a distributed run looks at the same steps (each look is an all-reduce), whatever its batches
    interval = check_interval(options.steps) if options.holdout > 0 else options.steps

    def error() -> float:
        return block_output_error(block, [inputs[b] for b in watched], [calls[b] for b in watched],
                                  [dense_outputs[b] for b in watched], device, average, options.loss)

    flags = {id(p): p.requires_grad for p in block.parameters()}
    best = [p.detach().clone() for p in params]
    was_training = block.training
    before = best_error = error()
    best_step, stale = 0, 0
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        block.eval()  # no dropout: the loss compares deterministic outputs
        optimizer = torch.optim.Adam(relative_groups(params, options.lr))
        for number, step in enumerate(batch_schedule(len(training), options), start=1):
            with torch.enable_grad():
                optimizer.zero_grad(set_to_none=True)
                for b in (training[i] for i in step):
                    loss = block_loss(run_block(block, inputs[b], calls[b], device), dense_outputs[b], options.loss)
                    (loss / len(step)).backward()
                if average is not None:
                    for p in params:
                        if p.grad is not None:
                            average(p.grad)
                optimizer.step()
            if number % interval and number != options.steps:
                continue
            now = error()
            if math.isfinite(now) and now < best_error:
                best_error, best_step, stale = now, number, 0
                with torch.no_grad():
                    for p, keep in zip(params, best):
                        keep.copy_(p)
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
        del optimizer
    finally:
        for p in block.parameters():
            p.requires_grad_(flags[id(p)])
        block.train(was_training)
    with torch.no_grad():
        for p, keep in zip(params, best):
            p.copy_(keep)
    if best_step == 0:
        log.info("no refinement step lowered the block's %s error (%.4g); kept the factors from before",
                 "held-out" if held else "output", before)
    return RefineResult(before, best_error, best_step > 0, best_step)
