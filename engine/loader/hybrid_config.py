"""config.json keys of the hybrid Qwen3-Next family (transformers ``qwen3_next``): which layers are Gated DeltaNet
(linear attention) and which full attention, the DeltaNet shapes, and the Qwen mixture of experts."""

from __future__ import annotations

from mtpserve.engine.errors import ModelLoadError

HYBRID_ARCHITECTURES = ("qwen3_next",)
LAYER_TYPES = ("full_attention", "linear_attention")
# transformers' defaults for keys a config.json may leave out
QWEN3_NEXT_DEFAULTS = {"linear_conv_kernel_dim": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
                       "linear_key_head_dim": 128, "linear_value_head_dim": 128, "num_experts": 512,
                       "num_experts_per_tok": 10, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                       "decoder_sparse_step": 1, "norm_topk_prob": True, "full_attention_interval": 4}


def layer_types(cfg: dict, num_layers: int) -> tuple[str, ...]:
    """``layer_types`` as given, else every ``full_attention_interval``-th layer full attention (as transformers)."""
    types = cfg.get("layer_types")
    if types is None:
        interval = int(cfg.get("full_attention_interval") or QWEN3_NEXT_DEFAULTS["full_attention_interval"])
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ModelLoadError(f"layer_types must list {num_layers} entries from {', '.join(LAYER_TYPES)}, got {types}")
    return tuple(types)


def hybrid_fields(cfg: dict, arch: str, num_layers: int) -> dict:
    """ModelConfig fields of a qwen3_next config; {} for other architectures."""
    if arch not in HYBRID_ARCHITECTURES:
        return {}

    def get(key):
        return cfg[key] if cfg.get(key) is not None else QWEN3_NEXT_DEFAULTS[key]

    fields = {k: int(get(k)) for k in ("linear_conv_kernel_dim", "linear_num_key_heads", "linear_num_value_heads",
                                       "linear_key_head_dim", "linear_value_head_dim", "num_experts_per_tok",
                                       "moe_intermediate_size", "shared_expert_intermediate_size",
                                       "decoder_sparse_step")}
    if fields["linear_num_value_heads"] % fields["linear_num_key_heads"]:
        raise ModelLoadError("linear_num_value_heads must be a multiple of linear_num_key_heads")
    if fields["decoder_sparse_step"] < 1:
        raise ModelLoadError("decoder_sparse_step must be >= 1")
    fields.update(layer_types=layer_types(cfg, num_layers), n_routed_experts=int(get("num_experts")),
                  norm_topk_prob=bool(get("norm_topk_prob")),
                  mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()))
    return fields


def qwen_mtp_layers(weights: dict) -> int:
    """How many MTP blocks (``mtp.layers.{i}``) a checkpoint holds."""
    return len({name.split(".")[2] for name in weights if name.startswith("mtp.layers.")})
