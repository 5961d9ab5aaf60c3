"""Dense decoder family: Llama, Mistral, Qwen2, Qwen3 (and SmolLM, which is Llama).

Tokens of a step arrive flattened (``input_ids [T]``, ``positions [T]``); attention reads and
writes the paged KV cache through an ``AttentionBackend``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtpserve.engine.config import ModelConfig
from mtpserve.engine.errors import ModelLoadError
from mtpserve.kernels.attention import AttentionBackend
from mtpserve.kernels.cpu_decoder import FusedDecoder, supports
from mtpserve.kernels.linear import linear
from mtpserve.kernels.quant import ROW_HEADS, QuantizedWeight
from mtpserve.kernels.rmsnorm import rms_norm
from mtpserve.kernels.rotary import apply_rotary, rope_cos_sin, signed_tables


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Attention(nn.Module):
    LINEAR_WEIGHTS = ("qkv_weight", "o_weight")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_weight = _param(cfg.hidden_size, self.q_size + 2 * self.kv_size)  # [in, out]
        self.qkv_bias = _param(self.q_size + 2 * self.kv_size) if cfg.attention_bias else None
        self.o_weight = _param(self.q_size, cfg.hidden_size)
        # HF puts a bias on o_proj too when attention_bias is set, except for Qwen2 (q/k/v only).
        o_bias = cfg.attention_bias and cfg.architecture != "qwen2"
        self.o_bias = _param(cfg.hidden_size) if o_bias else None
        self.q_norm = _param(self.head_dim) if cfg.qk_norm else None
        self.k_norm = _param(self.head_dim) if cfg.qk_norm else None
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5

    def forward(self, x, cos, sin, kv_cache, attn: AttentionBackend):
        t = x.shape[0]
        qkv = linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = self.rotated_qkv(qkv, cos, sin)
        out = attn.forward(q, k, v, kv_cache, self.scale)
        return linear(out.reshape(t, self.q_size), self.o_weight, self.o_bias)

    def rotated_qkv(self, qkv: torch.Tensor, cos, sin):
        """q, k (normed, rotated) and v of a fused projection [T, q + 2 kv]; without q/k norms,
        q and k are rotated in one pass."""
        t = qkv.shape[0]
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = qkv[:, :self.q_size + self.kv_size].split([self.q_size, self.kv_size], dim=-1)
            q = rms_norm(q.view(t, self.num_heads, self.head_dim), self.q_norm, self.eps)
            k = rms_norm(k.view(t, self.num_kv_heads, self.head_dim), self.k_norm, self.eps)
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v
        qk = qkv[:, :self.q_size + self.kv_size].unflatten(-1, (-1, self.head_dim))
        qk = apply_rotary(qk, cos, sin)
        return qk[:, :self.num_heads], qk[:, self.num_heads:], v


class MLP(nn.Module):
    LINEAR_WEIGHTS = ("gate_up_weight", "down_weight")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_weight = _param(cfg.hidden_size, 2 * cfg.intermediate_size)  # [in, out]
        self.down_weight = _param(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down_weight)

    def load(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        gate = _take(w, prefix + "gate_proj.weight")
        up = _take(w, prefix + "up_proj.weight")
        _set_linear(self, "gate_up_weight", [gate, up])
        _set_linear(self, "down_weight", [_take(w, prefix + "down_proj.weight")])

    def export(self, prefix: str) -> dict[str, torch.Tensor]:
        gate, up = self.gate_up_weight.t().chunk(2)
        return {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up,
                prefix + "down_proj.weight": self.down_weight.t()}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_norm = _param(cfg.hidden_size)
        self.post_attention_norm = _param(cfg.hidden_size)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.eps = cfg.rms_norm_eps

    def forward(self, x, cos, sin, kv_cache, attn):
        x = x + self.self_attn(rms_norm(x, self.input_norm, self.eps), cos, sin, kv_cache, attn)
        return x + self.mlp(rms_norm(x, self.post_attention_norm, self.eps))

    def load(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        """Fill from HF-named weights under ``prefix`` (e.g. ``model.layers.3.``)."""
        def g(name):
            return _take(w, prefix + name)

        a = self.self_attn
        _copy(self.input_norm, g("input_layernorm.weight"))
        _copy(self.post_attention_norm, g("post_attention_layernorm.weight"))
        _set_linear(a, "qkv_weight", [g(f"self_attn.{p}_proj.weight") for p in "qkv"])
        if a.qkv_bias is not None:
            _copy(a.qkv_bias, torch.cat([g(f"self_attn.{p}_proj.bias") for p in "qkv"]))
        _set_linear(a, "o_weight", [g("self_attn.o_proj.weight")])
        if a.o_bias is not None:
            _copy(a.o_bias, g("self_attn.o_proj.bias"))
        if a.q_norm is not None:
            _copy(a.q_norm, g("self_attn.q_norm.weight"))
            _copy(a.k_norm, g("self_attn.k_norm.weight"))
        self.mlp.load(w, prefix + "mlp.")

    def export(self, prefix: str) -> dict[str, torch.Tensor]:
        """The inverse of ``load``: HF-named weights (for saving a trained MTP block)."""
        a = self.self_attn
        out = {}
        out[prefix + "input_layernorm.weight"] = self.input_norm
        out[prefix + "post_attention_layernorm.weight"] = self.post_attention_norm
        for name, w in zip("qkv", a.qkv_weight.t().split([a.q_size, a.kv_size, a.kv_size])):
            out[f"{prefix}self_attn.{name}_proj.weight"] = w
        if a.qkv_bias is not None:
            for name, b in zip("qkv", a.qkv_bias.split([a.q_size, a.kv_size, a.kv_size])):
                out[f"{prefix}self_attn.{name}_proj.bias"] = b
        out[prefix + "self_attn.o_proj.weight"] = a.o_weight.t()
        if a.o_bias is not None:
            out[prefix + "self_attn.o_proj.bias"] = a.o_bias
        if a.q_norm is not None:
            out[prefix + "self_attn.q_norm.weight"] = a.q_norm
            out[prefix + "self_attn.k_norm.weight"] = a.k_norm
        out.update(self.mlp.export(prefix + "mlp."))
        return {k: v.detach().float().contiguous() for k, v in out.items()}


def _take(w: dict, name: str) -> torch.Tensor:
    if name not in w:
        raise ModelLoadError(f"checkpoint is missing weight {name!r}")
    return w[name]


def _copy(param: nn.Parameter, value) -> None:
    """``param.data = value`` (dequantized if it arrived quantized), shapes checked."""
    if isinstance(value, QuantizedWeight):
        value = value.dequantize()
    if tuple(param.shape) != tuple(value.shape):
        raise ModelLoadError(f"weight shape {tuple(value.shape)} does not match "
                             f"expected {tuple(param.shape)}")
    param.data = value.to(param.dtype).contiguous()


def _set_linear(module: nn.Module, name: str, parts: list) -> None:
    """Fill the projection ``module.<name>`` (an ``[in, out]`` parameter) from ``[out, in]`` row
    blocks, fused in order. Blocks that all arrived quantized alike stay so, as a QuantizedWeight
    in the parameter's place; mixed ones (llama.cpp's Q4_K_M) are fused as float."""
    param = getattr(module, name)
    expected = tuple(reversed(param.shape))
    if all(isinstance(p, QuantizedWeight) for p in parts) and _same_format(parts):
        weight = QuantizedWeight.cat(parts)
        if weight.shape != expected:
            raise ModelLoadError(f"weight shape {weight.shape} does not match expected {expected}")
        delattr(module, name)  # a parameter's name takes no module otherwise
        setattr(module, name, weight)
        return
    floats = []
    for part in parts:
        if isinstance(part, QuantizedWeight):
            part = part.dequantize()
        floats.append(part)
    _copy(param, torch.cat(floats).t())


def _same_format(parts: list[QuantizedWeight]) -> bool:
    first = parts[0]
    return all((p.bits, p.group_size) == (first.bits, first.group_size) for p in parts)


class LlamaForCausalLM(nn.Module):
    HEAD_WEIGHTS = ("lm_head",)
    # the forward reads no device value on the host: it can be captured in a CUDA graph
    CUDA_GRAPHS = True
    # its layers are plain dense blocks: a step can run as one kernel call on CPU
    FUSED_LAYERS = True

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        # lm_head is stored [hidden, vocab]; with tied embeddings the embedding lookup reads
        # its columns.
        self.lm_head = _param(cfg.hidden_size, cfg.vocab_size)
        self.embed_tokens = None
        if not cfg.tie_word_embeddings:
            self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(i) for i in range(cfg.num_hidden_layers))
        self.norm = _param(cfg.hidden_size)
        table_len = max_positions or cfg.max_position_embeddings
        try:
            cos, sin = rope_cos_sin(cfg.rotary_dim, cfg.rope_theta, table_len, cfg.rope_scaling,
                                    cfg.max_position_embeddings)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        cos, sin = signed_tables(cos.float(), sin.float())
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.fusable = False  # to_runtime: whether steps can run as one kernel call
        self.fused: FusedDecoder | None = None

    def make_layer(self, layer_idx: int) -> DecoderLayer:
        """A decoder block of this family (also the block inside an MTP layer)."""
        return DecoderLayer(self.config)

    def load_weights(self, w: dict[str, torch.Tensor]) -> None:
        embed = _take(w, "model.embed_tokens.weight")
        if self.config.tie_word_embeddings:
            _set_linear(self, "lm_head", [embed])
        else:
            _copy(self.embed_tokens, embed)
            _set_linear(self, "lm_head", [_take(w, "lm_head.weight")])
        for i, layer in enumerate(self.layers):
            layer.load(w, f"model.layers.{i}.")
        _copy(self.norm, _take(w, "model.norm.weight"))

    def to_runtime(self, dtype: torch.dtype, device: str | torch.device) -> "LlamaForCausalLM":
        """Cast weights to ``dtype`` on ``device``; rotary tables follow the dtype."""
        self.to(device=device, dtype=dtype)
        self.fusable = supports(self)
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            return F.embedding(input_ids, self.embed_tokens)
        if isinstance(self.lm_head, ROW_HEADS):
            return self.lm_head.embedding(input_ids, self.norm.dtype)
        return self.lm_head.index_select(1, input_ids).t()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                attn: AttentionBackend) -> torch.Tensor:
        """Returns the final post-norm hidden states [T, hidden]."""
        x = self.embed(input_ids)
        fused = self._fused(kv_caches, attn)
        if fused is not None:
            x = fused.run(x, positions, attn.meta)
            return rms_norm(x, self.norm, self.config.rms_norm_eps)
        cos, sin = self.cos[positions], self.sin[positions]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, attn)
        return rms_norm(x, self.norm, self.config.rms_norm_eps)

    def _fused(self, kv_caches: list, attn: AttentionBackend) -> FusedDecoder | None:
        """The one-call decoder for this step over the paged cache (kernels/cpu_decoder.py), or
        None: the per-op path (also for a dense pass without a cache)."""
        if not self.fusable or attn.meta is None:
            return None
        kv_caches = kv_caches[:len(self.layers)]
        self.fused = FusedDecoder.bind(self.fused, self.layers, self.config, self.cos, self.sin,
                                       kv_caches)
        return self.fused

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head)
