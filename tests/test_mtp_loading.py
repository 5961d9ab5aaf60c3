"""Loading MTP weights: head files, GGUF nextn names, configs that promise layers the weights lack."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import make_engine
from mtp_helpers import save_random_head

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.errors import ModelLoadError
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.loader.mtp_head import rename_gguf_nextn
from mtpserve.engine.sampling_params import SamplingParams


def test_rename_gguf_nextn():
    w = {"gguf.blk.30.nextn.eh_proj.weight": torch.zeros(1), "gguf.blk.30.nextn.shared_head_norm.weight": torch.ones(1),
         "gguf.blk.30.nextn.enorm.weight": torch.ones(1), "model.layers.30.self_attn.q_proj.weight": torch.ones(1)}
    rename_gguf_nextn(w)
    assert set(w) == {"model.layers.30.eh_proj.weight", "model.layers.30.shared_head.norm.weight",
                      "model.layers.30.enorm.weight", "model.layers.30.self_attn.q_proj.weight"}


def test_head_must_match_the_base_model(tiny_llama_dir, tiny_qwen3_dir, tmp_path):
    head = save_random_head(tmp_path / "head", load_checkpoint(tiny_qwen3_dir).config)
    with pytest.raises(ModelLoadError, match="trained for"):
        make_engine(tiny_llama_dir, mtp_head=head)
    with pytest.raises(ModelLoadError, match="missing"):
        make_engine(tiny_llama_dir, mtp_head=str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mtp_head.json").write_text(json.dumps({"format": "something else"}))
    (bad / "mtp_head.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not an mtpserve head"):
        make_engine(tiny_llama_dir, mtp_head=str(bad))


def test_config_promising_mtp_layers_without_weights(tiny_llama_dir):
    ck = load_checkpoint(tiny_llama_dir)
    ck.config.num_nextn_predict_layers = 1
    with pytest.raises(ModelLoadError, match="MTP layer"):
        LLMEngine(ck, EngineConfig(num_blocks=64, block_size=4))
    assert LLMEngine(ck, EngineConfig(num_blocks=64, block_size=4, spec_draft_n_max=0)).mtp is None


def test_model_without_mtp_runs_plain_and_says_so(tiny_llama_dir, caplog):
    with caplog.at_level("INFO"):
        engine = make_engine(tiny_llama_dir)
    assert engine.mtp is None and engine.runner.proposer is None
    assert sum("no MTP layers" in r.message for r in caplog.records) == 1


def test_checkpoint_with_own_mtp_layer(tiny_llama_dir, tmp_path):
    """A checkpoint carrying the layer itself (DeepSeek names inside model.safetensors) drafts with it."""
    from mtp_helpers import random_head_weights

    ck = load_checkpoint(tiny_llama_dir)
    ck.weights.update(random_head_weights(ck.config))
    ck.config.num_nextn_predict_layers = 1
    engine = LLMEngine(ck, EngineConfig(num_blocks=64, block_size=4, spec_adaptive=False))
    assert engine.mtp is not None and len(engine.runner.kv_caches) == ck.config.num_hidden_layers + 1
    (req,) = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert req.spec_stats.num_draft_tokens > 0


def test_mimo_layout(make_checkpoint):
    """MiMo: a Qwen2 model whose MTP layer sits under model.mtp_layers.0 with its own names and
    [hidden, token] input order; drafting with it stays lossless."""
    import os

    from mtp_helpers import random_head_weights
    from safetensors.torch import load_file, save_file

    from mtpserve.engine.models.mtp import MIMO_LAYOUT

    path = make_checkpoint("qwen2")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(model_type="mimo", architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1)
    json.dump(cfg, open(cfg_path, "w"))
    base = load_checkpoint(path).config
    rename = {"enorm": "token_layernorm", "hnorm": "hidden_layernorm", "eh_proj": "input_proj",
              "shared_head.norm": "final_layernorm"}
    weights = load_file(os.path.join(path, "model.safetensors"))
    for key, value in random_head_weights(base).items():
        name = key[len(f"model.layers.{base.num_hidden_layers}."):]
        for old, new in rename.items():
            if name.startswith(old + "."):
                name = new + name[len(old):]
        weights["model.mtp_layers.0." + name] = value
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    ck = load_checkpoint(path)
    assert ck.config.architecture == "qwen2" and ck.config.mtp_layout == "mimo"
    engine = make_engine(path, dtype=torch.float64, spec_adaptive=False)
    assert engine.mtp.layers[0].layout == MIMO_LAYOUT and engine.mtp.layers[0].feedback == "post_norm"
    prompts = [[5, 6, 7, 8], [9, 10]]
    plain = [r.output_token_ids for r in make_engine(path, dtype=torch.float64, spec_draft_n_max=0).generate(
        prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
    reqs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [r.output_token_ids for r in reqs] == plain
    assert engine.spec_stats.num_draft_tokens > 0
