"""Builders for MTP tests: a random DeepSeek-style head for a tiny dense checkpoint."""

from __future__ import annotations

import torch

from mtpserve.engine.loader.mtp_head import save_mtp_head


def random_head_weights(config, seed: int = 0, num_layers: int = 1, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Random MTP layer(s) named like DeepSeek's (``model.layers.{N+i}.*``) with a llama block."""
    g = torch.Generator().manual_seed(seed)
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h), "shared_head.norm.weight": (h,),
              "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
              "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
              "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
              "mlp.down_proj.weight": (h, inter)}
    if config.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if config.architecture != "qwen2":
            shapes["self_attn.o_proj.bias"] = (h,)
    if config.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (config.head_dim,), "self_attn.k_norm.weight": (config.head_dim,)})
    weights = {}
    for i in range(num_layers):
        prefix = f"model.layers.{config.num_hidden_layers + i}."
        for name, shape in shapes.items():
            w = torch.randn(shape, generator=g) * scale
            weights[prefix + name] = w + 1.0 if name.endswith("norm.weight") else w
    return weights


def save_random_head(path, config, **kwargs) -> str:
    weights = random_head_weights(config, **kwargs)
    save_mtp_head(str(path), weights, {
        "num_nextn_predict_layers": kwargs.get("num_layers", 1), "base_num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size, "vocab_size": config.vocab_size, "feedback": "pre_norm"})
    return str(path)
