"""Self-distillation of MTP layers on a frozen base model: teacher forcing over sequences the base
model generated itself, so the head learns what the model will actually say.

Rows are chain starts: row ``i`` of draft depth ``s`` pairs the depth ``s-1`` output of row ``i``
(the base model's ``h[i]`` at depth 0) with token ``t[i+1+s]`` and predicts ``t[i+2+s]``. Teacher
forcing the tokens is exact for acceptance: a draft step only matters when every earlier draft was
accepted, i.e. equal to the text.

Several sequences are packed into one batch of rows. With one MTP layer reused for every step,
:class:`DraftChainAttention` gives each depth the keys that step sees at inference: the depth-0 keys
of its own sequence up to its chain start (the pass over verified positions), plus its own chain's
keys of depths 1..s. Heads of several layers use plain causal attention per depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtpserve.engine.train.soft_targets import Teacher, soft_loss
from mtpserve.kernels.attention import AttentionBackend, DenseCausalAttention

IGNORE = -100


@torch.no_grad()
def base_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Final post-norm hidden states of the frozen base model for one sequence [L] -> [L, H]."""
    positions = torch.arange(ids.shape[0], device=ids.device)
    return model(ids, positions, [None] * len(model.layers), DenseCausalAttention())


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    if x.shape[1] == num_heads:
        return x
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


class DraftChainAttention(AttentionBackend):
    """Attention of packed rows for draft depth ``depth`` (set before each depth's forward)."""

    def __init__(self, seq_ids: torch.Tensor, staircase: bool = True):
        same = seq_ids[:, None] == seq_ids[None, :]
        self.causal = same & torch.ones_like(same).tril()
        self.staircase = staircase
        self.depth = 0
        # keys and values of depth 0, 1, ..
        self.chain_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def prepare(self, metadata=None) -> None:
        pass

    def forward(self, q, k, v, kv_cache, scale):
        heads = q.shape[1]
        qh = q.transpose(0, 1)  # [h, R, d]
        if not self.staircase or self.depth == 0:
            self.chain_kv = [(k, v)]
            kh = _expand_kv(k, heads).transpose(0, 1)
            vh = _expand_kv(v, heads).transpose(0, 1)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=self.causal, scale=scale)
            return out.transpose(0, 1)
        self.chain_kv.append((k, v))
        k0, v0 = self.chain_kv[0]
        k0h = _expand_kv(k0, heads).transpose(0, 1)
        v0h = _expand_kv(v0, heads).transpose(0, 1)
        scores0 = (qh @ k0h.transpose(1, 2)) * scale  # [h, R, R]
        scores0 = scores0.masked_fill(~self.causal, float("-inf"))
        # [R, h, s, d]
        own_k = torch.stack([_expand_kv(kd, heads) for kd, _ in self.chain_kv[1:]], -2)
        own_v = torch.stack([_expand_kv(vd, heads) for _, vd in self.chain_kv[1:]], -2)
        own_scores = (q.unsqueeze(-2) * own_k).sum(-1).transpose(0, 1) * scale  # [h, R, s]
        p = torch.cat([scores0, own_scores], -1).softmax(-1)
        rows = scores0.shape[-1]
        out = p[..., :rows] @ v0h  # [h, R, d]
        out = out + (p[..., rows:].transpose(0, 1).unsqueeze(-1) * own_v).sum(-2).transpose(0, 1)
        return out.transpose(0, 1)


