"""How much each matrix's output error moves the model's loss: the output Fisher, from a few backward passes.

For a target y = W x, perturbing its outputs by e_t raises the calibration loss by about
½ Σ_t (g_t · e_t)², where g_t = ∂loss/∂y_t (the Fisher, or Gauss-Newton, approximation of the
second-order term; the first-order term averages out at a trained model). Collecting
F = Σ_t g_t g_tᵀ for every target therefore prices any output error: truncating direction j of the
whitened SVD W·S = Σ σⱼ uⱼ vⱼᵀ costs about ½ σⱼ² · uⱼᵀ F uⱼ / N (inputs and output gradients taken
as independent, as in K-FAC). One backward pass per batch measures every matrix at once: seconds,
where ASVD's sensitivity search truncates each matrix in turn and re-evaluates the model.

An encoder has no next-token loss; what its users consume is the pooled sentence embedding e.
Its Gauss-Newton matrix is measured with random probes r ~ N(0, I) at the output: the gradient of
r·e is g = Jᵀr, and E[g gᵀ] = JᵀJ, so the same accumulation prices directions by how far they move
the embedding. A masked-LM checkpoint may use its MLM loss instead (objective "mlm").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .calibration import add_gram_, model_device, shortest_window, window_batches
from .encoders import embed
from .errors import LowrankError
from .head_gradient import final_hidden_states, head_gradient
from .model_info import frozen_in_eval, is_causal_lm, without_cache
from .sequential import block_of
from .targets import Target, find_block_list

#: What the backward passes differentiate: None picks next-token for causal LMs, embedding otherwise.
OBJECTIVES = ("next-token", "embedding", "mlm")
#: Random probe vectors per batch for the embedding objective.
EMBEDDING_PROBES = 4
MLM_MASK_FRACTION = 0.15


@dataclass
class OutputFisher:
    """Σ_t g_t g_tᵀ (float64) of the loss gradient w.r.t. one module's output, over `tokens` tokens.

    For a module wider out than in (an MLP's gate and up projections), `side` "input" holds
    Σ_t (Wᵀg_t)(Wᵀg_t)ᵀ instead, in × in: the gradient at the module's input through W alone, which
    autograd forms anyway. Every direction the planner prices lies in W's column space, u = W·a, where
    uᵀFu = aᵀ(WᵀFW)a: the same prices (`profiling.priced_spectrum`) from a matrix (in/out)² the size,
    and as much cheaper to sum.
    """

    matrix: torch.Tensor
    tokens: int = 0
    side: str = "output"

    @property
    def mean(self) -> torch.Tensor:
        """The per-token Fisher F / N."""
        return self.matrix / max(self.tokens, 1)


def direction_costs(fisher: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """uⱼᵀ F uⱼ for every column uⱼ of `directions` (out × r): the loss price of unit error along uⱼ."""
    directions = directions.to(torch.float64)
    return ((fisher.to(torch.float64) @ directions) * directions).sum(0)


def default_objective(model: nn.Module) -> str:
    """next-token for causal language models; the pooled embedding for every other model."""
    return "next-token" if is_causal_lm(model) else "embedding"


def backward_next_token(model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> None:
    """Backpropagate the summed next-token cross-entropy of `batch`: through the blocks once, and through the
    head a slice of tokens at a time (`lowrank.head_gradient`), so that the batch's logits never exist whole."""
    _, blocks = find_block_list(model)
    final = final_hidden_states(model, blocks, batch)
    final.backward(head_gradient(model, blocks, final.detach(), batch, final.device))


def backward_next_token_whole(model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> None:
    """`backward_next_token` from the whole batch's logits at once: for targets outside the blocks (an
    included lm_head), which the head's slices would run once more."""
    logits = model(input_ids=batch, **without_cache(model)).logits
    # each position's next token, none (ignored) after the last: the same gradients, without a shifted copy of the
    # logits (0.4 GB per 4 windows of 512 over a 49k vocabulary)
    following = nn.functional.pad(batch[:, 1:], (0, 1), value=-100)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), following.reshape(-1),
                                       reduction="sum", ignore_index=-100)
    loss.backward()


