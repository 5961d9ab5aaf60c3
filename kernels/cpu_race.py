"""The sampling race on the CPU kernels (kernels/cpu/race.cpp): the token ``argmax(p / E)`` picks,
without computing the E of tokens that cannot win."""

from __future__ import annotations

import ctypes

import torch

from mtpserve.kernels.cpu_build import library


def race_argmax(probs: torch.Tensor, key_pairs: list[tuple[int, int]]) -> torch.Tensor | None:
    """[B] long: each row's winner of the race keyed on its pair of 32-bit keys (``noise.keys``);
    None where the CPU kernels are unavailable."""
    lib = library()
    if lib is None:
        return None
    probs = probs.float().contiguous()
    keys = torch.tensor(key_pairs, dtype=torch.int64).reshape(-1, 2)
    out = torch.empty(probs.shape[0], dtype=torch.int64)
    lib.race_argmax(ctypes.c_void_p(probs.data_ptr()), ctypes.c_void_p(keys.data_ptr()),
                    ctypes.c_int64(probs.shape[0]), ctypes.c_int64(probs.shape[1]),
                    ctypes.c_void_p(out.data_ptr()))
    return out
