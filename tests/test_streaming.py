"""Streaming compression (lowrank.streaming): the same compressed model as the in-memory path, block by block from disk."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (CAUSAL_ARCHITECTURES, TINY_ARCHITECTURES, VOCAB, interrupt_compress_pass_at, random_windows,
                     save_tiny_model)

import lowrank
from lowrank.block_source import INDEX_FILE, BlockSource
from lowrank.boundary_store import BoundaryStore
from lowrank.checkpoint import load_compressed
from lowrank.config import CompressConfig
from lowrank.errors import LowrankError
from lowrank.layers import LowRankLinear
from lowrank.planner import plan_profile
from lowrank.profile import Profile
from lowrank.profiling import profile_with_calibration, targets_of
from lowrank.stream_memory import estimate
from lowrank.stream_profile import profile_streamed
from lowrank.streaming import partial_dir


def _products(model) -> dict[str, torch.Tensor]:
    return {name: m.merged_weight() for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _compress_both(tmp_path, arch: str, **stream_options):
    save_tiny_model(tmp_path / "src", arch)
    windows = random_windows(12, 24)
    strategy = "global" if arch == "bert" else None  # streamed, an encoder plans globally (no embedding prices)
    dense = lowrank.compress(tmp_path / "src", CompressConfig(stream=False, strategy=strategy), windows,
                             output=tmp_path / "mem", progress=False)
    streamed = lowrank.compress(tmp_path / "src", CompressConfig(stream=True, strategy=strategy, **stream_options), windows,
                                output=tmp_path / "str", progress=False)
    return dense, streamed, windows


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_streamed_compression_equals_in_memory(tmp_path, arch):
    dense, streamed, windows = _compress_both(tmp_path, arch, max_shard_size="30KB")
    assert streamed.factored == dense.factored and streamed.factored
    assert (tmp_path / "str" / INDEX_FILE).is_file()  # sharded: blocks of ~80 KB pass the 30 KB cap
    a, b = load_compressed(tmp_path / "mem"), load_compressed(tmp_path / "str")
    products_a, products_b = _products(a), _products(b)
    assert products_a.keys() == products_b.keys()
    for name in products_a:
        assert torch.allclose(products_a[name], products_b[name], atol=1e-5, rtol=0), name
    with torch.no_grad():
        out_a, out_b = a(input_ids=windows).logits, b(input_ids=windows).logits
    assert torch.allclose(out_a, out_b, atol=1e-5, rtol=0)
    assert not partial_dir(tmp_path / "str").exists()


@pytest.mark.parametrize("arch", CAUSAL_ARCHITECTURES)
def test_streamed_prices_equal_fisher_prices(tmp_path, arch):
    """Σ_t (g_t·u)² from block-by-block backward passes equals uᵀFu from the whole model's Fisher."""
    model = save_tiny_model(tmp_path, arch)
    windows = random_windows(12, 24)
    reference = profile_with_calibration(model, windows, prices=True, progress=False)
    streamed = profile_streamed(BlockSource(tmp_path), targets_of(model), windows, BoundaryStore(), progress=False)
    for ref, got in zip(reference.matrices, streamed.matrices):
        assert ref.name == got.name
        assert torch.equal(ref.whitened, got.whitened)
        cost_ref, cost_got = 0.5 * ref.whitened**2 * ref.price, 0.5 * got.whitened**2 * got.price
        assert ((cost_ref - cost_got).abs() / cost_ref).max() < 1e-6, ref.name


def test_offloaded_boundaries_give_the_same_profile(tmp_path):
    model = save_tiny_model(tmp_path / "src", "llama")
    windows = random_windows(12, 24)
    kept = profile_streamed(BlockSource(tmp_path / "src"), targets_of(model), windows, BoundaryStore(), progress=False)
    store = BoundaryStore(cap_bytes=0, offload_dir=tmp_path / "spill")
    spilled = profile_streamed(BlockSource(tmp_path / "src"), targets_of(model), windows, store, progress=False)
    assert store.spilled_bytes > 0 and list((tmp_path / "spill").iterdir()) == []  # used, then cleaned up
    for a, b in zip(kept.matrices, spilled.matrices):
        assert torch.equal(a.price, b.price) and torch.equal(a.whitened, b.whitened)


