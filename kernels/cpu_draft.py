"""An MTP layer's greedy draft steps in one call to the CPU kernels (kernels/cpu/draft.cpp).

The per-step path (engine/spec/proposer.py) spends most of a draft step in Python and small
PyTorch ops on a 2-core CPU; this loop runs every step of every drafting request in C++, from the
fed-back states of draft step 0 to the drafts. It follows the per-step path's ops (same block
weights and rounded activations) to float32 rounding: the norms are the block kernels' own.
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


def fits(layer, embed, head) -> bool:
    """Whether an MTP layer's projection, the embedding its tokens read and its (draft) head are
    all block weights."""
    return all(isinstance(w, BlockLinear) for w in (layer.eh_proj, embed, head))


class FusedDrafter:
    """One MTP layer's greedy draft loop: its block (bound to its KV cache), the token embedding
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

    def draft(self, y: torch.Tensor, last: list[int], num_drafts: list[int],
              tables: list[list[int]], block_size: int) -> list[list[int]]:
        """Drafts of each request: ``y`` [m, hidden] their fed-back states after draft step 0,
        ``last`` the KV position of their last computed token, ``tables`` their block tables."""
        y = y.float().clone(memory_format=torch.contiguous_format)  # the kernel writes it
        width = max(num_drafts)
        drafts = torch.empty(len(last), width, dtype=torch.long)
        columns = max(len(t) for t in tables)
        padded = [t + [0] * (columns - len(t)) for t in tables]
        block_tables = torch.tensor(padded, dtype=torch.int32)
        last_positions = torch.tensor(last, dtype=torch.long)
        counts = torch.tensor(num_drafts, dtype=torch.int32)
        step = StepStruct(0, 0, 0, 0, 0, block_tables.data_ptr(), columns, block_size)
        library().mtp_draft_greedy(
            ctypes.byref(self.block.model), ctypes.byref(self.struct), ctypes.byref(step),
            _ptr(y.data_ptr()), _ptr(last_positions.data_ptr()), _ptr(counts.data_ptr()),
            len(last), width, _ptr(drafts.data_ptr()))
        rows = drafts.tolist()
        return [row[:n] for row, n in zip(rows, num_drafts)]
