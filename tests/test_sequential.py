"""Sequential compression: block-by-block statistics from the compressed path, and the LS update."""

import copy

import pytest
import torch
import transformers
from helpers import CAUSAL_ARCHITECTURES, TINY_ARCHITECTURES, VOCAB, make_tiny_model, random_windows, run_cli

from lowrank.calibration import collect_stats
from lowrank.compress import apply_plan, compress_model, uniform_plan
from lowrank.errors import LowrankError
from lowrank.factorize import whiten_factors
from lowrank.layers import LowRankLinear
from lowrank.plan import ModulePlan, Plan
from lowrank.sequential import capture_block_inputs, compress_sequential, refit_up
from lowrank.targets import find_block_list, find_targets


def logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


def full_rank_plan(model) -> Plan:
    """Every target factored at rank min(m, n): an exact factorization, so nothing may change."""
    return Plan(modules={t.name: ModulePlan(t.shape, min(t.shape)) for t in find_targets(model)})


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---- capture --------------------------------------------------------------------------------------

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

@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize("update", [False, True])
def test_full_rank_reproduces_the_dense_model(arch, update):
    model = make_tiny_model(arch)
    dense = copy.deepcopy(model)
    windows = random_windows(6, 20)
    compress_sequential(model, full_rank_plan(model), windows, batch_size=4, update=update, progress=False)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert torch.allclose(logits(model, windows), logits(dense, windows), atol=1e-4, rtol=1e-4)


