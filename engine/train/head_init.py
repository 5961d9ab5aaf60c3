"""A freshly initialized DeepSeek-style MTP head for a dense (Llama-family) base model."""

from __future__ import annotations

import torch

from mtpserve.engine.config import ModelConfig
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.loader.mtp_head import save_mtp_head
from mtpserve.engine.models.llama import DecoderLayer


def init_head_weights(
    config: ModelConfig, num_layers: int = 1, seed: int = 0, scale: float = 0.02
) -> dict:
    """Weights named ``model.layers.{N+i}.*``: norms at 1 + noise, projections ~ N(0, scale^2)."""
    if config.architecture not in ("llama", "mistral", "qwen2", "qwen3"):
        raise MtpserveError(
            f"new MTP heads are built for dense models, not {config.architecture!r}"
        )
    g = torch.Generator().manual_seed(seed)
    h = config.hidden_size
    weights = {}
    for i in range(num_layers):
        prefix = f"model.layers.{config.num_hidden_layers + i}."
        block = DecoderLayer(config)
        for p in block.parameters():
            p.data = torch.randn(p.shape, generator=g) * scale
        layer = block.export(prefix)
        layer[prefix + "enorm.weight"] = torch.ones(h)
        layer[prefix + "hnorm.weight"] = torch.ones(h)
        layer[prefix + "eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) * scale
        layer[prefix + "shared_head.norm.weight"] = torch.ones(h)
        for name in layer:
            if name.endswith("norm.weight"):
                layer[name] = 1.0 + torch.randn(layer[name].shape, generator=g) * scale
        weights.update(layer)
    return weights


def head_config(config: ModelConfig, num_layers: int) -> dict:
    """The JSON config of a head for the base model ``config``."""
    return {
        "num_nextn_predict_layers": num_layers,
        "base_num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "feedback": "pre_norm",
    }


def save_new_head(
    path: str, config: ModelConfig, num_layers: int = 1, seed: int = 0, scale: float = 0.02
) -> str:
    weights = init_head_weights(config, num_layers, seed, scale)
    save_mtp_head(path, weights, head_config(config, num_layers))
    return path
