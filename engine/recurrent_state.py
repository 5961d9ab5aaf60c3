"""Recurrent state of linear-attention (Gated DeltaNet) layers: one slot per running request instead
of paged KV.

A slot holds, for every linear-attention layer:

- ``ssm [S, H, Dk, Dv]`` with ``S = spec_draft_n_max + 1``: the states after the last ``saved``
  positions the request's latest step computed (entry ``i`` = after position
  ``end - saved + 1 + i``). A step that verifies ``k`` drafts keeps the state after each of its
  ``k + 1`` positions; any other step keeps its last state.
- ``conv [W, C]`` with ``W = K - 1 + spec_draft_n_max``: the convolution inputs of the last ``W``
  positions (a window widened by the draft length).

Nothing is recomputed after a rejection: the next step starts at ``num_computed_tokens``, so the
``r`` positions after it were rejected (``r = end - (num_computed_tokens - 1)``); it continues from
ssm entry ``saved - 1 - r`` and from the conv window with its last ``r`` columns dropped. A step at
position 0 starts from zeros (a new or a preempted request: preemption recomputes from scratch).

``HybridCacheManager`` hands out a slot when a request is admitted (first ``allocate_slots``) and
takes it back when its blocks are freed (finish, abort, preemption); ``step_state`` gives the model
a ``RecurrentStep`` for the scheduled requests (``AttentionMetadata.recurrent``).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from mtpserve.engine.kv_cache import KVCacheManager

logger = logging.getLogger(__name__)


class RecurrentStatePool:
    """The state tensors of every linear-attention layer, slots handed out per request, and where
    each request's kept states end."""

    def __init__(self, shapes: list, num_slots: int, num_spec: int, dtype: torch.dtype, device):
        """``shapes``: per layer ``((K - 1, C), (H, Dk, Dv))`` (``GatedDeltaNet.state_shapes``)."""
        state_dtype = torch.promote_types(dtype, torch.float32)
        self.num_spec = num_spec
        self.conv = [torch.zeros(num_slots, ctx + num_spec, c, dtype=dtype, device=device)
                     for (ctx, c), _ in shapes]
        self.ssm = [torch.zeros(num_slots, num_spec + 1, *s, dtype=state_dtype, device=device)
                    for _, s in shapes]
        self.free_slots: deque[int] = deque(range(num_slots))
        self.slot_of: dict[str, int] = {}
        # request -> (end: last position kept, saved: ssm entries)
        self.progress: dict[str, tuple[int, int]] = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)

    def allocate(self, request_id: str) -> bool:
        if request_id not in self.slot_of:
            if not self.free_slots:
                return False
            self.slot_of[request_id] = self.free_slots.popleft()
        return True

    def free(self, request_id: str) -> None:
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            self.free_slots.append(slot)
        self.progress.pop(request_id, None)

    def step(self, scheduled) -> RecurrentStep:
        """Per-step view for the scheduled requests (``ScheduledRequest``s);
        records where each one will end."""
        slots = []
        read = []
        drop = []
        save = []
        for s in scheduled:
            rid = s.request.request_id
            start = s.request.num_computed_tokens
            if s.num_spec_tokens > self.num_spec:
                raise ValueError(f"{s.num_spec_tokens} drafts but state slots for {self.num_spec}")
            slots.append(self.slot_of[rid])
            if start == 0:
                read.append(-1)
                drop.append(0)
            else:
                end, saved = self.progress[rid]
                rejected = end - (start - 1)
                if not 0 <= rejected < saved:
                    raise ValueError(f"request {rid} resumes at {start} but its state ends "
                                     f"at {end} ({saved} kept)")
                read.append(saved - 1 - rejected)
                drop.append(rejected)
            save.append(s.num_spec_tokens + 1)
            self.progress[rid] = (start + s.num_new_tokens - 1, s.num_spec_tokens + 1)
        return RecurrentStep(self, slots, read, drop, save)


@dataclass
class RecurrentStep:
    """What the linear-attention layers read and write in one step, per scheduled sequence ``i``."""

    pool: RecurrentStatePool
    slots: list[int]
    read: list[int]  # ssm entry to continue from, -1: start from zeros
    drop: list[int]  # conv window columns (rejected positions) to drop at its end
    save: list[int]  # states to keep: after each of the last save[i] positions

    def read_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv context [B, K-1, C], state [B, H, Dk, Dv]) to start each sequence from."""
        conv = self.pool.conv[layer]
        ssm = self.pool.ssm[layer]
        ctx_len = conv.shape[1] - self.pool.num_spec
        contexts = []
        states = []
        for slot, entry, drop in zip(self.slots, self.read, self.drop):
            if entry < 0:
                contexts.append(conv.new_zeros(ctx_len, conv.shape[2]))
                states.append(ssm.new_zeros(ssm.shape[2:]))
            else:
                end = conv.shape[1] - drop
                contexts.append(conv[slot, end - ctx_len:end])
                states.append(ssm[slot, entry])
        return torch.stack(contexts), torch.stack(states)

    def write(self, layer: int, i: int, inputs: torch.Tensor, states: torch.Tensor) -> None:
        """Sequence ``i`` computed conv ``inputs [n, C]`` and kept
        ``states [save[i], H, Dk, Dv]``."""
        conv = self.pool.conv[layer]
        ssm = self.pool.ssm[layer]
        slot = self.slots[i]
        width = conv.shape[1]
        if self.read[i] >= 0:
            old = conv[slot, :width - self.drop[i]]
        else:  # a fresh sequence sees zeros before position 0
            old = conv.new_zeros(width, conv.shape[2])
        window = torch.cat([old, inputs.to(conv.dtype)])[-width:]
        # shorter than the window only when fewer inputs came than columns were dropped; later steps
        # drop fewer columns than this one computes, so they never read the stale ones in front
        conv[slot, width - len(window):] = window
        ssm[slot, :len(states)] = states


class HybridCacheManager(KVCacheManager):
    """Paged KV blocks for the attention layers plus a recurrent state slot per request."""

    def __init__(self, num_blocks: int, block_size: int, states: RecurrentStatePool):
        super().__init__(num_blocks, block_size)
        self.states = states

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        admitted = request_id not in self.states.slot_of
        if not self.states.allocate(request_id):
            return False
        if not super().allocate_slots(request_id, num_tokens):
            if admitted:
                self.states.free(request_id)
            return False
        return True

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self.states.free(request_id)

    def step_state(self, scheduled) -> RecurrentStep:
        return self.states.step(scheduled)


def cache_manager(model, num_blocks: int, config, num_spec: int) -> KVCacheManager:
    """The engine's cache manager: KV blocks, plus ``config.max_num_seqs`` state slots (each for
    ``num_spec`` drafts) when the model has linear-attention layers."""
    layers = []
    if hasattr(model, "linear_attention_layers"):
        layers = model.linear_attention_layers()
    if not layers:
        return KVCacheManager(num_blocks, config.block_size)
    shapes = [layer.state_shapes() for layer in layers]
    pool = RecurrentStatePool(shapes, config.max_num_seqs, num_spec, config.dtype, config.device)
    logger.info("recurrent state: %d slots for %d linear-attention layers (%.1f MiB)",
                config.max_num_seqs, len(layers), pool.nbytes() / 2**20)
    return HybridCacheManager(num_blocks, config.block_size, pool)