def test_a_planning_profile_skips_sigma_of_w_and_plans_the_same(tmp_path):
    """plain=False (what the streamed compress plans on) leaves σ(W) out and changes nothing the planner reads;
    its file, kept for --resume, loads back as it was; a profile file that lost σ(W) otherwise is refused."""
    model = save_tiny_model(tmp_path / "src", "llama")
    windows = random_windows(12, 24)
    full = profile_streamed(BlockSource(tmp_path / "src"), targets_of(model), windows, BoundaryStore(), progress=False)
    planning = profile_streamed(BlockSource(tmp_path / "src"), targets_of(model), windows, BoundaryStore(),
                                progress=False, plain=False)
    assert all(m.sigma is not None for m in full.matrices) and all(m.sigma is None for m in planning.matrices)
    for a, b in zip(full.matrices, planning.matrices):
        assert torch.equal(a.whitened, b.whitened) and torch.equal(a.price, b.price), a.name
    loaded = Profile.load(planning.save(tmp_path / "planning.safetensors"))
    plans = [plan_profile(p, 0.6, "sensitivity") for p in (full, planning, loaded)]
    assert plans[0].factored and plans[0].factored == plans[1].factored == plans[2].factored
    full.options.pop("planning_only", None)
    for m in full.matrices:
        m.sigma = None  # σ(W) gone from a profile that does not say it plans only
    with pytest.raises(LowrankError, match="planning-only"):
        full.save(tmp_path / "broken.safetensors")


