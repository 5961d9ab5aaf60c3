"""The reduced draft vocabulary of a trained head: the most frequent tokens of the base model's
answers (the head drafts only those; verification keeps the whole vocabulary)."""

from __future__ import annotations

import logging

import torch

from mtpserve.engine.train.distill import IGNORE

logger = logging.getLogger("mtpserve.train")


def draft_vocabulary(
    sequences: list[dict], size: int, vocab_size: int, eos: frozenset
) -> torch.Tensor | None:
    """The ``size`` most frequent answer tokens of ``sequences``, EOS always included, sorted
    (None: the whole vocabulary)."""
    if size <= 0 or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in sequences:
        ids = torch.tensor(s["output_ids"], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab_size)
    for t in eos:
        counts[t] = counts.max() + 1  # ending a reply is always draftable
    return counts.argsort(descending=True, stable=True)[:size].sort().values


def vocab_map_of(draft_vocab: torch.Tensor, vocab_size: int, train: list[dict]) -> torch.Tensor:
    """Token id -> its index in the draft vocabulary (IGNORE outside it); logs the coverage."""
    vocab_map = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    vocab_map[draft_vocab] = torch.arange(len(draft_vocab))
    covered = sum(int((vocab_map[torch.tensor(s["output_ids"])] >= 0).sum()) for s in train)
    answer_tokens = sum(len(s["output_ids"]) for s in train)
    logger.warning("draft vocabulary: %d tokens cover %.1f%% of the answer tokens",
                   len(draft_vocab), 100 * covered / max(1, answer_tokens))
    return vocab_map
