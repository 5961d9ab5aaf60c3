"""GGUF loader: real SmolLM2 file vs transformers, synthetic files for quant types, layouts and errors."""

import logging

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from mtpserve.engine.errors import ModelLoadError
from mtpserve.engine.loader.gguf import default_gguf_path, dequantize_tensor, load_gguf

HIDDEN, HEADS, KV_HEADS, FFN = 256, 4, 2, 256  # in-dims of 256 so K-quants fit every matrix
HEAD_DIM = HIDDEN // HEADS


# ---- the real model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_checkpoint):
    return smollm2_checkpoint


@pytest.fixture(scope="module")
def hf_model(smollm2_reference):
    return smollm2_reference


def test_config_matches_transformers(smol, hf_model):
    ours, ref = smol.config, hf_model.config
    assert ours.architecture == "llama"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "bos_token_id"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert ours.eos_token_ids == [ref.eos_token_id]
    assert (ours.rope_scaling, ours.partial_rotary_factor, ours.num_nextn_predict_layers) == (None, 1.0, 0)
    assert smol.generation.eos_token_ids == [2]


def test_weights_match_transformers(smol, hf_model):
    ref = hf_model.state_dict()
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{part}.weight"
        for i in (0, 17, 29)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    ]
    for name in names:
        assert smol.weights[name].dtype == torch.float32
        torch.testing.assert_close(smol.weights[name], ref[name], rtol=0, atol=0, msg=name)
    assert set(ref) - set(smol.weights) == {"lm_head.weight"}  # tied
    assert set(smol.weights) <= set(ref)


# ---- synthetic files ------------------------------------------------------------------------------

