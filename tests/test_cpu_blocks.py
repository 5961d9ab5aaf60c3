"""The CPU block kernels (kernels/cpu/blocks.cpp): GGUF blocks times activations rounded to 8-bit
blocks, against the gguf package's own quantizer and dequantizer in float64; rows independent of
each other bit for bit; and the one-call decode step against the per-op path on the same weights."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny_checkpoint
from gguf import GGMLQuantizationType as T
from mtp_helpers import save_random_head
from test_quant import gguf_tensor, reference_dequantize

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.loader.gguf_quant import read_quantized
from mtpserve.kernels import cpu_blocks, cpu_build
from mtpserve.kernels.attention import TorchPagedAttention, build_metadata
from mtpserve.kernels.cpu_blocks import BlockLinear, round_rows
from mtpserve.kernels.quant import quantize

pytestmark = pytest.mark.skipif(not cpu_blocks.available(), reason="no C++ compiler or no AVX2")

OUT, IN = 96, 256


def gguf_weight(qtype):
    if qtype == T.Q4_K:  # gguf has no Q4_K quantizer: random bytes, finite fp16 d and dmin
        rng = np.random.default_rng(1)
        blocks = rng.integers(0, 256, size=(OUT, IN // 256, 144), dtype=np.uint8)
        halves = rng.uniform(0.001, 0.1, size=(OUT, IN // 256, 2)).astype(np.float16)
        blocks[..., 0:4] = halves.view(np.uint8).reshape(OUT, IN // 256, 4)
        return gguf_tensor(T.Q4_K, blocks.reshape(OUT, -1), OUT, IN)
    weights = np.random.default_rng(2).standard_normal((OUT, IN)).astype(np.float32)
    return gguf_tensor(qtype, gguf.quants.quantize(weights, qtype), OUT, IN)


def gguf_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded to Q8_0 blocks and back by the gguf package (llama.cpp's activation rounding)."""
    raw = gguf.quants.quantize(x.numpy(), T.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(raw, T.Q8_0).astype(np.float64))


def expected_tile(tiled: bool) -> int:
    """The tile of a weight of OUT outputs: asked for, and a build with the tiled kernel."""
    if tiled:
        return cpu_blocks.tile_width()
    return 0


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("rows", [1, 4, 7, 70])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K])
def test_block_linear_matches_gguf(qtype, rows, tiled):
    tensor = gguf_weight(qtype)
    layer = BlockLinear.of(read_quantized(tensor), tiled)
    assert layer.tile == expected_tile(tiled)
    x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(rows))
    out = layer(x).double()
    weight = reference_dequantize(tensor).double()
    # llama.cpp's rounding of the activations (fp16 block scales; ours are float32)
    want = gguf_rounded(x) @ weight.t()
    assert (out - want).abs().max() < 2e-3 * want.abs().max()
    # our own rounding, exactly what the kernel multiplies: float32 sums only
    exact = round_rows(x).double() @ weight.t()
    assert (out - exact).abs().max() < 1e-5 * exact.abs().max()
    # and against the unrounded input: the 8-bit activation blocks cost about 1% of the output's
    # norm on random data (at most 1.6% over 200 single rows of the random Q4_K weight)
    unrounded = x.double() @ weight.t()
    assert (out - unrounded).norm() < 0.025 * unrounded.norm()


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_does_not_depend_on_the_other_rows(bits, tiled):
    layer = BlockLinear.of(quantize(torch.randn(OUT, IN), bits, 32), tiled)
    assert layer.tile == expected_tile(tiled)
    x = torch.randn(70, IN)
    together = layer(x)
    for rows in (1, 3, 4, 5, 8, 9, 13):
        apart = torch.cat([layer(x[i:i + rows]) for i in range(0, 70, rows)])
        assert torch.equal(together, apart)


def builds_this_cpu_runs() -> dict[str, list[str]]:
    """The instruction-set flags of each build of the kernels this CPU can run."""
    cpu = cpu_build.cpu_flags()
    builds = {"avx2": []}
    if "avx_vnni" in cpu:
        builds["avx-vnni"] = cpu_build.AVX_VNNI_FLAGS
    if all(flag in cpu for flag in cpu_build.AVX512_VNNI):
        builds["avx512-vnni"] = cpu_build.AVX512_VNNI_FLAGS
    return builds


