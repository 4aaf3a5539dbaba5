"""Teach transformers to load lowrank checkpoints: `from_pretrained(folder)` just works.

A compressed `config.json` carries `quantization_config = {"quant_method": "lowrank", "ranks": ...}`.
transformers looks the method up among registered quantizers; ours swaps a `LowRankLinear` in
for every factored module while the model is still on the meta device, before the weights load.
On save it adds the guards (lowrank.folder_guard) that make a load without lowrank fail; on load
it skips them. `register` runs on `import lowrank`, and from the start-up hook (lowrank_autoload).
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .folder_guard import FORMAT_VERSION, GUARD_SHAPE, READABLE_FORMATS, SAFETENSORS_METADATA, guard_key, guard_patterns

QUANT_METHOD = "lowrank"


class LowrankConfig(QuantizationConfigMixin):
    """The `quantization_config` block of a lowrank checkpoint: format version and module ranks."""

    def __init__(
        self,
        ranks: dict[str, int] | None = None,
        format_version: int = FORMAT_VERSION,
        method: str | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        self.ranks = dict(ranks or {})
        self.method = method
        if self.format_version not in READABLE_FORMATS:
            from .errors import LowrankError

            raise LowrankError(
                f"checkpoint format version {self.format_version} is not one this lowrank reads "
                f"({', '.join(map(str, READABLE_FORMATS))}); upgrade lowrank (pip install -U lowrank)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "method": self.method,
            "ranks": dict(self.ranks),
        }


class LowrankQuantizer(HfQuantizer):
    """Builds the low-rank skeleton before weight loading; the weights then load as usual."""

    requires_calibration = False

    def __init__(self, quantization_config: LowrankConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .layers import install_lowrank_skeleton

        ranks = self.quantization_config.ranks
        install_lowrank_skeleton(model, ranks)
        ignored = set(model._keys_to_ignore_on_load_unexpected or ())
        model._keys_to_ignore_on_load_unexpected = ignored | guard_patterns(ranks)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def get_state_dict(self, model):
        """What save_pretrained writes: the model's tensors plus one guard per factored module."""
        import torch

        state = dict(model.state_dict())
        for name in self.quantization_config.ranks:
            dtype = model.get_submodule(name).up.weight.dtype
            state[guard_key(name)] = torch.zeros(GUARD_SHAPE, dtype=dtype)
        self.quantization_config.format_version = FORMAT_VERSION  # config.json is written after this
        return state

    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        """transformers 5's name for `get_state_dict`, with the safetensors header's metadata."""
        return self.get_state_dict(model), dict(SAFETENSORS_METADATA)

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, LowrankConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, LowrankQuantizer)


def attach(model, ranks: dict[str, int], method: str | None = None) -> None:
    """Mark an in-memory compressed model as a lowrank model, so save_pretrained writes our config."""
    config = LowrankConfig(ranks=ranks, method=method)
    model.config.quantization_config = config
    model.hf_quantizer = LowrankQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