def test_run_past_memory_spills_with_offload_dir_and_refuses_without(tmp_path):
    save_tiny_model(tmp_path / "src", "llama")
    windows = random_windows(12, 24)
    source = BlockSource(tmp_path / "src")
    est = estimate(source, targets_of(source.model), windows, True, 8)
    limit = f"{est.total(0) + 1000}B"  # room for everything but the boundary activations
    with pytest.raises(LowrankError, match="--offload-dir"):
        lowrank.compress(tmp_path / "src", CompressConfig(stream=True, max_memory=limit), windows,
                         output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()
    config = CompressConfig(stream=True, max_memory=limit, offload_dir=str(tmp_path / "spill"))
    plan = lowrank.compress(tmp_path / "src", config, windows, output=tmp_path / "out", progress=False)
    reference = lowrank.compress(tmp_path / "src", CompressConfig(stream=True), windows, output=tmp_path / "ref",
                                 progress=False)
    assert plan.factored == reference.factored
    for name, product in _products(load_compressed(tmp_path / "out")).items():
        assert torch.equal(product, _products(load_compressed(tmp_path / "ref"))[name])


def test_the_estimate_counts_one_batch_through_a_block(tmp_path):
    """Both passes hold one calibration batch's activations inside a block beside their statistics: three
    MLP-wide and two hidden-wide float32 vectors per token (the 1.1B shape at 64 × 512 passed an estimate
    without them by 4 %)."""
    save_tiny_model(tmp_path / "src", "llama")  # hidden 48, MLP 96
    source = BlockSource(tmp_path / "src")
    windows = random_windows(12, 24)
    small, large = (estimate(source, targets_of(source.model), windows, True, 8, batch_size=b) for b in (2, 8))
    per_window = 24 * (3 * 96 + 2 * 48) * 4
    assert (small.forward, large.forward) == (2 * per_window, 8 * per_window)
    assert large.compress_fixed() - small.compress_fixed() == 6 * per_window
    assert large.profile_fixed() - small.profile_fixed() == 6 * per_window
    assert "one batch through it" in large.describe()


def test_the_estimate_counts_the_logits_of_one_slice_of_tokens(tmp_path, monkeypatch):
    """The head's step holds 4 copies of one slice's logits (lowrank.head_gradient), not of a window's or a
    batch's: the slice is as many tokens as fit the slice budget, at most one sensitivity batch."""
    from lowrank import head_gradient

    save_tiny_model(tmp_path / "src", "llama")  # vocabulary VOCAB
    source = BlockSource(tmp_path / "src")
    windows = random_windows(12, 24)
    base = source.outside_bytes() + source.block_bytes(0)
    monkeypatch.setattr(head_gradient, "LOGITS_SLICE_BYTES", 10 * VOCAB * 4)  # 10 tokens a slice
    assert estimate(source, targets_of(source.model), windows, True, 8).outside == base + 4 * 10 * VOCAB * 4
    monkeypatch.setattr(head_gradient, "LOGITS_SLICE_BYTES", 2**30)  # every token of a sensitivity batch (4 × 24)
    assert estimate(source, targets_of(source.model), windows, True, 8).outside == base + 4 * 4 * 24 * VOCAB * 4
    assert estimate(source, targets_of(source.model), windows, False, 8).outside == base  # no prices: no head step


def test_bf16_source_is_saved_in_bf16_unless_asked(tmp_path):
    model = save_tiny_model(tmp_path / "f32", "llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_bytes((tmp_path / "f32" / "tokenizer.json").read_bytes())
    windows = random_windows(12, 24)
    lowrank.compress(tmp_path / "src", CompressConfig(stream=True), windows, output=tmp_path / "bf16", progress=False)
    lowrank.compress(tmp_path / "src", CompressConfig(stream=True, save_dtype="float32"), windows,
                     output=tmp_path / "f32out", progress=False)
    lowrank.compress(tmp_path / "src", CompressConfig(stream=False), windows, output=tmp_path / "mem", progress=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # the math ran in float32 on the bf16 values: saved in float32, it equals the in-memory path exactly
    wide, memory = _products(load_compressed(tmp_path / "f32out")), _products(load_compressed(tmp_path / "mem"))
    narrow = _products(load_compressed(tmp_path / "bf16", dtype=torch.float32))
    for name in memory:
        assert torch.equal(wide[name], memory[name])
        assert torch.allclose(narrow[name], memory[name], atol=0.05 * memory[name].abs().max().item())


def test_resume_continues_from_the_last_finished_block(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "src", "llama")
    windows = random_windows(12, 24)
    config = CompressConfig(stream=True, max_shard_size="30KB")  # one shard per block: block 0 is flushed alone
    lowrank.compress(tmp_path / "src", config, windows, output=tmp_path / "whole", progress=False)

    loads = interrupt_compress_pass_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        lowrank.compress(tmp_path / "src", config, windows, output=tmp_path / "out", progress=False)
    partial = partial_dir(tmp_path / "out")
    assert (partial / "profile.safetensors").is_file() and not (tmp_path / "out").exists()
    assert json.loads((partial / "progress.json").read_text())["blocks"] == [0]

    with pytest.raises(LowrankError, match="other inputs"):
        lowrank.compress(tmp_path / "src", config.replace(ratio=0.6), windows, output=tmp_path / "out",
                         progress=False, resume=True)
    loads.clear()
    lowrank.compress(tmp_path / "src", config, windows, output=tmp_path / "out", progress=False, resume=True)
    assert loads == [1]  # no profile pass again, block 0 not again
    whole, resumed = _products(load_compressed(tmp_path / "whole")), _products(load_compressed(tmp_path / "out"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name])
    assert not partial.exists()


def test_streamed_output_reloads_with_from_pretrained(tmp_path):
    import transformers

    save_tiny_model(tmp_path / "src", "llama")
    windows = random_windows(12, 24)
    lowrank.compress(tmp_path / "src", CompressConfig(stream=True, max_shard_size="30KB"), windows,
                     output=tmp_path / "out", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert next(model.parameters()).dtype == torch.bfloat16
    reference = load_compressed(tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=windows).logits.float(), reference(input_ids=windows).logits, atol=0.1)


def test_streamed_output_reloads_with_device_map_auto_in_bf16(tmp_path):
    """What a user with accelerate does: from_pretrained(folder, device_map="auto", dtype=bfloat16)."""
    import transformers

    save_tiny_model(tmp_path / "src", "llama")
    windows = random_windows(12, 24)
    lowrank.compress(tmp_path / "src", CompressConfig(stream=True, max_shard_size="30KB"), windows,
                     output=tmp_path / "out", progress=False)
    narrow = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="auto",
                                                               dtype=torch.bfloat16)
    wide = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    factors = [m for m in narrow.modules() if isinstance(m, LowRankLinear)]
    assert factors and all(p.dtype == torch.bfloat16 for m in factors for p in m.parameters())
    with torch.no_grad():
        low = narrow(input_ids=windows.to(narrow.device)).logits.float().cpu()
        high = wide(input_ids=windows).logits
    assert (low - high).abs().max() < 0.05 * high.abs().max()
    assert torch.nn.functional.cosine_similarity(low.flatten(), high.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_update_on_kept_inputs_equals_running_the_dense_block_again(tmp_path, arch, monkeypatch):
    """The statistics forward keeps each layer's dense input; the update on them is bit-identical."""
    import copy

    import lowrank.compression as compression
    from lowrank.compression import compress_sequential
    from lowrank.model_planning import uniform_plan
    from lowrank.targets import find_targets

    model = save_tiny_model(tmp_path, arch)
    windows = random_windows(12, 24)
    original = compression.sequential_statistics
    results = []
    for keep in (True, False):
        monkeypatch.setattr(compression, "sequential_statistics",
                            lambda *args, keep_inputs=False, **kw: original(*args, keep_inputs=keep, **kw))
        copy_ = copy.deepcopy(model)
        compress_sequential(copy_, uniform_plan(copy_, find_targets(copy_), 0.6), windows, update=True,
                            progress=False)
        results.append(_products(copy_))
    assert results[0].keys() == results[1].keys() and results[0]
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_profile_pass_runs_each_calibration_batch_forward_once(tmp_path, monkeypatch):
    """The Grams ride along the forward sweep: no second pass of any calibration window."""
    import lowrank.stream_profile as stream_profile

    model = save_tiny_model(tmp_path, "llama")
    windows = random_windows(12, 24)  # the first 8 are the sensitivity windows, in batches of 4; then the last 4
    calls = []
    original = stream_profile.run_block

    def counting(block, hidden, call, device):
        calls.append(hidden.shape[0])
        return original(block, hidden, call, device)

    monkeypatch.setattr(stream_profile, "run_block", counting)
    profile_streamed(BlockSource(tmp_path), targets_of(model), windows, BoundaryStore(), progress=False)
    blocks = model.config.num_hidden_layers
    # forward sweep, per block: each window once, the sensitivity ones (4 + 4) among them, then the other 4;
    # backward sweep: the sensitivity batches again, nothing else
    assert calls == [4, 4, 4] * blocks + [4, 4] * blocks


@pytest.mark.parametrize("case, can", [("folder", True), ("no-stream", True), ("one-shot", False),
                                       ("include", False), ("svd", False), ("no-output", False),
                                       ("compressed", False), ("encoder", False), ("offload", True)])
def test_where_streaming_applies_and_when_it_is_asked_for(tmp_path, case, can):
    """Streaming applies to a causal LM's safetensors folder; it runs when asked (--stream or a streaming-only option)."""
    from lowrank.streaming import can_stream, should_stream

    save_tiny_model(tmp_path / "src", "bert" if case == "encoder" else "llama")
    source = tmp_path / "src"
    config = {"no-stream": CompressConfig(stream=False), "one-shot": CompressConfig(sequential=False),
              "include": CompressConfig(include="mlp"), "svd": CompressConfig(method="svd"),
              "offload": CompressConfig(offload_dir=str(tmp_path / "spill"))}.get(case, CompressConfig())
    if case == "compressed":
        lowrank.compress(source, CompressConfig(), random_windows(12, 24), output=tmp_path / "c", progress=False)
        source = tmp_path / "c"
    output = None if case == "no-output" else tmp_path / "out"
    assert can_stream(str(source), config, output) is can
    assert should_stream(str(source), config, output) is (case == "offload")
    if can:
        assert should_stream(str(source), config.replace(stream=True), output) is True


def test_a_checkpoint_that_would_not_fit_loaded_whole_streams_by_default(tmp_path):
    from lowrank.streaming import IN_MEMORY_PEAK_FACTOR, in_memory_peak_bytes, should_stream

    model = save_tiny_model(tmp_path / "src", "llama")
    source, output = str(tmp_path / "src"), tmp_path / "out"
    needed = in_memory_peak_bytes(tmp_path / "src")
    assert needed == IN_MEMORY_PEAK_FACTOR * 4 * sum(p.numel() for p in model.state_dict().values())
    assert should_stream(source, CompressConfig(), output, available=needed) is False  # fits: loaded whole
    assert should_stream(source, CompressConfig(), output, available=needed - 1) is True
    assert should_stream(source, CompressConfig(stream=False), output, available=1) is False  # --no-stream wins
    assert should_stream(source, CompressConfig(sequential=False), output, available=1) is False  # cannot stream


def test_ctrl_c_in_a_streamed_run_names_the_partial_folder_to_resume(tmp_path, monkeypatch, capsys):
    """The CLI's one line after Ctrl-C in a streamed run says where the finished blocks wait, and --resume works."""
    from helpers import run_cli

    save_tiny_model(tmp_path / "src", "llama")
    capsys.readouterr()  # what saving the tiny model printed
    original = BlockSource.load_block
    interrupt_compress_pass_at(monkeypatch, 1)
    argv = ["compress", str(tmp_path / "src"), "--stream", "--samples", "12", "--seq-len", "24", "--max-shard-size", "30KB",
            "-o", str(tmp_path / "out"), "-q"]
    code, _, err = run_cli(capsys, *argv)
    partial = partial_dir(tmp_path / "out")
    assert code == 130 and err.strip().splitlines() == [
        f"error: interrupted; the finished blocks are kept in {partial} (rerun with --resume to continue, or delete "
        "it); the input is untouched"]
    assert partial.is_dir() and not (tmp_path / "out").exists()
    monkeypatch.setattr(BlockSource, "load_block", original)
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert (tmp_path / "out").is_dir() and not partial.exists()
