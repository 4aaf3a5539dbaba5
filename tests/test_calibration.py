"""Calibration text handling and the activation statistics the hooks accumulate."""

import logging

import pytest
import torch
from helpers import (TINY_ARCHITECTURES, make_tiny_model, make_tiny_tokenizer, random_windows, save_tiny_model,
                     smollm2_calibration)

import lowrank
from lowrank.calibration import (ActivationStats, StatsCollector, add_gram_, calibration_tokens, collect_stats,
                                 distinct_tokens_covered, load_text, sample_text_path, statistics_runner, text_windows,
                                 thin_calibration, token_windows, warn_if_thin)
from lowrank.compression import compress_model
from lowrank.config import CompressConfig
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


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_statistics_skip_the_head_and_equal_a_full_forward(arch):
    """collect_stats runs the backbone only (the head's logits are unused): the same Grams, bit for bit, as
    hooks on a full-model forward, and the head never runs; with the head as a target, the whole model runs."""
    model = make_tiny_model(arch)
    targets = find_targets(model)
    windows = random_windows(4, 12)
    head = model.get_output_embeddings()
    head_calls = []
    handle = head.register_forward_hook(lambda *a: head_calls.append(1)) if head is not None else None
    stats = collect_stats(model, targets, windows, batch_size=2, progress=False)
    assert head_calls == []
    if handle is not None:
        handle.remove()
    full = StatsCollector(model, targets)
    with full, torch.no_grad():
        for batch in windows.split(2):
            model(input_ids=batch)
            full.end_batch()
    for target in targets:
        assert torch.equal(stats[target.name].gram, full.stats[target.name].gram), target.name
        assert torch.equal(stats[target.name].abs_sum, full.stats[target.name].abs_sum), target.name
    if head is not None and isinstance(head, torch.nn.Linear) and arch != "bert":
        head_name = next(n for n, m in model.named_modules() if m is head)
        with_head = find_targets(model, include=head_name.replace(".", r"\.") + "$")
        assert statistics_runner(model, with_head) is model
        assert collect_stats(model, with_head, windows, progress=False)[head_name].count == 4 * 12


@pytest.mark.parametrize("dim, block", [(48, 16), (96, 40), (600, 256), (40, 64)])
def test_gram_from_upper_blocks_equals_the_full_product(dim, block):
    """add_gram_ forms only the blocks on and above the diagonal and mirrors them: float32 sums are the same
    bits as the full x.T @ x on CPU, and float64 ones agree to rounding."""
    g = torch.Generator().manual_seed(dim)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(300, dim, generator=g, dtype=dtype) * torch.rand(dim, generator=g, dtype=dtype)
        gram = torch.zeros(dim, dim, dtype=torch.float64)
        full = torch.zeros(dim, dim, dtype=torch.float64)
        for _ in range(2):
            add_gram_(gram, x, block)
            full += (x.T @ x).double()
        if dtype == torch.float32:
            assert torch.equal(gram, full)
        assert torch.allclose(gram, full, rtol=1e-12, atol=1e-12 * float(full.abs().max()))


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


def test_enough_text_gives_todays_non_overlapping_windows_and_no_warning(caplog):
    """With room for the windows asked for, they are the non-overlapping ones drawn by randperm, as always."""
    for n_tokens in (1000, 1099):  # exactly ten windows of 100, and ten with a remainder
        ids = torch.arange(n_tokens)
        windows = token_windows(ids, 10, 100, seed=5)
        starts = torch.randperm(10, generator=torch.Generator().manual_seed(5))[:10].sort().values * 100
        assert torch.equal(windows[:, 0], starts)
        assert torch.equal(windows, ids[: 1000].view(10, 100))  # all ten, each once, in order
    picked = token_windows(torch.arange(1000), 4, 100, seed=5)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5))[:4].sort().values * 100
    assert torch.equal(picked[:, 0], expected)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_short_text_gives_overlapping_windows_and_one_warning(caplog):
    """20 windows of 100 from 1000 tokens: random starts, overlaps, one warning with the tokens covered."""
    ids = torch.arange(1000) + 7  # token id = position + 7, so a window's content names its start
    with caplog.at_level("WARNING", logger="lowrank.calibration"):
        windows = token_windows(ids, 20, 100, seed=3)
    assert windows.shape == (20, 100)
    starts = windows[:, 0] - 7
    assert torch.equal(windows, ids[starts[:, None] + torch.arange(100)])  # each window is contiguous text
    assert starts.min() >= 0 and starts.max() <= 900 and torch.equal(starts, starts.sort().values)
    assert len(set(starts.tolist())) > 10  # not the ten non-overlapping windows: starts off the grid of 100
    assert any(s % 100 for s in starts.tolist())
    covered = len(set(windows.flatten().tolist()))  # distinct token positions, counted independently
    assert covered == distinct_tokens_covered(starts, 100, 1000)
    assert 100 < covered <= 1000
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"calibration text has 1000 tokens, enough for 10 non-overlapping windows of 100 but 20 "
                        f"were requested; using 20 overlapping windows, which cover {covered} distinct tokens "
                        f"({100 * covered / 1000:.0f}% of the text); give more text for independent windows"]
    assert torch.equal(token_windows(ids, 20, 100, seed=3), windows)  # seeded: the same windows again
    assert not torch.equal(token_windows(ids, 20, 100, seed=4), windows)


def test_distinct_tokens_covered_counts_the_union_of_windows():
    assert distinct_tokens_covered(torch.tensor([0, 50, 300]), 100, 1000) == 250  # [0,150) ∪ [300,400)
    assert distinct_tokens_covered(torch.tensor([0, 0, 0]), 100, 100) == 100
    assert distinct_tokens_covered(torch.tensor([0, 100, 200]), 100, 300) == 300


