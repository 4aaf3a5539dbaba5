"""vLLM plugin (entry point `vllm.general_plugins`): refuse lowrank checkpoints with a clear message.

vLLM reads `quantization_config.quant_method` from config.json and looks the method up among its
registered quantization configs. Serving factored layers is not implemented yet, so the method
registered here only refuses, naming the alternative. vLLM stays optional: nothing here imports
it unless vLLM itself calls `register`.
"""

from __future__ import annotations

from typing import Any, NoReturn

from .errors import LowrankError

QUANT_METHOD = "lowrank"
REFUSAL = ("this is a lowrank checkpoint (low-rank factored layers, quant_method 'lowrank'), and vLLM cannot "
           "serve it yet; load it with transformers instead (pip install lowrank, then "
           "AutoModelForCausalLM.from_pretrained(folder)), or serve the original dense model")


def refuse(quant_config: Any = None) -> NoReturn:
    """What vLLM gets when it tries to build the lowrank quantization method: an error naming the fix."""
    version = quant_config.get("format_version") if isinstance(quant_config, dict) else None
    where = f" (format version {version})" if version is not None else ""
    raise LowrankError(f"{REFUSAL}{where}")


def register() -> None:
    """Called by vLLM in each of its processes: register `lowrank` as a method that refuses to load."""
    try:
        from vllm.model_executor.layers.quantization import register_quantization_config
        from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    except ImportError:  # no vLLM, or one whose plugin API moved: nothing to register
        return

    @register_quantization_config(QUANT_METHOD)
    class LowrankRefusal(QuantizationConfig):
        """Stands in for lowrank in vLLM's registry; every way of building it refuses."""

        def __init__(self, *args, **kwargs):
            refuse()

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> NoReturn:
            refuse(config)

        @classmethod
        def get_name(cls) -> str:
            return QUANT_METHOD

        @classmethod
        def get_supported_act_dtypes(cls) -> list:
            return []

        @classmethod
        def get_min_capability(cls) -> int:
            return 0

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []

        def get_quant_method(self, layer, prefix: str) -> NoReturn:
            refuse()
