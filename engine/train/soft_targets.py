"""Soft targets: the head learns the base model's whole next-token distribution, not only its
argmax, so that sampled drafts are accepted too.

At temperature ``T`` the engine verifies with ``p = softmax(z / T)`` and drafts from
``q = softmax(y / T)`` (the same processing on both sides), and a draft is kept with probability
``min(1, p / q)``: the expected acceptance of one draft is ``sum(min(p, q))``. The loss is
``T^2 * KL(p_T || q_T)`` with the temperature applied to both logits as at inference (``T^2``
keeps the gradient's scale independent of ``T``).

With a reduced draft vocabulary ``q`` is 0 outside it, and ``sum(min(p, q))`` is at its best when
``q`` is ``p`` renormalized over the draft vocabulary, so the teacher's logits are taken over the
draft vocabulary only (the base model's lm_head rows of those tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SAMPLED_TEMPERATURE = 0.7  # where the evaluation reports the expected acceptance of a draft


@dataclass
class Teacher:
    head: torch.Tensor  # [H, N]: the base model's lm_head over the draft vocabulary
    temperature: float = 1.0

    def logits(self, batch: dict) -> torch.Tensor:
        """The base model's logits at every packed position, [R, N] (float32)."""
        return batch["hidden"].float() @ self.head.float()


def teacher_head(model, draft_vocab: torch.Tensor | None) -> torch.Tensor:
    """The base model's lm_head ([H, V]) over ``draft_vocab`` (all of it when None)."""
    head = model.lm_head.detach()
    if draft_vocab is None:
        return head
    return head.index_select(1, draft_vocab.to(head.device))


def _pairs(student: list[torch.Tensor], teacher_logits: torch.Tensor, batch: dict):
    """Per depth with rows to count: (student logits, teacher logits) of those rows."""
    for s, logits in enumerate(student):
        rows = batch["counted"][s]
        if rows.any():
            yield s, logits[rows].float(), teacher_logits[batch["teacher_rows"][s][rows]]


def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) per row."""
    log_p = F.log_softmax(teacher / temperature, -1)
    log_q = F.log_softmax(student / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def soft_loss(student: list[torch.Tensor], teacher: Teacher, batch: dict) -> torch.Tensor | None:
    """Mean over depths of ``T^2 * KL(p_T || q_T)`` over response rows (None: nothing to count)."""
    t = teacher.temperature
    losses = []
    for _, y, z in _pairs(student, teacher.logits(batch), batch):
        losses.append(kl(y, z, t).mean() * t * t)
    if not losses:
        return None
    return torch.stack(losses).mean()


@torch.no_grad()
def distribution_sums(student: list[torch.Tensor], teacher: Teacher, batch: dict) -> dict:
    """Per depth, sums over response rows of KL(p || q) at T = 1 and of the expected acceptance
    ``sum(min(p, q))`` at SAMPLED_TEMPERATURE, and the row counts (to average over batches)."""
    depth = len(student)
    out = {"kl": [0.0] * depth, "sampled": [0.0] * depth, "rows": [0] * depth}
    for s, y, z in _pairs(student, teacher.logits(batch), batch):
        out["kl"][s] = float(kl(y, z, 1.0).sum())
        p = F.softmax(z / SAMPLED_TEMPERATURE, -1)
        q = F.softmax(y / SAMPLED_TEMPERATURE, -1)
        out["sampled"][s] = float(torch.minimum(p, q).sum(-1).sum())
        out["rows"][s] = int(y.shape[0])
    return out
