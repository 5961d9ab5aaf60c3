"""Paged KV cache bookkeeping: a block pool with reference counts and prefix caching, and
per-request block tables.

Pure Python: the tensors themselves live in the runner. Block ids index the first dimension of
every layer's ``[num_blocks, block_size, kv_heads, head_dim]`` K and V pools (the MTP layers'
included).

Prefix caching: once a full block's KV is computed from verified tokens (and its MTP KV filled,
when the engine drafts), it is registered under its chained hash (``prefix_cache.py``). A freed
registered block keeps its KV and waits in an LRU; a new or preempted request starts with the
longest chain of its blocks found there, shared through reference counts. Blocks are written only
past a request's ``num_computed_tokens``, so a registered block is never written again while it
is cached; it is evicted (its hash forgotten) only when free, least recently freed first, once no
empty block is left.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from mtpserve.engine.prefix_cache import engine_salt, extend_block_hashes


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> the block holding its KV
        self.empty_blocks: deque[int] = deque(range(num_blocks))
        # free blocks that still hold cached KV, least recently freed first
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.empty_blocks) + len(self.lru)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks with ref_cnt 1 (empty ones first, then evicted from the LRU), or None (and
        nothing taken) when fewer are free."""
        if n > self.num_free_blocks:
            return None
        blocks = []
        for _ in range(n):
            if self.empty_blocks:
                block = self.empty_blocks.popleft()
            else:
                block = self._evict()
            self.ref_cnt[block] = 1
            blocks.append(block)
        return blocks

    def _evict(self) -> int:
        block, _ = self.lru.popitem(last=False)
        del self.cached[self.block_hash[block]]
        self.block_hash[block] = None
        self.num_evictions += 1
        return block

    def incref(self, block: int) -> None:
        """One more reference; a free cached block leaves the LRU."""
        if self.ref_cnt[block] == 0:
            if block not in self.lru:
                raise ValueError(f"block {block} is free")
            del self.lru[block]
        self.ref_cnt[block] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """``block`` holds the KV of ``block_hash``. A hash another block already holds keeps
        that block (two requests computed the same prefix at once); this one stays unregistered."""
        if block_hash in self.cached or self.block_hash[block] is not None:
            return
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block. At zero a registered block joins the LRU and an
        unregistered one is empty again. Freed last block first, so a request's tail, the part
        least likely to be shared, is evicted before its head."""
        for b in reversed(blocks):
            if self.ref_cnt[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] > 0:
                continue
            if self.block_hash[b] is None:
                self.empty_blocks.append(b)
            else:
                self.lru[b] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no request holds (they become empty)."""
        while self.lru:
            self.empty_blocks.append(self._evict())

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


