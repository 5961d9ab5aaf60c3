"""Tiny random Qwen3-Next checkpoints saved with transformers, with an MTP layer in the released ``mtp.*`` layout.

transformers' Qwen3NextForCausalLM has no MTP module (it drops ``mtp.*`` on load), so the MTP weights are written
next to the saved model in ``model.safetensors``::

    mtp.fc.weight [H, 2H], mtp.pre_fc_norm_embedding.weight, mtp.pre_fc_norm_hidden.weight, mtp.norm.weight
    mtp.layers.{i}.*   a full-attention decoder block (gated attention + MoE), as saved by transformers
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from conftest import BOS_ID, DEFAULT_GENERATION, EOS_ID, PAD_ID, save_tokenizer

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
QWEN3_NEXT_TINY = {
    "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "layer_types": LAYER_TYPES,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_conv_kernel_dim": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 12,
    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
    "mlp_only_layers": [2], "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "initializer_range": 0.1,
    "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
}


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


def _mtp_weights(config, num_layers: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """mtp.* weights: blocks as transformers saves a one-layer full-attention model's layer 0."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    h = config.hidden_size
    out = {"mtp.fc.weight": 0.1 * torch.randn(h, 2 * h, generator=g)}
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{name}.weight"] = 0.1 * torch.randn(h, generator=g)
    block_config = Qwen3NextConfig(**{**config.to_dict(), "num_hidden_layers": 1, "layer_types": ["full_attention"],
                                      "mlp_only_layers": []})
    for i in range(num_layers):
        block = AutoModelForCausalLM.from_config(block_config, dtype=torch.float32)
        _randomize(block, g)
        with tempfile.TemporaryDirectory() as tmp:
            block.save_pretrained(tmp)
            saved = load_file(os.path.join(tmp, "model.safetensors"))
        out.update({f"mtp.layers.{i}." + k[len("model.layers.0."):]: v for k, v in saved.items()
                    if k.startswith("model.layers.0.")})
    return out


def make_tiny_qwen3_next(tmp_dir, *, seed: int = 0, mtp_layers: int = 1, mtp_key: str | None = "num_nextn_predict_layers",
                         **overrides) -> str:
    """Save a random tiny qwen3_next checkpoint (+ tokenizer, generation_config.json); return its path.

    ``mtp_layers`` MTP blocks under ``mtp.*`` (0: none); ``mtp_key`` the config key announcing them (None: absent,
    as in the released Qwen3-Next config). ``overrides`` go to ``Qwen3NextConfig``."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    path = str(tmp_dir)
    os.makedirs(path, exist_ok=True)
    config = Qwen3NextConfig(**{**QWEN3_NEXT_TINY, **overrides})
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, g)
    model.save_pretrained(path)
    if mtp_layers:
        file = os.path.join(path, "model.safetensors")
        save_file({**load_file(file), **_mtp_weights(config, mtp_layers, g)}, file, metadata={"format": "pt"})
    if mtp_key:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        saved[mtp_key] = mtp_layers
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(DEFAULT_GENERATION, f, indent=2)
    save_tokenizer(path)
    return path
