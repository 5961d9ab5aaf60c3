"""The model and engine options shared by the commands
that run an engine, and the engine they describe."""

from __future__ import annotations

import argparse

import torch

from mtpserve.engine.attention_backend import ATTENTION_BACKENDS
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.loader.mtp_head import default_head_path
from mtpserve.engine.models.quantize import QUANTIZATIONS
from mtpserve.kernels import cpu_blocks
from mtpserve.kernels.cpu_build import ISA_CHOICES, choose_isa


def add_engine_args(p: argparse.ArgumentParser, speculation: bool = True) -> None:
    """The model and engine options; ``speculation=False`` leaves out the draft-length switches (for
    commands that set them themselves)."""
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default="default",
                   help="GGUF file, HF model directory, or 'default' (SmolLM2-135M-Instruct GGUF)")
    g.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16", "float64"],
                   help="activation dtype; auto: on CUDA the checkpoint's float16, else "
                        "bfloat16; bfloat16 with quantized weights on CPUs with native bf16; "
                        "else float32")
    g.add_argument("--quantization", default="auto", choices=["auto", *QUANTIZATIONS],
                   help="weight-only quantization of the projections; none: float weights, "
                        "the exact reference path; int4 (a GGUF file's 4-bit codes as stored), "
                        "int8, fp16 (FBGEMM, CPU); auto: for a GGUF file on CPU, int4 on the CPU "
                        "block kernels (or on PyTorch's with native bf16), else fp16; none "
                        "otherwise")
    g.add_argument("--quantization-group-size", type=int, default=32, choices=[32, 64, 128, 256],
                   help="inputs per int4 scale when rounding float weights")
    g.add_argument("--no-cpu-kernels", action="store_true",
                   help="CPU: run int4/int8 weights on PyTorch's kernels instead of the block "
                        "kernels compiled (once, cached) at the first start")
    g.add_argument("--cpu-isa", default="auto", choices=ISA_CHOICES,
                   help="instruction sets of the CPU block kernels; auto: AVX-512 VNNI or "
                        "AVX-VNNI where the CPU has them, else AVX2; avx2: AVX2 only (to compare)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-blocks", "--kv-cache-blocks", dest="num_blocks", type=int, default=None,
                   help="KV cache blocks (overrides --kv-cache-memory)")
    g.add_argument("--kv-cache-memory", type=float, default=0.5, help="KV cache budget in GiB")
    g.add_argument("--max-num-seqs", type=int, default=32)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="paged attention kernels; auto: triton on CUDA, the torch reference "
                        "(gather + SDPA) on CPU")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step eagerly instead of replaying CUDA graphs "
                        "captured at start-up for decode and verify steps")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="every request computes its whole prompt (default: reuse the KV blocks "
                        "of earlier requests' shared prefixes)")
    s = p.add_argument_group("speculative decoding (MTP)")
    s.add_argument("--mtp-head", default=None,
                   help="MTP head directory for a model without MTP "
                        "layers (the default model uses its shipped head)")
    if speculation:
        s.add_argument("--spec-draft-n-max", type=int, default=3,
                       help="most draft tokens per step (0 disables)")
        s.add_argument("--no-spec", action="store_true",
                       help="plain decoding even when the model has MTP layers")
        s.add_argument("--spec-adaptive", default="on", choices=["on", "off"],
                       help="on: draft length follows acceptance and "
                            "batch size; off: always --spec-draft-n-max")
        s.add_argument("--spec-draft-p-min", type=float, default=None,
                       help="stop a request's drafts where the MTP head's confidence in them all "
                            "(the product of each draft's top probability) falls below this "
                            "(default: 0.25 with --spec-adaptive on, 0 = off with it off)")
    s.add_argument("--mtp-feedback", default="pre_norm", choices=["pre_norm", "post_norm"],
                   help="hidden state fed back between draft steps "
                        "(MTP block output, or after its shared norm)")


