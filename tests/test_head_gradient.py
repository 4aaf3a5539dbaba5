"""The next-token loss's gradient at the last block's output, a slice of tokens at a time: the whole batch's, through
each model's own head (a final norm, a tied head, Gemma 2's soft-capped logits), up to float32 rounding.

The products of a slice of a few rows may round differently from the whole batch's in MKL's kernels (seen
on an AMD EPYC host with AVX2: slices of under a window, 1–2 units in the last place; bit for bit on the
Intel hosts measured), so the comparisons allow a millionth of the largest entry: a slice missed, run
twice or shifted by a token moves entries by the size of the entries themselves."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import CAUSAL_ARCHITECTURES, VOCAB, make_tiny_model, random_windows

from lowrank import head_gradient as head
from lowrank import sensitivity
from lowrank.calibration import StatsCollector
from lowrank.head_gradient import final_hidden_states, head_gradient, slice_tokens, token_slices
from lowrank.targets import find_block_list, find_targets


def assert_same_up_to_rounding(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within a millionth of `expected`'s largest entry (float32 rounds at 6e-8 of it)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def _model(arch: str) -> torch.nn.Module:
    if arch != "gemma2":
        return make_tiny_model(arch)
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       final_logit_softcapping=5.0)
    return transformers.Gemma2ForCausalLM(config).eval()


def _whole_batch_gradient(model, blocks, final, batch) -> torch.Tensor:
    """The textbook: the model's own forward with the last block's output replaced by `final`, all the logits at
    once, the summed next-token loss, and its gradient at `final`."""
    whole = final.clone().requires_grad_(True)
    handle = blocks[-1].register_forward_hook(lambda module, args, output: whole)
    logits = model(input_ids=batch, use_cache=False).logits
    handle.remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                             reduction="sum")
    return torch.autograd.grad(loss, whole)[0]


def test_slices_cover_every_token_once_within_the_budget():
    for windows, length, tokens in [(3, 20, 7), (3, 20, 45), (3, 20, 20), (1, 5, 100), (4, 512, 85)]:
        covered = torch.zeros(windows, length, dtype=torch.int64)
        for rows, positions in token_slices(windows, length, tokens):
            assert covered[rows, positions].numel() <= tokens
            covered[rows, positions] += 1
        assert torch.equal(covered, torch.ones_like(covered)), (windows, length, tokens)
    # parts of one window, as equal as they come; whole windows together where they fit
    assert [(r.stop - r.start, p.stop - p.start) for r, p in token_slices(3, 20, 7)] == [(1, 7), (1, 7), (1, 6)] * 3
    assert [(r.start, r.stop) for r, _ in token_slices(3, 20, 45)] == [(0, 2), (2, 3)]
    assert [p.stop - p.start for _, p in token_slices(1, 512, 85)] == [74] * 6 + [68]
    # 16 MiB of float32 logits: 85 tokens over SmolLM2's 49,152 words, 1 over a vocabulary too wide for one
    assert slice_tokens(49152) == 85 and slice_tokens(10**9) == 1 and slice_tokens(VOCAB, budget=VOCAB * 4 * 10) == 10


@pytest.mark.parametrize("arch", [*CAUSAL_ARCHITECTURES, "gemma2"])
@pytest.mark.parametrize("tokens", [7, 45, None])
def test_the_gradient_by_slices_is_the_whole_batch_gradient(arch, tokens):
    model = _model(arch)
    batch = random_windows(3, 20)
    torch.manual_seed(1)
    final = torch.randn(3, 20, model.config.hidden_size)
    _, blocks = find_block_list(model)
    expected = _whole_batch_gradient(model, blocks, final, batch)

    logit_shapes = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, output: logit_shapes.append(output.shape[:-1]))
    got = head_gradient(model, blocks, final, batch, torch.device("cpu"), tokens=tokens)
    assert_same_up_to_rounding(got, expected)
    assert float(got[:, :-1].abs().min(-1).values.max()) > 0 and torch.equal(got[:, -1], torch.zeros_like(got[:, -1]))
    expected_shapes = {7: [(1, 7), (1, 7), (1, 6)] * 3, 45: [(2, 20), (1, 20)], None: [(3, 20)]}[tokens]
    assert [tuple(s) for s in logit_shapes] == expected_shapes  # never more logits at once than a slice's
    assert all(not isinstance(block, head._Injector) for block in blocks)  # the blocks are put back


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_final_hidden_states_are_the_last_blocks_output_and_the_head_does_not_run(arch):
    model = make_tiny_model(arch)
    batch = random_windows(2, 12)
    _, blocks = find_block_list(model)
    seen = []
    handle = blocks[-1].register_forward_hook(lambda m, a, output: seen.append(output))
    model(input_ids=batch, use_cache=False)
    handle.remove()
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    assert torch.equal(final_hidden_states(model, blocks, batch), seen[0])
    assert head_calls == []


def test_the_fishers_from_sliced_logits_are_those_from_the_whole_logits(monkeypatch):
    """The in-memory sensitivity pass through the head by slices of 5 tokens: every target's Fisher as through the
    whole batch's logits at once (the path it took before), up to rounding."""
    model = make_tiny_model("llama")
    targets = find_targets(model)
    windows = random_windows(4, 16)
    monkeypatch.setattr(head, "LOGITS_SLICE_BYTES", 5 * 4 * VOCAB)
    sliced = sensitivity.measure_output_fisher(model, targets, windows, batch_size=2, progress=False)
    monkeypatch.setitem(sensitivity.BACKWARD, "next-token", sensitivity.backward_next_token_whole)
    whole = sensitivity.measure_output_fisher(model, targets, windows, batch_size=2, progress=False)
    assert sliced.keys() == whole.keys()
    for name in whole:
        assert sliced[name].tokens == whole[name].tokens == 4 * 16
        assert_same_up_to_rounding(sliced[name].matrix, whole[name].matrix)


def test_an_included_head_is_measured_once_per_token(monkeypatch):
    """With the head itself a target, the backward takes the whole logits: slices would run the head (and the
    statistics riding along) a second time."""
    model = make_tiny_model("llama")
    targets = find_targets(model, include=r"lm_head|layers\.1\.mlp\.down_proj")
    assert {t.name for t in targets} == {"lm_head", "model.layers.1.mlp.down_proj"}
    monkeypatch.setattr(head, "LOGITS_SLICE_BYTES", 5 * 4 * VOCAB)
    with StatsCollector(model, targets) as collector:
        fisher = sensitivity.measure_output_fisher(model, targets, random_windows(4, 16), batch_size=2,
                                                   progress=False, after_batch=collector.end_batch)
    assert collector.stats["lm_head"].count == fisher["lm_head"].tokens == 4 * 16
    assert collector.stats["model.layers.1.mlp.down_proj"].count == 4 * 16
