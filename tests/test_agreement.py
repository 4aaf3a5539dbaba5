"""Agreement with the dense model: KL, top-1, greedy generation; `lowrank eval --against`."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from helpers import make_tiny_model, random_windows, run_cli
from lowrank.agreement import agreement, greedy_tokens, token_kl
from lowrank.evaluation import perplexity
from lowrank.errors import LowrankError


def test_token_kl_matches_a_hand_computation():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = ½ ln(½ / ¼) + ½ ln(½ / ¾) = ½ ln 2 + ½ ln(2/3)
    dense = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    compressed = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert float(token_kl(dense, compressed)) == pytest.approx(expected, rel=1e-12)
    # KL is not symmetric: the other direction is ¼ ln(½) + ¾ ln(3/2)
    assert float(token_kl(compressed, dense)) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)
    # logits are shift-invariant
    assert float(token_kl(dense + 7.0, compressed - 3.0)) == pytest.approx(expected, rel=1e-12)


def test_a_model_against_itself_agrees_completely():
    model = make_tiny_model("llama")
    windows = random_windows(6, 20)
    result = agreement(model, copy.deepcopy(model), windows, batch_size=4, prompts=3, prompt_tokens=5,
                       generated_tokens=8, progress=False)
    assert result.top1_agreement == 1.0 and result.kl_mean == 0.0 and result.kl_p95 == 0.0
    assert result.generation_agreement == 1.0 and result.prompts == 3
    assert result.dense_perplexity == result.perplexity
    assert result.perplexity == pytest.approx(perplexity(model, windows, progress=False).perplexity, rel=1e-6)
    assert result.tokens == 6 * 19


def test_agreement_with_a_different_model_matches_a_token_by_token_count():
    dense = make_tiny_model("llama")
    other = copy.deepcopy(dense)  # the dense model plus noise: it agrees on some tokens, not all
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    windows = random_windows(5, 16, seed=3)
    result = agreement(dense, other, windows, batch_size=2, prompts=4, prompt_tokens=6, generated_tokens=5,
                       progress=False)
    with torch.no_grad():
        p = torch.log_softmax(dense(input_ids=windows).logits[:, :-1].double(), -1)
        q = torch.log_softmax(other(input_ids=windows).logits[:, :-1].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).flatten()
    same = (p.argmax(-1) == q.argmax(-1)).double().mean()
    assert 0 < result.top1_agreement < 1 and result.top1_agreement == pytest.approx(float(same), abs=1e-12)
    assert result.kl_mean == pytest.approx(float(kl.mean()), rel=1e-9)
    assert result.kl_p95 == pytest.approx(float(np.percentile(kl.numpy(), 95)), rel=1e-9)
    assert result.kl_p95 > result.kl_mean > 0
    nll_dense = -p.gather(-1, windows[:, 1:, None]).sum() / kl.numel()
    assert result.dense_perplexity == pytest.approx(math.exp(float(nll_dense)), rel=1e-9)
    prompts = windows[:4, :6]
    same_text = (greedy_without_cache(dense, prompts, 5) == greedy_without_cache(other, prompts, 5)).all(dim=1)
    assert result.generation_agreement == float(same_text.double().mean())


def greedy_without_cache(model, prompts, new_tokens):
    """Greedy continuation recomputing the whole sequence for every token (the slow, obvious way)."""
    sequence = prompts
    with torch.no_grad():
        for _ in range(new_tokens):
            next_token = model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1)
            sequence = torch.cat([sequence, next_token[:, None]], dim=1)
    return sequence[:, prompts.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_tokens_with_the_cache_match_full_recomputation(arch):
    model = make_tiny_model(arch)
    prompts = random_windows(3, 7, seed=5)
    assert torch.equal(greedy_tokens(model, prompts, 6), greedy_without_cache(model, prompts, 6))


def test_vocabulary_mismatch_is_one_line():
    dense = make_tiny_model("llama")
    other = make_tiny_model("gpt2")
    other.resize_token_embeddings(50)
    with pytest.raises(LowrankError, match="vocabulary"):
        agreement(dense, other, random_windows(2, 8), progress=False)


def test_eval_against_the_plans_source(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "compressed"
    code, _, _ = run_cli(capsys, "compress", tiny_model_folder, "--ratio", "0.5", "--samples", "4", "--seq-len", "32",
                         "-o", out, "--quiet")
    assert code == 0
    code, stdout, stderr = run_cli(capsys, "eval", out, "--against", "--seq-len", "32", "--max-windows", "4",
                                   "--prompts", "3", "--prompt-tokens", "8", "--generated-tokens", "6", "--quiet",
                                   "--json", tmp_path / "agreement.json")
    assert code == 0, stderr
    record = json.loads((tmp_path / "agreement.json").read_text())
    assert record["against"] == str(tiny_model_folder)
    assert record["tokens"] == 4 * 31 and record["prompts"] == 3 and record["generated_tokens"] == 6
    assert 0 <= record["top1_agreement"] <= 1 and record["kl_p95"] >= 0 and record["kl_mean"] > 0
    assert "| top-1 agreement |" in stdout and f"{record['perplexity']:.3f}" in stdout
    # the dense perplexity is exactly what plain `lowrank eval` says about the dense folder
    code, stdout, _ = run_cli(capsys, "eval", tiny_model_folder, "--seq-len", "32", "--max-windows", "4", "--quiet",
                              "--json", tmp_path / "dense.json")
    assert json.loads((tmp_path / "dense.json").read_text())["perplexity"] == pytest.approx(
        record["dense_perplexity"], rel=1e-6)
    # a dense folder against itself, named explicitly
    code, stdout, _ = run_cli(capsys, "eval", tiny_model_folder, "--against", tiny_model_folder, "--seq-len", "32",
                              "--max-windows", "2", "--prompt-tokens", "4", "--generated-tokens", "4", "--quiet",
                              "--json", tmp_path / "self.json")
    self_record = json.loads((tmp_path / "self.json").read_text())
    assert code == 0 and self_record["top1_agreement"] == 1 and self_record["kl_mean"] == 0
    assert self_record["generation_agreement"] == 1


def test_against_alone_on_a_dense_folder_is_one_line(tiny_model_folder, capsys):
    code, _, stderr = run_cli(capsys, "eval", tiny_model_folder, "--against", "--seq-len", "32", "--quiet")
    assert code != 0 and stderr.startswith("error: ") and "--against DENSE" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_recipe_eval_stage_with_against(tiny_model_folder, tmp_path, capsys):
    """`eval: {against: plan}` in a recipe makes its eval stage measure agreement."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""model: {tiny_model_folder}
compress: {{ratio: 0.5}}
calibration: {{samples: 4, seq_len: 32}}
eval: {{seq_len: 32, max_windows: 2, against: plan, prompt_tokens: 8, generated_tokens: 4}}
stages:
  - stage: compress
    output: {tmp_path / 'c'}
  - stage: eval
    input: {tmp_path / 'c'}
    output: {tmp_path / 'e.json'}
""")
    code, _, stderr = run_cli(capsys, "run", recipe, "-q")
    assert code == 0, stderr
    record = json.loads((tmp_path / "e.json").read_text())
    direct = json.loads(json.dumps(__import__("lowrank").compare(tmp_path / "c", __import__("lowrank").EvalConfig(
        seq_len=32, max_windows=2, against="plan", prompt_tokens=8, generated_tokens=4), progress=False).to_dict()))
    assert {k: record[k] for k in direct} == direct and record["tokens"] == 2 * 31
