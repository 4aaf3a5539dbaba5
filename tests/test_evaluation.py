"""Perplexity: exp of the mean next-token loss, over windows scored one by one, on models whose logits we know.

A tiny Llama with its head replaced by a zero-weight linear layer with bias b predicts the same
logits b at every position, so the loss of target y is logsumexp(b) − b_y: a closed form to compare with.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import VOCAB, make_tiny_model, random_windows
from torch import nn

from lowrank.errors import LowrankError
from lowrank.evaluation import perplexity


def with_constant_logits(bias: torch.Tensor) -> nn.Module:
    """A tiny Llama whose logits are `bias` at every position, whatever the input."""
    model = make_tiny_model("llama")
    head = nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    model.lm_head = head
    return model


def test_uniform_logits_give_the_vocabulary_size():
    result = perplexity(with_constant_logits(torch.zeros(VOCAB)), random_windows(5, 12), progress=False)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-6)
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_known_logits_give_the_closed_form_over_the_predicted_tokens():
    bias = torch.linspace(-3.0, 3.0, VOCAB)
    windows = random_windows(6, 10, seed=3)
    targets = windows[:, 1:]  # the first token of each window is never predicted
    losses = torch.logsumexp(bias.double(), 0) - bias.double()[targets]
    result = perplexity(with_constant_logits(bias), windows, batch_size=4, progress=False)
    assert result.nll == pytest.approx(losses.mean().item(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(losses.mean().item()), rel=1e-5)
    assert (result.tokens, result.windows, result.seq_len) == (6 * 9, 6, 10)


def test_each_window_is_scored_alone_so_the_batch_size_does_not_matter():
    model, windows = make_tiny_model("llama"), random_windows(7, 16, seed=1)
    by_one = perplexity(model, windows, batch_size=1, progress=False)
    by_three = perplexity(model, windows, batch_size=3, progress=False)  # batches of 3, 3 and 1
    assert by_three.perplexity == pytest.approx(by_one.perplexity, rel=1e-5)
    first_two = perplexity(model, windows[:2], progress=False)
    last_five = perplexity(model, windows[2:], progress=False)
    pooled = (first_two.nll * first_two.tokens + last_five.nll * last_five.tokens) / (7 * 15)
    assert by_one.nll == pytest.approx(pooled, rel=1e-5) and by_one.tokens == 7 * 15


def test_the_training_mode_is_restored():
    model = make_tiny_model("llama").train()
    perplexity(model, random_windows(2, 8), progress=False)
    assert model.training
    perplexity(model.eval(), random_windows(2, 8), progress=False)
    assert not model.training


def test_nan_logits_are_refused():
    model = with_constant_logits(torch.zeros(VOCAB))
    with torch.no_grad():
        model.lm_head.bias[5] = float("nan")
    with pytest.raises(LowrankError, match="the model produced NaN or Inf logits; the compressed weights are broken"):
        perplexity(model, random_windows(2, 8), progress=False)


def test_an_encoder_is_refused():
    with pytest.raises(LowrankError, match="perplexity needs a causal language model, and BertForMaskedLM is not one"):
        perplexity(make_tiny_model("bert"), random_windows(2, 8), progress=False)


def test_the_result_reads_as_a_dictionary():
    result = perplexity(with_constant_logits(torch.zeros(VOCAB)), random_windows(2, 8), progress=False)
    assert result.to_dict() == {"perplexity": result.perplexity, "nll": result.nll, "tokens": 14, "windows": 2,
                                "seq_len": 8}
