"""The recovery losses (lowrank.distill): next-token cross-entropy, distillation, and their mix."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from helpers import make_tiny_model, random_windows
from lowrank.distill import distillation_loss, next_token_loss, recovery_loss


def test_next_token_loss_matches_transformers_own_loss():
    model = make_tiny_model("llama")
    ids = random_windows(3, 16)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert float(next_token_loss(out.logits, ids)) == pytest.approx(float(out.loss), rel=1e-5)


def test_distillation_loss_is_t2_scaled_kl_and_vanishes_on_the_teacher():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    t = 2.0
    p = F.softmax(teacher / t, -1)
    manual = (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert float(distillation_loss(student, teacher, t)) == pytest.approx(float(manual), rel=1e-5)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(student, teacher, 1.0)) > 0
    ids = torch.randint(0, 11, (2, 5))
    both = recovery_loss("both", student, ids, teacher, t, distill_weight=0.25)
    assert float(both) == pytest.approx(0.75 * float(next_token_loss(student, ids)) + 0.25 * float(manual), rel=1e-5)
