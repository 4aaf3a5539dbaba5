"""Facts about a transformers model that several stages ask: its class, its kind, its size.

A leaf module (it imports nothing of lowrank's), so that loading, profiling and evaluation can all
use it without importing one another.
"""

from __future__ import annotations

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
