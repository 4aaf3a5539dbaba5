"""Teach transformers to load lowrank checkpoints: `from_pretrained(folder)` just works.

A compressed `config.json` carries `quantization_config = {"quant_method": "lowrank", "ranks": ...}`.
transformers looks the method up among registered quantizers; ours swaps a `LowRankLinear` in
for every factored module while the model is still on the meta device, before the weights load.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "lowrank"
FORMAT_VERSION = 1


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
        if self.format_version > FORMAT_VERSION:
            from .errors import LowrankError

            raise LowrankError(
                f"checkpoint format version {self.format_version} is newer than this lowrank "
                f"(reads up to {FORMAT_VERSION}); upgrade lowrank"
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

        install_lowrank_skeleton(model, self.quantization_config.ranks)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

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
