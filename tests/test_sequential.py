"""Sequential compression: block-by-block statistics from the compressed path, through the one compress loop.

Capturing block inputs is tested in test_block_capture.py, the least-squares update in test_update.py.
"""

import copy

import pytest
import torch
from helpers import CAUSAL_ARCHITECTURES, TINY_ARCHITECTURES, VOCAB, make_tiny_model, random_windows, run_cli
from test_block_capture import sliding_qwen2  # a Qwen2 whose blocks get different masks

from lowrank.calibration import collect_stats
from lowrank.compression import apply_plan, compress_model
from lowrank.model_planning import uniform_plan
from lowrank.errors import LowrankError
from lowrank.layers import LowRankLinear
from lowrank.plan import ModulePlan, Plan
from lowrank.compression import compress_sequential
from lowrank.targets import find_targets


def logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


def full_rank_plan(model) -> Plan:
    """Every target factored at rank min(m, n): an exact factorization, so nothing may change."""
    return Plan(modules={t.name: ModulePlan(t.shape, min(t.shape)) for t in find_targets(model)})


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


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
    from lowrank.evaluation import perplexity

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


def test_the_sequential_producer_yields_each_block_then_the_layers_outside():
    from lowrank.model_planning import plan_modules
    from lowrank.sequential import sequential_statistics

    model = make_tiny_model("llama")
    chosen = find_targets(model, include=r"(mlp\.\w+_proj|lm_head)")
    plan = Plan(modules={t.name: ModulePlan(t.shape, 4) for t in chosen})
    targets = {t.name: t for t in plan_modules(model, plan)}
    seen = [(work.prefix, work.names, set(work.stats), work.block is not None)
            for work in sequential_statistics(model, plan, targets, random_windows(4, 16), 2, progress=False)]
    assert [prefix for prefix, *_ in seen] == ["model.layers.0.", "model.layers.1.", ""]
    assert seen[0][1] == [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert seen[2][1] == ["lm_head"] and not seen[2][3]  # outside the blocks: no block to update against
    assert all(set(names) == stats for _, names, stats, _ in seen)
