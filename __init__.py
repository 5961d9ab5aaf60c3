"""mtpserve: an OpenAI-compatible inference server built around Multi-Token Prediction."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["LLMEngine", "EngineConfig", "SamplingParams", "load_checkpoint"]

# The public API is imported on first use, so `import mtpserve` (and every subpackage, which
# imports this one first) does not load torch and the engine.
_EXPORTS = {
    "LLMEngine": "mtpserve.engine.engine",
    "EngineConfig": "mtpserve.engine.config",
    "SamplingParams": "mtpserve.engine.sampling_params",
    "load_checkpoint": "mtpserve.engine.loader",
}

if TYPE_CHECKING:
    from mtpserve.engine.config import EngineConfig
    from mtpserve.engine.engine import LLMEngine
    from mtpserve.engine.loader import load_checkpoint
    from mtpserve.engine.sampling_params import SamplingParams


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mtpserve' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
