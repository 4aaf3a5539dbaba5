"""End to end on the real SmolLM2-135M and real text: compress, save, reload with
transformers' from_pretrained, evaluate, generate.

Cross-cutting (tests/ mirrors lowrank/ otherwise): every stage at once, on the real model.
"""

import pytest
import torch
import transformers

import lowrank  # noqa: F401  (registers the lowrank quantizer with transformers)
from lowrank.calibration import text_windows
from lowrank.model_info import count_parameters
from lowrank.evaluation import perplexity

pytestmark = pytest.mark.slow


def test_compress_save_reload_evaluate(smollm2, smollm2_compressed):
    """The session's shared compression (whiten, one-shot, uniform, ratio 0.8; see conftest)."""
    tokenizer = smollm2.tokenizer
    evaluation = text_windows(tokenizer, None, None, 256, what="evaluation", default="macbeth")[:6]

    dense_ppl = perplexity(smollm2.model, evaluation, progress=False).perplexity
    model, plan, out = smollm2_compressed.model, smollm2_compressed.plan, smollm2_compressed.folder
    assert len(plan.factored) == 210  # 30 blocks × 7 projections, all below break-even at 0.8
    assert 0.79 < plan.target_ratio <= 0.8
    assert plan.model_params_after == count_parameters(model)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        difference = (reloaded(evaluation[:2]).logits - model(evaluation[:2]).logits).abs().max()
    assert difference < 1e-5

    ppl = perplexity(reloaded, evaluation, progress=False).perplexity
    # Truncation costs quality, but whitening keeps the model a language model.
    assert dense_ppl < ppl < 20 * dense_ppl

    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = reloaded_tokenizer("To be, or not to be", return_tensors="pt").input_ids
    generated = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt.shape[1] + 8


def test_quiet_loading_of_the_gguf_builtin_prints_nothing(capfd):
    """transformers' GGUF reader calls tqdm directly; with its progress bars off, loading must stay silent.

    It loads the model again, not through the session's `smollm2` fixture: loading is what it watches.
    """
    from lowrank.loading import load_model

    transformers.utils.logging.disable_progress_bar()
    try:
        loaded = load_model("smollm2-135m", need_tokenizer=False)
    finally:
        transformers.utils.logging.enable_progress_bar()
    assert count_parameters(loaded.model) > 100_000_000
    assert capfd.readouterr().err == ""
