"""Self-distillation of MTP layers on a frozen base model: teacher forcing over sequences the base
model generated itself, so the head learns what the model will actually say."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtpserve.kernels.attention import DenseCausalAttention


@torch.no_grad()
def base_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Final post-norm hidden states of the frozen base model for one sequence [L] -> [L, H]."""
    positions = torch.arange(ids.shape[0], device=ids.device)
    return model(ids, positions, [None] * len(model.layers), DenseCausalAttention())


def mtp_loss(mtp, model, ids: torch.Tensor, hidden: torch.Tensor, depth: int = 1) -> torch.Tensor:
    """Mean cross-entropy of draft steps 0..depth-1 predicting t[p+2+step] from (h[p], t[p+1])."""
    attn = DenseCausalAttention()
    length = ids.shape[0]
    h = hidden[:-1]
    losses = []
    for step in range(depth):
        n = length - 2 - step  # positions with a target
        if n <= 0:
            break
        inputs = ids[1 + step:1 + step + h.shape[0]]
        positions = torch.arange(1 + step, 1 + step + h.shape[0], device=ids.device)
        y = mtp(step, inputs, h, positions, [None] * len(mtp.layers), attn)
        logits = mtp.compute_logits(step, y[:n]).float()
        losses.append(F.cross_entropy(logits, ids[2 + step:2 + step + n]))
        h = y[:-1]
    return torch.stack(losses).mean()


def distill(mtp, model, sequences: list[list[int]], steps: int, lr: float = 3e-3, depth: int = 1,
            seed: int = 0, on_step=None) -> list[float]:
    """Adam on the MTP layers' own weights (embedding/lm_head shared and frozen)."""
    params = [p for p in mtp.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    cache = {}
    losses = []
    for step in range(steps):
        i = int(torch.randint(len(sequences), (1,), generator=g))
        ids = torch.tensor(sequences[i], dtype=torch.long)
        if i not in cache:
            cache[i] = base_hidden(model, ids)
        loss = mtp_loss(mtp, model, ids, cache[i], depth)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    for p in params:
        p.requires_grad_(False)
    return losses
