"""Builders for MTP tests: a random DeepSeek-style head for a tiny dense checkpoint."""

from __future__ import annotations

from mtpserve.engine.train.head_init import init_head_weights, save_new_head


def random_head_weights(config, seed: int = 0, num_layers: int = 1, scale: float = 0.1):
    return init_head_weights(config, num_layers=num_layers, seed=seed, scale=scale)


def save_random_head(path, config, seed: int = 0, num_layers: int = 1, scale: float = 0.1) -> str:
    return save_new_head(str(path), config, num_layers=num_layers, seed=seed, scale=scale)