def backward_embedding_probes(model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> None:
    """Backpropagate r·e for EMBEDDING_PROBES random probes r ~ N(0, I) at the pooled embeddings e."""
    embeddings = embed(model, batch)
    for k in range(EMBEDDING_PROBES):
        probe = torch.randn(embeddings.shape, generator=generator).to(embeddings)
        (embeddings * probe).sum().backward(retain_graph=k < EMBEDDING_PROBES - 1)


def backward_masked_lm(model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> None:
    """Backpropagate the summed MLM loss of recovering MLM_MASK_FRACTION of the tokens (seeded)."""
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        mask_id = 103  # [MASK] in the BERT vocabularies, which do not record it in their config
    if mask_id >= model.config.vocab_size:
        raise LowrankError(f"the model's vocabulary has no [MASK] id {mask_id}; set mask_token_id in its config.json")
    chosen = torch.rand(batch.shape, generator=generator) < MLM_MASK_FRACTION
    chosen[:, 0] |= ~chosen.any(1)  # at least one masked token per window
    chosen = chosen.to(batch.device)
    logits = model(input_ids=batch.masked_fill(chosen, mask_id)).logits
    nn.functional.cross_entropy(logits[chosen].float(), batch[chosen], reduction="sum").backward()


def skip_draws(objective: str, model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> None:
    """Advance `generator` as the backward pass of `batch` would (probes, masks), without running it."""
    if objective == "embedding":
        for _ in range(EMBEDDING_PROBES):
            torch.randn((batch.shape[0], model.config.hidden_size), generator=generator)
    elif objective == "mlm":
        torch.rand(batch.shape, generator=generator)


def all_reduce_fishers(fishers: dict[str, OutputFisher]) -> None:
    """Sum every rank's Fishers and token counts in float64, in place (nothing with one process)."""
    if not distributed.active():
        return
    for fisher in fishers.values():
        tokens = torch.tensor(float(fisher.tokens), dtype=torch.float64)
        distributed.all_reduce_sum_([fisher.matrix, tokens], "the sensitivity")
        fisher.tokens = int(tokens)


BACKWARD = {"next-token": backward_next_token, "embedding": backward_embedding_probes, "mlm": backward_masked_lm}


def measure_output_fisher(
    model: nn.Module,
    targets: list[Target],
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    objective: str | None = None,
    seed: int = 0,
    after_batch: Callable[[], None] | None = None,
) -> dict[str, OutputFisher]:
    """Backpropagate `objective` on `windows` and accumulate every target's output Fisher.

    The objective is the next-token loss, random probes of the pooled embedding, or the MLM loss
    (None: `default_objective`). Parameters are frozen during the passes (no weight gradients are
    formed; only activations carry gradients), then restored. The model is left exactly as it was.
    `after_batch` is called after each batch's passes (a `StatsCollector` riding along ends its batch).
    """
    objective = objective or default_objective(model)
    if objective not in OBJECTIVES:
        raise LowrankError(f"unknown sensitivity objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective == "next-token" and not is_causal_lm(model):
        raise LowrankError(f"the next-token objective needs a causal language model, and {type(model).__name__} "
                           "is not one; use the embedding objective")
    if objective == "mlm" and not type(model).__name__.endswith("ForMaskedLM"):
        raise LowrankError(f"the mlm objective needs a masked-LM head, which {type(model).__name__} has not; "
                           "use the embedding objective")
    if shortest_window(windows) < 2:
        raise LowrankError("sensitivity needs windows of at least 2 tokens; raise --seq-len")
    device = model_device(model)
    through_input = {t.name for t in targets if t.out_features > t.in_features}  # see OutputFisher.side
    fishers = {}
    for t in targets:
        width = t.in_features if t.name in through_input else t.out_features
        fishers[t.name] = OutputFisher(torch.zeros(width, width, dtype=torch.float64),
                                       side="input" if t.name in through_input else "output")
    handles = []

    def accumulate(name: str):
        def hook(grad):
            flat = grad.detach().reshape(-1, grad.shape[-1]).float()
            add_gram_(fishers[name].matrix, flat)  # Σ g gᵀ from its upper block triangle (same bits)
            fishers[name].tokens += flat.shape[0]
        return hook

    def watch(name: str):
        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(accumulate(name))
        return hook

    def watch_input(name: str):
        def hook(module, args):
            if not args or not args[0].requires_grad:
                return None
            own = args[0].view_as(args[0])  # this module's own edge of a shared input: its gradient is Wᵀg alone
            own.register_hook(accumulate(name))
            return (own, *args[1:])
        return hook

    def make_differentiable(module, args, output):
        return output.requires_grad_(True)

    with frozen_in_eval(model):
        try:
            handles.append(model.get_input_embeddings().register_forward_hook(make_differentiable))
            for target in targets:
                module = model.get_submodule(target.name)
                handles.append(module.register_forward_pre_hook(watch_input(target.name))
                               if target.name in through_input else module.register_forward_hook(watch(target.name)))
            backward = BACKWARD[objective]
            if objective == "next-token" and any(block_of(t.name, find_block_list(model)[0]) is None for t in targets):
                backward = backward_next_token_whole
            generator = torch.Generator().manual_seed(seed)
            batches = distributed.with_ownership(window_batches(windows, batch_size))
            with torch.enable_grad():
                for batch, mine in tqdm(batches, desc="Sensitivity", unit="batch", disable=not progress):
                    if mine:
                        backward(model, batch.to(device), generator)
                    else:  # another rank's batch: draw its random numbers all the same, so seeds do not depend on N
                        skip_draws(objective, model, batch, generator)
                    if after_batch is not None:
                        after_batch()
        finally:
            for handle in handles:
                handle.remove()
    all_reduce_fishers(fishers)
    for name, fisher in fishers.items():
        if not torch.isfinite(fisher.matrix).all():
            raise LowrankError(f"the loss gradient at {name} is NaN or Inf; check the model and calibration text")
    return fishers
