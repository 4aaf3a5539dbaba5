"""Text as an encoder sees it: one sentence at a time, framed by its special tokens ([CLS] … [SEP]).

A sentence encoder is used on single sentences of a few dozen tokens, each starting at position 0
with [CLS] and ending with [SEP]. Calibrating it on 128-token chunks of running text shows it
inputs it never meets (no [CLS]/[SEP], positions up to 127, attention across sentence borders),
so its Gram matrices describe the wrong inputs. `sentence_batches` instead cuts the text into
sentences and groups sentences of the *same token length* into batches: no batch needs padding,
so no padding token ever enters a statistic, and attention is exactly what a padded, masked
batch would compute for each sentence on its own.

The batches are a list of (b, L) tensors of token ids with different L; the compression pipeline
accepts such a list wherever it accepts calibration windows (`calibration.window_batches`).
"""

from __future__ import annotations

import re

import torch

from .errors import CalibrationError

#: Sentences shorter than this many words (stage directions, "Exit.") are left out.
MIN_WORDS = 4


def split_sentences(text: str, min_words: int = MIN_WORDS) -> list[str]:
    """The sentences of `text` (ending in . ! or ?), whitespace collapsed, each of at least `min_words` words."""
    flat = re.sub(r"\s+", " ", text)
    pieces = re.split(r"(?<=[.!?])\s+", flat)
    return [p.strip() for p in pieces if len(p.split()) >= min_words]


def tokenize_sentences(tokenizer, sentences: list[str], max_length: int) -> list[list[int]]:
    """Each sentence's token ids with the tokenizer's special tokens, truncated to `max_length`."""
    return tokenizer(sentences, truncation=True, max_length=max_length, verbose=False).input_ids


def choose_sentences(lengths: list[int], token_budget: int | None, seed: int) -> list[int]:
    """Indices of sentences drawn at random (seeded) until they hold `token_budget` tokens (None: all), sorted."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    if token_budget is None:
        return sorted(order)
    chosen, total = [], 0
    for index in order:
        if total >= token_budget:
            break
        chosen.append(index)
        total += lengths[index]
    return sorted(chosen)


def batch_by_length(rows: list[list[int]], batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Rows grouped into (b ≤ batch_size, L) tensors of equal length L, in a seeded random order: no padding anywhere.

    The order is shuffled so that any prefix of the batches (the few the sensitivity prices
    backpropagate through) holds sentences of every length, not only the shortest.
    """
    by_length: dict[int, list[list[int]]] = {}
    for row in rows:
        by_length.setdefault(len(row), []).append(row)
    batches = []
    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), batch_size):
            batches.append(torch.tensor(group[start:start + batch_size], dtype=torch.long))
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order]


def sentence_batches(tokenizer, text: str, *, token_budget: int | None, max_length: int, batch_size: int,
                     seed: int = 0, what: str = "calibration") -> list[torch.Tensor]:
    """Sentences of `text` drawn at random until `token_budget` tokens, as equal-length batches (see module doc)."""
    if max_length < 3:
        raise CalibrationError(f"--seq-len must be at least 3 tokens for sentences ([CLS] word [SEP]), got {max_length}")
    sentences = split_sentences(text)
    if not sentences:
        raise CalibrationError(f"the {what} text holds no sentence of at least {MIN_WORDS} words; give more text")
    rows = tokenize_sentences(tokenizer, sentences, max_length)
    chosen = choose_sentences([len(r) for r in rows], token_budget, seed)
    return batch_by_length([rows[i] for i in chosen], batch_size, seed)


def framed_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of running text, each framed as a sentence is: [CLS] seq_len − 2 tokens [SEP].

    Training needs equal-length windows; framing them keeps the encoder's input what it was trained
    on (special tokens at both ends, positions from 0) while every token of the text is used.
    """
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise CalibrationError("the tokenizer has no [CLS]/[SEP] tokens to frame windows with; use plain windows")
    if seq_len < 3:
        raise CalibrationError(f"--seq-len must be at least 3 tokens for framed windows, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    body = seq_len - 2
    count = len(ids) // body
    if count == 0:
        raise CalibrationError(f"the text has {len(ids)} tokens, fewer than one window of {body}; give more text")
    inner = torch.tensor(ids[:count * body], dtype=torch.long).view(count, body)
    return torch.cat([torch.full((count, 1), cls), inner, torch.full((count, 1), sep)], dim=1)
