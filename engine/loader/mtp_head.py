"""MTP weights from outside the main checkpoint: a standalone head file (``--mtp-head``) and GGUF
``blk.{n}.nextn.*`` tensors, both mapped to the DeepSeek layout ``model.layers.{N+i}.*``.

A head directory holds ``mtp_head.json`` and ``mtp_head.safetensors``::

    {"format": "mtpserve-mtp-head", "num_nextn_predict_layers": 1, "base_num_hidden_layers": 30,
     "hidden_size": 576, "vocab_size": 49152, "feedback": "pre_norm"}

with tensors named like DeepSeek's MTP layers (``model.layers.30.enorm.weight``,
``...eh_proj.weight``, ``...shared_head.norm.weight``, the decoder block's own names), sharing the
base model's embedding and lm_head. A head with a reduced draft vocabulary also holds
``draft_token_ids`` (int64, the token ids it may draft, ``"draft_vocab_size"`` in the JSON).
"""

from __future__ import annotations

import json
import os

import torch

from mtpserve.engine.errors import ModelLoadError

HEAD_CONFIG = "mtp_head.json"
HEAD_WEIGHTS = "mtp_head.safetensors"
HEAD_FORMAT = "mtpserve-mtp-head"
DRAFT_VOCAB = "draft_token_ids"
_GGUF_NEXTN = {
    "eh_proj": "eh_proj",
    "enorm": "enorm",
    "hnorm": "hnorm",
    "shared_head_norm": "shared_head.norm",
    "shared_head_head": "shared_head.head",
    "embed_tokens": "embed_tokens",
}


def default_head_path() -> str:
    """The head trained for the default model (SmolLM2-135M-Instruct), shipped with the package."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(package_root, "heads", "smollm2-135m-instruct")


def load_mtp_head(path: str, config) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and head config of a head directory, checked against the base model's ``config``; the
    draft vocabulary, if any, is ``head["draft_token_ids"]``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, HEAD_CONFIG)
    w_path = os.path.join(path, HEAD_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise ModelLoadError(f"MTP head: missing {p}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            head = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"MTP head: cannot read {cfg_path}: {e}") from None
    if head.get("format") != HEAD_FORMAT:
        raise ModelLoadError(f"MTP head: {cfg_path} is not an mtpserve head config "
                             f"(format != {HEAD_FORMAT!r})")
    expected = {
        "base_num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }
    for key, want in expected.items():
        if head.get(key) != want:
            raise ModelLoadError(
                f"MTP head was trained for {key}={head.get(key)}, this model has {want}"
            )
    try:
        weights = load_file(w_path)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"MTP head: cannot read {w_path}: {e}") from None
    draft = weights.pop(DRAFT_VOCAB, None)
    if draft is not None:
        ids = draft.long()
        if not valid_draft_vocab(ids, config.vocab_size):
            raise ModelLoadError(f"MTP head: {DRAFT_VOCAB} must be distinct token ids "
                                 f"in [0, {config.vocab_size})")
        head[DRAFT_VOCAB] = ids
    return {k: v.float() for k, v in weights.items()}, head


def valid_draft_vocab(ids: torch.Tensor, vocab_size: int) -> bool:
    """Whether ``ids`` is a non-empty 1-D tensor of distinct token ids in [0, vocab_size)."""
    if ids.dim() != 1 or len(ids) == 0:
        return False
    if ids.min() < 0 or ids.max() >= vocab_size:
        return False
    return len(ids.unique()) == len(ids)


def save_mtp_head(
    path: str,
    weights: dict[str, torch.Tensor],
    head_config: dict,
    draft_vocab: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write a head directory; the config file goes last,
    so a directory with one holds a whole head."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in weights.items()}
    if draft_vocab is not None:
        tensors[DRAFT_VOCAB] = draft_vocab.long().contiguous()
        head_config = {**head_config, "draft_vocab_size": len(draft_vocab)}
    save_file(tensors, os.path.join(path, HEAD_WEIGHTS))
    with open(os.path.join(path, HEAD_CONFIG), "w", encoding="utf-8") as f:
        json.dump({"format": HEAD_FORMAT, **head_config}, f, indent=2)


def rename_gguf_nextn(weights: dict[str, torch.Tensor]) -> None:
    """``gguf.blk.{n}.nextn.{name}`` -> ``model.layers.{n}.{hf name}`` (in place)."""
    for key in [k for k in weights if k.startswith("gguf.blk.") and ".nextn." in k]:
        layer, rest = key[len("gguf.blk."):].split(".nextn.", 1)
        name, _, suffix = rest.partition(".")
        if name in _GGUF_NEXTN:
            weights[f"model.layers.{layer}.{_GGUF_NEXTN[name]}.{suffix}"] = weights.pop(key)
