"""Sentence calibration for encoders (lowrank.sentences), the pipeline on lists of batches, and the exact
per-direction embedding prices (lowrank.embedding_prices)."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import make_tiny_model, make_tiny_tokenizer, random_windows
from lowrank.calibration import first_windows, load_text, sample_text_path, window_batches, window_count
from lowrank.compression import compress_model
from lowrank.embedding_prices import measure_embedding_prices, whitened_basis
from lowrank.encoders import Pooling, embed
from lowrank.errors import CalibrationError
from lowrank.factorize import whitening
from lowrank.calibration import collect_stats
from lowrank.layers import LowRankLinear
from lowrank.sentences import batch_by_length, choose_sentences, sentence_batches
from lowrank.targets import find_targets


def test_batches_group_equal_lengths_so_nothing_is_padded():
    rows = [[1, 5, 2], [1, 6, 7, 2], [1, 8, 2], [1, 9, 9, 9, 2], [1, 4, 2]]
    batches = batch_by_length(rows, batch_size=2, seed=0)
    assert sorted(tuple(b.shape) for b in batches) == [(1, 3), (1, 4), (1, 5), (2, 3)]
    assert sorted(tuple(r) for b in batches for r in b.tolist()) == sorted(tuple(r) for r in rows)
    assert [b.tolist() for b in batch_by_length(rows, 2, seed=0)] == [b.tolist() for b in batches]  # seeded


def test_choose_sentences_stops_at_the_token_budget():
    lengths = [10] * 20
    chosen = choose_sentences(lengths, token_budget=35, seed=1)
    assert len(chosen) == 4 and chosen == sorted(chosen)  # 3 sentences hold 30 < 35 tokens, the 4th crosses it
    assert choose_sentences(lengths, None, seed=1) == list(range(20))


def test_sentence_batches_frame_each_sentence_with_its_special_tokens():
    tokenizer = make_tiny_tokenizer()
    tokenizer.cls_token, tokenizer.sep_token = "<s>", "</s>"
    from tokenizers import processors
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    text = "Exit. Fair is foul, and foul is fair. Hover through the fog and filthy air. When shall we three meet again?"
    batches = sentence_batches(tokenizer, text, token_budget=None, max_length=20, batch_size=4)
    rows = [r for b in batches for r in b.tolist()]
    assert len(rows) == 3 and all(r[0] == 1 and r[-1] == 2 and len(r) <= 20 for r in rows)
    with pytest.raises(CalibrationError, match="no sentence"):
        sentence_batches(tokenizer, "Exit. Go.", token_budget=None, max_length=20, batch_size=4)


def test_window_helpers_treat_a_list_of_batches_like_the_tensor_it_splits():
    windows = random_windows(7, 6)
    as_list = list(windows.split(3))
    assert [b.tolist() for b in window_batches(as_list, 99)] == [b.tolist() for b in window_batches(windows, 3)]
    assert window_count(as_list) == window_count(windows) == 7
    assert torch.equal(torch.cat(first_windows(as_list, 5)), first_windows(windows, 5))


def test_compressing_from_a_list_of_batches_equals_compressing_from_the_tensor():
    """Sequential whitening + update on the batches of a tensor, passed as a list: bit-identical factors."""
    windows = random_windows(8, 12)
    model_a, model_b = make_tiny_model("bert"), make_tiny_model("bert")
    compress_model(model_a, ratio=0.6, windows=windows, batch_size=4, strategy="global", progress=False)
    compress_model(model_b, ratio=0.6, windows=list(windows.split(4)), batch_size=99, strategy="global",
                   progress=False)
    factored = {n: m for n, m in model_a.named_modules() if isinstance(m, LowRankLinear)}
    assert factored
    for name, module in factored.items():
        assert torch.equal(module.down.weight, model_b.get_submodule(name).down.weight), name
        assert torch.equal(module.up.weight, model_b.get_submodule(name).up.weight), name


def test_embedding_prices_equal_the_squared_weight_gradient_along_each_direction():
    """price_j = mean over sentences and probes of (uⱼᵀ Γ ṽⱼ)², Γ = ∂(r·e)/∂W computed by plain autograd."""
    model = make_tiny_model("bert")
    name = "bert.encoder.layer.0.intermediate.dense"
    target = next(t for t in find_targets(model) if t.name == name)
    batches = [random_windows(3, 7, seed=1), random_windows(2, 9, seed=2)]
    stats = collect_stats(model, [target], batches, progress=False)
    white = whitening(stats[name].gram)
    weight = model.get_submodule(name).weight
    sigma, basis = whitened_basis(weight, white.root, white.inverse)
    prices = measure_embedding_prices(model, [target], batches, {name: basis}, probes=2, seed=5, progress=False)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())

    generator = torch.Generator().manual_seed(5)
    total = torch.zeros(sigma.numel(), dtype=torch.float64)
    for batch in batches:
        embeddings = embed(model, batch, pooling=Pooling())
        probes = [torch.randn(embeddings.shape, generator=generator) for _ in range(2)]
        for probe in probes:
            for row in range(batch.shape[0]):  # one sentence at a time: its own weight gradient
                single = embed(model, batch[row:row + 1], pooling=Pooling())
                (grad,) = torch.autograd.grad((single * probe[row:row + 1]).sum(), weight)
                total += ((basis.left.T @ grad.double()) * basis.right.T).sum(1) ** 2
    expected = total / (5 * 2)
    assert float(expected.max()) > 0
    torch.testing.assert_close(prices[name], expected, rtol=1e-3, atol=1e-5 * float(expected.max()))


def test_sensitivity_on_an_encoder_prices_every_direction_and_plans(tmp_path):
    """The sensitivity strategy on a BERT uses the embedding prices (exact σ² · price) and meets the budget."""
    model = make_tiny_model("bert")
    reference = copy.deepcopy(model)
    windows = [random_windows(4, 10, seed=3), random_windows(4, 14, seed=4)]
    plan = compress_model(model, ratio=0.7, windows=windows, strategy="sensitivity", progress=False)
    assert plan.strategy == "sensitivity" and 0.6 < plan.summary()["target_ratio"] <= 0.7 + 1e-9
    batch = random_windows(2, 10, seed=9)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(embed(model, batch), embed(reference, batch)).min()
    assert 0.5 < float(cosine) < 1.0
