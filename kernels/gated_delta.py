"""Gated DeltaNet token mixing (PyTorch reference): the causal depthwise convolution and the gated
delta rule.

Per value head the state is a matrix ``S [Dk, Dv]``; each token ``t`` (``q, k`` L2-normalized,
``q`` scaled by ``Dk ** -0.5``, decay ``g_t <= 0`` in log space, write strength ``beta_t`` in
(0, 1))::

    S <- exp(g_t) * S
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T       # the delta rule: replace what S recalls for k_t
    o_t = S^T q_t

``delta_rule_recurrent`` runs it token by token (decode, verification) and returns the state after
every token; ``delta_rule_chunked`` runs long sequences (prefill) in chunks of a few matmuls each
and returns the final state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, context: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution with SiLU. x: [B, L, C] new inputs, context: [B, K-1, C] the
    inputs just before them, weight: [C, K] -> [B, L, C]."""
    full = torch.cat([context.to(x.dtype), x], dim=1).transpose(1, 2)  # [B, C, K-1+L]
    out = F.conv1d(full, weight.unsqueeze(1), groups=weight.shape[0])  # [B, C, L]
    return F.silu(out.transpose(1, 2))


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_recurrent(q, k, v, g, beta, state):
    """q, k: [B, L, H, Dk], v: [B, L, H, Dv], g, beta: [B, L, H], state: [B, H, Dk, Dv].

    Returns (out [B, L, H, Dv], states [B, L, H, Dk, Dv]: the state after each token)."""
    outs = []
    states = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        recalled = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        delta = (v[:, t] - recalled) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
        states.append(state)
    return torch.stack(outs, dim=1), torch.stack(states, dim=1)


def delta_rule_chunked(q, k, v, g, beta, state, chunk: int = 64):
    """Same inputs as ``delta_rule_recurrent``, for long sequences.

    Within a chunk of length C with cumulative log decay ``c_i = g_1 + ... + g_i`` and entry state
    ``S0``, the state after token i is ``exp(c_i) S0 + sum_{j<=i} exp(c_i - c_j) k_j u_j^T`` where
    the corrections ``u`` solve the unit lower-triangular system
    ``(I + A) U = beta V - beta exp(c) K S0`` with ``A_ij = beta_i exp(c_i - c_j) k_i . k_j``
    (j < i). Returns (out [B, L, H, Dv], final state [B, H, Dk, Dv])."""
    length = q.shape[1]
    q, k, v, g, beta = (x.transpose(1, 2) for x in (q, k, v, g, beta))  # [B, H, L, ...]
    out = torch.empty_like(v)
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        bc = beta[:, :, start:end, None]
        c = g[:, :, start:end].cumsum(-1)  # [B, H, C]
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
        # exp(c_i - c_j), j <= i
        decay = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, -torch.inf).exp()
        # the solver reads only the strictly lower triangle of A and takes the diagonal as ones
        a = ((bc * kc) @ kc.transpose(-1, -2)) * decay
        rhs = bc * vc - (bc * c.exp()[..., None] * kc) @ state
        u = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)  # [B, H, C, Dv]
        recalled = (c.exp()[..., None] * qc) @ state
        written = ((qc @ kc.transpose(-1, -2)) * decay) @ u
        out[:, :, start:end] = recalled + written
        tail = (c[..., -1:] - c).exp()[..., None]  # exp(c_C - c_j)
        state = c[..., -1].exp()[..., None, None] * state + (tail * kc).transpose(-1, -2) @ u
    return out.transpose(1, 2), state