def pack(sequences: list[tuple[list[int], int]], hidden: list[torch.Tensor], depth: int,
         vocab_map: torch.Tensor | None, device) -> dict:
    """Rows of several ``(ids, response_start)`` sequences for ``depth`` draft steps: per depth the
    input tokens, rotary positions, targets (draft-vocabulary indices, IGNORE outside the response
    or the draft vocabulary), which rows have a target in the response, and the row of ``hidden``
    whose base-model logits predict that target (for soft targets)."""
    seq_ids = []
    offset = 0
    teacher_rows = [[] for _ in range(depth)]
    inputs = [[] for _ in range(depth)]
    positions = [[] for _ in range(depth)]
    targets = [[] for _ in range(depth)]
    counted = [[] for _ in range(depth)]
    for n, (ids, start) in enumerate(sequences):
        length = len(ids)
        seq_ids += [n] * length
        for s in range(depth):
            for i in range(length):
                # rows past the end only pad the batch: never attended, no target
                valid = i + 1 + s < length
                inputs[s].append(ids[i + 1 + s] if valid else 0)
                positions[s].append(i + 1 + s if valid else 0)
                teacher_rows[s].append(offset + i + 1 + s if valid else 0)
                t = i + 2 + s
                in_response = start <= t < length
                counted[s].append(in_response)
                if not in_response:
                    targets[s].append(IGNORE)
                else:
                    targets[s].append(ids[t] if vocab_map is None else int(vocab_map[ids[t]]))
        offset += length

    def as_tensor(x, dtype=torch.long):
        return torch.tensor(x, dtype=dtype, device=device)

    return {
        "seq_ids": as_tensor(seq_ids),
        "hidden": torch.cat(hidden).to(device),
        "inputs": [as_tensor(x) for x in inputs],
        "positions": [as_tensor(x) for x in positions],
        "targets": [as_tensor(x) for x in targets],
        "counted": [as_tensor(x, torch.bool) for x in counted],
        "teacher_rows": [as_tensor(x) for x in teacher_rows],
    }


def chain_logits(mtp, batch: dict, depth: int):
    """Logits of every depth for a packed batch, a list of [R, N]: ``draft_logits``, over the head's
    draft vocabulary when it has one (the same sliced head the engine drafts with), else over the
    whole vocabulary."""
    staircase = len(mtp.layers) == 1
    attn = DraftChainAttention(batch["seq_ids"], staircase)
    h = batch["hidden"].to(mtp.layers[0].eh_proj.dtype)
    out = []
    for s in range(depth):
        attn.depth = s
        y = mtp(s, batch["inputs"][s], h, batch["positions"][s], [None] * len(mtp.layers), attn)
        out.append(mtp.draft_logits(s, y))
        h = y
    return out


def mtp_loss(mtp, batch: dict, depth: int, teacher: Teacher | None = None) -> torch.Tensor | None:
    """Mean over depths of the cross-entropy against the base model's own tokens (hard targets),
    or with a ``teacher`` of the KL to its distribution (soft targets); None: nothing to count."""
    student = chain_logits(mtp, batch, depth)
    if teacher is not None:
        return soft_loss(student, teacher, batch)
    losses = []
    for s, logits in enumerate(student):
        if batch["counted"][s].any():
            loss = F.cross_entropy(logits.float(), batch["targets"][s], ignore_index=IGNORE)
            losses.append(loss)
    if not losses:
        return None
    return torch.stack(losses).mean()


@torch.no_grad()
def acceptance_length(mtp, batch: dict, depth: int) -> tuple[float, list[float]]:
    """Teacher-forced greedy acceptance with ``depth`` drafts: mean tokens per verify step (1 + the
    leading run of right drafts) over response rows, and the per-position acceptance rates."""
    return greedy_acceptance(chain_logits(mtp, batch, depth), batch)


def greedy_acceptance(student: list[torch.Tensor], batch: dict) -> tuple[float, list[float]]:
    """``acceptance_length`` from the chain's logits of every depth."""
    depth = len(student)
    hits = None
    for s, logits in enumerate(student):
        right = logits.argmax(-1) == batch["targets"][s]
        hits = right if hits is None else hits & right
        if s == 0:
            rows = batch["counted"][0]
            runs = torch.zeros_like(right, dtype=torch.long)
        runs += hits.long()
    counted = runs[rows]
    if not len(counted):
        return 1.0, [0.0] * depth
    per_position = [float((counted > s).float().mean()) for s in range(depth)]
    return 1 + float(counted.float().mean()), per_position


def distill(mtp, model, sequences: list[list[int]], steps: int, lr: float = 3e-3, depth: int = 1,
            seed: int = 0, on_step=None) -> list[float]:
    """Adam on the MTP layers' own weights (embedding and lm_head shared and frozen), one whole
    sequence (every position a target) per step, full vocabulary."""
    params = list(mtp.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    device = model.lm_head.device
    cache = {}
    losses = []
    for step in range(steps):
        i = int(torch.randint(len(sequences), (1,), generator=g))
        ids = sequences[i]
        if i not in cache:
            cache[i] = base_hidden(model, torch.tensor(ids, device=device))
        batch = pack([(ids, 0)], [cache[i]], depth, None, device)
        loss = mtp_loss(mtp, batch, depth)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    for p in params:
        p.requires_grad_(False)
    return losses
