"""The decode step of a dense decoder stack in one call to the CPU block kernels.

For steps whose queries are all short (decodes, MTP verify rows; prompts take the per-op path),
``mtp_decoder_layers`` runs every layer (norms, block projections, rotary, the paged-KV write and
attention, SwiGLU) in C++ without going back to Python: on a 2-core CPU the ~25 PyTorch ops of a
layer cost more than its projections. Its numbers follow the per-op path with the same block
weights (the same rounded activations, float32 elsewhere), to float32 rounding.
"""

from __future__ import annotations

import ctypes

import torch

from mtpserve.kernels.attention import SHORT_QUERY, AttentionMetadata
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
    _fields_ = [("num_tokens", ctypes.c_int32), ("positions", _ptr), ("slots", _ptr),
                ("token_seq", _ptr), ("block_tables", _ptr), ("bt_stride", ctypes.c_int32),
                ("block_size", ctypes.c_int32)]


def supports(model) -> bool:
    """Whether ``model``'s layers can run fused: a dense family (``FUSED_LAYERS``), float32 on
    CPU, block weights everywhere, full rotary, no q/k norms, head_dim a multiple of 8."""
    cfg = model.config
    if not getattr(model, "FUSED_LAYERS", False):
        return False
    if model.norm.dtype != torch.float32 or model.norm.device.type != "cpu":
        return False
    if cfg.rotary_dim != cfg.head_dim or cfg.head_dim % 8 or cfg.head_dim > 512:
        return False
    if library() is None:
        return False
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        weights = (attn.qkv_weight, attn.o_weight, mlp.gate_up_weight, mlp.down_weight)
        if not all(isinstance(w, BlockLinear) for w in weights):
            return False
        if attn.q_norm is not None:
            return False
    return True


def _addr(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    return tensor.data_ptr()


class FusedDecoder:
    """The layers of one model bound to one set of KV caches."""

    def __init__(self, model, kv_caches: list):
        cfg = model.config
        self.kv_caches = kv_caches
        layers = []
        for layer, (k_cache, v_cache) in zip(model.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(LayerStruct(
                _addr(layer.input_norm), _addr(layer.post_attention_norm),
                attn.qkv_weight.struct(), _addr(attn.qkv_bias), attn.o_weight.struct(),
                _addr(attn.o_bias), mlp.gate_up_weight.struct(), mlp.down_weight.struct(),
                _addr(k_cache), _addr(v_cache)))
        self.layers = (LayerStruct * len(layers))(*layers)
        self.model = ModelStruct(
            len(layers), cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps, cfg.head_dim ** -0.5,
            _addr(model.cos), _addr(model.sin), self.layers)

    def bound_to(self, kv_caches: list) -> bool:
        return kv_caches is self.kv_caches

    @staticmethod
    def can_run(meta: AttentionMetadata | None) -> bool:
        """Short queries only: a prompt chunk takes the per-op path."""
        if meta is None:
            return False
        return max(meta.query_lens) <= SHORT_QUERY

    def run(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        """x [T, hidden] (the embeddings) through every layer, in place."""
        x = x.contiguous()
        lens = torch.tensor(meta.query_lens)
        token_seq = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), lens)
        tables = meta.block_tables.contiguous()
        positions = positions.contiguous()
        slots = meta.slot_mapping.contiguous()
        step = StepStruct(x.shape[0], positions.data_ptr(), slots.data_ptr(),
                          token_seq.data_ptr(), tables.data_ptr(), tables.shape[1],
                          meta.block_size)
        library().mtp_decoder_layers(ctypes.byref(self.model), ctypes.byref(step),
                                     _ptr(x.data_ptr()))
        return x
