"""Qwen3-Next and Qwen3.5 (hybrid Gated DeltaNet + gated attention, dense or MoE): logits parity with transformers
through the paged cache and the recurrent state slots (float32), and MTP speculation in the ``mtp.*`` layout.

Losslessness runs in float64 (as test_mtp.py): verification multiplies matrices of other shapes than decoding,
and the delta rule runs token by token there but in chunks over prompts; in float64 the rounding differences
are far below any argmax gap of these random models, so greedy outputs must be equal token for token.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import load_reference_model
from engine_helpers import compute, greedy, make_engine, new_request, price_drafting_cheaply
from test_glm4_moe import ATOL, check_model
from test_model_parity import reference_logits
from test_mtp import check_stats, prompts
from tiny_qwen3_next import make_tiny_qwen3_next

from mtpserve.engine.errors import ModelLoadError
from mtpserve.engine.loader.hf import parse_hf_config
from mtpserve.engine.models import model_class
from mtpserve.engine.models.qwen3_next import Qwen3NextForCausalLM, SparseMoE
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.train.distill import distill
from mtpserve.kernels.gated_delta import delta_rule_chunked, delta_rule_recurrent, l2_normalize

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
F64 = {"dtype": torch.float64, "spec_adaptive": False}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    """Layers [linear, full, linear, linear], layer 2 dense, the others MoE; one MTP block under mtp.*."""
    return make_tiny_qwen3_next(tmp_path_factory.mktemp("tiny_qwen3_next"))


@pytest.fixture(scope="module")
def trained_mtp(qwen_dir):
    """The MTP layer distilled briefly on the model's own greedy outputs (drafts often right, not always)."""
    engine = make_engine(qwen_dir, spec_draft_n_max=1, **F64)
    ps = prompts(8, seed=7)
    sequences = [p + out for p, out in zip(ps, greedy(engine, ps, 32))]
    losses = distill(engine.mtp, engine.model, sequences, steps=80, lr=1e-2, depth=2)
    assert losses[-1] < losses[0]
    return {k: v.clone() for k, v in engine.mtp.state_dict().items()}


def trained_engine(path, trained, **config):
    engine = make_engine(path, **{**F64, **config})
    engine.mtp.load_state_dict(trained)
    return engine


def test_kernel_chunked_equals_recurrent():
    g = torch.Generator().manual_seed(0)
    b, n, h, dk, dv = 2, 150, 3, 8, 12
    q, k = (l2_normalize(torch.randn(b, n, h, dk, generator=g, dtype=torch.float64)) for _ in range(2))
    v = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
    decay, beta = -torch.rand(b, n, h, generator=g, dtype=torch.float64), torch.rand(b, n, h, generator=g,
                                                                                     dtype=torch.float64)
    state = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64)
    out, states = delta_rule_recurrent(q, k, v, decay, beta, state)
    chunked, final = delta_rule_chunked(q, k, v, decay, beta, state, chunk=16)
    torch.testing.assert_close(chunked, out)
    torch.testing.assert_close(final, states[:, -1])


def test_config_matches_transformers(qwen_dir):
    from transformers import AutoConfig

    with open(os.path.join(qwen_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    hf, ours = AutoConfig.from_pretrained(qwen_dir), parse_hf_config(raw)
    assert model_class(ours.architecture) is Qwen3NextForCausalLM
    for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "linear_conv_kernel_dim", "linear_num_key_heads",
                "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim", "num_experts_per_tok",
                "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step", "norm_topk_prob"]:
        assert getattr(ours, key) == getattr(hf, key), key
    assert ours.n_routed_experts == hf.num_experts and list(ours.mlp_only_layers) == hf.mlp_only_layers
    assert list(ours.layer_types) == hf.layer_types and ours.qk_norm
    assert ours.partial_rotary_factor == hf.rope_parameters["partial_rotary_factor"] == 0.25
    assert ours.mtp_layout == "qwen" and ours.num_nextn_predict_layers == 1
    # the released configs: full_attention_interval instead of layer_types; Qwen3.5's MTP key
    released = {k: v for k, v in raw.items() if k not in ("layer_types", "num_nextn_predict_layers")}
    parsed = parse_hf_config({**released, "full_attention_interval": 2, "mtp_num_hidden_layers": 2})
    assert parsed.layer_types == ("linear_attention", "full_attention") * 2 and parsed.num_nextn_predict_layers == 2
    with pytest.raises(ModelLoadError, match="layer_types"):
        parse_hf_config({**raw, "layer_types": ["linear_attention"]})


def test_layer_kinds(qwen_dir):
    engine = make_engine(qwen_dir)  # adaptive speculation: start-up cost measurement runs on the hybrid model
    assert engine.policy.costs is not None
    layers = engine.model.layers
    assert [layer.self_attn is None for layer in layers] == [True, False, True, True]
    assert [isinstance(layer.mlp, SparseMoE) for layer in layers] == [True, True, False, True]
    # no KV for DeltaNet layers; the MTP block (gated attention) has its own
    assert [c is None for c in engine.runner.kv_caches] == [True, False, True, True, False]


@pytest.mark.parametrize("chunks", [[40], [5, 7, 1, 20]])
def test_prefill_and_decode_match_transformers(qwen_dir, chunks):
    """Prompts over 16 tokens take the chunked delta rule, shorter chunks and decode the recurrent one; the
    state carries across chunks and steps."""
    check_model(qwen_dir, chunks)


@pytest.mark.parametrize("family,image_text", [("qwen3_5", False), ("qwen3_5_moe", False), ("qwen3_5", True)],
                         ids=["qwen3_5", "qwen3_5_moe", "qwen3_5_image_text"])
def test_qwen3_5_matches_transformers_and_drafts_losslessly(tmp_path, family, image_text):
    """Qwen3.5 (DeltaNet projections stored apart, dense or MoE blocks; the released image-text layout with the
    language model under model.language_model.*): parity, then MTP (its mtp_num_hidden_layers key) lossless."""
    import transformers

    path = make_tiny_qwen3_next(tmp_path, family, image_text=image_text, mtp_key="mtp_num_hidden_layers")
    reference = transformers.AutoModelForImageTextToText if image_text else transformers.AutoModelForCausalLM
    check_model(path, [20, 3], hf=reference.from_pretrained(path, dtype=torch.float32).eval())
    ps = prompts(3, seed=5)
    engine = make_engine(path, spec_draft_n_max=2, **F64)
    assert engine.mtp is not None
    assert greedy(engine, ps, 12) == greedy(make_engine(path, spec_draft_n_max=0, **F64), ps, 12)
    assert engine.spec_stats.num_draft_tokens > 0


def test_batched_step_matches_transformers(qwen_dir):
    """One flattened step: a decode, the end of a chunked prefill, a whole prompt (each its own state slot)."""
    hf = load_reference_model(qwen_dir)
    engine = make_engine(qwen_dir, spec_adaptive=False)
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 25, 6)]
    reqs = [new_request(engine, p, f"r{i}") for i, p in enumerate(ps)]
    compute(engine, [(reqs[0], 3), (reqs[1], 4)])
    reqs[0].all_token_ids.append(7)
    out = compute(engine, [(reqs[0], 1), (reqs[1], 21), (reqs[2], 6)])
    torch.testing.assert_close(out[0][-1], reference_logits(hf, ps[0] + [7])[-1], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[1], reference_logits(hf, ps[1])[4:], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[2], reference_logits(hf, ps[2]), atol=ATOL, rtol=1e-4)


