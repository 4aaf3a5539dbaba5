"""Facts about a model: its class from the config, whether it predicts the next token, its size."""

import transformers

from helpers import make_tiny_model
from lowrank.model_info import count_parameters, is_causal_lm, model_class_for


def test_model_class_comes_from_config_architectures():
    config = make_tiny_model("gpt2").config
    config.architectures = ["GPT2LMHeadModel"]  # what save_pretrained records
    assert model_class_for(config) is transformers.GPT2LMHeadModel
    config.architectures = ["NoSuchModel"]
    assert model_class_for(config) is transformers.AutoModelForCausalLM


def test_causal_lm_and_parameter_count():
    gpt2, bert = make_tiny_model("gpt2"), make_tiny_model("bert")
    assert is_causal_lm(gpt2) and not is_causal_lm(bert)
    tensors = {name: t for name, t in gpt2.state_dict().items() if not name.endswith(".attn.bias")}  # params only
    embedding = gpt2.transformer.wte.weight.numel()
    assert count_parameters(gpt2) == sum(t.numel() for t in tensors.values()) - embedding  # tied lm_head counted once
