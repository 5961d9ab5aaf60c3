"""What every loader returns: config, weights (HF names), tokenizer and generation defaults."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtpserve.engine.config import GenerationDefaults, ModelConfig
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtpserve.engine.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF names (model.layers.{i}.self_attn.q_proj.weight, ...)
    tokenizer: "Tokenizer"
    generation: GenerationDefaults
    source: str  # path it was loaded from
