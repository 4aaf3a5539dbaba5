"""Sentence embeddings of an encoder: the pooled (and, where the model says so, normalized) vector
that users of a sentence encoder consume, read from the model's own sentence-transformers config.

A sentence-transformers folder says how it pools in `1_Pooling/config.json` and whether it
normalizes in `modules.json`; `attach_pooling` copies that onto the model's config (as
`sentence_pooling`), so it is saved in every compressed folder's config.json and read back from
there. Without it an encoder pools by the mean over its tokens, as sentence-transformers does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LowrankError
from .model_info import is_causal_lm

POOLING_MODES = ("mean", "cls", "max")
#: The model-config attribute that carries the pooling into saved folders.
POOLING_ATTRIBUTE = "sentence_pooling"


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence vector: the mean, [CLS] or max over tokens; then maybe unit length."""

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise LowrankError(f"unknown pooling {self.mode!r}; choose one of {', '.join(POOLING_MODES)}")


def read_pooling(folder: str | Path) -> Pooling | None:
    """The pooling a sentence-transformers folder declares (1_Pooling/config.json, modules.json), or None."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        kinds = [str(m.get("type", "")) for m in modules]
        pooling_dirs = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")]
        settings = {}
        if pooling_dirs and (folder / pooling_dirs[0] / "config.json").is_file():
            settings = json.loads((folder / pooling_dirs[0] / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise LowrankError(f"cannot read the sentence-transformers config in {folder} ({exc}); fix or remove "
                           "modules.json") from None
    mode = "mean"
    if settings.get("pooling_mode_cls_token"):
        mode = "cls"
    elif settings.get("pooling_mode_max_tokens"):
        mode = "max"
    return Pooling(mode, normalize=any(kind.endswith(".Normalize") for kind in kinds))


def attach_pooling(model: nn.Module, folder: str | Path) -> None:
    """Record the folder's declared pooling on the model's config (kept when the model is saved)."""
    pooling = read_pooling(folder)
    if pooling is not None and getattr(model, "config", None) is not None:
        setattr(model.config, POOLING_ATTRIBUTE, asdict(pooling))


def pooling_of(model: nn.Module) -> Pooling:
    """The model's pooling: the one recorded on its config, else mean pooling without normalization."""
    recorded = getattr(getattr(model, "config", None), POOLING_ATTRIBUTE, None)
    if isinstance(recorded, dict):
        return Pooling(str(recorded.get("mode", "mean")), bool(recorded.get("normalize", False)))
    return Pooling()


def is_encoder(model: nn.Module) -> bool:
    """A model whose product is its hidden states (BERT and kin), not next-token predictions."""
    return not is_causal_lm(model)


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """Sentence vectors (b, d) from token states (b, s, d) and the attention mask (b, s) of real tokens."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    if pooling.mode == "cls":
        vectors = hidden[:, 0]
    elif pooling.mode == "max":
        vectors = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
    else:
        vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling.normalize:
        vectors = nn.functional.normalize(vectors.float(), dim=-1)
    return vectors


def last_hidden_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      hidden_states: bool = False):
    """The encoder's output states (b, s, d), or with `hidden_states` the tuple of every layer's."""
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states)
    if hidden_states:
        return outputs.hidden_states
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:  # a model with a head (BertForMaskedLM, ...): its last hidden state
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    return hidden


def embed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
          pooling: Pooling | None = None) -> torch.Tensor:
    """The sentence embeddings (b, d) of a batch, pooled as the model pools (differentiable)."""
    hidden = last_hidden_state(model, input_ids, attention_mask)
    return pool(hidden, attention_mask, pooling or pooling_of(model))
