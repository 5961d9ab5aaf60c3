"""A model of a given shape with random weights, built on the device without a checkpoint file.

Decode speed does not depend on the weight values, so an 8B-class model can be timed on a machine
that holds no 16 GB checkpoint; acceptance and quality do depend on them and need the real model.
Shapes come from ``configs/models/<name>.yaml`` (a transformers config.json written as YAML) or any
such YAML or JSON file.
"""

from __future__ import annotations

import json
import os

import torch
import yaml

from mtpserve.engine.config import EngineConfig, GenerationDefaults, ModelConfig
from mtpserve.engine.engine import LLMEngine, LoadedModels
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.loader.checkpoint import Checkpoint
from mtpserve.engine.loader.hf import parse_hf_config
from mtpserve.engine.models import model_class
from mtpserve.engine.spec.policy import StepCosts

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "models")
INIT_STD = 0.02  # the usual initializer range: activations stay finite in half precision


def preset_names() -> list[str]:
    names = []
    for file in sorted(os.listdir(PRESETS_DIR)):
        if file.endswith(".yaml"):
            names.append(file.removesuffix(".yaml"))
    return names


def model_config_of(shape: str) -> ModelConfig:
    """The ModelConfig of a preset name (``llama-8b``) or of a YAML / JSON config file."""
    path = os.path.expanduser(shape)
    if not os.path.isfile(path):
        path = os.path.join(PRESETS_DIR, f"{shape}.yaml")
    if not os.path.isfile(path):
        raise MtpserveError(f"--random-weights {shape}: not a config file nor one of the presets "
                            f"{', '.join(preset_names())}")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            raw = json.load(f)
        else:
            raw = yaml.safe_load(f)
    return parse_hf_config(raw)


@torch.inference_mode()
def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 max_positions: int, seed: int = 0):
    """The model of ``config`` with random weights in ``dtype``, allocated on ``device`` directly
    (parameter by parameter, so the float32 skeleton never needs host memory)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model = model_class(config.architecture)(config, max_positions)
    for name, param in model.named_parameters():
        if name.endswith("norm"):  # RMSNorm weights (input_norm, q_norm, norm, ...)
            param.data = torch.ones(param.shape, dtype=dtype, device=device)
            continue
        values = torch.empty(param.shape, dtype=dtype, device=device)
        param.data = values.normal_(0.0, INIT_STD, generator=gen)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the float32 skeleton's memory, for the KV cache
    return model.to_runtime(dtype, device).eval()


def random_engine(shape: str, config: EngineConfig, seed: int = 0) -> LLMEngine:
    """An engine (no MTP: a random head would accept nothing) on a random model of ``shape``."""
    if config.quantization != "none":
        raise MtpserveError("--random-weights runs float weights (--quantization none)")
    model_config = model_config_of(shape)
    config.spec_draft_n_max = 0
    config.mtp_head = None
    device = torch.device(config.device)
    longest = max(config.max_model_len or 0, model_config.max_position_embeddings)
    model = random_model(model_config, config.dtype, device, longest + 2, seed)
    checkpoint = Checkpoint(model_config, {}, None, GenerationDefaults(), f"random:{shape}",
                            f"random {str(config.dtype).removeprefix('torch.')}")
    models = LoadedModels(model, None, None, StepCosts())
    return LLMEngine(checkpoint, config, models)
