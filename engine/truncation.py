"""Top-k and top-p truncation of logits rows, without sorting the whole vocabulary.

Sorting 49k logits costs about 2 ms a row on a CPU, as much as a decode step's attention. Both cuts
almost always fall among the largest few hundred logits, so they are looked for among the largest
1,024 first, then 8,192 (``topk``, a fraction of a sort's cost). A row whose cut may lie beyond
them (a flat distribution, a large top-k, a tie with the last candidate) is taken whole. Either
way a row keeps the same tokens, and which way it goes depends on the row alone, never on the rest
of the batch.
"""

from __future__ import annotations

import torch

WIDTHS = (1024, 8192)  # candidates looked at, widening, before a row is taken whole


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, V] float32 with the tokens top-k and top-p drop set to -inf (a new tensor).

    Top-k keeps every token tied with the k-th largest (``top_k`` = V: off); top-p then keeps the
    smallest prefix of the sorted, top-k renormalized distribution whose mass reaches ``top_p``
    (1: off). The most likely token always survives."""
    vocab = logits.shape[-1]
    out = logits.clone()
    rows = ((top_k < vocab) | (top_p < 1.0)).nonzero()[:, 0]
    for width in (*WIDTHS, vocab):  # the last pass holds the whole row: every row is decided
        if not len(rows):
            break
        some = logits[rows]
        values, order = some.topk(min(width, vocab), dim=-1)
        kept, decided = _cut(values, top_k[rows], top_p[rows], some)
        cut = torch.full_like(some[decided], float("-inf"))
        out[rows[decided]] = cut.scatter_(1, order[decided], kept[decided])
        rows = rows[~decided]
    return out


def _cut(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
         logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the candidates ``values`` [B, W], sorted descending, with the dropped ones at -inf;
    [B] whether every token beyond the candidates is dropped for certain)."""
    vocab = logits.shape[-1]
    width = values.shape[-1]
    whole = width == vocab
    top_k_on = top_k < vocab
    kth = values.gather(1, (top_k.clamp(max=width) - 1)[:, None])
    values = values.masked_fill(top_k_on[:, None] & (values < kth), float("-inf"))
    # beyond the candidates, nothing ties with the k-th largest only if the last candidate doesn't
    beyond_top_k = top_k_on & (top_k <= width) & (values[:, -1] < kth[:, 0])
    decided = ~top_k_on | beyond_top_k | whole
    top_p_on = top_p < 1.0
    log_mass = torch.where(top_k_on, values.logsumexp(dim=-1), logits.logsumexp(dim=-1))
    probs = (values - log_mass[:, None]).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p[:, None]) & top_p_on[:, None]
    drop[:, 0] = False
    values = values.masked_fill(drop, float("-inf"))
    # the mass before a token only grows: once a candidate is dropped, all that follows is too
    decided &= ~top_p_on | drop[:, -1] | beyond_top_k | whole
    return values, decided

