"""The engine on quantized weights: the real SmolLM2 from its stored Q4_1 / Q8_0 codes against the
float32 path with dequantized weights (the exact reference), MTP lossless on quantized weights, and a
Hugging Face checkpoint quantized at load against its float logits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mtpserve.bench.quality import chunk_logits, compare_nll, held_out_chunks
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.loader.gguf import default_gguf_path, load_gguf
from mtpserve.engine.loader.mtp_head import default_head_path
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.kernels import cpu_blocks
from mtpserve.kernels.cpu_blocks import BlockLinear
from mtpserve.kernels.quant import Fp16Linear, Int4Linear, Int8Linear, quantize

# on the CPU block kernels (a C++ compiler and AVX2) int4 and int8 weights are blocks of 32
BLOCKS = cpu_blocks.available()

CHATS = [
    "Write a Python function that reverses a list.",
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for better sleep.",
]
SMALL_CACHE = 64 * 2**20


@pytest.fixture(scope="module")
def quantized_checkpoint():
    return load_gguf(default_gguf_path(), quantized=True)


@pytest.fixture(scope="module")
def quantized(quantized_checkpoint):
    config = EngineConfig(kv_cache_memory_bytes=SMALL_CACHE, quantization="int4", spec_draft_n_max=0)
    return LLMEngine(quantized_checkpoint, config)


@pytest.fixture(scope="module")
def reference(smollm2_checkpoint):
    config = EngineConfig(kv_cache_memory_bytes=SMALL_CACHE, spec_draft_n_max=0)
    return LLMEngine(smollm2_checkpoint, config)


def test_the_stored_codes_run_packed(quantized):
    layer = quantized.model.layers[0]
    if BLOCKS:  # Q4_1 and the tied Q8_0 embedding as stored; decode steps in one call
        assert layer.self_attn.qkv_weight.bits == 4 and layer.mlp.down_weight.bits == 4
        assert isinstance(quantized.model.lm_head, BlockLinear)
        assert quantized.model.lm_head.bits == 8
        assert quantized.model.fusable
    else:
        assert isinstance(layer.self_attn.qkv_weight, Int4Linear)  # Q4_1, as stored
        assert isinstance(layer.mlp.down_weight, Int4Linear)
        assert isinstance(quantized.model.lm_head, Int8Linear)  # the tied Q8_0 embedding
    assert "int4" in quantized.summary()


def test_quantized_nll_on_held_out_text_is_within_one_percent_of_float(quantized, reference):
    """Stated tolerance: mean NLL within 1% of the float32 dequantized path over 1,024 tokens, and
    the top-1 prediction the same at 90% of positions or more (bf16 rounding of scales and inputs
    flips some near-ties)."""
    chunks = held_out_chunks(quantized.tokenizer, 1024)
    result = compare_nll(quantized.model, reference.model, chunks)
    assert result["tokens"] >= 1000
    assert abs(result["nll_ratio"] - 1) < 0.01, result
    assert result["top1_agreement"] >= 0.9, result


def test_quantized_logits_are_close_to_float(quantized, reference):
    """Per position, the quantized logits stay within half the float ones' spread, and the
    distributions close in total variation. The block kernels round activations to 8 bits per
    block of 32 (as llama.cpp does), which errs more than PyTorch's kernels' bf16 inputs: measured
    on this text, total variation at most 0.22 and 0.05 on average (bf16 inputs: 0.14, 0.04)."""
    ids = quantized.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    ours = chunk_logits(quantized.model, ids)
    ref = chunk_logits(reference.model, ids)
    error = (ours - ref).abs().amax(-1)
    spread = ref.std(-1)
    assert (error < 0.5 * spread).all()
    variation = (ours.softmax(-1) - ref.softmax(-1)).abs().sum(-1)
    limit = 0.3 if BLOCKS else 0.2
    assert (variation < limit).all(), variation.max()
    assert variation.mean() < 0.08, variation.mean()


def chat_prompts(engine) -> list[list[int]]:
    tok = engine.tokenizer
    prompts = []
    for chat in CHATS:
        text = tok.apply_chat_template([{"role": "user", "content": chat}])
        prompts.append(tok.encode(text, add_special_tokens=False))
    return prompts


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


@pytest.mark.parametrize("quantization", ["int4", "fp16"])
def test_mtp_is_lossless_on_quantized_weights(quantized_checkpoint, quantization):
    """Greedy output with the shipped head drafting 3 tokens a step (its eh_proj and block packed
    like the model's, its draft head rows of the packed head) equals plain decoding on the same
    weights.

    On the CPU block kernels a row's result does not depend on the other rows of a step, so the
    outputs must be equal token for token. Near-tie rule elsewhere: PyTorch's int4 kernels and
    the int8 head round inputs and logits to bf16 (8 significant bits), so two candidates closer
    than one bf16 step are a tie that a 1-row and a 4-row step may break differently. Where the
    outputs part, the plain path's top two logits must be within one bf16 step of each other
    (2**-7 of their magnitude); before that, every token must be equal."""
    config = EngineConfig(kv_cache_memory_bytes=SMALL_CACHE, quantization=quantization,
                          mtp_head=default_head_path(), spec_draft_n_max=3, spec_adaptive=False)
    drafting = LLMEngine(quantized_checkpoint, config)
    exact = BLOCKS and quantization == "int4"
    kind = {"int4": BlockLinear if BLOCKS else Int4Linear, "fp16": Fp16Linear}[quantization]
    assert isinstance(drafting.mtp.layers[0].eh_proj, kind)
    quantized = LLMEngine(quantized_checkpoint, replace(config, spec_draft_n_max=0, mtp_head=None))
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = chat_prompts(quantized)
    plain = quantized.generate(prompts, params)
    drafted = drafting.generate(prompts, params)
    num_equal = 0
    for prompt, a, b in zip(prompts, plain, drafted):
        i = first_difference(a.output_token_ids, b.output_token_ids)
        if i is None:
            num_equal += 1
            continue
        assert not exact, (i, a.output_token_ids, b.output_token_ids)
        logits = chunk_logits(quantized.model, prompt + a.output_token_ids[:i])[-1]
        top = logits.topk(2).values
        assert top[0] - top[1] <= top[0].abs() * 2**-7, (i, top)
    assert num_equal >= 2
    assert drafting.spec_stats.num_accepted_tokens > 0


def round_like(engine: LLMEngine, quantization: str) -> None:
    """Give a float engine's projections the values the quantized engine's codes stand for (8-bit
    codes: one scale per row, per block of 32 on the block kernels)."""
    for module in engine.model.modules():
        for name in getattr(module, "LINEAR_WEIGHTS", ()):
            param = getattr(module, name)
            if quantization == "fp16":
                param.data = param.data.half().float()
            else:
                bits = 4 if quantization == "int4" else 8
                group = 32 if bits == 4 or BLOCKS else param.shape[0]
                param.data = quantize(param.data.t(), bits, group).dequantize().t().contiguous()
    head = engine.model.lm_head
    if quantization == "fp16":
        head.data = head.data.half().float()
    else:
        group = 32 if BLOCKS else head.shape[0]
        head.data = quantize(head.data.t(), 8, group).dequantize().t().contiguous()


@pytest.mark.parametrize("quantization, kind", [
    ("int4", BlockLinear if BLOCKS else Int4Linear), ("int8", BlockLinear if BLOCKS else Int8Linear),
    ("fp16", Fp16Linear)])
def test_a_float_checkpoint_is_quantized_at_load(tiny_llama_dir, quantization, kind):
    """The engine quantized at load against a float engine whose weights hold the same rounded
    values: what remains is the kernels' rounding of inputs (8-bit blocks; PyTorch's kernels:
    bf16 inputs and scales; fp16: float32 throughout)."""
    checkpoint = load_checkpoint(tiny_llama_dir)
    float_engine = LLMEngine(checkpoint, EngineConfig(num_blocks=32, spec_draft_n_max=0))
    round_like(float_engine, quantization)
    config = EngineConfig(num_blocks=32, spec_draft_n_max=0, quantization=quantization)
    engine = LLMEngine(checkpoint, config)
    assert isinstance(engine.model.layers[0].mlp.gate_up_weight, kind)
    ids = list(range(3, 40))
    ours = chunk_logits(engine.model, ids)
    ref = chunk_logits(float_engine.model, ids)
    assert (ours - ref).norm() < 0.02 * ref.norm()
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].output_token_ids) == 8


def test_unknown_quantization_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLMEngine(load_checkpoint(tiny_llama_dir), EngineConfig(quantization="int3", num_blocks=8))


def test_the_float_reference_path_dequantizes_stored_codes(quantized_checkpoint, reference):
    """quantization "none" on a checkpoint read as codes gives the float32 path's exact weights."""
    engine = LLMEngine(quantized_checkpoint, EngineConfig(num_blocks=8, spec_draft_n_max=0))
    ours = engine.model.layers[3].mlp.gate_up_weight
    theirs = reference.model.layers[3].mlp.gate_up_weight
    assert isinstance(ours, torch.nn.Parameter)
    assert torch.equal(ours, theirs)


