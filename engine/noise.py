"""Counter-based randomness: every random number a request uses is a pure function of
(seed, output position, stream, token id), so nothing depends on how many numbers were drawn before.

A seeded request's token at output position ``n`` is the exponential race ``argmax(p / E)`` with
``E = exponentials(seed, n, TOKEN)``: the same whether it was sampled by a plain step, verified
after drafting, recomputed after preemption, or batched with anything else. Requests without a
seed get a random one.

The numbers come from a 32-bit integer hash (two rounds of a multiply-xorshift mix, a bijection on
32 bits), computed in int64 torch ops on the device, so CPU and CUDA give the same bits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

TOKEN = 0   # the race that picks an emitted token (and a seeded request's coupled drafts)
DRAFT = 1   # the race that picks a draft under rejection sampling
ACCEPT = 2  # the uniform that accepts or rejects a draft under rejection sampling

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
SCALE = 2.0 ** -32


def mix32(x: int) -> int:
    """The integer hash on Python ints (reference for ``_mix32``)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` on an int64 tensor of values in [0, 2**32): int64 products wrap, and the mask keeps
    their low 32 bits, which are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def keys(seed: int, position: int, stream: int) -> tuple[int, int]:
    """Two 32-bit keys of (64-bit seed, position, stream)."""
    seed &= (1 << 64) - 1
    a = mix32((seed & MASK32) ^ mix32(stream + 1))
    a = mix32(a ^ (seed >> 32))
    a = mix32(a ^ (position & MASK32))
    return a, mix32(a ^ GOLDEN)


def hashes(key_pairs: list[tuple[int, int]], token_ids: torch.Tensor) -> torch.Tensor:
    """[B, n] int64 in [0, 2**32): the hash of each row's keys with each token id
    (token_ids: [n])."""
    k = torch.tensor(key_pairs, dtype=torch.int64, device=token_ids.device).reshape(-1, 2)
    h = _mix32(token_ids.to(torch.int64)[None, :] ^ k[:, :1])
    return _mix32(h ^ k[:, 1:])


def to_uniform(h: torch.Tensor) -> torch.Tensor:
    """float64 in (0, 1) from 32-bit hashes."""
    return (h.double() + 0.5) * SCALE


@dataclass(frozen=True)
class RequestNoise:
    """One request's randomness. ``seeded``: the seed came from the request, whose output must then
    depend on nothing else; otherwise it was drawn at random (see ``of``)."""
    seed: int
    seeded: bool = True

    @classmethod
    def of(cls, seed: int | None) -> RequestNoise:
        if seed is None:
            return cls(secrets.randbits(64), seeded=False)
        return cls(seed)


def exponentials(noises: list[RequestNoise], positions: list[int], stream: int, vocab_size: int,
                 device) -> torch.Tensor:
    """[B, vocab_size] float32 Exp(1): row b is keyed on (noises[b].seed, positions[b], stream)."""
    pairs = [keys(n.seed, p, stream) for n, p in zip(noises, positions)]
    token_ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
    return (-torch.log(to_uniform(hashes(pairs, token_ids)))).float()


def uniforms(noises: list[RequestNoise], positions: list[int], stream: int, device) -> torch.Tensor:
    """[B] float64 U(0, 1): entry b is keyed on (noises[b].seed, positions[b], stream)."""
    pairs = [keys(n.seed, p, stream) for n, p in zip(noises, positions)]
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    return to_uniform(hashes(pairs, zero))[:, 0]
