"""Model, generation and engine configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUPPORTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "glm4_moe", "qwen3_next",
    "qwen3_5_text", "qwen3_5_moe_text",
)


@dataclass
class ModelConfig:
    """Architecture of a decoder (dense or MoE).
    Weight names follow the HF layout (``model.layers.{i}...``)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Normalized: None or a dict with "rope_type" in {"linear", "llama3", "yarn"} and its keys.
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    num_nextn_predict_layers: int = 0
    # where the MTP weights live: "deepseek" (model.layers.{N+i}.*), "mimo" (model.mtp_layers.{i}.*)
    # or "qwen" (mtp.*)
    mtp_layout: str = "deepseek"
    # mixture of experts (GLM-4.5 / DeepSeek-V3 style); n_routed_experts == 0: dense MLPs only
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    # group-limited routing: experts in n_group groups, tokens pick from topk_group of them
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0  # layers below this index keep a dense MLP
    # hybrid models (Qwen3-Next, Qwen3.5): Gated DeltaNet layers between full-attention ones,
    # Qwen-style MoE. layer_types: per layer "full_attention" or "linear_attention"; () = all full
    # attention
    layer_types: tuple[str, ...] = ()
    linear_conv_kernel_dim: int = 4
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    shared_expert_intermediate_size: int = 0  # one shared expert behind a sigmoid gate (0: none)
    decoder_sparse_step: int = 1  # experts in every decoder_sparse_step-th layer ...
    mlp_only_layers: tuple[int, ...] = ()  # ... except these

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def has_kv(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` (MTP layers after the main ones included)
        attends over a paged KV cache."""
        if layer_idx >= len(self.layer_types):
            return True
        return self.layer_types[layer_idx] == "full_attention"


@dataclass
class GenerationDefaults:
    """Default sampling settings from ``generation_config.json`` (None = not given)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill)
    # reuse the KV blocks of earlier requests' shared prefixes (kv_cache.py); off for hybrid models
    enable_prefix_caching: bool = True
    # None: the model's max_position_embeddings, capped by the cache
    max_model_len: int | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    # weight-only quantization of the projections: "none" (float; the exact reference path),
    # "int4" (groups of quantization_group_size inputs; a GGUF file's 4-bit codes as stored),
    # "int8" (per output row, or blocks of 32 on the CPU block kernels) or "fp16" (float16 for
    # FBGEMM, CPU); see models/quantize.py
    quantization: str = "none"
    quantization_group_size: int = 32
    # CPU: int4/int8 weights on the block kernels built at first start (kernels/cpu/blocks.cpp)
    # where they build; False: PyTorch's kernels
    cpu_kernels: bool = True
    # speculative decoding with the model's MTP layers
    spec_draft_n_max: int = 3  # 0 disables
    spec_adaptive: bool = True  # False: always draft spec_draft_n_max tokens
    # a request's drafts stop where the head's confidence in them all (the product of each draft's
    # largest probability) falls below this; None: spec/policy.py's DRAFT_P_MIN when adaptive, 0
    # (off) with a fixed draft length
    spec_draft_p_min: float | None = None
    mtp_head: str | None = None  # standalone head directory for a model without MTP layers
    # hidden fed back between draft steps: the block output ("pre_norm") or after the shared norm
    mtp_feedback: str = "pre_norm"
    # paged attention: "auto" (Triton kernels on CUDA, the torch reference on CPU), "torch" or
    # "triton" (engine/attention_backend.py)
    attention_backend: str = "auto"
    # True: no CUDA graphs (every step runs eagerly); on CPU there are none anyway
    enforce_eager: bool = False
