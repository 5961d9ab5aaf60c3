"""Paged KV cache bookkeeping: a block pool with reference counts and per-request block tables.

Pure Python: the tensors themselves live in the runner. Block ids index the first dimension of
every layer's ``[num_blocks, block_size, kv_heads, head_dim]`` K and V pools.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks with ref_cnt 1, or None (and nothing taken) when fewer are free."""
        if n > len(self.free_blocks):
            return None
        blocks = [self.free_blocks.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_cnt[b] = 1
        return blocks

    # Not used yet: a prefix cache will share blocks between requests through it.
    def incref(self, block: int) -> None:
        if self.ref_cnt[block] == 0:
            raise ValueError(f"block {block} is free")
        self.ref_cnt[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero return to the pool."""
        for b in reversed(blocks):
            if self.ref_cnt[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free_blocks.append(b)

    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks


class KVCacheManager:
    """Owns the block table of every request that holds cache."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Make the request's block table cover ``num_tokens`` tokens.
        False (nothing changed) if full."""
        table = self.block_tables.setdefault(request_id, [])
        missing = self.blocks_needed(num_tokens) - len(table)
        if missing <= 0:
            return True
        blocks = self.pool.allocate(missing)
        if blocks is None:
            if not table:
                del self.block_tables[request_id]
            return False
        table.extend(blocks)
        return True

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Release blocks beyond what ``num_tokens`` tokens need (e.g. unused lookahead)."""
        table = self.block_tables.get(request_id)
        if not table:
            return
        keep = self.blocks_needed(num_tokens)
        if len(table) > keep:
            self.pool.free(table[keep:])
            del table[keep:]

    def free(self, request_id: str) -> None:
        table = self.block_tables.pop(request_id, None)
        if table:
            self.pool.free(table)

    def step_state(self, scheduled) -> None:
        """Per-request state beyond KV blocks for a step:
        none here (hybrid models: ``HybridCacheManager``)."""

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()
