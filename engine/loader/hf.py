"""Load a Hugging Face model directory: config.json,
safetensors weights, tokenizer, generation_config.json."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch

from mtpserve.engine.config import SUPPORTED_ARCHITECTURES, GenerationDefaults, ModelConfig
from mtpserve.engine.errors import ModelLoadError
from mtpserve.engine.loader.hybrid_config import (
    HYBRID_ARCHITECTURES,
    hybrid_fields,
    qwen_mtp_layers,
    text_config_of,
    text_weights,
)

if TYPE_CHECKING:
    from mtpserve.engine.loader.checkpoint import Checkpoint

ARCHITECTURE_CLASSES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Glm4MoeForCausalLM": "glm4_moe",
    "MiMoForCausalLM": "mimo",
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5ForCausalLM": "qwen3_5_text",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text",
}
# transformers' defaults for keys a config.json may leave out
DEFAULT_MAX_POSITIONS = {
    "llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768, "glm4_moe": 131072,
    "qwen3_next": 32768, "qwen3_5_text": 32768, "qwen3_5_moe_text": 32768,
}
GLM4_MOE_DEFAULTS = {
    "n_routed_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1408,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
    "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
}
# the last one: Qwen3.5
MTP_COUNT_KEYS = ("num_nextn_predict_layers", "num_mtp_layers", "mtp_num_hidden_layers")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate"),
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def architecture_of(cfg: dict) -> str:
    model_type = cfg.get("model_type")
    if model_type is None:
        names = cfg.get("architectures") or []
        known = [ARCHITECTURE_CLASSES[n] for n in names if n in ARCHITECTURE_CLASSES]
        model_type = "unknown"
        if known:
            model_type = known[0]
        elif names:
            model_type = names[0]
    if model_type not in SUPPORTED_ARCHITECTURES + ("mimo",):
        raise ModelLoadError(
            f"unsupported architecture '{model_type}' "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return model_type


def token_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def parse_rope(
    cfg: dict, max_positions: int, default_partial: float = 1.0
) -> tuple[float, float, dict | None]:
    """Return (rope_theta, partial_rotary_factor, rope_scaling) from either config form.

    transformers 5 writes ``rope_parameters`` (theta, type and scaling keys in one dict); older
    configs write ``rope_theta`` / ``partial_rotary_factor`` at the top level and scaling in
    ``rope_scaling``.
    """
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError("per-layer-type rope_parameters are not supported")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_partial))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope type '{rope_type}' (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    scaling = None
    if rope_type != "default":
        scaling = {"rope_type": rope_type}
        for key in ROPE_KEYS[rope_type]:
            if params.get(key) is not None:
                scaling[key] = params[key]
        if rope_type in ("llama3", "yarn"):
            # as transformers: the pretraining length defaults to the config's
            original = cfg.get("original_max_position_embeddings", max_positions)
            scaling.setdefault("original_max_position_embeddings", original)
        if rope_type == "yarn" and "factor" not in scaling:
            # as transformers (DeepSeek-V3 style configs)
            scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
        if "factor" not in scaling:
            raise ModelLoadError(f"rope type '{rope_type}' needs a 'factor'")
    return float(theta), float(partial or 1.0), scaling


def moe_fields(cfg: dict, arch: str) -> dict:
    """Mixture-of-experts keys of a glm4_moe config.json
    (transformers' defaults for absent keys); {} otherwise."""
    if arch != "glm4_moe":
        return {}

    def get(key):
        if cfg.get(key) is not None:
            return cfg[key]
        return GLM4_MOE_DEFAULTS[key]

    ints = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
            "n_group", "topk_group", "first_k_dense_replace")
    fields = {k: int(get(k)) for k in ints}
    fields["norm_topk_prob"] = bool(get("norm_topk_prob"))
    fields["routed_scaling_factor"] = float(get("routed_scaling_factor"))
    experts, groups = fields["n_routed_experts"], fields["n_group"]
    if groups < 1 or experts % groups or not 1 <= fields["topk_group"] <= groups:
        raise ModelLoadError(f"invalid expert groups: {experts} experts, n_group {groups}, "
                             f"topk_group {fields['topk_group']}")
    return fields


