"""A step of a dense decoder stack in one call to the CPU block kernels.

``mtp_decoder_layers`` runs every layer (norms, block projections, rotary, the paged-KV write and
attention, SwiGLU) in C++ without going back to Python: on a 2-core CPU the ~25 PyTorch ops of a
layer cost more than its projections. Every step takes it, prompt chunks as decodes and verify
rows, so a token's numbers never depend on the step it was computed in: with the rows of a call
independent, greedy output is the same with drafts or without, batched or alone, with prefix-cache
hits or without, bit for bit. They follow the per-op path (same block weights and rounded
activations, PyTorch's norms and attention elsewhere) to float32 rounding.
"""

from __future__ import annotations

import ctypes

import torch

from mtpserve.kernels.attention import AttentionMetadata
from mtpserve.kernels.cpu_blocks import BlockLinear, QWeightStruct
from mtpserve.kernels.cpu_build import library

_ptr = ctypes.c_void_p


class LayerStruct(ctypes.Structure):
    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", QWeightStruct),
                ("qkv_bias", _ptr), ("o", QWeightStruct), ("o_bias", _ptr),
                ("gate_up", QWeightStruct), ("down", QWeightStruct), ("k_cache", _ptr),
                ("v_cache", _ptr)]


class ModelStruct(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_int32), ("hidden", ctypes.c_int32),
                ("num_heads", ctypes.c_int32), ("num_kv_heads", ctypes.c_int32),
                ("head_dim", ctypes.c_int32), ("intermediate", ctypes.c_int32),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cos", _ptr), ("sin", _ptr),
                ("layers", ctypes.POINTER(LayerStruct))]


class StepStruct(ctypes.Structure):
    _fields_ = [("num_tokens", ctypes.c_int32), ("positions", _ptr), ("kv_positions", _ptr),
                ("slots", _ptr), ("token_seq", _ptr), ("block_tables", _ptr),
                ("bt_stride", ctypes.c_int32), ("block_size", ctypes.c_int32)]


def supports(model) -> bool:
    """Whether ``model``'s layers can run fused: a dense family (``FUSED_LAYERS``), float32 on
    CPU, full rotary, head_dim a multiple of 8, and every layer plain (``layer_fits``)."""
    cfg = model.config
    if not getattr(model, "FUSED_LAYERS", False):
        return False
    if model.norm.dtype != torch.float32 or model.norm.device.type != "cpu":
        return False
    if cfg.rotary_dim != cfg.head_dim or cfg.head_dim % 8 or cfg.head_dim > 512:
        return False
    if library() is None:
        return False
    return all(layer_fits(layer) for layer in model.layers)


def layer_fits(layer) -> bool:
    """A dense block (attention and SwiGLU) with block weights and no q/k norms."""
    attn = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    if attn is None or getattr(attn, "q_norm", True) is not None:
        return False
    weights = (getattr(attn, "qkv_weight", None), getattr(attn, "o_weight", None),
               getattr(mlp, "gate_up_weight", None), getattr(mlp, "down_weight", None))
    return all(isinstance(w, BlockLinear) for w in weights)


def _addr(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    return tensor.data_ptr()


def _layer_struct(layer, kv_cache) -> LayerStruct:
    attn, mlp = layer.self_attn, layer.mlp
    k_cache, v_cache = kv_cache
    return LayerStruct(
        _addr(layer.input_norm), _addr(layer.post_attention_norm), attn.qkv_weight.struct(),
        _addr(attn.qkv_bias), attn.o_weight.struct(), _addr(attn.o_bias),
        mlp.gate_up_weight.struct(), mlp.down_weight.struct(), _addr(k_cache), _addr(v_cache))


class FusedDecoder:
    """Decoder layers (of a model, or an MTP layer's block) bound to their KV caches."""

    def __init__(self, layers, cfg, cos: torch.Tensor, sin: torch.Tensor, kv_caches: list):
        self.kv_caches = kv_caches
        structs = [_layer_struct(layer, kv) for layer, kv in zip(layers, kv_caches)]
        self.layers = (LayerStruct * len(structs))(*structs)
        self.model = ModelStruct(
            len(structs), cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps, cfg.head_dim ** -0.5,
            _addr(cos), _addr(sin), self.layers)

    def bound_to(self, kv_caches: list) -> bool:
        return len(kv_caches) == len(self.kv_caches) and all(
            a is b for a, b in zip(kv_caches, self.kv_caches))

    @classmethod
    def bind(cls, cached: FusedDecoder | None, layers, cfg, cos: torch.Tensor, sin: torch.Tensor,
             kv_caches: list) -> FusedDecoder:
        """``cached`` if it is bound to ``kv_caches``, else ``layers`` bound to them anew."""
        if cached is not None and cached.bound_to(kv_caches):
            return cached
        return cls(layers, cfg, cos, sin, kv_caches)

    def run(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            kv_positions: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, hidden] through every layer, in place. ``positions``: rotary positions;
        ``kv_positions``: the tokens' positions in the cache, if not those (MTP layers)."""
        if kv_positions is None:
            kv_positions = positions
        x = x.contiguous()
        lens = torch.tensor(meta.query_lens)
        token_seq = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), lens)
        tables = meta.block_tables.contiguous()
        positions = positions.contiguous()
        kv_positions = kv_positions.contiguous()
        slots = meta.slot_mapping.contiguous()
        step = StepStruct(x.shape[0], positions.data_ptr(), kv_positions.data_ptr(),
                          slots.data_ptr(), token_seq.data_ptr(), tables.data_ptr(),
                          tables.shape[1], meta.block_size)
        library().mtp_decoder_layers(ctypes.byref(self.model), ctypes.byref(step),
                                     _ptr(x.data_ptr()))
        return x
