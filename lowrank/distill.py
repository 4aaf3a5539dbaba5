"""The losses recovery trains on: next-token cross-entropy and distillation from a dense teacher.

Encoders are distilled on hidden states instead: 1 − cosine or the mean squared error between
student and teacher token states, on the last layer or averaged over every layer; or ("embedding")
1 − cosine between the pooled sentence embeddings, the vectors users of the encoder consume.

Both are plain functions of logits, so they can be tested on small tensors. Distillation is the
KL divergence KL(teacher ‖ student) between the two next-token distributions, both softened by
a temperature T and scaled by T² so its gradients keep the size of the cross-entropy's
(Hinton et al., 2015).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

#: Losses on the hidden states of a dense teacher, for encoders (which have no next-token logits).
HIDDEN_LOSSES = ("cosine", "mse", "embedding")
LOSSES = ("ce", "distill", "both") + HIDDEN_LOSSES
#: Which teacher hidden states the hidden-state losses match: the last layer's, or every layer's.
HIDDEN_LAYERS = ("last", "all")


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions ≤ t; logits (b, s, V), ids (b, s)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T²·KL(teacher ‖ student) of the temperature-softened distributions, averaged over tokens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def recovery_loss(
    kind: str,
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    distill_weight: float = 0.5,
) -> torch.Tensor:
    """The training loss `kind`: "ce", "distill", or "both" = (1−w)·CE + w·distill."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    if kind == "ce":
        return next_token_loss(student_logits, input_ids)
    if teacher_logits is None:
        raise ValueError(f"loss {kind!r} needs the teacher's logits")
    distill = distillation_loss(student_logits, teacher_logits, temperature)
    if kind == "distill":
        return distill
    return (1 - distill_weight) * next_token_loss(student_logits, input_ids) + distill_weight * distill


def hidden_state_loss(kind: str, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over layers and tokens of 1 − cos(s, t) ("cosine") or of ‖s − t‖²/d ("mse"); states (b, s, d)."""
    if kind not in ("cosine", "mse"):
        raise ValueError(f"unknown hidden-state loss {kind!r}; choose cosine or mse")
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{len(student)} student and {len(teacher)} teacher hidden states do not pair up")
    terms = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        if kind == "cosine":
            terms.append((1 - F.cosine_similarity(s, t, dim=-1)).mean())
        else:
            terms.append(F.mse_loss(s, t))
    return torch.stack(terms).mean()


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over sentences of 1 − cos(student, teacher) of pooled sentence embeddings (b, d)."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
