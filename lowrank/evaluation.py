"""Perplexity of a causal language model over non-overlapping token windows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LowrankError
from .model_info import is_causal_lm, without_cache


@dataclass
class PerplexityResult:
    """exp(mean next-token negative log-likelihood) over `tokens` predicted tokens."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity over `windows` (n, seq_len) of token ids; each window is scored independently."""
    if not is_causal_lm(model):
        raise LowrankError(f"perplexity needs a causal language model, and {type(model).__name__} is not one")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for batch in tqdm(windows.split(batch_size), desc="Evaluating", unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, **without_cache(model)).logits.float()
            nll = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise LowrankError("the model produced NaN or Inf logits; the compressed weights are broken")
    return PerplexityResult(math.exp(mean), mean, total_tokens, windows.shape[0], windows.shape[1])
