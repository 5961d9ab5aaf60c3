"""GLM-4.5 (glm4_moe): config parsing, logits parity with transformers through the paged cache (float32), and
the MTP layer against transformers' MtpModel."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import load_reference_model
from engine_helpers import compute, greedy, make_engine, new_request
from test_model_parity import reference_logits
from tiny_mtp import GLM4_MOE_TINY, make_tiny_glm4_moe

from mtpserve.engine.loader.hf import parse_hf_config
from mtpserve.engine.models import model_class
from mtpserve.engine.models.glm4_moe import Glm4MoeForCausalLM
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.kernels.attention import DenseCausalAttention

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # 46 tiny layers: thousands of small ops
ATOL = 2e-4
# group-limited routing over 8 experts, q/k norm, unnormalized scaled weights, 2 shared experts, 3 layers
ROUTING_VARIANT = dict(num_hidden_layers=3, mtp=False, n_routed_experts=8, n_group=4, topk_group=2,
                       num_experts_per_tok=3, use_qk_norm=True, norm_topk_prob=False, routed_scaling_factor=2.5,
                       n_shared_experts=2, first_k_dense_replace=0)


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory) -> str:
    """46 layers (layer 0 dense, the rest MoE) and an MTP layer at index 46."""
    return make_tiny_glm4_moe(tmp_path_factory.mktemp("tiny_glm4_moe"))


def check_model(path: str, chunks: list[int], decode_steps: int = 8, hf=None) -> None:
    """Chunked prefill then decode through the paged cache vs one transformers forward over the whole sequence
    (``hf``, else the checkpoint loaded by AutoModelForCausalLM). (test_model_parity.check_model with the engine's
    start-up cost measurement turned off.)"""
    hf = hf if hf is not None else load_reference_model(path)
    engine = make_engine(path, spec_adaptive=False)
    ids = torch.randint(0, engine.model_config.vocab_size, (sum(chunks) + decode_steps,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    req = new_request(engine, ids[:sum(chunks)])
    ours = [compute(engine, [(req, n)])[0] for n in chunks]
    for t in ids[sum(chunks):]:
        req.all_token_ids.append(t)
        ours.append(compute(engine, [(req, 1)])[0])
    torch.testing.assert_close(torch.cat(ours), reference_logits(hf, ids), atol=ATOL, rtol=1e-4)


def config_of(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_registry():
    assert model_class("glm4_moe") is Glm4MoeForCausalLM


def test_config_matches_transformers(glm_dir):
    from transformers import AutoConfig

    hf, ours = AutoConfig.from_pretrained(glm_dir), parse_hf_config(config_of(glm_dir))
    assert ours.architecture == "glm4_moe"
    same = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "attention_bias", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
            "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace"]
    for key in same:
        assert getattr(ours, key) == getattr(hf, key), key
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.partial_rotary_factor == hf.rope_parameters["partial_rotary_factor"] == 0.5
    assert ours.rotary_dim == 8 and ours.rope_scaling is None
    assert ours.qk_norm == hf.use_qk_norm
    assert ours.num_nextn_predict_layers == hf.num_mtp_layers == 1


def test_config_defaults_match_transformers():
    """Keys a config.json leaves out take transformers' glm4_moe defaults (partial rotary 0.5, eps 1e-5, ...)."""
    from transformers import Glm4MoeConfig

    given = {"vocab_size": 320, "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 16, "num_nextn_predict_layers": 0}
    hf, ours = Glm4MoeConfig(**given), parse_hf_config({"model_type": "glm4_moe", **given})
    for key in ["rms_norm_eps", "max_position_embeddings", "n_routed_experts", "num_experts_per_tok",
                "moe_intermediate_size", "n_shared_experts", "n_group", "topk_group", "norm_topk_prob",
                "routed_scaling_factor", "first_k_dense_replace", "attention_bias", "tie_word_embeddings"]:
        assert getattr(ours, key) == getattr(hf, key), key
    assert ours.partial_rotary_factor == hf.rope_parameters["partial_rotary_factor"]
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.num_key_value_heads == hf.num_key_value_heads == 8 and ours.head_dim == 8
    # an absent MTP count means none here (transformers assumes 1): a checkpoint must say it has MTP weights
    assert parse_hf_config({"model_type": "glm4_moe", **given, "num_nextn_predict_layers": None}) \
        .num_nextn_predict_layers == 0
    assert parse_hf_config({"model_type": "glm4_moe", **given, "num_mtp_layers": 2}).num_nextn_predict_layers == 2


def test_layer_kinds(glm_dir):
    from mtpserve.engine.models.glm4_moe import MoE

    model = Glm4MoeForCausalLM(parse_hf_config(config_of(glm_dir)), max_positions=64)
    kinds = [isinstance(layer.mlp, MoE) for layer in model.layers]
    assert kinds == [False] + [True] * 45
    assert isinstance(model.make_layer(46).mlp, MoE)  # the MTP block


@pytest.mark.parametrize("chunks", [[17], [5, 7, 1, 4]])
def test_prefill_and_decode_match_transformers(glm_dir, chunks):
    check_model(glm_dir, chunks)


@pytest.mark.parametrize("overrides", [
    dict(num_hidden_layers=46, first_k_dense_replace=46),  # dense only (the MTP block still has experts)
    ROUTING_VARIANT,
], ids=["dense", "routing"])
def test_variants_match_transformers(tmp_path, overrides):
    check_model(make_tiny_glm4_moe(tmp_path, **overrides), [9, 6])


def test_bf16_router_stays_float32(glm_dir):
    engine = make_engine(glm_dir, dtype=torch.bfloat16, spec_adaptive=False)
    moe = engine.model.layers[1].mlp
    assert moe.gate_weight.dtype == moe.gate_bias.dtype == torch.float32
    assert moe.gate_up_weight.dtype == torch.bfloat16
    assert engine.mtp.layers[0].block.mlp.gate_weight.dtype == torch.float32
    req = new_request(engine, list(range(10, 30)))
    assert torch.isfinite(compute(engine, [(req, 20)])[0]).all()


@torch.inference_mode()
def test_mtp_layer_matches_transformers(glm_dir):
    """The first MTP pass: pair (h[p], t[p+1]) at rotary position p + 1, logits of shared_head(post_norm(block))."""
    from transformers.modeling_layers import MtpModel

    hf = load_reference_model(glm_dir)
    hf_mtp = MtpModel.from_pretrained(hf, device_map={"": "cpu"}).eval()
    engine = make_engine(glm_dir, spec_adaptive=False)
    ids = torch.randint(5, GLM4_MOE_TINY["vocab_size"], (20,), generator=torch.Generator().manual_seed(3))
    n = len(ids)
    out = hf(ids[None], output_hidden_states=True)
    h_ref = out.hidden_states[-1]  # post-norm (tied to last_hidden_state)
    y_ref = hf_mtp.forward_layer(0, h_ref[:, :-1], torch.arange(1, n)[None], None, input_ids=ids[None, 1:])
    ref = hf_mtp._project_to_logits(y_ref)[0]

    attn = DenseCausalAttention()
    positions = torch.arange(n)
    h = engine.model(ids, positions, [None] * len(engine.model.layers), attn)
    torch.testing.assert_close(h, h_ref[0], atol=ATOL, rtol=1e-4)
    y = engine.mtp(0, ids[1:], h[:-1], positions[1:], [None], attn)
    logits = engine.mtp.compute_logits(0, y)
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("mtp_copy", [False, True], ids=["random_mtp", "copy_mtp"])
def test_greedy_with_mtp_matches_transformers(tmp_path, mtp_copy):
    """transformers' own MTP generation runs on the checkpoint, and our MTP-speculative greedy output equals
    transformers' plain greedy output, with drafts all rejected (random MTP layer) or often accepted."""
    path = make_tiny_glm4_moe(tmp_path, mtp_copy=mtp_copy)
    hf = load_reference_model(path)
    prompt = torch.tensor([[1, 5, 77, 200, 13, 9, 100, 42]])
    greedy_kwargs = dict(max_new_tokens=16, do_sample=False, repetition_penalty=1.0)  # not generation_config's
    plain = hf.generate(prompt, **greedy_kwargs)
    assert torch.equal(plain, hf.generate(prompt, use_mtp=True, **greedy_kwargs))
    engine = make_engine(path, spec_adaptive=False, spec_draft_n_max=3)
    assert greedy(engine, prompt.tolist(), 16) == [plain[0, prompt.shape[1]:].tolist()]
    stats = engine.spec_stats
    assert stats.num_draft_tokens > 0
    assert (stats.num_accepted_tokens > 0) == mtp_copy


@torch.inference_mode()
@pytest.mark.parametrize("mtp_copy", [False, True], ids=["random_mtp", "copy_mtp"])
def test_accepted_drafts_equal_transformers_mtp_drafts(tmp_path, mtp_copy):
    """k = 1, adaptive off: each step drafts the token after the last emitted one. Replaying those steps
    with transformers' MtpModel drafts (teacher-forced over the final sequence; causal, so each equals
    the incremental draft) must give exactly our number of accepted drafts."""
    from transformers.modeling_layers import MtpModel

    path = make_tiny_glm4_moe(tmp_path, mtp_copy=mtp_copy)
    hf = load_reference_model(path)
    hf_mtp = MtpModel.from_pretrained(hf, device_map={"": "cpu"}).eval()
    engine = make_engine(path, spec_adaptive=False, spec_draft_n_max=1)
    prompts = [[1, 5, 77, 200, 13, 9, 100, 42], [3, 17, 250, 8], [60, 61, 62, 63, 64, 65]]
    n = 20
    total = 0
    for prompt in prompts:
        (req,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        seq = torch.tensor(prompt + req.output_token_ids)
        h = hf(seq[None], output_hidden_states=True).hidden_states[-1]
        y = hf_mtp.forward_layer(0, h[:, :-1], torch.arange(1, len(seq))[None], None, input_ids=seq[None, 1:])
        drafts = hf_mtp._project_to_logits(y)[0].argmax(-1)  # drafts[p] predicts seq[p + 2]
        out, p0 = req.output_token_ids, len(prompt)
        accepted, i = 0, 1  # i: index in out of the token the next draft predicts
        while i < n:
            if i == n - 1:  # the last token comes without a draft (max_tokens cap)
                break
            hit = int(drafts[p0 + i - 2]) == out[i]
            accepted += hit
            i += 2 if hit else 1
        assert req.spec_stats.num_accepted_tokens == accepted
        total += accepted
    assert (total > 0) == mtp_copy  # the copy layer's drafts are sometimes right: both paths run