def linear_with(library, layer: BlockLinear, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], layer.out_features)
    library.mtp_linear(ctypes.c_void_p(x.data_ptr()), x.shape[0], ctypes.byref(layer.struct()),
                       ctypes.c_void_p(out.data_ptr()))
    return out


@pytest.mark.parametrize("in_features", [224, 256])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_build_this_cpu_runs_multiplies_alike(bits, in_features):
    """Each build (AVX2; AVX-VNNI; AVX-512 VNNI, two blocks per instruction and a last block on
    its own when their number is odd) against the float64 product of what the kernel multiplies,
    with rows independent of each other; AVX-VNNI's integer sums are AVX2's, so its outputs are
    the same bit for bit."""
    layer = BlockLinear.of(quantize(torch.randn(OUT, in_features), bits, 32))
    x = torch.randn(9, in_features)
    exact = round_rows(x).double() @ layer.dequantize().double().t()
    outs = {}
    for name, isa in builds_this_cpu_runs().items():
        library = ctypes.CDLL(str(cpu_build.build(isa)))
        out = linear_with(library, layer, x)
        assert (out.double() - exact).abs().max() < 1e-5 * exact.abs().max(), name
        apart = torch.cat([linear_with(library, layer, x[i:i + 1].contiguous()) for i in range(9)])
        assert torch.equal(out, apart), name
        outs[name] = out
    if "avx-vnni" in outs:
        assert torch.equal(outs["avx-vnni"], outs["avx2"])


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_every_build_reads_float16_scales_of_tiles_as_stored(qtype, monkeypatch):
    """GGUF's block scales (and 4-bit minimums) are float16: tiled, each build reads them from one
    16-bit pair per block (16 columns a tile with AVX-512 VNNI, else 8; 8 bits: the scale and the
    code sum, with AVX-512 VNNI only) and multiplies exactly as from the float32 copies."""
    tensor = gguf_weight(qtype)
    x = torch.randn(5, IN)
    exact = round_rows(x).double() @ reference_dequantize(tensor).double().t()
    for name, isa in builds_this_cpu_runs().items():
        library = ctypes.CDLL(str(cpu_build.build(isa)))
        monkeypatch.setattr(cpu_blocks, "tile_width", lambda: int(library.mtp_tile_width()))
        monkeypatch.setattr(cpu_blocks, "tile_starts", lambda: bool(library.mtp_tile_starts()))
        layer = BlockLinear.of(read_quantized(tensor), tiled=True)
        if qtype == T.Q8_0 and not library.mtp_tile_starts():
            assert layer.half_scales is None, name
            continue
        assert layer.half_scales is not None, name
        out = linear_with(library, layer, x)
        assert (out.double() - exact).abs().max() < 1e-5 * exact.abs().max(), name
        with monkeypatch.context() as m:  # the same weight without pairs: float32 scales (and start sums)
            m.setattr(cpu_blocks, "half_pairs", lambda *args: None)
            apart = BlockLinear.of(read_quantized(tensor), tiled=True)
        assert apart.half_scales is None, name
        assert torch.equal(linear_with(library, apart, x), out), name


def test_scales_float16_cannot_hold_stay_float32():
    """Scales of our own rounding (float32) have no float16 copy: the kernels read them as made."""
    layer = BlockLinear.of(quantize(torch.randn(OUT, IN), 4, 32), tiled=True)
    assert layer.tile > 0 and layer.half_scales is None


def test_the_build_follows_the_cpu_unless_told_avx2():
    zen4 = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni"}
    assert cpu_build.isa_flags(zen4) == cpu_build.AVX512_VNNI_FLAGS
    assert cpu_build.isa_flags({"avx2", "avx_vnni"}) == cpu_build.AVX_VNNI_FLAGS
    assert cpu_build.isa_flags({"avx2", "avx512f"}) == []
    assert cpu_build.isa_flags(zen4, "avx2") == []
    with pytest.raises(ValueError, match="auto"):
        cpu_build.choose_isa("avx512")


