"""Tiny random checkpoints with MTP layers, saved with transformers in the released layout.

``make_tiny_glm4_moe`` writes a GLM-4.5 style directory: ``Glm4MoeForCausalLM.save_pretrained`` for the main model,
plus its MTP layer(s) appended to ``model.safetensors`` under the checkpoint's own names (transformers' model has no
MTP modules; ``generate(..., use_mtp=True)`` builds ``MtpModel`` and loads them from the file)::

    model.layers.{N+i}.enorm.weight, .hnorm.weight, .eh_proj.weight [H, 2H], .shared_head.norm.weight
    model.layers.{N+i}.shared_head.head.weight, .embed_tokens.weight      (copies of the main ones, optional)
    model.layers.{N+i}.{input_layernorm,post_attention_layernorm,self_attn.*,mlp.*}   a full MoE decoder block

transformers only looks for MTP weights at layer 46 or 92 (``_keys_to_ignore_on_load_unexpected``), hence the
46 thin layers by default.
"""

from __future__ import annotations

import json
import os

import torch
from conftest import BOS_ID, DEFAULT_GENERATION, EOS_ID, PAD_ID, save_tokenizer

GLM4_MOE_TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, moe_intermediate_size=32, n_routed_experts=4,
    n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, partial_rotary_factor=0.5,
    attention_bias=True, initializer_range=0.1, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
)


def _randomize(module: torch.nn.Module, g: torch.Generator, scale: float = 0.1) -> None:
    """Norm weights 1 + noise, random projection and router biases (transformers initializes them to 1 and 0),
    so that a swapped norm or a missed bias shows."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("norm.weight"):
                t.copy_(1.0 + scale * torch.randn(t.shape, generator=g))
            elif name.endswith(("_proj.bias", "e_score_correction_bias")):
                t.copy_(2 * scale * torch.randn(t.shape, generator=g))


def _checkpoint_names(mtp_state: dict[str, torch.Tensor], num_hidden_layers: int) -> dict[str, torch.Tensor]:
    """transformers' MtpModel state dict -> the released names (the reverse of its loading conversions)."""
    out = {}
    for name, t in mtp_state.items():
        parts = name.split(".")
        if parts[0] != "layers":  # embed_tokens / shared_head: the main model's, tied
            continue
        prefix = f"model.layers.{num_hidden_layers + int(parts[1])}."
        rest = ".".join(parts[2:])
        if rest.startswith("mtp_block."):
            rest = rest[len("mtp_block."):]
        elif rest.startswith("post_norm."):
            rest = "shared_head.norm." + rest[len("post_norm."):]
        if rest.endswith("experts.gate_up_proj"):  # [E, 2I, H] -> per expert gate [I, H], up [I, H]
            base = rest[: -len("gate_up_proj")]
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}{base}{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}{base}{e}.up_proj.weight"] = up.contiguous()
        elif rest.endswith("experts.down_proj"):  # [E, H, I]
            base = rest[: -len("down_proj")]
            for e, w in enumerate(t):
                out[f"{prefix}{base}{e}.down_proj.weight"] = w.contiguous()
        else:
            out[prefix + rest] = t.contiguous()
    return out


def _make_copy_layers(mtp_model) -> None:
    with torch.no_grad():
        for layer in mtp_model.layers:
            h = layer.eh_proj.weight.shape[0]
            layer.eh_proj.weight.copy_(torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1))  # input [e, h]
            for name, p in layer.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                    p.zero_()


def make_tiny_glm4_moe(tmp_dir, *, num_hidden_layers: int = 46, mtp: bool = True, seed: int = 0,
                       mtp_head_copies: bool = True, mtp_copy: bool = False, **overrides) -> str:
    """Save a random tiny glm4_moe checkpoint (+ tokenizer, generation_config.json) to ``tmp_dir``; return its path.

    ``mtp``: append one MTP layer at index ``num_hidden_layers`` (config ``num_nextn_predict_layers`` 1, else 0);
    ``mtp_head_copies``: also store the main embedding and lm_head under the MTP layer, as GLM-4.5 releases do.
    ``mtp_copy``: an MTP layer that repeats the main model's last prediction (``eh_proj`` passes ``h`` through, the
    block adds nothing, norms are ones), so drafts are accepted wherever the greedy text repeats a token.
    ``overrides`` go to ``Glm4MoeConfig``.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Glm4MoeConfig
    from transformers.modeling_layers import MtpModel

    path = str(tmp_dir)
    os.makedirs(path, exist_ok=True)
    kwargs = {**GLM4_MOE_TINY, "num_hidden_layers": num_hidden_layers, "num_mtp_layers": int(mtp), **overrides}
    config = Glm4MoeConfig(**kwargs)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, g)
    model.save_pretrained(path)
    if mtp:
        mtp_model = MtpModel(model, config.num_mtp_layers)
        with torch.no_grad():
            for name, p in mtp_model.layers.named_parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        _randomize(mtp_model.layers, g)
        if mtp_copy:
            _make_copy_layers(mtp_model)
        extra = _checkpoint_names(mtp_model.state_dict(), num_hidden_layers)
        if mtp_head_copies:
            for i in range(config.num_mtp_layers):
                prefix = f"model.layers.{num_hidden_layers + i}."
                extra[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
                extra[prefix + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
        file = os.path.join(path, "model.safetensors")
        save_file({**load_file(file), **extra}, file, metadata={"format": "pt"})
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(DEFAULT_GENERATION, f, indent=2)
    save_tokenizer(path)
    return path
