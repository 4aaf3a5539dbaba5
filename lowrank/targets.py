"""Which modules of a model are matrices to factor, and how to read their weight as (out, in).

transformers' GPT-2 family stores `Conv1D` weights transposed, (in, out); `weight_matrix` is the
single place that knows about that orientation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LowrankError

try:  # transformers moved Conv1D between releases
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    from transformers.modeling_utils import Conv1D  # type: ignore


@dataclass(frozen=True)
class Target:
    """A linear map y = W x + b inside the model that may be replaced by low-rank factors."""

    name: str
    out_features: int
    in_features: int
    has_bias: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def params(self) -> int:
        """Parameters of the dense weight (the bias is never factored)."""
        return self.out_features * self.in_features


def is_linear(module: nn.Module) -> bool:
    """True for modules computing y = W x + b: nn.Linear and transformers' Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a linear module as an (out_features, in_features) matrix."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a linear module")


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the longest ModuleList of identical modules."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise LowrankError(
            f"no stack of transformer blocks found in {type(model).__name__}; "
            "pass --include with a regex naming the layers to factor"
        )
    return best


def name_filter(include: str | None = None, exclude: str | None = None):
    """A test on module names: matches `include` (if given) and not `exclude` (regexes searched in the name)."""
    include_re = re.compile(include) if include else None
    exclude_re = re.compile(exclude) if exclude else None

    def wanted(name: str) -> bool:
        if include_re is not None and not include_re.search(name):
            return False
        return exclude_re is None or not exclude_re.search(name)

    return wanted


def find_targets(
    model: nn.Module,
    include: str | None = None,
    exclude: str | None = None,
) -> list[Target]:
    """Linear modules to factor, in model order.

    By default every linear layer inside the transformer blocks (embeddings, lm_head and
    poolers sit outside them). `include` replaces that default with a regex searched in
    each module's full name; `exclude` then removes names matching its regex.
    """
    wanted = name_filter(include, exclude)
    block_prefix = None if include else find_block_list(model)[0] + "."
    targets = []
    for name, module in model.named_modules():
        if not is_linear(module) or not wanted(name):
            continue
        if block_prefix is not None and not name.startswith(block_prefix):
            continue
        out_features, in_features = weight_matrix(module).shape
        targets.append(Target(name, out_features, in_features, module.bias is not None))
    if not targets:
        filters = ", ".join(
            f"{flag} {value!r}" for flag, value in (("--include", include), ("--exclude", exclude)) if value
        )
        raise LowrankError(
            f"no linear layers to factor in {type(model).__name__}"
            + (f" with {filters}" if filters else "")
            + "; check the regexes against the module names (lowrank analyze lists them)"
        )
    return targets