def test_auto_weights_follow_the_device():
    from mtpserve.cli.engine_args import native_bf16, resolve_dtype, resolve_quantization

    on_cpu = resolve_quantization("default", "auto", "cpu")
    assert on_cpu == ("int4" if BLOCKS or native_bf16() else "fp16")
    assert resolve_quantization("model.GGUF", "auto", "cuda") == "none"
    assert resolve_quantization("some/hf-dir", "auto", "cpu") == "none"
    assert resolve_quantization("some/hf-dir", "int8", "cpu") == "int8"
    bf16 = native_bf16() and not BLOCKS
    assert resolve_dtype("auto", on_cpu, "cpu") == (torch.bfloat16 if bf16 else torch.float32)
    assert resolve_dtype("auto", "none", "cuda") == torch.bfloat16
    assert resolve_dtype("float64", "int4", "cpu") == torch.float64


def test_cuda_runs_a_float16_checkpoint_as_stored():
    from mtpserve.cli.engine_args import checkpoint_half_dtype

    assert checkpoint_half_dtype("safetensors float16") == torch.float16
    assert checkpoint_half_dtype("safetensors bfloat16") == torch.bfloat16
    assert checkpoint_half_dtype("safetensors float32") == torch.bfloat16
    assert checkpoint_half_dtype("GGUF Q4_1") == torch.bfloat16


def test_fp16_weights_are_refused_on_cuda(tiny_llama_dir):
    from mtpserve.engine.models.quantize import prepare_weights

    engine = LLMEngine(load_checkpoint(tiny_llama_dir), EngineConfig(num_blocks=8, spec_draft_n_max=0))
    with pytest.raises(ValueError, match="CPU library"):
        prepare_weights(engine.model, "fp16", 32, torch.device("cuda"))
