"""LowRankLinear: a linear layer stored as two thin factors, x ↦ up(down(x)) + b."""

from __future__ import annotations

import torch
from torch import nn

from .errors import LowrankError
from .factorize import Factors
from .targets import weight_matrix


class LowRankLinear(nn.Module):
    """y = up(down(x)) + bias, with down: in → rank and up: rank → out.

    The two factors are plain `nn.Linear` modules, so tools that target linear layers (PEFT's
    LoRA, quantizers, torch.compile) work on them unchanged. The bias lives on `up`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} must lie in [1, {min(in_features, out_features)}]")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, factors: Factors, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None, device=None) -> "LowRankLinear":
        """A layer holding `factors` (and `bias`), cast to `dtype`."""
        out_features, rank = factors.up.shape
        in_features = factors.down.shape[1]
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            layer.down.weight.copy_(factors.down)
            layer.up.weight.copy_(factors.up)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) equivalent, computed on access and detached.

        Only for code that inspects `.weight` (its dtype, device, or model initialisers such as
        GPT-2's); the forward pass never builds it.
        """
        with torch.no_grad():
            return self.merged_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def merged_weight(self) -> torch.Tensor:
        """The dense (out, in) matrix up @ down that this layer represents."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted path `name` in `model`; return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def install_lowrank_skeleton(model: nn.Module, ranks: dict[str, int]) -> None:
    """Swap an empty LowRankLinear of the given rank in for each named linear module.

    Used before weights load (the model may be on the meta device): shapes, bias and dtype
    come from the module being replaced.
    """
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LowrankError(
                f"the checkpoint's plan names module {name!r}, which this model does not have; "
                "the config and the weights come from different models"
            ) from None
        if isinstance(old, LowRankLinear):
            continue
        weight = weight_matrix(old)
        out_features, in_features = weight.shape
        if not 1 <= rank <= min(out_features, in_features):
            raise LowrankError(
                f"rank {rank} for {name} is outside [1, {min(out_features, in_features)}]; the checkpoint is corrupt"
            )
        new = LowRankLinear(in_features, out_features, rank, bias=old.bias is not None,
                            device=weight.device, dtype=weight.dtype)
        replace_module(model, name, new)
