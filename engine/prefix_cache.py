"""Block hashes for prefix caching.

Block ``b`` of a request holds positions ``[b * B, (b + 1) * B)``. Its hash chains the previous
block's hash (the engine's salt for block 0) with the block's tokens *and the token after it*:
the MTP layer's KV at position ``p`` pairs the main model's hidden state at ``p`` with token
``p + 1``, so the block's last MTP entry depends on the next block's first token. Two prompts that
share a block but not the token after it get different hashes, and a hit never serves an MTP entry
made for another continuation.

So a block is hashable once the token after it is known. A request only ever reuses blocks that end
before its last token (that token is always recomputed, so its logits exist), and that token is
known, which makes the lookahead free for lookups. Hashes are taken over ``all_token_ids`` (prompt
and verified output): drafts live in ``spec_token_ids`` and are never hashed.

The salt covers what the KV depends on besides the tokens: model, weight format, quantization,
dtype, block size, the MTP head. SHA-256 keeps a crafted prompt from colliding with another user's
prefix.
"""

from __future__ import annotations

import hashlib
from array import array


def engine_salt(*parts) -> bytes:
    """The root hash of every chain: a digest of ``parts`` (their ``repr``s)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.digest()


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[bytes], root: bytes, token_ids: list[int],
                        block_size: int) -> list[bytes]:
    """Append to ``hashes`` the hash of every block of ``token_ids`` that has become hashable (full,
    with the token after it known); returns ``hashes``."""
    while True:
        start = len(hashes) * block_size
        end = start + block_size
        if end >= len(token_ids):
            return hashes
        parent = root
        if hashes:
            parent = hashes[-1]
        hashes.append(chain_hash(parent, token_ids[start:end + 1]))
