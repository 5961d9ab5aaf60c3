"""Tiny random hybrid Qwen checkpoints (Qwen3-Next, Qwen3.5 dense and MoE, Qwen3.5's image-text wrapper) saved with
transformers, with an MTP layer in the released ``mtp.*`` layout.

transformers' models have no MTP module (they drop ``mtp.*`` on load), so the MTP weights are written next to the
saved model in ``model.safetensors``::

    mtp.fc.weight [H, 2H], mtp.pre_fc_norm_embedding.weight, mtp.pre_fc_norm_hidden.weight, mtp.norm.weight
    mtp.layers.{i}.*   a full-attention decoder block of the family, in transformers' own layout (fused
                       experts.gate_up_proj / experts.down_proj where the block has experts)
"""

from __future__ import annotations

import json
import os

import torch
from conftest import BOS_ID, DEFAULT_GENERATION, EOS_ID, PAD_ID, save_tokenizer

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
COMMON = {
    "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 4, "layer_types": LAYER_TYPES,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_conv_kernel_dim": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 12,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "initializer_range": 0.1,
    "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}
# family -> (transformers text config class, its arguments)
FAMILIES = {
    "qwen3_next": ("Qwen3NextConfig", {**COMMON, **MOE, "intermediate_size": 96, "mlp_only_layers": [2]}),
    "qwen3_5": ("Qwen3_5TextConfig", {**COMMON, "intermediate_size": 96}),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", {**COMMON, **MOE}),
}
TINY_VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 64,
               "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2, "num_position_embeddings": 16}


def _randomize(model: torch.nn.Module, g: torch.Generator) -> None:
    """Zero-centered norms at noise (scale 1 + w), the gated DeltaNet norm at 1 + noise, and slow decays
    (A = exp(A_log) in [0.05, 0.5]) so the recurrent state carries over many tokens and a wrong one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.05, 0.5, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _mtp_weights(config_class, kwargs: dict, num_layers: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    h = kwargs["hidden_size"]
    out = {"mtp.fc.weight": 0.1 * torch.randn(h, 2 * h, generator=g)}
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{name}.weight"] = 0.1 * torch.randn(h, generator=g)
    block_kwargs = {**kwargs, "num_hidden_layers": 1, "layer_types": ["full_attention"]}
    if "mlp_only_layers" in block_kwargs:
        block_kwargs["mlp_only_layers"] = []
    for i in range(num_layers):
        block = AutoModelForCausalLM.from_config(config_class(**block_kwargs), dtype=torch.float32)
        _randomize(block, g)
        out.update({f"mtp.layers.{i}." + k[len("model.layers.0."):]: v.detach().clone()
                    for k, v in block.state_dict().items() if k.startswith("model.layers.0.")})
    return out


def make_tiny_qwen3_next(tmp_dir, family: str = "qwen3_next", *, image_text: bool = False, seed: int = 0,
                         mtp_layers: int = 1, mtp_key: str | None = "num_nextn_predict_layers", **overrides) -> str:
    """Save a random tiny checkpoint of ``family`` (+ tokenizer, generation_config.json); return its path.

    ``image_text``: the Qwen3.5 image-text model (``Qwen3_5ForConditionalGeneration``, a one-block vision tower)
    around the text model; ``mtp_layers`` MTP blocks under ``mtp.*`` (0: none); ``mtp_key`` the config key announcing
    them (None: absent, as in the released Qwen3-Next config). ``overrides`` go to the text config."""
    import transformers
    from safetensors.torch import load_file, save_file

    path = str(tmp_dir)
    os.makedirs(path, exist_ok=True)
    class_name, kwargs = FAMILIES[family]
    config_class = getattr(transformers, class_name)
    kwargs = {**kwargs, **overrides}
    config = config_class(**kwargs)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if image_text:
        wrapper = transformers.Qwen3_5Config if family == "qwen3_5" else transformers.Qwen3_5MoeConfig
        config = wrapper(text_config=config.to_dict(), vision_config=TINY_VISION)
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model.eval(), g)
    model.save_pretrained(path)
    if mtp_layers:
        file = os.path.join(path, "model.safetensors")
        save_file({**load_file(file), **_mtp_weights(config_class, kwargs, mtp_layers, g)}, file,
                  metadata={"format": "pt"})
    if mtp_key:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        (saved["text_config"] if image_text else saved)[mtp_key] = mtp_layers
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(DEFAULT_GENERATION, f, indent=2)
    save_tokenizer(path)
    return path
