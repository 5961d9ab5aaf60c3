"""config.json keys of the hybrid Qwen family (transformers ``qwen3_next``, ``qwen3_5_text``,
``qwen3_5_moe_text``): which layers are Gated DeltaNet (linear attention) and which full attention,
the DeltaNet shapes, and the Qwen mixture of experts. Qwen3.5 releases are image-text models
(``qwen3_5`` / ``qwen3_5_moe``): their language model is ``text_config`` with weights under
``model.language_model.*``; the vision tower is not loaded."""

from __future__ import annotations

from mtpserve.engine.errors import ModelLoadError

HYBRID_ARCHITECTURES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
# image-text model -> its text model
WRAPPERS = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
LAYER_TYPES = ("full_attention", "linear_attention")
# transformers' defaults for keys a config.json may leave out
LINEAR_DEFAULTS = {
    "linear_conv_kernel_dim": 4, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "full_attention_interval": 4,
}
INT_KEYS = (
    "linear_conv_kernel_dim", "linear_num_key_heads", "linear_num_value_heads",
    "linear_key_head_dim", "linear_value_head_dim", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size", "decoder_sparse_step",
)
MOE_DEFAULTS = {
    "qwen3_next": {"num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
                   "shared_expert_intermediate_size": 512},
    "qwen3_5_moe_text": {"num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
                         "shared_expert_intermediate_size": 512},
    "qwen3_5_text": {"num_experts": 0, "num_experts_per_tok": 0, "moe_intermediate_size": 0,
                     "shared_expert_intermediate_size": 0},
}


def text_config_of(cfg: dict) -> dict:
    """The language model's config of a Qwen3.5 image-text config (other configs as they are)."""
    if cfg.get("model_type") not in WRAPPERS or "text_config" not in cfg:
        return cfg
    text = dict(cfg["text_config"])
    text["model_type"] = WRAPPERS[cfg["model_type"]]
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    return text


def text_weights(weights: dict) -> dict:
    """``model.language_model.*`` -> ``model.*``; the vision tower's ``model.visual.*`` left out."""
    out = {}
    for name, tensor in weights.items():
        if name.startswith("model.language_model."):
            out["model." + name[len("model.language_model."):]] = tensor
        elif not name.startswith("model.visual."):
            out[name] = tensor
    return out


def layer_types(cfg: dict, num_layers: int) -> tuple[str, ...]:
    """``layer_types`` as given, else every ``full_attention_interval``-th
    layer full attention (as transformers)."""
    types = cfg.get("layer_types")
    if types is None:
        interval = cfg.get("full_attention_interval") or LINEAR_DEFAULTS["full_attention_interval"]
        interval = int(interval)
        types = []
        for i in range(num_layers):
            if (i + 1) % interval == 0:
                types.append("full_attention")
            else:
                types.append("linear_attention")
    if len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ModelLoadError(f"layer_types must list {num_layers} entries from "
                             f"{', '.join(LAYER_TYPES)}, got {types}")
    return tuple(types)


def hybrid_fields(cfg: dict, arch: str, num_layers: int) -> dict:
    """ModelConfig fields of a hybrid Qwen config; {} for other architectures."""
    if arch not in HYBRID_ARCHITECTURES:
        return {}
    defaults = {**LINEAR_DEFAULTS, **MOE_DEFAULTS[arch]}
    defaults["decoder_sparse_step"] = 1
    defaults["norm_topk_prob"] = True

    def get(key):
        return cfg[key] if cfg.get(key) is not None else defaults[key]

    fields = {k: int(get(k)) for k in INT_KEYS}
    if fields["linear_num_value_heads"] % fields["linear_num_key_heads"]:
        raise ModelLoadError("linear_num_value_heads must be a multiple of linear_num_key_heads")
    if fields["decoder_sparse_step"] < 1:
        raise ModelLoadError("decoder_sparse_step must be >= 1")
    fields["layer_types"] = layer_types(cfg, num_layers)
    fields["n_routed_experts"] = int(get("num_experts"))
    fields["norm_topk_prob"] = bool(get("norm_topk_prob"))
    fields["mlp_only_layers"] = tuple(int(i) for i in cfg.get("mlp_only_layers") or ())
    return fields


def qwen_mtp_layers(weights: dict) -> int:
    """How many MTP blocks (``mtp.layers.{i}``) a checkpoint holds."""
    return len({name.split(".")[2] for name in weights if name.startswith("mtp.layers.")})