def check_all_free(engine) -> None:
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    states = engine.kv.states
    assert len(states.free_slots) == engine.config.max_num_seqs and not states.slot_of and not states.progress


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_lossless_with_mtp(qwen_dir, trained_mtp, k):
    """Distillation prompts (high acceptance) and held-out ones, batched and alone: both the accept path (continue
    from state slot j) and the reject path run; output equals plain decoding."""
    ps = prompts(8, seed=7)[:4] + prompts(2, seed=11)
    plain = greedy(make_engine(qwen_dir, spec_draft_n_max=0, **F64), ps, 24)
    engine = trained_engine(qwen_dir, trained_mtp, spec_draft_n_max=k)
    reqs = engine.generate(ps, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [r.output_token_ids for r in reqs] == plain
    assert greedy(engine, ps[-1:], 24) == plain[-1:]
    check_stats(reqs)
    stats = engine.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    check_all_free(engine)


def test_chunked_prefill_and_preemption(qwen_dir, trained_mtp):
    """A small token budget (prompts in chunks) and a tiny KV cache (preemption: state slots freed, recomputed
    from scratch)."""
    ps = prompts(8, seed=7)[2:8]
    plain = greedy(make_engine(qwen_dir, spec_draft_n_max=0, **F64), ps, 32)
    engine = trained_engine(qwen_dir, trained_mtp, spec_draft_n_max=3, block_size=4, num_blocks=28,
                            max_num_batched_tokens=12)
    assert greedy(engine, ps, 32) == plain
    assert engine.scheduler.num_preemptions > 0
    assert 0 < engine.spec_stats.num_accepted_tokens < engine.spec_stats.num_draft_tokens
    check_all_free(engine)


def test_sampled_reproducible_with_rollbacks(qwen_dir, trained_mtp):
    ps = prompts(8, seed=7)[:3]
    params = [SamplingParams(temperature=0.7, seed=s, max_tokens=20, ignore_eos=True) for s in range(3)]
    runs = []
    for _ in range(2):
        engine = trained_engine(qwen_dir, trained_mtp, spec_draft_n_max=3)
        price_drafting_cheaply(engine)
        runs.append([r.output_token_ids for r in engine.generate(ps, params)])
        stats = engine.spec_stats
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # drafts rejected: states rolled back
        check_all_free(engine)
    assert runs[0] == runs[1]


def test_mtp_weights_missing_or_implied(qwen_dir, tmp_path):
    """A config promising MTP layers the weights lack is an error; the released Qwen3-Next config names no count,
    and then the mtp.* blocks in the weights say it."""
    no_weights = make_tiny_qwen3_next(tmp_path / "none", mtp_layers=0)
    with open(os.path.join(no_weights, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    with open(os.path.join(no_weights, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**raw, "mtp_num_hidden_layers": 1}, f)
    with pytest.raises(ModelLoadError, match=r"MTP layer.*mtp\.layers\.0\."):
        make_engine(no_weights)
    implied = make_tiny_qwen3_next(tmp_path / "implied", mtp_key=None)
    engine = make_engine(implied, spec_draft_n_max=2, spec_adaptive=False)
    assert engine.model_config.num_nextn_predict_layers == 1 and engine.mtp is not None
    plain = make_engine(qwen_dir, spec_draft_n_max=0)
    assert plain.mtp is None and plain.kv.states.ssm[0].shape[1] == 1  # no drafts: one state entry per slot
