"""Calibration text handling and the activation statistics the hooks accumulate."""

import pytest
import torch
from helpers import make_tiny_model, make_tiny_tokenizer, random_windows

from lowrank.calibration import (ActivationStats, collect_stats, load_text, sample_text_path, text_windows,
                                 token_windows)
from lowrank.errors import CalibrationError
from lowrank.targets import find_targets


def captured_inputs(model, names, windows):
    """Each named module's inputs, captured directly (the reference the hooks must match)."""
    seen = {name: [] for name in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        model(input_ids=windows)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_gram_count_and_mean_abs_match_direct_computation():
    model = make_tiny_model("llama")
    targets = find_targets(model)
    windows = random_windows(6, 20)
    stats = collect_stats(model, targets, windows, batch_size=4, progress=False)
    reference = captured_inputs(model, [t.name for t in targets], windows)
    for target in targets:
        x = reference[target.name]
        s = stats[target.name]
        assert s.count == 6 * 20
        assert torch.allclose(s.gram, x.T @ x, rtol=1e-5, atol=1e-5)
        assert torch.allclose(s.mean_abs, x.abs().mean(0), rtol=1e-5, atol=1e-6)


def test_modules_reading_one_input_share_one_accumulation():
    model = make_tiny_model("llama")
    stats = collect_stats(model, find_targets(model), random_windows(2, 8), progress=False)
    attn = "model.layers.0.self_attn."
    mlp = "model.layers.0.mlp."
    assert stats[attn + "q_proj"] is stats[attn + "k_proj"] is stats[attn + "v_proj"]
    assert stats[mlp + "gate_proj"] is stats[mlp + "up_proj"]
    assert stats[attn + "o_proj"] is not stats[attn + "q_proj"]
    assert stats[mlp + "down_proj"] is not stats[mlp + "up_proj"]
    assert len({id(s) for s in stats.values()}) == 2 * 4  # 4 distinct inputs per block


def test_activation_stats_update_in_float64():
    stats = ActivationStats.empty(3)
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    stats.update(x)
    stats.update(x)
    assert stats.count == 4
    assert torch.allclose(stats.gram, 2 * (x.T @ x).double())
    assert stats.gram.dtype == torch.float64


def test_token_windows_are_deterministic_and_distinct():
    ids = torch.arange(1000)
    a = token_windows(ids, 5, 100, seed=3)
    b = token_windows(ids, 5, 100, seed=3)
    c = token_windows(ids, 5, 100, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    starts = a[:, 0].tolist()
    assert len(set(starts)) == 5 and all(s % 100 == 0 for s in starts)  # non-overlapping windows
    assert token_windows(ids, None, 300).shape == (3, 300)


def test_too_short_text_says_how_much_is_there():
    with pytest.raises(CalibrationError, match="has 1000 tokens, enough for 10 windows of 100 but 20 were requested"):
        token_windows(torch.arange(1000), 20, 100)


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first text")
    sub = tmp_path / "folder"
    sub.mkdir()
    (sub / "b.txt").write_text("second text")
    (sub / "c.txt").write_text("third text")
    assert load_text([tmp_path / "a.txt"]) == "first text"
    assert load_text([sub]) == "second text\n\nthird text"
    assert "HAMLET" in load_text(None)[:2000]


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"   \n\n ", "empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"\xff\xfe\xfa not utf8", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=message):
        load_text([path])


def test_missing_source_and_offline_dataset(tmp_path):
    with pytest.raises(CalibrationError, match="not a file, a folder or a data set name"):
        load_text([tmp_path / "nope.txt"])
    with pytest.raises(CalibrationError, match="wikitext2"):
        load_text(["wikitext2"])  # offline here: no datasets package or no network, either way one clear line


def test_bundled_windows_with_a_real_tokenizer():
    windows = text_windows(make_tiny_tokenizer(), None, 4, 64, seed=0)
    assert windows.shape == (4, 64)
    assert sample_text_path("macbeth").is_file()
