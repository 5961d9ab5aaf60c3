"""Builders for MTP tests: a random DeepSeek-style head for a tiny dense checkpoint, or one briefly distilled."""

from __future__ import annotations

from engine_helpers import greedy, make_engine

from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.loader.mtp_head import save_mtp_head
from mtpserve.engine.train.distill import distill
from mtpserve.engine.train.head_init import head_config, init_head_weights, save_new_head


def random_head_weights(config, seed: int = 0, num_layers: int = 1, scale: float = 0.1):
    return init_head_weights(config, num_layers=num_layers, seed=seed, scale=scale)


def save_random_head(path, config, seed: int = 0, num_layers: int = 1, scale: float = 0.1) -> str:
    return save_new_head(str(path), config, num_layers=num_layers, seed=seed, scale=scale)


def save_distilled_head(path, model_dir: str, prompts: list[list[int]], steps: int,
                        max_tokens: int = 40) -> tuple[str, list[float]]:
    """A one-layer head distilled on the model's own greedy continuations of ``prompts``, so drafts are often
    right (on those prompts) and both the accept and the reject paths run; returns its path and the losses."""
    config = load_checkpoint(model_dir).config
    path = save_random_head(path, config, scale=0.05)
    engine = make_engine(model_dir, mtp_head=path, spec_draft_n_max=1, spec_adaptive=False)
    sequences = [p + out for p, out in zip(prompts, greedy(engine, prompts, max_tokens))]
    losses = distill(engine.mtp, engine.model, sequences, steps=steps, lr=3e-3, depth=2)
    layer = engine.mtp.layers[0]
    save_mtp_head(path, layer.export(f"model.layers.{config.num_hidden_layers}."), head_config(config, 1))
    return path, losses