class KVCacheManager:
    """Owns the block table of every request that holds cache, and the prefix cache's per-request
    progress."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self.prefix_caching = False
        self.draft_kv = False  # the MTP layers' KV shares the blocks
        self.roots = (b"", b"")  # chain roots: main KV only, main and MTP KV
        self.num_registered: dict[str, int] = {}  # per request: leading blocks registered
        self.draft_kv_tokens: dict[str, int] = {}  # per request: positions with MTP KV filled
        self.promised: dict[bytes, str] = {}  # hash -> the running request computing it
        self.promises: dict[str, list[bytes]] = {}
        self.num_queried_tokens = 0  # tokens of admitted requests looked up in the cache
        self.num_hit_tokens = 0  # ... and found there

    def enable_prefix_caching(self, salt: bytes, draft_kv: bool) -> None:
        """``salt``: what the KV depends on besides the tokens; ``draft_kv``: the engine drafts,
        so a block is cached once its MTP KV is filled too."""
        self.prefix_caching = True
        self.draft_kv = draft_kv
        self.roots = (engine_salt(salt, "main"), engine_salt(salt, "main+mtp"))

    def fills_draft_kv(self, req) -> bool:
        return self.draft_kv and req.spec_n_max != 0

    def block_hashes(self, req) -> list[bytes]:
        """The hashes of ``req``'s hashable blocks (extended as its tokens grow). A request that
        leaves the MTP KV empty chains from its own root, so it never serves or reads MTP KV."""
        root = self.roots[self.fills_draft_kv(req)]
        return extend_block_hashes(req.block_hashes, root, req.all_token_ids, self.block_size)

    def cached_prefix(self, req) -> list[int]:
        """The blocks of the longest cached chain of ``req``'s leading blocks, all before its last
        token (always recomputed, so that its logits exist)."""
        if not self.prefix_caching:
            return []
        hashes = self.block_hashes(req)
        blocks = []
        for h in hashes[:(req.num_tokens - 1) // self.block_size]:
            block = self.pool.lookup(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def waits_for_prefix(self, req, num_cached_blocks: int) -> bool:
        """Whether the block after ``req``'s cached ones is being computed by another request (a
        choice of the same prompt, n > 1): waiting for it beats computing it twice."""
        hashes = req.block_hashes
        if not self.prefix_caching or num_cached_blocks >= len(hashes):
            return False
        owner = self.promised.get(hashes[num_cached_blocks])
        return owner is not None and owner != req.request_id

    def admit(self, req, cached_blocks: list[int], num_tokens: int) -> bool:
        """A block table for ``num_tokens`` of a waiting request's tokens: ``cached_blocks`` (its
        cached prefix), then fresh blocks. False (nothing taken) if the cache is full."""
        rid = req.request_id
        if cached_blocks:
            missing = self.blocks_needed(num_tokens) - len(cached_blocks)
            in_lru = sum(1 for b in cached_blocks if self.pool.ref_cnt[b] == 0)
            if missing > self.pool.num_free_blocks - in_lru:
                return False
            for b in cached_blocks:
                self.pool.incref(b)
            self.block_tables[rid] = list(cached_blocks)
        if not self.allocate_slots(rid, num_tokens):
            self.free(rid)
            return False
        num_cached = len(cached_blocks) * self.block_size
        self.num_registered[rid] = len(cached_blocks)
        self.draft_kv_tokens[rid] = num_cached
        if self.prefix_caching:
            self.num_queried_tokens += req.num_tokens
            self.num_hit_tokens += num_cached
            self._promise(rid, req.block_hashes[len(cached_blocks):])
        return True

    def _promise(self, request_id: str, hashes: list[bytes]) -> None:
        taken = []
        for h in hashes:
            if h not in self.promised:
                self.promised[h] = request_id
                taken.append(h)
        self.promises[request_id] = taken

    def _drop_promises(self, request_id: str) -> None:
        for h in self.promises.pop(request_id, []):
            del self.promised[h]

    def mark_draft_kv(self, request_id: str, num_tokens: int) -> None:
        """The MTP KV of the request's first ``num_tokens`` positions is filled (the proposer's
        pass over verified tokens)."""
        if request_id in self.block_tables:
            self.draft_kv_tokens[request_id] = num_tokens

    def cache_blocks(self, req) -> None:
        """Register ``req``'s full blocks whose KV is computed from verified tokens (and MTP KV
        filled) and whose next token is known."""
        rid = req.request_id
        table = self.block_tables.get(rid)
        if not self.prefix_caching or not table:
            return
        computed = req.num_computed_tokens
        if self.fills_draft_kv(req):
            computed = min(computed, self.draft_kv_tokens.get(rid, 0))
        hashes = self.block_hashes(req)
        done = self.num_registered.get(rid, 0)
        full = min(computed // self.block_size, len(hashes), len(table))
        for b in range(done, full):
            self.pool.register(table[b], hashes[b])
        self.num_registered[rid] = max(done, full)
        if req.num_computed_tokens >= req.num_prompt_tokens:
            self._drop_promises(rid)

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
        self.num_registered.pop(request_id, None)
        self.draft_kv_tokens.pop(request_id, None)
        self._drop_promises(request_id)

    def reset_prefix_cache(self) -> None:
        """Drop what the prefix cache keeps of finished requests (benchmarks that time prompts)."""
        self.pool.reset_prefix_cache()

    def step_state(self, scheduled) -> None:
        """Per-request state beyond KV blocks for a step:
        none here (hybrid models: ``HybridCacheManager``)."""

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()