def test_a_failed_build_for_the_cpu_falls_back_to_avx2(monkeypatch):
    """A compiler without the CPU's extensions still gives the kernels, built for AVX2."""
    built = []
    real = cpu_build.build

    def build(isa):
        built.append(isa)
        if isa:
            raise RuntimeError("g++: unrecognized option")
        return real(isa)

    monkeypatch.setattr(cpu_build, "build", build)
    monkeypatch.setattr(cpu_build, "isa_flags", lambda cpu, choice: cpu_build.AVX_VNNI_FLAGS)
    monkeypatch.setattr(cpu_build, "_library", None)
    monkeypatch.setattr(cpu_build, "_reason", None)
    assert cpu_build.library() is not None
    assert built == [cpu_build.AVX_VNNI_FLAGS, []]


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_groups_wider_than_a_block_are_repeated_per_block(bits, tiled):
    """Also the rows of a tiled weight: read back from its tiles, they give back the weight; a
    projection onto 16 of its outputs is tiled too, and multiplies as the whole one does."""
    weight = quantize(torch.randn(OUT, IN), bits, 128)
    layer = BlockLinear.of(weight, tiled)
    assert layer.tile == expected_tile(tiled)
    assert torch.equal(layer.dequantize(), weight.dequantize())
    index = torch.tensor([5, 0, 77])
    assert torch.equal(layer.rows(index).dequantize(), weight.dequantize()[index])
    assert torch.equal(layer.embedding(index, torch.float32), weight.dequantize()[index])
    sixteen = torch.arange(80, 64, -1)
    part = layer.rows(sixteen)
    assert part.tile == expected_tile(tiled)
    x = torch.randn(3, IN)
    assert torch.equal(part(x), layer(x)[:, sixteen])


def test_rounding_keeps_zero_rows_and_halves_to_even():
    x = torch.zeros(2, 64)
    x[1, 0] = 127.0
    x[1, 1] = 0.5  # scale 1: 0.5 rounds to 0, as nearbyint does
    x[1, 2] = 1.5
    rounded = round_rows(x)
    assert torch.equal(rounded[0], torch.zeros(64))
    assert rounded[1, :3].tolist() == [127.0, 0.0, 2.0]


@pytest.fixture(scope="module")
def block_engine(tiny_llama_dir):
    config = EngineConfig(num_blocks=32, spec_draft_n_max=0, quantization="int4")
    return LLMEngine(load_checkpoint(tiny_llama_dir), config)


@pytest.fixture(scope="module")
def wide_head_engine(tmp_path_factory):
    """Heads of 96 dims: the attention's values go 64 dims at a time, then 8 at a time."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("wide_heads"), "llama", hidden_size=192,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=96)
    config = EngineConfig(num_blocks=32, spec_draft_n_max=0, quantization="int4")
    return LLMEngine(load_checkpoint(path), config)


@pytest.fixture(scope="module")
def narrow_head_engine(tmp_path_factory):
    """Heads of 40 dims, not whole 16-float registers: the attention goes 8 dims at a time, as the
    AVX2 build always does."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("narrow_heads"), "llama", hidden_size=96,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=40)
    config = EngineConfig(num_blocks=32, spec_draft_n_max=0, quantization="int4")
    return LLMEngine(load_checkpoint(path), config)


def run_step(model, kv_caches, tables, starts, query_lens, fused: bool, first_id: int = 3):
    """The model's hidden states for one step, through the one-call path or the per-op one; the
    step's tokens are ids ``first_id, first_id + 1, ...``."""
    meta, positions = build_metadata(tables, starts, query_lens, 16, "cpu")
    ids = torch.arange(first_id, first_id + sum(query_lens))
    attn = TorchPagedAttention()
    attn.prepare(meta)
    model.fusable = fused
    try:
        return model(ids, positions, kv_caches, attn)
    finally:
        model.fusable = True