def default_partial_rotary(arch: str) -> float:
    """transformers' partial_rotary_factor when a config leaves it out:
    0.5 for glm4_moe, 0.25 for the hybrids."""
    if arch == "glm4_moe":
        return 0.5
    if arch in HYBRID_ARCHITECTURES:
        return 0.25
    return 1.0


def has_attention_bias(cfg: dict, arch: str) -> bool:
    """qwen2 always has q/k/v bias (never on o_proj); mistral never; llama/qwen3 follow the key
    (and then o_proj has a bias too: see the weights)."""
    if arch == "qwen2":
        return True
    return arch != "mistral" and bool(cfg.get("attention_bias"))


def mtp_layer_count(cfg: dict) -> int:
    """The first non-zero MTP layer count among MTP_COUNT_KEYS, else 0 (transformers 5 reads
    num_mtp_layers as an alias and writes num_nextn_predict_layers)."""
    for key in MTP_COUNT_KEYS:
        if cfg.get(key):
            return int(cfg[key])
    return 0


def check_supported(cfg: dict) -> None:
    """ModelLoadError for quantized weights, an activation other than SiLU, MLP biases."""
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "unknown")
        raise ModelLoadError(f"quantized checkpoints are not supported (quant_method '{method}')")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"unsupported hidden_act '{act}' (only silu)")
    if cfg.get("mlp_bias"):
        raise ModelLoadError("mlp_bias=true is not supported")


