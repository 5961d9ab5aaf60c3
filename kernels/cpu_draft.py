"""An MTP layer's draft steps in one call to the CPU kernels (kernels/cpu/draft.cpp).

The per-step path (engine/spec/proposer.py) spends most of a draft step in Python and small
PyTorch ops on a 2-core CPU; this loop runs every step of every drafting request in C++, from
draft step 0 (the MTP layer over what the main model computed) to the drafts. It follows the
per-step path's ops (same block weights and rounded activations) to float32 rounding: the norms
are the block kernels' own. A request drafts greedily (the argmax) or samples: q over the draft
vocabulary as engine/sampler.py's processed_probs makes it (temperature, top-k, top-p, min-p),
and the exponential race over q on the keys the caller gives (engine/noise.py), as the per-step
path samples.
"""

from __future__ import annotations

import ctypes

import torch

from mtpserve.kernels.cpu_blocks import BlockLinear, QWeightStruct
from mtpserve.kernels.cpu_build import library
from mtpserve.kernels.cpu_decoder import FusedDecoder, StepStruct

_ptr = ctypes.c_void_p


class DraftLayerStruct(ctypes.Structure):
    _fields_ = [("enorm", _ptr), ("hnorm", _ptr), ("eh_proj", QWeightStruct),
                ("shared_norm", _ptr), ("embed", QWeightStruct), ("head", QWeightStruct),
                ("vocab_ids", _ptr), ("hidden_first", ctypes.c_int32),
                ("post_norm_feedback", ctypes.c_int32)]


class DraftSamplingStruct(ctypes.Structure):
    _fields_ = [("temperatures", _ptr), ("top_k", _ptr), ("top_p", _ptr), ("min_p", _ptr),
                ("keys", _ptr), ("probs", _ptr)]


def fits(layer, embed, head) -> bool:
    """Whether an MTP layer's projection, the embedding its tokens read and its (draft) head are
    all block weights."""
    return all(isinstance(w, BlockLinear) for w in (layer.eh_proj, embed, head))


class FusedDrafter:
    """One MTP layer's draft loop: its block (bound to its KV cache), the token embedding
    and the head over the draft vocabulary (``vocab_ids``: its rows' tokens, None: all)."""

    def __init__(self, layer, block: FusedDecoder, embed: BlockLinear, head: BlockLinear,
                 vocab_ids: torch.Tensor | None):
        self.block = block
        self.head = head
        self.vocab_ids = vocab_ids  # kept alive: the struct holds its address
        ids = 0
        if vocab_ids is not None:
            ids = vocab_ids.data_ptr()
        self.struct = DraftLayerStruct(
            layer.enorm.data_ptr(), layer.hnorm.data_ptr(), layer.eh_proj.struct(),
            layer.shared_norm.data_ptr(), embed.struct(), head.struct(), ids,
            int(layer.layout.hidden_first), int(layer.feedback == "post_norm"))

    def propose(self, hidden: torch.Tensor, tokens: list[int], starts: list[int],
                lengths: list[int], num_drafts: list[int], tables: list[list[int]],
                block_size: int, params: list | None = None,
                keys: list[list[tuple[int, int]]] | None = None, want_probs: bool = False,
                p_min: float = 0.0):
        """Draft step 0 and the drafts of each request: the MTP layer over ``lengths[r]`` positions
        from ``starts[r]`` on (``hidden`` [T, hidden] the main model's states there, ``tokens`` [T]
        the token after each), then up to ``num_drafts[r]`` drafts from its last row (0: only its
        MTP KV is filled). ``tables``: the block tables. ``params``: each request's
        SamplingParams (None: all greedy); a sampled request's draft j races on ``keys[r][j]``.
        ``p_min`` > 0: a request's drafts stop where the product of the head's confidences in them
        (the largest probability of each draft's distribution) falls below it.
        Returns the drafts, and with ``want_probs`` the q of each draft over the draft vocabulary,
        [m, max(num_drafts), N] (rows of greedy drafts unset), else None."""
        m = len(starts)
        hidden = hidden.float().contiguous()
        token_ids = torch.tensor(tokens, dtype=torch.long)
        start_positions = torch.tensor(starts, dtype=torch.long)
        length_counts = torch.tensor(lengths, dtype=torch.int32)
        counts = torch.tensor(num_drafts, dtype=torch.int32)
        width = max(max(num_drafts), 1)
        drafts = torch.empty(m, width, dtype=torch.long)
        columns = max(len(t) for t in tables)
        padded = [t + [0] * (columns - len(t)) for t in tables]
        block_tables = torch.tensor(padded, dtype=torch.int32)
        step = StepStruct(0, 0, 0, 0, 0, block_tables.data_ptr(), columns, block_size)
        probs = None
        if want_probs:
            probs = torch.empty(m, width, self.head.out_features)
        sampling, held = self._sampling(m, width, params, keys, probs)
        library().mtp_propose(
            ctypes.byref(self.block.model), ctypes.byref(self.struct), ctypes.byref(sampling),
            ctypes.byref(step), _ptr(hidden.data_ptr()), _ptr(token_ids.data_ptr()),
            _ptr(start_positions.data_ptr()), _ptr(length_counts.data_ptr()),
            _ptr(counts.data_ptr()), m, width, ctypes.c_float(p_min), _ptr(drafts.data_ptr()))
        rows = [row[:n] for row, n in zip(drafts.tolist(), counts.tolist())]
        return rows, probs

    @staticmethod
    def _sampling(m: int, width: int, params, keys, probs: torch.Tensor | None):
        """The kernel's DraftSampling (``probs``: where q goes, or None) and the tensors it points
        into (kept alive by the caller)."""
        if params is None:
            return DraftSamplingStruct(0, 0, 0, 0, 0, 0), []
        temps = torch.zeros(m, dtype=torch.float32)  # 0: greedy
        for r, p in enumerate(params):
            if not p.greedy:
                temps[r] = p.temperature
        top_k = torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.int32)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
        pairs = torch.zeros(m, width, 2, dtype=torch.int64)
        for r, row in enumerate(keys):
            if row:
                pairs[r, :len(row)] = torch.tensor(row, dtype=torch.int64)
        probs_at = 0
        if probs is not None:
            probs_at = probs.data_ptr()
        struct = DraftSamplingStruct(temps.data_ptr(), top_k.data_ptr(), top_p.data_ptr(),
                                     min_p.data_ptr(), pairs.data_ptr(), probs_at)
        return struct, [temps, top_k, top_p, min_p, pairs]