def test_full_rank_with_per_block_masks():
    model = sliding_qwen2()
    dense = copy.deepcopy(model)
    windows = random_windows(4, 12)
    compress_sequential(model, full_rank_plan(model), windows, batch_size=2, progress=False)
    assert torch.allclose(logits(model, windows), logits(dense, windows), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_low_ratio_gives_a_usable_model(arch):
    model = make_tiny_model(arch)
    dense = copy.deepcopy(model)
    windows = random_windows(8, 24)
    plan = compress_sequential(model, uniform_plan(model, find_targets(model), 0.5), windows, progress=False)
    assert plan.options["sequential"] is True and plan.factored
    for name, rank in plan.factored.items():
        assert model.get_submodule(name).rank == rank
    out, ref = logits(model, windows), logits(dense, windows)
    assert torch.isfinite(out).all()
    assert 1e-4 < relative_error(out, ref) < 1.0
    assert model.config.quantization_config.ranks == plan.factored


# ---- what makes it sequential ---------------------------------------------------------------------

def test_block_statistics_come_from_the_compressed_earlier_blocks():
    """Block 1 is factored exactly as if its statistics were collected after block 0 was compressed."""
    dense = make_tiny_model("llama")
    windows = random_windows(8, 24)
    plan = uniform_plan(dense, find_targets(dense), 0.4)
    block0 = {n: m for n, m in plan.modules.items() if n.startswith("model.layers.0.")}
    block1 = {n: m for n, m in plan.modules.items() if n.startswith("model.layers.1.")}

    sequential = copy.deepcopy(dense)
    compress_sequential(sequential, Plan(modules=dict(plan.modules)), windows, batch_size=3, progress=False)

    by_hand = copy.deepcopy(dense)
    targets = {t.name: t for t in find_targets(by_hand)}
    stats0 = collect_stats(by_hand, [targets[n] for n in block0], windows, progress=False)
    apply_plan(by_hand, Plan(modules=block0), stats0, progress=False)
    stats1 = collect_stats(by_hand, [targets[n] for n in block1], windows, progress=False)
    apply_plan(by_hand, Plan(modules=block1), stats1, progress=False)

    one_shot = copy.deepcopy(dense)
    stats = collect_stats(one_shot, list(targets.values()), windows, progress=False)
    apply_plan(one_shot, Plan(modules=dict(plan.modules)), stats, progress=False)

    for name in block1:
        got = sequential.get_submodule(name).merged_weight()
        assert torch.allclose(got, by_hand.get_submodule(name).merged_weight(), atol=1e-5)
        assert not torch.allclose(got, one_shot.get_submodule(name).merged_weight(), atol=1e-3)
    for name in block0:  # block 0 sees the dense inputs in every mode
        assert torch.allclose(sequential.get_submodule(name).merged_weight(),
                              one_shot.get_submodule(name).merged_weight(), atol=1e-5)


def test_update_changes_the_factors_after_the_first_layer_group():
    model = make_tiny_model("llama")
    windows = random_windows(8, 24)
    plain, updated = copy.deepcopy(model), copy.deepcopy(model)
    plan = uniform_plan(model, find_targets(model), 0.4)
    compress_sequential(plain, Plan(modules=dict(plan.modules)), windows, progress=False)
    compress_sequential(updated, Plan(modules=dict(plan.modules)), windows, update=True, progress=False)
    first = plain.get_submodule("model.layers.0.self_attn.q_proj").up.weight
    # q/k/v read the block input, identical in the dense and compressed block: the refit is a no-op.
    assert torch.allclose(updated.get_submodule("model.layers.0.self_attn.q_proj").up.weight, first, atol=1e-4)
    later = "model.layers.0.mlp.down_proj"
    assert not torch.allclose(updated.get_submodule(later).up.weight, plain.get_submodule(later).up.weight, atol=1e-3)
    assert torch.isfinite(logits(updated, windows)).all()


def test_targets_outside_the_blocks_are_factored_last():
    model = make_tiny_model("llama")
    windows = random_windows(6, 16)
    targets = find_targets(model, include=r"lm_head|mlp")
    plan = uniform_plan(model, targets, 0.5)
    assert "lm_head" in plan.factored
    compress_sequential(model, plan, windows, progress=False)
    assert isinstance(model.lm_head, LowRankLinear)
    assert torch.isfinite(logits(model, windows)).all()


# ---- the closed-form update -----------------------------------------------------------------------

def test_refit_up_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    x_dense = torch.randn(300, 12, generator=g, dtype=torch.float64)
    x_comp = x_dense + 0.3 * torch.randn(300, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(7, 12, generator=g, dtype=torch.float64)
    down = torch.randn(4, 12, generator=g, dtype=torch.float64)
    up = refit_up(weight, down, x_comp.T @ x_comp, x_dense.T @ x_comp, ridge=0.0)
    codes = x_comp @ down.T  # (tokens, k)
    expected = torch.linalg.lstsq(codes, x_dense @ weight.T).solution.T
    assert torch.allclose(up, expected, atol=1e-8)
    # Without `cross`, the target is W applied to the compressed inputs themselves.
    up_own = refit_up(weight, down, x_comp.T @ x_comp, None, ridge=0.0)
    assert torch.allclose(up_own, torch.linalg.lstsq(codes, x_comp @ weight.T).solution.T, atol=1e-8)


def test_refit_up_leaves_whitened_truncation_unchanged_on_its_own_inputs():
    """Whitened truncation's `up` is already the least-squares optimum for its `down` and Gram matrix."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 10, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 10, dtype=torch.float64)
    weight = torch.randn(6, 10, generator=g, dtype=torch.float64)
    factors = whiten_factors(weight, x.T @ x, 3, damping=0.0)
    assert torch.allclose(refit_up(weight, factors.down, x.T @ x, ridge=0.0), factors.up, atol=1e-8)


# ---- entry points ---------------------------------------------------------------------------------

def test_compress_model_dispatches_to_sequential():
    model = make_tiny_model("gpt2")
    windows = random_windows(6, 16)
    reference = copy.deepcopy(model)
    plan = compress_model(model, ratio=0.5, windows=windows, sequential=True, update=True, progress=False,
                          strategy="uniform")
    assert (plan.options["sequential"], plan.options["update"], plan.options["update_target"]) == (True, True, "dense")
    compress_sequential(reference, uniform_plan(reference, find_targets(reference), 0.5), windows, update=True,
                        progress=False)
    assert torch.allclose(logits(model, windows), logits(reference, windows), atol=1e-5)


def test_update_needs_statistics_and_sequential():
    model = make_tiny_model("llama")
    with pytest.raises(LowrankError, match="--update"):
        compress_model(model, ratio=0.5, method="svd", update=True, progress=False)
    with pytest.raises(LowrankError, match="--sequential"):
        compress_model(model, ratio=0.5, windows=random_windows(2, 8), sequential=False, update=True, progress=False)
    with pytest.raises(LowrankError, match="calibration"):
        compress_sequential(model, uniform_plan(model, find_targets(model), 0.5), None, progress=False)


def test_already_factored_model_is_refused():
    model = make_tiny_model("opt")
    windows = random_windows(4, 12)
    plan = uniform_plan(model, find_targets(model), 0.5)
    compress_sequential(model, Plan(modules=dict(plan.modules)), windows, progress=False)
    with pytest.raises(LowrankError, match="already factored"):
        compress_sequential(model, plan, windows, progress=False)


@pytest.mark.parametrize("arch", CAUSAL_ARCHITECTURES[:1])
def test_input_windows_and_dense_model_are_not_modified(arch):
    model = make_tiny_model(arch)
    windows = random_windows(4, 12)
    before = windows.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    copy_for_compression = copy.deepcopy(model)
    compress_sequential(copy_for_compression, uniform_plan(model, find_targets(model), 0.5), windows, progress=False)
    assert torch.equal(windows, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_sequential_with_update(tiny_model_folder, tmp_path, capsys):
    from lowrank.checkpoint import load_compressed, read_plan

    out = tmp_path / "seq"
    code, stdout, _ = run_cli(capsys, "compress", tiny_model_folder, "--ratio", "0.5", "--samples", "4",
                              "--seq-len", "32", "--sequential", "--update", "-o", out, "--quiet")
    assert code == 0, stdout
    plan, _ = read_plan(out)
    assert plan.options["sequential"] is True and plan.options["update"] is True and plan.options["samples"] == 4
    model = load_compressed(out)
    ids = torch.randint(3, VOCAB, (2, 16))
    assert torch.isfinite(logits(model, ids)).all()


def test_cli_refuses_update_without_sequential(tiny_model_folder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", tiny_model_folder, "--samples", "4", "--seq-len", "32",
                           "--one-shot", "--update", "-o", tmp_path / "x", "--quiet")
    assert code == 1 and "--sequential" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_help_names_the_modes(capsys):
    code, stdout, _ = run_cli(capsys, "compress", "--help")
    assert code == 0 and "--sequential / --one-shot" in stdout and "--update / --no-update" in stdout


# ---- the real model -------------------------------------------------------------------------------

@pytest.mark.slow
def test_sequential_on_smollm2_matches_one_shot_quality(smollm2):
    """End to end on the real model with little calibration text (8×256 tokens).

    With this little text, plain sequential measured 614 against one-shot's 574 (it wins clearly
    on the full 64×512 protocol: reports/sequential.md), so this asserts a usable model within
    25% of one-shot, not a win. It does not reuse the session's shared compression (conftest
    `smollm2_compressed`): it compares one-shot and sequential on one plan at 0.6, and the shared
    one is one-shot only, at 0.8.
    """
    from lowrank.calibration import text_windows
    from lowrank.evaluate import perplexity

    calib = text_windows(smollm2.tokenizer, None, 8, 256, seed=0, default="hamlet")
    evaluation = text_windows(smollm2.tokenizer, None, None, 256, what="evaluation", default="macbeth")[:4]
    targets = find_targets(smollm2.model)
    one_shot, sequential = copy.deepcopy(smollm2.model), copy.deepcopy(smollm2.model)
    plan = uniform_plan(one_shot, targets, 0.6)
    stats = collect_stats(one_shot, targets, calib, progress=False)
    apply_plan(one_shot, Plan.from_dict(plan.to_dict()), stats, progress=False)
    compress_sequential(sequential, Plan.from_dict(plan.to_dict()), calib, progress=False)
    ppl_one_shot = perplexity(one_shot, evaluation, progress=False).perplexity
    ppl_sequential = perplexity(sequential, evaluation, progress=False).perplexity
    dense = perplexity(smollm2.model, evaluation, progress=False).perplexity
    assert dense < ppl_sequential < 1.25 * ppl_one_shot


def test_sequential_with_update_is_the_default():
    model = make_tiny_model("qwen2")
    windows = random_windows(6, 16)
    reference = copy.deepcopy(model)
    plan = compress_model(model, ratio=0.5, windows=windows, strategy="uniform", progress=False)
    assert plan.options["sequential"] is True and plan.options["update"] is True
    compress_sequential(reference, uniform_plan(reference, find_targets(reference), 0.5), windows, update=True,
                        progress=False)
    assert torch.allclose(logits(model, windows), logits(reference, windows), atol=1e-5)
    one_shot = compress_model(make_tiny_model("qwen2"), ratio=0.5, windows=windows, sequential=False, progress=False)
    assert "sequential" not in one_shot.options
    svd = compress_model(make_tiny_model("qwen2"), ratio=0.5, method="svd", progress=False)  # no statistics to sequence
    assert "sequential" not in svd.options