@pytest.mark.parametrize("engine_name", ["block_engine", "wide_head_engine", "narrow_head_engine"])
def test_the_one_call_decode_step_equals_the_per_op_path(engine_name, request):
    """Two sequences with prompts in the cache step together: one decodes a token, the other
    verifies 4; both paths write the same KV and return the same hidden states (prompts of 20 and
    33 tokens: cache blocks of 16 keys, scored 8 at a time, and shorter ones). The one-call path's
    rows are independent of the other sequence's bit for bit."""
    engine = request.getfixturevalue(engine_name)
    model = engine.model
    assert model.fusable
    shape = engine.runner.kv_caches[0][0].shape
    caches = [tuple(torch.zeros(shape) for _ in "kv") for _ in model.layers]
    tables = [[0, 1, 2], [3, 4, 5]]
    with torch.inference_mode():
        run_step(model, caches, tables, [0, 0], [20, 33], fused=False)  # prompts: per-op
        copies = [tuple(c.clone() for c in pair) for pair in caches]
        alone = [tuple(c.clone() for c in pair) for pair in caches]
        first = run_step(model, alone, tables[:1], [20], [1], fused=True)
        fused = run_step(model, caches, tables, [20, 33], [1, 4], fused=True)
        per_op = run_step(model, copies, tables, [20, 33], [1, 4], fused=False)
    assert model.fused is not None and model.fused.bound_to(caches)
    assert torch.equal(fused[:1], first)
    torch.testing.assert_close(fused, per_op, rtol=1e-4, atol=1e-4)
    for (k, v), (k2, v2) in zip(caches, copies):
        torch.testing.assert_close(k, k2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v, v2, rtol=1e-4, atol=1e-5)


def test_verify_rows_equal_one_row_steps_bit_for_bit(block_engine):
    """A sequence stepping 4 tokens at once gives each the state that 4 one-token steps give:
    the rows of a call are independent, so MTP verification equals plain decoding exactly."""
    model = block_engine.model
    shape = block_engine.runner.kv_caches[0][0].shape
    caches = [tuple(torch.zeros(shape) for _ in "kv") for _ in model.layers]
    tables = [[0, 1, 2]]
    with torch.inference_mode():
        run_step(model, caches, tables, [0], [20], fused=False)
        copies = [tuple(c.clone() for c in pair) for pair in caches]
        together = run_step(model, caches, tables, [20], [4], fused=True)
        apart = [run_step(model, copies, tables, [20 + i], [1], fused=True, first_id=3 + i)
                 for i in range(4)]
    assert torch.equal(together, torch.cat(apart))


def test_an_mtp_block_runs_as_one_call_like_the_per_op_path(tiny_llama_dir, tmp_path):
    """A draft step of an MTP head on block weights (rotary position p + 1, KV slot of p) through
    the one-call block equals the per-op block."""
    checkpoint = load_checkpoint(tiny_llama_dir)
    head = save_random_head(tmp_path / "head", checkpoint.config)
    config = EngineConfig(num_blocks=32, quantization="int4", mtp_head=head, spec_draft_n_max=2)
    engine = LLMEngine(checkpoint, config)
    model, mtp = engine.model, engine.mtp
    shape = engine.runner.kv_caches[0][0].shape
    caches = [tuple(torch.zeros(shape) for _ in "kv")]
    tables = [[0, 1, 2], [3, 4, 5]]
    meta, slot_positions = build_metadata(tables, [20, 33], [1, 3], 16, "cpu")
    attn = TorchPagedAttention()
    attn.prepare(meta)
    ids = torch.tensor([5, 6, 7, 8])
    hidden = torch.randn(4, checkpoint.config.hidden_size)
    copies = [tuple(c.clone() for c in pair) for pair in caches]
    with torch.inference_mode():
        fused = mtp(0, ids, hidden, slot_positions + 1, caches, attn)
        assert mtp._fused_blocks[0].bound_to([caches[0]])
        model.fusable = False
        try:
            per_op = mtp(0, ids, hidden, slot_positions + 1, copies, attn)
        finally:
            model.fusable = True
    torch.testing.assert_close(fused, per_op, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[0][0], copies[0][0], rtol=1e-4, atol=1e-5)