def resolve_device(device: str | None) -> str:
    """``--device``: cuda when available unless given; a cuda request without CUDA is an error."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MtpserveError("--device cuda requested but CUDA is not available")
    return device


def engine_config_from_args(args) -> EngineConfig:
    """The EngineConfig of the engine options (validated).
    The default model gets its shipped MTP head."""
    if args.model == "default" and args.mtp_head is None:
        args.mtp_head = default_head_path()
    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            raise MtpserveError(f"--{name.replace('_', '-')} must be at least 1")
    if args.spec_draft_n_max < 0:
        raise MtpserveError("--spec-draft-n-max must be >= 0")
    if args.spec_draft_p_min is not None and not 0 <= args.spec_draft_p_min < 1:
        raise MtpserveError("--spec-draft-p-min must be in [0, 1)")
    if args.kv_cache_memory <= 0:
        raise MtpserveError("--kv-cache-memory must be positive")
    device = resolve_device(args.device)
    choose_isa(args.cpu_isa)  # before anything loads the kernels
    cpu_kernels = not args.no_cpu_kernels
    quantization = resolve_quantization(args.model, args.quantization, device, cpu_kernels)
    if quantization == "fp16" and device.startswith("cuda"):
        raise MtpserveError("--quantization fp16 runs on FBGEMM, a CPU library; on CUDA use "
                            "--dtype float16")
    dtype = resolve_dtype(args.dtype, quantization, device, cpu_kernels)
    draft_n_max = 0 if args.no_spec else args.spec_draft_n_max
    return EngineConfig(
        block_size=args.block_size, num_blocks=args.num_blocks,
        kv_cache_memory_bytes=int(args.kv_cache_memory * 2**30), max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        dtype=dtype, device=device, quantization=quantization,
        quantization_group_size=args.quantization_group_size, cpu_kernels=cpu_kernels,
        spec_draft_n_max=draft_n_max, spec_adaptive=args.spec_adaptive == "on",
        spec_draft_p_min=args.spec_draft_p_min,
        mtp_head=args.mtp_head, mtp_feedback=args.mtp_feedback,
        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager)


def resolve_quantization(model: str, quantization: str, device: str,
                         cpu_kernels: bool = True) -> str:
    """``--quantization auto``, the fastest weights measured that keep quality (docs/BENCHMARKS.md):
    a GGUF file runs from its stored codes (int4) on the CPU block kernels, or, where they do not
    build, on PyTorch's int4 kernel on CPUs with native bf16 and from float16 weights (FBGEMM) on
    CPUs without. CUDA and other checkpoints keep float weights."""
    if quantization != "auto":
        return quantization
    is_gguf = model == "default" or str(model).lower().endswith(".gguf")
    if not is_gguf or device.startswith("cuda"):
        return "none"
    if (cpu_kernels and cpu_blocks.available()) or native_bf16():
        return "int4"
    return "fp16"


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16, AMX): oneDNN's own check."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_dtype(dtype: str, quantization: str, device: str,
                  cpu_kernels: bool = True) -> torch.dtype:
    """``--dtype auto``: bfloat16 on CUDA (float16 for a float16 checkpoint: engine_from_args),
    and on CPUs with native bf16 when the weights are quantized on PyTorch's kernels (they read
    bf16; the block kernels read float32); float32
    elsewhere. On a CPU without bf16 instructions (AVX2 only) every bfloat16 op is emulated:
    float32 activations are faster there, the quantized kernels casting their inputs
    (docs/BENCHMARKS.md)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16
    on_blocks = cpu_kernels and cpu_blocks.available()
    if quantization in ("int4", "int8") and native_bf16() and not on_blocks:
        return torch.bfloat16
    return torch.float32


def engine_from_args(args) -> LLMEngine:
    config = engine_config_from_args(args)
    checkpoint = load_checkpoint(args.model, quantized=config.quantization != "none")
    if args.dtype == "auto" and config.device.startswith("cuda"):
        config.dtype = checkpoint_half_dtype(checkpoint.weight_format)
    return LLMEngine(checkpoint, config)


def checkpoint_half_dtype(weight_format: str) -> torch.dtype:
    """The 16-bit dtype a checkpoint was stored in (``weight_format`` "safetensors float16"):
    float16 runs as stored; bfloat16 for everything else (bf16, float32, GGUF)."""
    if weight_format.endswith(" float16"):
        return torch.float16
    return torch.bfloat16
