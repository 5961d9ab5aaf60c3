"""Which weights of a loaded model run quantized, and in what form (before ``.to(device, dtype)``).

Modules name their projection weights in ``LINEAR_WEIGHTS`` (``[in, out]`` float parameters, or
``QuantizedWeight`` as a GGUF file stores them) and their vocabulary heads in ``HEAD_WEIGHTS``.
Routers, norms, convolutions and stacked MoE experts stay float.
"""

from __future__ import annotations

import torch
from torch import nn

from mtpserve.kernels import cpu_blocks
from mtpserve.kernels.quant import Fp16Head, Fp16Linear, Int8Linear, QuantizedWeight, pack, quantize

QUANTIZATIONS = ("none", "int4", "int8", "fp16")
# how the engine's start-up line names each
WEIGHT_FORMS = {"int4": "int4 (4-bit codes as stored), heads int8 per row",
                "int8": "int8 per row, heads too", "fp16": "float16 (FBGEMM), heads too"}
# the same on the CPU block kernels
BLOCK_FORMS = {"int4": "int4 blocks of 32 as stored, heads int8 blocks (CPU block kernels)",
               "int8": "int8 blocks of 32, heads too (CPU block kernels)"}


def prepare_weights(model: nn.Module, quantization: str, group_size: int,
                    device: torch.device, cpu_kernels: bool = True) -> None:
    """``quantization``: "none" keeps every weight float, dequantizing stored codes (the exact
    reference path); "int4" packs the projections in 4 bits (groups), keeping 4-bit codes a file
    stores as they are; "int8" packs them in 8 bits per output row, rounding stored codes again.
    "fp16" holds every projection in float16 for FBGEMM. Vocabulary heads are float16 with "fp16"
    and 8 bits per row otherwise: they are also read row by row, as the tied embedding and as a
    reduced draft head. On CPU with ``cpu_kernels`` (and the block kernels built), int4 and int8
    weights are blocks of 32 inputs (kernels/cpu_blocks.py)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    if quantization == "fp16" and device.type != "cpu":
        raise ValueError("fp16 weights run on FBGEMM, a CPU library; on CUDA use --dtype float16")
    blocks = cpu_kernels and device.type == "cpu" and cpu_blocks.available()
    for module in list(model.modules()):
        for name in getattr(module, "LINEAR_WEIGHTS", ()):
            _prepare(module, name, quantization, group_size, device, False, blocks)
        for name in getattr(module, "HEAD_WEIGHTS", ()):
            _prepare(module, name, quantization, group_size, device, True, blocks)


def _prepare(module: nn.Module, name: str, quantization: str, group_size: int,
             device: torch.device, head: bool, blocks: bool) -> None:
    value = getattr(module, name)
    if value is None:
        return
    if quantization == "none":
        if isinstance(value, QuantizedWeight):
            _replace(module, name, nn.Parameter(value.dequantize().t().contiguous(),
                                                requires_grad=False))
        return
    if quantization == "fp16":
        _replace(module, name, _fp16(value, head))
        return
    if isinstance(value, nn.Parameter):
        bits = _bits(quantization, head, value.shape[0], group_size)
        value = quantize(value.t(), bits, _group(bits, value.shape[0], group_size, blocks))
    if blocks and cpu_blocks.fits(value):
        _replace(module, name, cpu_blocks.BlockLinear.of(value, tiled=True))
        return
    if head or quantization == "int8":
        _replace(module, name, Int8Linear.of(value, device))
    else:
        _replace(module, name, pack(value, device))


def _fp16(value, head: bool) -> Fp16Linear:
    """``value`` (an ``[in, out]`` parameter or a QuantizedWeight) in float16 for FBGEMM."""
    if isinstance(value, QuantizedWeight):
        weight = value.dequantize()
    else:
        weight = value.t()
    if head:
        return Fp16Head(weight)
    return Fp16Linear(weight)


def _replace(module: nn.Module, name: str, value) -> None:
    """``module.<name> = value`` across kinds (a parameter's name takes no module otherwise)."""
    delattr(module, name)
    setattr(module, name, value)


def _bits(quantization: str, head: bool, in_features: int, group_size: int) -> int:
    """8 for heads, for int8, and where the input is not whole groups (the int4 kernel's need)."""
    if head or quantization == "int8" or in_features % group_size:
        return 8
    return 4


def _group(bits: int, in_features: int, group_size: int, blocks: bool) -> int:
    """The group size to round to: 8-bit weights have one scale per row, except on the block
    kernels, which take groups where the input is whole groups."""
    if bits == 8 and (not blocks or in_features % group_size):
        return in_features
    return group_size
