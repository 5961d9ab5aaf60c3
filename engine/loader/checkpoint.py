"""What every loader returns: config, weights (HF names), tokenizer and generation defaults."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mtpserve.engine.config import GenerationDefaults, ModelConfig

if TYPE_CHECKING:
    from mtpserve.engine.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF names (model.layers.{i}.self_attn.q_proj.weight, ...)
    tokenizer: "Tokenizer"
    generation: GenerationDefaults
    source: str  # path it was loaded from
    # how the weights are stored, e.g. "GGUF Q4_1" or "safetensors bfloat16"
    weight_format: str = ""


def most_common(kinds) -> str:
    """The most frequent of ``kinds`` (ties: the first seen), or "" for none."""
    counts = Counter(kinds)
    return counts.most_common(1)[0][0] if counts else ""