def test_text_of_exactly_one_window_repeats_it():
    windows = token_windows(torch.arange(100), 3, 100, seed=0)
    assert torch.equal(windows, torch.arange(100).repeat(3, 1))


def test_text_shorter_than_one_window_is_refused():
    with pytest.raises(CalibrationError, match="calibration text has 99 tokens, fewer than one window of 100; "
                                               "give more text or lower --seq-len"):
        token_windows(torch.arange(99), 2, 100)
    with pytest.raises(CalibrationError, match="evaluation text has 99 tokens, fewer than one window of 100"):
        token_windows(torch.arange(99), None, 100, what="evaluation")


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


def test_missing_source_and_offline_dataset(tmp_path, monkeypatch):
    with pytest.raises(CalibrationError, match="not a file, a folder or a data set name"):
        load_text([tmp_path / "nope.txt"])
    # Offline for sure (read when datasets is imported): without this, an installed datasets package
    # retried the Hub for 25 s here, and a machine with network access would download wikitext.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CalibrationError, match="wikitext2"):
        load_text(["wikitext2"])  # no datasets package or offline: either way one clear line


def test_bundled_windows_with_a_real_tokenizer():
    windows = text_windows(make_tiny_tokenizer(), None, 4, 64, seed=0)
    assert windows.shape == (4, 64)
    assert sample_text_path("macbeth").is_file()


def test_thin_calibration_names_the_widest_input_only_when_the_tokens_fall_short():
    """The warning's numbers: the tokens, the widest input and how many are wider; none once tokens ≥ every width."""
    widths = {"a.q_proj": 48, "a.down_proj": 96, "b.down_proj": 96, "b.q_proj": 48}
    assert thin_calibration(96, widths) is None  # as many rows as inputs: the Gram can have full rank
    message = thin_calibration(64, widths)
    assert message.startswith("the calibration holds 64 tokens, fewer than the 96 inputs of a.down_proj (2 of 4 target "
                              "layers have more inputs than that)")
    assert "give at least 96 tokens" in message
    assert "(4 of 4 target layers" in thin_calibration(47, widths)
    assert calibration_tokens(torch.zeros(3, 7)) == 21
    assert calibration_tokens([torch.zeros(2, 5), torch.zeros(1, 9)]) == 19  # sentence batches of unequal length


def thin_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("the calibration holds")]


def test_compress_warns_once_when_the_calibration_has_fewer_tokens_than_the_widest_input(caplog):
    """2 × 16 tokens against inputs of 48 and 96: the Grams really are singular, and compress says so once."""
    model = make_tiny_model("llama")
    windows = random_windows(2, 16)
    stats = collect_stats(model, find_targets(model), windows, progress=False)
    # of widths 48 and 96, rank 32 at most (past it only float32 rounding: eigenvalues ~1e-7 of the largest)
    assert max(int(torch.linalg.matrix_rank(s.gram, rtol=1e-5)) for s in stats.values()) == 32
    with caplog.at_level(logging.WARNING, logger="lowrank"):
        compress_model(model, ratio=0.8, windows=windows, progress=False)
    assert thin_warnings(caplog) == [thin_calibration(32, {t.name: t.in_features for t in find_targets(
        make_tiny_model("llama"))})]
    assert "fewer than the 96 inputs of model.layers.0.mlp.down_proj (14 of 14" in thin_warnings(caplog)[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowrank"):
        compress_model(make_tiny_model("llama"), ratio=0.8, windows=random_windows(4, 24), progress=False)  # 96 tokens
        compress_model(make_tiny_model("llama"), ratio=0.8, method="svd", windows=windows, progress=False)  # no Grams
        compress_model(make_tiny_model("llama"), ratio=0.8, method="asvd", windows=windows, progress=False)  # Σ|x|
    assert thin_warnings(caplog) == []


def test_streamed_compress_warns_as_in_memory(tmp_path, caplog):
    """The streamed path checks the same tokens against the same widths (64 tokens: the two down_proj only)."""
    save_tiny_model(tmp_path / "src")
    with caplog.at_level(logging.WARNING, logger="lowrank"):
        lowrank.compress(tmp_path / "src", CompressConfig(stream=True), random_windows(4, 16), output=tmp_path / "out",
                         progress=False)
    assert len(thin_warnings(caplog)) == 1
    assert thin_warnings(caplog)[0].startswith("the calibration holds 64 tokens, fewer than the 96 inputs of "
                                               "model.layers.0.mlp.down_proj (2 of 14 target layers")


def test_smollm2_on_1024_tokens_of_hamlet_warns_and_its_down_proj_grams_are_singular(smollm2, caplog):
    """SmolLM2's down_proj reads 1536 inputs: 2 windows of 512 leave its Gram singular and warn; the real-model
    tests' 16 × 128 tokens do not."""
    targets = find_targets(smollm2.model)
    thin = text_windows(smollm2.tokenizer, None, 2, 512)
    with caplog.at_level(logging.WARNING, logger="lowrank"):
        warn_if_thin(thin, targets)
        warn_if_thin(smollm2_calibration(smollm2.tokenizer), targets)  # 2048 tokens
    assert len(thin_warnings(caplog)) == 1
    assert thin_warnings(caplog)[0].startswith("the calibration holds 1024 tokens, fewer than the 1536 inputs of "
                                               "model.layers.0.mlp.down_proj (30 of 210 target layers")
    down = [t for t in targets if t.name == "model.layers.29.mlp.down_proj"]
    gram = collect_stats(smollm2.model, down, thin, progress=False)[down[0].name].gram
    assert gram.shape == (1536, 1536) and int(torch.linalg.matrix_rank(gram, rtol=1e-5)) <= 1024
