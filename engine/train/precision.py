"""The arithmetic of train-head's hidden-state pass and training steps.

bfloat16 autocast keeps the head's weights, the optimizer and the loss in float32 and runs the
matrix products in bfloat16. It pays where the hardware multiplies bfloat16 natively (CPUs with
AVX512-BF16 or AMX, CUDA GPUs that support it); elsewhere PyTorch emulates it and float32 is
faster, so ``auto`` picks by the hardware.
"""

from __future__ import annotations

import contextlib

import torch

from mtpserve.kernels.cpu_build import cpu_flags

PRECISIONS = ("auto", "float32", "bfloat16")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(device: str) -> bool:
    if str(device).startswith("cuda"):
        return torch.cuda.is_bf16_supported(including_emulation=False)
    flags = cpu_flags()
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_precision(name: str, device: str) -> str:
    """"float32" or "bfloat16" for ``name`` (one of PRECISIONS) on ``device``."""
    if name not in PRECISIONS:
        raise ValueError(f"precision is one of {PRECISIONS}, not {name!r}")
    if name != "auto":
        return name
    if native_bf16(device):
        return "bfloat16"
    return "float32"


def autocast(precision: str, device: str):
    """A context that runs the matrix products inside it in ``precision``."""
    if precision == "float32":
        return contextlib.nullcontext()
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16)
