"""Hugging Face directory loader: config mapping, RoPE forms, weights, generation defaults, errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import BOS_ID, CHAT_TEMPLATE, EOS_ID, IM_END_ID, LLAMA3_ROPE, load_reference_model

from mtpserve.engine.errors import ModelLoadError
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.loader.hf import load_generation_defaults, load_hf_dir, load_weights, parse_hf_config

BASE = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 256}


def config_of(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def rewrite_config(path: str, **changes) -> None:
    cfg = config_of(path)
    cfg.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def copy_dir(src: str, tmp_path) -> str:
    return shutil.copytree(src, str(tmp_path / "copy"))


# ---- config.json ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen3_dir"])
def test_config_matches_transformers(fixture, request):
    from transformers import AutoConfig

    path = request.getfixturevalue(fixture)
    ref = AutoConfig.from_pretrained(path)
    cfg = parse_hf_config(config_of(path))
    assert cfg.architecture == ref.model_type
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "bos_token_id"):
        assert getattr(cfg, name) == getattr(ref, name), name
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.eos_token_ids == [ref.eos_token_id]
    assert cfg.qk_norm == (ref.model_type == "qwen3")
    assert cfg.attention_bias == (ref.model_type == "qwen2")
    assert cfg.num_nextn_predict_layers == 0


def test_fixture_specifics(tiny_llama_dir, tiny_qwen2_dir, tiny_qwen3_dir):
    llama = parse_hf_config(config_of(tiny_llama_dir))
    assert llama.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert llama.rope_theta == 500000.0 and not llama.tie_word_embeddings
    assert parse_hf_config(config_of(tiny_qwen2_dir)).tie_word_embeddings
    qwen3 = parse_hf_config(config_of(tiny_qwen3_dir))
    assert qwen3.head_dim == 32 and qwen3.rotary_dim == 32 and qwen3.rope_scaling is None


def test_defaults_and_architectures_fallback():
    cfg = parse_hf_config({**BASE, "architectures": ["MistralForCausalLM"], "eos_token_id": [2, 7]})
    assert cfg.architecture == "mistral"
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 16
    assert cfg.eos_token_ids == [2, 7] and cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert cfg.partial_rotary_factor == 1.0 and cfg.bos_token_id is None


def test_bias_and_mtp_keys():
    assert parse_hf_config({**BASE, "model_type": "llama", "attention_bias": True}).attention_bias
    assert not parse_hf_config({**BASE, "model_type": "mistral", "attention_bias": True}).attention_bias
    assert parse_hf_config({**BASE, "model_type": "qwen2"}).attention_bias
    assert parse_hf_config({**BASE, "model_type": "qwen3", "num_nextn_predict_layers": 1}).num_nextn_predict_layers == 1


def test_sliding_window_caps_context():
    cfg = parse_hf_config({**BASE, "model_type": "mistral", "sliding_window": 128})
    assert cfg.max_position_embeddings == 128
    cfg = parse_hf_config({**BASE, "model_type": "qwen2", "sliding_window": 128, "use_sliding_window": False})
    assert cfg.max_position_embeddings == 256


LLAMA3_KEYS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
YARN_KEYS = {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}


@pytest.mark.parametrize("form", ["flat", "rope_parameters"])
@pytest.mark.parametrize("rope_type,keys", [("llama3", LLAMA3_KEYS), ("linear", {"factor": 2.0}),
                                            ("yarn", YARN_KEYS)])
def test_rope_scaling_both_forms(form, rope_type, keys):
    if form == "flat":  # transformers 4 style; "type" is the older spelling of "rope_type"
        extra = {"rope_theta": 5e5, "rope_scaling": {"type": rope_type, **keys}, "partial_rotary_factor": 0.5}
    else:
        extra = {"rope_parameters": {"rope_type": rope_type, "rope_theta": 5e5, "partial_rotary_factor": 0.5,
                                     **keys}}
    cfg = parse_hf_config({**BASE, "model_type": "llama", **extra})
    assert cfg.rope_theta == 5e5
    assert cfg.partial_rotary_factor == 0.5 and cfg.rotary_dim == 8
    assert cfg.rope_scaling == {"rope_type": rope_type, **keys}


def test_rope_defaults_filled():
    cfg = parse_hf_config({**BASE, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    cfg = parse_hf_config({**BASE, "model_type": "qwen2", "rope_scaling": {"type": "default"}, "rope_theta": 1e6})
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e6


def test_rope_scaling_from_saved_variants(make_checkpoint):
    from transformers import AutoConfig

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    path = make_checkpoint("llama", rope_parameters=yarn, partial_rotary_factor=0.5, attention_bias=True)
    cfg = parse_hf_config(config_of(path))
    ref = AutoConfig.from_pretrained(path).rope_parameters
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == ref["factor"]
    assert cfg.partial_rotary_factor == 0.5 and cfg.attention_bias


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope", "mrope"])
def test_unsupported_rope_type(rope_type):
    with pytest.raises(ModelLoadError, match=f"unsupported rope type '{rope_type}'"):
        parse_hf_config({**BASE, "model_type": "llama", "rope_scaling": {"rope_type": rope_type, "factor": 2.0}})


def test_unsupported_architecture():
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'bert' \(supported: llama, mistral"):
        parse_hf_config({**BASE, "model_type": "bert"})
    with pytest.raises(ModelLoadError, match="'GPT2LMHeadModel'"):
        parse_hf_config({**BASE, "architectures": ["GPT2LMHeadModel"]})


def test_unsupported_features():
    with pytest.raises(ModelLoadError, match="quant_method 'gptq'"):
        parse_hf_config({**BASE, "model_type": "llama", "quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ModelLoadError, match="hidden_act 'gelu'"):
        parse_hf_config({**BASE, "model_type": "llama", "hidden_act": "gelu"})
    with pytest.raises(ModelLoadError, match="missing 'hidden_size'"):
        parse_hf_config({"model_type": "llama", "num_attention_heads": 4})


# ---- generation_config.json -------------------------------------------------------------------------------------

def test_generation_defaults(tiny_llama_dir, tmp_path):
    gen = load_generation_defaults(tiny_llama_dir)
    assert (gen.temperature, gen.top_p, gen.top_k, gen.min_p, gen.repetition_penalty) == (0.7, 0.9, 20, 0.05, 1.1)
    assert gen.eos_token_ids == [EOS_ID, IM_END_ID]
    assert load_generation_defaults(str(tmp_path)).temperature is None  # no file
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6,
                                                                 "eos_token_id": 5}))
    greedy = load_generation_defaults(str(tmp_path))
    assert greedy.temperature == 0.0 and greedy.top_p is None and greedy.eos_token_ids == [5]


# ---- weights ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen3_dir"])
def test_weights_equal_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    weights = load_weights(path)
    ref = load_reference_model(path).state_dict()
    tied = parse_hf_config(config_of(path)).tie_word_embeddings
    assert set(ref) - set(weights) == ({"lm_head.weight"} if tied else set())
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, ref[name]), name


def test_sharded_checkpoint(make_checkpoint):
    path = make_checkpoint("mistral", max_shard_size="40KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    weights = load_weights(path)
    ref = load_reference_model(path).state_dict()
    assert set(weights) == set(ref)
    assert all(torch.equal(weights[n], ref[n]) for n in ref)


def test_bf16_weights_become_float32(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(3, 4, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    assert load_weights(str(tmp_path))["w"].dtype == torch.float32


# ---- full directory ---------------------------------------------------------------------------------------------

def test_load_hf_dir(tiny_qwen2_dir):
    ckpt = load_checkpoint(tiny_qwen2_dir)
    assert ckpt.source == tiny_qwen2_dir
    assert ckpt.config.architecture == "qwen2" and ckpt.config.bos_token_id == BOS_ID
    assert "model.layers.0.self_attn.q_proj.bias" in ckpt.weights
    assert ckpt.generation.eos_token_ids == [EOS_ID, IM_END_ID]
    ids = ckpt.tokenizer.encode("Hello, world!")
    assert ids and max(ids) < ckpt.config.vocab_size
    assert ckpt.tokenizer.decode(ids) == "Hello, world!"


def test_chat_template_file_picked_up(tiny_qwen3_dir):
    assert "chat_template" not in json.load(open(os.path.join(tiny_qwen3_dir, "tokenizer_config.json")))
    tokenizer = load_hf_dir(tiny_qwen3_dir).tokenizer
    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_generation_eos_falls_back_to_config(tiny_llama_dir, tmp_path):
    path = copy_dir(tiny_llama_dir, tmp_path)
    os.remove(os.path.join(path, "generation_config.json"))
    assert load_hf_dir(path).generation.eos_token_ids == [EOS_ID]


# ---- errors -----------------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="model path not found"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="model path not found"):
        load_hf_dir(str(tmp_path / "nope"))


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "bert"}, "unsupported architecture 'bert'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported rope type 'dynamic'"),
])
def test_unsupported_config_dir(tiny_llama_dir, tmp_path, changes, message):
    path = copy_dir(tiny_llama_dir, tmp_path)
    rewrite_config(path, **changes)
    with pytest.raises(ModelLoadError, match=message):
        load_checkpoint(path)


def test_truncated_safetensors(tiny_llama_dir, tmp_path):
    path = copy_dir(tiny_llama_dir, tmp_path)
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_checkpoint(path)


def test_garbage_safetensors(tiny_llama_dir, tmp_path):
    path = copy_dir(tiny_llama_dir, tmp_path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 7)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_missing_shard(make_checkpoint):
    path = make_checkpoint("llama", max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(ModelLoadError, match=shard):
        load_checkpoint(path)


def test_no_safetensors(tiny_llama_dir, tmp_path):
    path = copy_dir(tiny_llama_dir, tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ModelLoadError, match="looked for model.safetensors and model.safetensors.index.json"):
        load_checkpoint(path)
    torch.save({}, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(ModelLoadError, match="only safetensors is supported"):
        load_checkpoint(path)


def test_missing_lm_head(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path = copy_dir(tiny_llama_dir, tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["lm_head.weight"]
    save_file(tensors, file)
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        load_checkpoint(path)


def test_not_a_model_file(tmp_path):  # neither a directory nor .gguf
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="expected a .gguf file"):
        load_checkpoint(str(tmp_path / "weights.txt"))
