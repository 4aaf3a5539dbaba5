"""How often a compressed model still says what the dense one said, on the same token windows.

Four numbers beside both perplexities: top-1 next-token agreement, the mean and 95th percentile of
the per-token KL(dense ‖ compressed), and the fraction of prompts whose greedy continuations match.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LowrankError
from .model_info import is_causal_lm


@dataclass
class AgreementResult:
    """The compressed model measured against the dense one over `tokens` predicted tokens."""

    dense_perplexity: float
    perplexity: float
    top1_agreement: float       # fraction of positions where both models' most likely next token is the same
    kl_mean: float              # mean over positions of KL(dense ‖ compressed), in nats
    kl_p95: float               # 95th percentile of the same
    generation_agreement: float  # fraction of prompts whose first `generated_tokens` greedy tokens all match
    tokens: int
    windows: int
    seq_len: int
    prompts: int
    prompt_tokens: int
    generated_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def token_kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(dense) ‖ softmax(compressed)) per position, over the last axis (float64, nats)."""
    return kl_of_log_probs(log_probs(dense_logits), log_probs(logits))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the last axis, in float64."""
    return torch.log_softmax(logits.double(), dim=-1)


def kl_of_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position from log-probabilities, never below 0 (rounding)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def token_nll(log_q: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token: log-probs (b, s-1, v) of positions 0..s-2, windows (b, s)."""
    return -log_q.gather(-1, windows[:, 1:, None]).squeeze(-1)


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword that takes the KV cache: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_cache(output):
    """The KV cache a forward pass returned (`cache` in newer transformers, `past_key_values` before)."""
    return output["cache"] if "cache" in output else output.past_key_values


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The first `new_tokens` greedy tokens after each prompt (n, p) → (n, new_tokens), with the KV cache.

    No end-of-text stop: every prompt gets exactly `new_tokens` tokens, so continuations compare position by position.
    """
    keyword = cache_keyword(model)
    output = model(input_ids=prompts, use_cache=True)
    next_token = output.logits[:, -1].argmax(-1)
    generated = [next_token]
    for _ in range(new_tokens - 1):
        output = model(input_ids=next_token[:, None], use_cache=True, **{keyword: kv_cache(output)})
        next_token = output.logits[:, -1].argmax(-1)
        generated.append(next_token)
    return torch.stack(generated, dim=1)


def _check_models(dense: nn.Module, compressed: nn.Module) -> None:
    for role, model in (("dense", dense), ("compressed", compressed)):
        if not is_causal_lm(model):
            raise LowrankError(f"agreement needs causal language models, and the {role} model "
                               f"({type(model).__name__}) is not one")
    dense_vocab = dense.get_output_embeddings().weight.shape[0]
    vocab = compressed.get_output_embeddings().weight.shape[0]
    if dense_vocab != vocab:
        raise LowrankError(f"the dense model's vocabulary ({dense_vocab}) differs from the compressed one's ({vocab}); "
                           "pass --against the model the folder was compressed from")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def agreement(
    dense: nn.Module,
    compressed: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    prompts: int = 16,
    prompt_tokens: int = 32,
    generated_tokens: int = 32,
    progress: bool = True,
) -> AgreementResult:
    """Score `compressed` against `dense` on `windows` (n, seq_len) of token ids.

    Greedy generation starts from the first `prompt_tokens` tokens of the first `prompts` windows.
    """
    _check_models(dense, compressed)
    if prompt_tokens > windows.shape[1]:
        raise LowrankError(f"--prompt-tokens {prompt_tokens} is longer than the windows ({windows.shape[1]} tokens); "
                           "lower --prompt-tokens or raise --seq-len")
    modes = (dense.training, compressed.training)
    dense.eval(), compressed.eval()
    dense_nll = nll = 0.0
    agree = 0
    kls = []
    try:
        for batch in tqdm(windows.split(batch_size), desc="Comparing", unit="batch", disable=not progress):
            log_p = log_probs(dense(input_ids=batch.to(_device(dense)), use_cache=False).logits[:, :-1].cpu())
            log_q = log_probs(compressed(input_ids=batch.to(_device(compressed)), use_cache=False).logits[:, :-1].cpu())
            dense_nll += float(token_nll(log_p, batch).sum())
            nll += float(token_nll(log_q, batch).sum())
            agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            kls.append(kl_of_log_probs(log_p, log_q).flatten())
            del log_p, log_q
        chosen = windows[:prompts, :prompt_tokens]
        dense_text = greedy_tokens(dense, chosen.to(_device(dense)), generated_tokens).cpu()
        text = greedy_tokens(compressed, chosen.to(_device(compressed)), generated_tokens).cpu()
    finally:
        dense.train(modes[0]), compressed.train(modes[1])
    kl = torch.cat(kls)
    tokens = kl.numel()
    if not (math.isfinite(dense_nll) and math.isfinite(nll) and bool(torch.isfinite(kl).all())):
        raise LowrankError("a model produced NaN or Inf logits; the compressed weights are broken")
    return AgreementResult(
        dense_perplexity=math.exp(dense_nll / tokens), perplexity=math.exp(nll / tokens),
        top1_agreement=agree / tokens, kl_mean=float(kl.mean()), kl_p95=float(torch.quantile(kl, 0.95)),
        generation_agreement=float((dense_text == text).all(dim=1).double().mean()),
        tokens=tokens, windows=windows.shape[0], seq_len=windows.shape[1], prompts=chosen.shape[0],
        prompt_tokens=prompt_tokens, generated_tokens=generated_tokens)


def agreement_table(result: AgreementResult, name: str = "compressed", dense_name: str = "dense") -> str:
    """A markdown table of `result` for people."""
    return "\n".join([
        "| model | perplexity | top-1 agreement | KL mean | KL p95 | generation agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| {dense_name} | {result.dense_perplexity:.3f} | 1 | 0 | 0 | 1 |",
        f"| {name} | {result.perplexity:.3f} | {result.top1_agreement:.4f} | {result.kl_mean:.4f} | "
        f"{result.kl_p95:.4f} | {result.generation_agreement:.3f} ({round(result.generation_agreement * result.prompts)}"
        f"/{result.prompts}) |",
    ])