def parse_hf_config(cfg: dict) -> ModelConfig:
    """Map a transformers config.json (llama, mistral, qwen2, qwen3, glm4_moe, mimo, qwen3_next,
    qwen3_5 and qwen3_5_moe, dense text or image-text) to a ModelConfig.

    Sliding-window attention is not implemented: when a config enables a window shorter than the
    context, max_position_embeddings is capped to the window, where full attention gives the same
    result.
    """
    cfg = text_config_of(cfg)
    arch = architecture_of(cfg)
    mtp_layout = "deepseek"
    if arch == "mimo":  # Qwen2 with MTP layers under model.mtp_layers.{i}
        arch = "qwen2"
        mtp_layout = "mimo"
    # Qwen3-Next / 3.5: MTP layers under mtp.*, partial rotary 0.25, q/k norm
    hybrid = arch in HYBRID_ARCHITECTURES
    if hybrid:
        mtp_layout = "qwen"
    check_supported(cfg)
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        max_positions = int(cfg.get("max_position_embeddings") or DEFAULT_MAX_POSITIONS[arch])
        window = cfg.get("sliding_window")
        window_on = arch == "mistral" or cfg.get("use_sliding_window", False)
        if window and window_on and window < max_positions:
            max_positions = int(window)
        glm = arch == "glm4_moe"  # transformers' glm4_moe defaults: partial rotary 0.5, eps 1e-5
        theta, partial, scaling = parse_rope(cfg, max_positions, default_partial_rotary(arch))
        if hybrid:
            intermediate = int(cfg.get("intermediate_size") or 0)
        else:
            intermediate = int(cfg["intermediate_size"])
        default_kv_heads = 8 if glm else heads
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or default_kv_heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5 if glm else 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=has_attention_bias(cfg, arch),
            qk_norm=arch == "qwen3" or hybrid or glm and bool(cfg.get("use_qk_norm")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=token_ids(cfg.get("eos_token_id")),
            num_nextn_predict_layers=mtp_layer_count(cfg),
            mtp_layout=mtp_layout,
            **moe_fields(cfg, arch),
            **hybrid_fields(cfg, arch, int(cfg["num_hidden_layers"])),
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json is missing {e.args[0]!r}") from e


def load_generation_defaults(path: str) -> GenerationDefaults:
    """Read generation_config.json if present (all None when absent).

    HF semantics for do_sample: when it is explicitly false the model's default decoding is greedy,
    recorded as temperature=0.0 (the other sampling values are then irrelevant and left None). When
    do_sample is true or absent, the sampling values are taken as given (as vLLM does).
    """
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return GenerationDefaults()
    gen = read_json(file)
    eos = token_ids(gen.get("eos_token_id"))
    if gen.get("do_sample") is False:
        return GenerationDefaults(temperature=0.0, eos_token_ids=eos)

    def num(key, kind):
        if gen.get(key) is None:
            return None
        return kind(gen[key])

    return GenerationDefaults(
        temperature=num("temperature", float),
        top_p=num("top_p", float),
        top_k=num("top_k", int),
        min_p=num("min_p", float),
        repetition_penalty=num("repetition_penalty", float),
        eos_token_ids=eos,
    )


def weight_files(path: str) -> dict[str, list[str] | None]:
    """{file: names expected in it (None: all)} for model.safetensors or a sharded index."""
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return {SINGLE_FILE: None}
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
        weight_map = read_json(os.path.join(path, INDEX_FILE)).get("weight_map") or {}
        files: dict[str, list[str] | None] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        if not files:
            raise ModelLoadError(f"{INDEX_FILE} in {path} has an empty weight_map")
        return files
    pickled = ("pytorch_model.bin", "pytorch_model.bin.index.json")
    if any(os.path.isfile(os.path.join(path, f)) for f in pickled):
        raise ModelLoadError(
            f"{path} has only pytorch_model.bin weights; only safetensors is supported "
            "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise ModelLoadError(f"no weights in {path}: looked for {SINGLE_FILE} and {INDEX_FILE}")


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """All tensors under their HF names; floating point ones as float32."""
    from safetensors import safe_open

    weights: dict[str, torch.Tensor] = {}
    for file, expected in weight_files(path).items():
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            raise ModelLoadError(
                f"weights file {file} listed in {INDEX_FILE} is missing from {path}"
            )
        try:
            with safe_open(full, framework="pt") as f:
                read_safetensors(f, file, expected, weights)
        except ModelLoadError:
            raise
        except Exception as e:  # SafetensorError, OSError, ... on truncated or corrupt files
            raise ModelLoadError(
                f"cannot read weights file {full} (corrupt or truncated?): {e}"
            ) from e
    return weights


def read_safetensors(f, file: str, expected: list[str] | None, weights: dict) -> None:
    """Add every tensor of the open safetensors file ``f`` to ``weights`` (floats as float32)."""
    names = list(f.keys())
    missing = set(expected or ()) - set(names)
    if missing:
        raise ModelLoadError(f"{file} lacks {len(missing)} tensors listed in {INDEX_FILE}, "
                             f"e.g. {sorted(missing)[0]}")
    for name in names:
        t = f.get_tensor(name)
        if t.is_floating_point():
            t = t.float()
        weights[name] = t


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], path: str) -> None:
    mixer = "self_attn.q_proj" if config.has_kv(0) else "linear_attn.out_proj"
    needed = ["model.embed_tokens.weight", "model.norm.weight", f"model.layers.0.{mixer}.weight"]
    if not config.tie_word_embeddings:
        needed.append("lm_head.weight")
    missing = [n for n in needed if n not in weights]
    if missing:
        raise ModelLoadError(f"weights in {path} lack {', '.join(missing)}")


def load_hf_dir(path: str) -> "Checkpoint":
    """Load a Hugging Face model directory;
    config and weight errors are reported before the tokenizer loads."""
    path = str(path)
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path not found: {path}")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelLoadError(f"{path} has no config.json (not a Hugging Face model directory?)")
    raw = text_config_of(read_json(config_file))
    config = parse_hf_config(raw)
    weights = load_weights(path)
    if config.architecture in HYBRID_ARCHITECTURES:
        weights = text_weights(weights)  # Qwen3.5 image-text releases: the language model's weights
    check_weights(config, weights, path)
    count_given = any(raw.get(k) is not None for k in MTP_COUNT_KEYS)
    if config.mtp_layout == "qwen" and not count_given:
        # Qwen3-Next's config does not say
        config.num_nextn_predict_layers = qwen_mtp_layers(weights)
    generation = load_generation_defaults(path)
    if not generation.eos_token_ids:
        generation.eos_token_ids = list(config.eos_token_ids)
    from mtpserve.engine.loader.checkpoint import Checkpoint, most_common
    from mtpserve.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(path)
    dtypes = [str(w.dtype).removeprefix("torch.") for w in weights.values()]
    weight_format = "safetensors " + most_common(dtypes)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, generation=generation,
                      source=path, weight_format=weight_format)
