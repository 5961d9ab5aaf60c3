"""Checkpoint loaders: Hugging Face directories (safetensors) and GGUF files."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mtpserve.engine.errors import ModelLoadError

if TYPE_CHECKING:
    from mtpserve.engine.loader.checkpoint import Checkpoint


def load_checkpoint(model: str, quantized: bool = False) -> "Checkpoint":
    """Load ``model``: "default" (the bundled GGUF), a ``.gguf`` file, or a Hugging Face model
    directory. ``quantized``: a GGUF file's quantized matrices stay quantized."""
    if model == "default":
        from mtpserve.engine.loader.gguf import default_gguf_path, load_gguf

        return load_gguf(default_gguf_path(), quantized)
    path = os.path.expanduser(str(model))
    if not os.path.exists(path):
        raise ModelLoadError(f"model path not found: {model}")
    if os.path.isdir(path):
        from mtpserve.engine.loader.hf import load_hf_dir

        return load_hf_dir(path)
    if path.lower().endswith(".gguf"):
        from mtpserve.engine.loader.gguf import load_gguf

        return load_gguf(path, quantized)
    raise ModelLoadError(
        f"cannot load {model}: expected a .gguf file or a Hugging Face model directory"
    )
