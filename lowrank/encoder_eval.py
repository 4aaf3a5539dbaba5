"""How faithful a compressed encoder is to its dense original, on held-out sentences.

The text is split into sentences; both models embed each one as the model pools
(`encoders.pooling_of`). Reported: the mean and minimum cosine between the two embeddings of the
same sentence, and self-retrieval: with the compressed embedding of a sentence as the query and
the dense embeddings of all sentences as the corpus, how often the sentence itself ranks first
(top-1) or among the first ten (recall@10). Where the model has a masked-LM head, also its MLM
perplexity on the same sentences (15% of tokens masked, seeded).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .encoders import embed, pooling_of
from .errors import LowrankError

#: Sentences shorter than this many words (stage directions, "Exit.") are left out.
MIN_WORDS = 4
MASK_FRACTION = 0.15


@dataclass
class EncoderAgreement:
    """Agreement of a model's sentence embeddings with a reference's over `sentences` sentences."""

    sentences: int
    mean_cosine: float
    min_cosine: float
    top1: float
    recall_at_10: float
    mlm_perplexity: float | None = None
    reference_mlm_perplexity: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def split_sentences(text: str, min_words: int = MIN_WORDS) -> list[str]:
    """The sentences of `text` (ending in . ! or ?), whitespace collapsed, each of at least `min_words` words."""
    flat = re.sub(r"\s+", " ", text)
    pieces = re.split(r"(?<=[.!?])\s+", flat)
    return [p.strip() for p in pieces if len(p.split()) >= min_words]


def agreement(embeddings: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Cosine of each row with its reference row (mean, min) and self-retrieval top-1 / recall@10."""
    if embeddings.shape != reference.shape or embeddings.ndim != 2:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} and reference {tuple(reference.shape)} must match")
    a = nn.functional.normalize(embeddings.double(), dim=-1)
    b = nn.functional.normalize(reference.double(), dim=-1)
    cosine = (a * b).sum(-1)
    similarity = a @ b.T
    own = similarity.diagonal().unsqueeze(1)
    rank = (similarity > own).sum(1)  # how many other sentences beat the sentence itself
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "top1": float((rank == 0).double().mean()), "recall_at_10": float((rank < 10).double().mean())}


def _batches(tokenizer, sentences: list[str], max_length: int, batch_size: int):
    """Padded batches {input_ids, attention_mask} of the sentences (padded by hand: not every tokenizer has a pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(sentences), batch_size):
        rows = tokenizer(sentences[start:start + batch_size], truncation=True, max_length=max_length).input_ids
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        yield {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, sentences: list[str], *, max_length: int = 128,
                        batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """The pooled embeddings (n, d), float32 on CPU, of `sentences` by `model`."""
    device = next(model.parameters()).device
    pooling = pooling_of(model)
    was_training = model.training
    model.eval()
    out = []
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))  # similar lengths share a batch
    try:
        for batch in tqdm(list(_batches(tokenizer, [sentences[i] for i in order], max_length, batch_size)),
                          desc="Embedding", unit="batch", disable=not progress):
            out.append(embed(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             pooling).float().cpu())
    finally:
        model.train(was_training)
    vectors = torch.empty_like(torch.cat(out))
    vectors[torch.tensor(order)] = torch.cat(out)
    if not torch.isfinite(vectors).all():
        raise LowrankError("the model produced NaN or Inf embeddings; the compressed weights are broken")
    return vectors


def has_mlm_head(model: nn.Module) -> bool:
    """True for masked-LM models (BertForMaskedLM, ...), whose loss is the MLM perplexity."""
    return type(model).__name__.endswith("ForMaskedLM")


@torch.no_grad()
def mlm_perplexity(model: nn.Module, tokenizer, sentences: list[str], *, max_length: int = 128,
                   batch_size: int = 32, seed: int = 0) -> float:
    """exp(mean cross-entropy) of recovering MASK_FRACTION of the real tokens (special tokens never masked)."""
    if tokenizer.mask_token_id is None:
        raise LowrankError("the tokenizer has no [MASK] token, so the MLM perplexity cannot be measured")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in _batches(tokenizer, sentences, max_length, batch_size):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        special = torch.tensor([tokenizer.get_special_tokens_mask(row.tolist(), already_has_special_tokens=True)
                                for row in ids], dtype=torch.bool)
        chosen = (torch.rand(ids.shape, generator=generator) < MASK_FRACTION) & mask.bool() & ~special
        if not chosen.any():
            continue
        masked = ids.masked_fill(chosen, tokenizer.mask_token_id)
        logits = model(input_ids=masked.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        total += float(nn.functional.cross_entropy(logits[chosen], ids[chosen], reduction="sum"))
        count += int(chosen.sum())
    if count == 0:
        raise LowrankError("no tokens to mask in the evaluation sentences; give more text")
    return math.exp(total / count)


def compare_encoders(model: nn.Module, reference: nn.Module, tokenizer, text: str, *, max_sentences: int | None = None,
                     max_length: int = 128, batch_size: int = 32, progress: bool = True) -> EncoderAgreement:
    """How closely `model` embeds the sentences of `text` as `reference` does (see the module docstring)."""
    sentences = split_sentences(text)[:max_sentences]
    if len(sentences) < 2:
        raise LowrankError(f"the evaluation text holds {len(sentences)} sentence(s) of at least {MIN_WORDS} words; "
                           "self-retrieval needs at least 2: give more text")
    ours = sentence_embeddings(model, tokenizer, sentences, max_length=max_length, batch_size=batch_size,
                               progress=progress)
    theirs = sentence_embeddings(reference, tokenizer, sentences, max_length=max_length, batch_size=batch_size,
                                 progress=progress)
    if ours.shape != theirs.shape:
        raise LowrankError(f"the reference embeds into {theirs.shape[1]} dimensions and the model into "
                           f"{ours.shape[1]}; pass the dense model it was compressed from as --against")
    result = EncoderAgreement(sentences=len(sentences), **agreement(ours, theirs))
    if has_mlm_head(model) and has_mlm_head(reference) and tokenizer.mask_token_id is not None:
        result.mlm_perplexity = mlm_perplexity(model, tokenizer, sentences, max_length=max_length,
                                               batch_size=batch_size)
        result.reference_mlm_perplexity = mlm_perplexity(reference, tokenizer, sentences, max_length=max_length,
                                                         batch_size=batch_size)
    return result