def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    spelled = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [spelled[b] for b in range(256)]


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows of llama models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_out(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_model(path, arch="llama", qtype=Q.F32, extra_kv=(), extra_tensors=None, block_count=1):
    """A one-layer model; returns the float32 weights as written (numpy, torch [out, in] order)."""
    rng = np.random.default_rng(0)
    tokens = byte_alphabet() + ["he", "ll", "hell", "hello", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), arch)
    metadata = [("block_count", block_count), ("context_length", 128), ("embedding_length", HIDDEN),
                ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", KV_HEADS),
                ("layer_norm_rms_eps", 1e-5), ("rope_freq_base", 10000.0), *extra_kv,
                ("tokenizer_model", "gpt2"), ("tokenizer_pre", "default"), ("token_list", tokens),
                ("token_types", [1] * (len(tokens) - 1) + [3]), ("token_merges", ["h e", "l l", "he ll", "hell o"]),
                ("bos_token_id", len(tokens) - 1), ("eos_token_id", len(tokens) - 1)]
    for key, value in metadata:
        getattr(w, f"add_{key}")(value)
    shapes = {
        "token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,),
        "output.weight": (len(tokens), HIDDEN),
        "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HIDDEN, HIDDEN), "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    written = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    written.update(extra_tensors or {})
    for name, value in written.items():
        if isinstance(value, tuple):  # (raw bytes, type)
            w.add_tensor(name, value[0], raw_dtype=value[1])
            continue
        if arch == "llama" and name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
            value = llama_permute(value, HEADS if "attn_q" in name else KV_HEADS)
        if value.ndim == 2 and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    write_out(w)
    return written


def test_tiny_llama_roundtrip_and_unpermute(tmp_path):
    written = write_model(tmp_path / "m.gguf")
    ckpt = load_gguf(str(tmp_path / "m.gguf"))
    c = ckpt.config
    shape = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    assert shape == (HIDDEN, HEADS, KV_HEADS, HEAD_DIM)
    assert not c.tie_word_embeddings and not c.attention_bias and not c.qk_norm
    w = ckpt.weights
    assert torch.equal(w["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(written["blk.0.attn_q.weight"]))
    assert torch.equal(w["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(written["blk.0.attn_k.weight"]))
    assert torch.equal(w["model.layers.0.mlp.down_proj.weight"], torch.from_numpy(written["blk.0.ffn_down.weight"]))
    assert torch.equal(w["lm_head.weight"], torch.from_numpy(written["output.weight"]))
    assert ckpt.tokenizer.encode("hello") == [ckpt.tokenizer.token_to_id("hello")]


def test_qwen_layouts_are_not_permuted(tmp_path):
    bias = {f"blk.0.attn_{p}.bias": np.arange(n, dtype=np.float32) for p, n in (("q", HIDDEN), ("k", 128), ("v", 128))}
    written = write_model(tmp_path / "q2.gguf", arch="qwen2", extra_tensors=bias)
    ckpt = load_gguf(str(tmp_path / "q2.gguf"))
    assert ckpt.config.attention_bias and not ckpt.config.qk_norm
    q_proj = ckpt.weights["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q_proj, torch.from_numpy(written["blk.0.attn_q.weight"]))
    assert torch.equal(ckpt.weights["model.layers.0.self_attn.k_proj.bias"], torch.arange(128, dtype=torch.float32))

    norms = {f"blk.0.attn_{p}_norm.weight": np.ones(HEAD_DIM, np.float32) for p in "qk"}
    write_model(tmp_path / "q3.gguf", arch="qwen3", extra_tensors=norms, extra_kv=[("key_length", HEAD_DIM)])
    ckpt = load_gguf(str(tmp_path / "q3.gguf"))
    assert ckpt.config.qk_norm and ckpt.config.architecture == "qwen3"
    assert ckpt.weights["model.layers.0.self_attn.k_norm.weight"].shape == (HEAD_DIM,)


def test_metadata_rope_scaling_nextn_and_unknown_tensors(tmp_path, caplog):
    extra_kv = [("rope_scaling_type", gguf.RopeScalingType.YARN), ("rope_scaling_factor", 4.0),
                ("rope_scaling_orig_ctx_len", 32), ("rope_dimension_count", 32), ("nextn_predict_layers", 1)]
    extra = {"blk.0.nextn.eh_proj.weight": np.ones((HIDDEN, 2 * HIDDEN), np.float32),
             "mystery.weight": np.ones(4, np.float32)}
    with caplog.at_level(logging.WARNING):
        write_model(tmp_path / "m.gguf", extra_kv=extra_kv, extra_tensors=extra, block_count=2)
        ckpt = load_gguf(str(tmp_path / "m.gguf"))
    c = ckpt.config
    assert c.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert c.partial_rotary_factor == 0.5 and c.rotary_dim == 32
    assert c.num_nextn_predict_layers == 1 and c.num_hidden_layers == 1  # block_count includes MTP layers
    assert ckpt.weights["gguf.blk.0.nextn.eh_proj.weight"].shape == (HIDDEN, 2 * HIDDEN)
    assert "mystery.weight" in caplog.text and not any("mystery" in k for k in ckpt.weights)


# ---- quantization types ---------------------------------------------------------------------------

def f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def ref_q8_0(b):
    return f16(b[:, 0:2]) * b[:, 2:].view(np.int8).astype(np.float32)


def nibbles(qs):  # 32 values: low nibbles first, then high nibbles
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)


def ref_q4_0(b):
    return f16(b[:, 0:2]) * (nibbles(b[:, 2:18]) - 8)


def ref_q4_1(b):
    return f16(b[:, 0:2]) * nibbles(b[:, 4:20]) + f16(b[:, 2:4])


def k_scale_min(s, j):
    """Scale and min of sub-block j from the 12 packed bytes of Q4_K/Q5_K."""
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def ref_q45_k(b, five):
    out = np.zeros((len(b), 256), np.float32)
    for n, blk in enumerate(b.astype(np.int64)):
        d, dmin = f16(b[n, 0:2])[0], f16(b[n, 2:4])[0]
        scales, qh, qs = blk[4:16], blk[16:48], blk[48:] if five else blk[16:]
        for j in range(4):  # 64 values per step: low nibbles then high nibbles of 32 bytes
            for half in range(2):
                sc, m = k_scale_min(scales, 2 * j + half)
                q = (qs[32 * j:32 * j + 32] >> (4 * half)) & 0xF
                if five:
                    q = q + 16 * ((qh >> (2 * j + half)) & 1)
                out[n, 64 * j + 32 * half:64 * j + 32 * half + 32] = d * sc * q - dmin * m
    return out


def ref_q6_k(b):
    out = np.zeros((len(b), 256), np.float32)
    for n, blk in enumerate(b.astype(np.int64)):
        ql, qh, sc, d = blk[0:128], blk[128:192], b[n, 192:208].view(np.int8), f16(b[n, 208:210])[0]
        for h in range(2):  # 128 values per half
            l_, hh, s = ql[64 * h:64 * h + 64], qh[32 * h:32 * h + 32], sc[8 * h:8 * h + 8]
            for part in range(4):
                low = (l_[32 * (part % 2):32 * (part % 2) + 32] >> (4 * (part // 2))) & 0xF
                q = (low | (((hh >> (2 * part)) & 3) << 4)) - 32
                for i in range(32):
                    out[n, 128 * h + 32 * part + i] = d * s[part * 2 + i // 16] * q[i]
    return out


def random_k_blocks(rng, n, type_size, d_offsets):
    raw = rng.integers(0, 256, (n, type_size), dtype=np.uint8)
    for off in d_offsets:  # valid, modest float16 super-block scales
        raw[:, off:off + 2] = rng.uniform(0.01, 0.1, (n, 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.fixture(scope="module")
def quant_file(tmp_path_factory):
    """One tensor per type, 4 x 512; returns ({name: tensor}, source, {type: (expected, max error vs source)})."""
    rng = np.random.default_rng(1)
    source = rng.standard_normal((4, 512)).astype(np.float32)
    path = tmp_path_factory.mktemp("quants") / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    expected = {Q.F32: (source, 0), Q.F16: (source.astype(np.float16).astype(np.float32), 0.003),
                Q.BF16: (torch.from_numpy(source).bfloat16().float().numpy(), 0.02)}
    w.add_tensor("F32", source)
    w.add_tensor("F16", source.astype(np.float16))
    w.add_tensor("BF16", gguf.quants.quantize(source, Q.BF16), raw_dtype=Q.BF16)
    for qtype, ref, tol in ((Q.Q8_0, ref_q8_0, 0.02), (Q.Q4_0, ref_q4_0, 0.35), (Q.Q4_1, ref_q4_1, 0.25)):
        raw = gguf.quants.quantize(source, qtype)
        w.add_tensor(qtype.name, raw, raw_dtype=qtype)
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        expected[qtype] = (ref(raw.reshape(-1, size)).reshape(source.shape), tol)
    for qtype, ref, offsets in ((Q.Q4_K, lambda b: ref_q45_k(b, False), (0, 2)),
                                (Q.Q5_K, lambda b: ref_q45_k(b, True), (0, 2)), (Q.Q6_K, ref_q6_k, (208,))):
        raw = random_k_blocks(rng, 8, gguf.GGML_QUANT_SIZES[qtype][1], offsets)
        w.add_tensor(qtype.name, raw.reshape(4, -1), raw_dtype=qtype)
        expected[qtype] = (ref(raw).reshape(4, 512), None)
    for qtype in (Q.Q5_0, Q.Q2_K, Q.IQ4_XS):  # accepted too; no reference here
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor(qtype.name, np.zeros((4, 512 // block * size), np.uint8), raw_dtype=qtype)
    write_out(w)
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}, source, expected


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_dequantize_against_reference(quant_file, qtype):
    tensors, source, expected = quant_file
    want, tol = expected[qtype]
    got = dequantize_tensor(tensors[qtype.name])
    assert got.shape == (4, 512) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-6, atol=1e-6)
    if tol is not None:  # and it is close to what was quantized
        assert (got - torch.from_numpy(source)).abs().max() <= tol


def test_other_types_and_whole_quantized_model(quant_file, tmp_path):
    for name in ("Q5_0", "Q2_K", "IQ4_XS"):
        assert dequantize_tensor(quant_file[0][name]).shape == (4, 512)
    written = write_model(tmp_path / "q8.gguf", qtype=Q.Q8_0)
    ckpt = load_gguf(str(tmp_path / "q8.gguf"))
    got, want = ckpt.weights["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(written["blk.0.attn_q.weight"])
    assert (got - want).abs().max() < 0.05  # de-permuted after dequantization


# ---- errors ---------------------------------------------------------------------------------------

def test_missing_file_and_not_a_gguf(tmp_path):
    assert default_gguf_path().endswith(".gguf")
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf(str(tmp_path / "nope.gguf"))
    (tmp_path / "text.gguf").write_text("hello, I am not a model\n" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_gguf(str(tmp_path / "text.gguf"))


@pytest.mark.parametrize("fraction", [0.5, 0.02])
def test_truncated(tmp_path, fraction):
    write_model(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_gguf(str(tmp_path / "cut.gguf"))


def test_unsupported_architecture(tmp_path):
    write_model(tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'bert'.*llama"):
        load_gguf(str(tmp_path / "bert.gguf"))


def test_unsupported_quant_type_in_model(tmp_path):
    raw = np.zeros((FFN, HIDDEN // 32 * 40), np.uint8)
    write_model(tmp_path / "m.gguf", extra_tensors={"blk.0.ffn_up.weight": (raw, Q.Q8_1)})
    with pytest.raises(ModelLoadError, match="'blk.0.ffn_up.weight' has unsupported type Q8_1"):
        load_gguf(str(tmp_path / "m.gguf"))
