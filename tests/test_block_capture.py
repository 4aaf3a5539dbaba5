"""Capturing what the transformer blocks receive: no block runs, the model is restored, per-block arguments kept."""

import torch
import transformers

from helpers import VOCAB, make_tiny_model, random_windows
from lowrank.block_capture import capture_block_inputs
from lowrank.targets import find_block_list


def test_capture_runs_no_block_and_restores_the_model():
    model = make_tiny_model("llama")
    _, blocks = find_block_list(model)
    originals = list(blocks)
    calls = []
    handles = [b.register_forward_hook(lambda *a: calls.append(1)) for b in originals]
    windows = random_windows(5, 16)
    captured = capture_block_inputs(model, windows, batch_size=2)
    for h in handles:
        h.remove()
    assert calls == []  # recorders stood in for the blocks
    assert all(a is b for a, b in zip(blocks, originals))
    assert [h.shape for h in captured.hidden] == [(2, 16, 48), (2, 16, 48), (1, 16, 48)]
    embedded = model.model.embed_tokens(windows)
    assert torch.equal(torch.cat(captured.hidden), embedded.detach())
    assert len(captured.calls) == len(blocks) and all(len(c) == 3 for c in captured.calls)
    cos, sin = captured.calls[1][0].kwargs["position_embeddings"]
    assert cos.shape[-2:] == (16, 12) and captured.calls[0][0].kwargs["use_cache"] is False


def sliding_qwen2():
    """Qwen2 whose second layer uses a 4-token sliding window: the blocks get different masks."""
    config = transformers.Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      use_sliding_window=True, sliding_window=4, max_window_layers=1)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_each_block_keeps_its_own_arguments():
    model = sliding_qwen2()
    captured = capture_block_inputs(model, random_windows(2, 12), batch_size=2)
    masks = [captured.calls[i][0].kwargs["attention_mask"] for i in range(2)]
    assert masks[0] is None or not torch.equal(masks[0], masks[1])
    assert masks[1] is not None


# ---- exactness at full rank, on every architecture ----------------------------------------------

