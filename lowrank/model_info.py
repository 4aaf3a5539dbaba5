"""Facts about a transformers model that several stages ask: its class, its kind, its size, its widths.

A leaf module (it imports nothing of lowrank's), so that loading, profiling and evaluation can all
use it without importing one another.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


def model_class_for(config):
    """The transformers class named in config.architectures (e.g. LlamaForCausalLM)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def is_causal_lm(model: nn.Module) -> bool:
    """True for models that predict the next token (LlamaForCausalLM, GPT2LMHeadModel, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def count_parameters(model: nn.Module) -> int:
    """Every distinct parameter of the model (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def without_cache(model: nn.Module) -> dict:
    """Keyword arguments that turn the KV cache off, for models whose forward() has one.

    Calibration and training never reuse a cache; encoders such as BERT (transformers 4.x) refuse
    the argument, so it is passed only where the forward accepts it.
    """
    import inspect

    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@contextmanager
def frozen_in_eval(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode with every parameter frozen (gradients reach only what hooks open up); both
    the mode and each parameter's requires_grad are restored afterwards, whatever happens."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield model
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)


def widths(config) -> tuple[int, int]:
    """A transformer config's hidden width and MLP width, under the names the architectures use."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    mlp = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
           or getattr(config, "n_inner", None) or 4 * hidden)
    return hidden, mlp
