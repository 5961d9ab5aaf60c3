"""MTP draft + verify on tiny checkpoints with a DeepSeek-style head (``--mtp-head`` format).

Losslessness tests run the engine in float64: verifying k + 1 tokens multiplies matrices of a
different shape than decoding one token, and in float32 that can flip a near-tie argmax. In float64
the rounding differences are ~1e-16, far below any argmax gap of these random models, so greedy
outputs with and without MTP must be identical token for token.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy, make_engine
from mtp_helpers import save_random_head

from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.train.distill import distill


def prompts(n: int, seed: int = 0, vocab: int = 300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (n,), generator=g).tolist()
    return [torch.randint(5, vocab, (length,), generator=g).tolist() for length in lengths]


@pytest.fixture(scope="module")
def llama_head(tiny_llama_dir, tmp_path_factory):
    config = load_checkpoint(tiny_llama_dir).config
    return save_random_head(tmp_path_factory.mktemp("head"), config)


@pytest.fixture(scope="module")
def trained_head(tiny_qwen3_dir, tmp_path_factory):
    """A head distilled briefly on the model's own greedy outputs, so drafts are often right and both
    the accept and the reject paths run."""
    from mtpserve.engine.loader.mtp_head import save_mtp_head

    config = load_checkpoint(tiny_qwen3_dir).config
    path = save_random_head(tmp_path_factory.mktemp("qhead"), config, scale=0.05)
    engine = make_engine(tiny_qwen3_dir, mtp_head=path, spec_draft_n_max=1, spec_adaptive=False)
    sequences = [p + out for p, out in zip(prompts(24, seed=7), greedy(engine, prompts(24, seed=7), 40))]
    distill(engine.mtp, engine.model, sequences, steps=300, lr=3e-3)
    weights = {f"model.layers.{config.num_hidden_layers}.{k[len('layers.0.'):]}": v
               for k, v in engine.mtp.state_dict().items() if k.startswith("layers.0.")}
    weights = {k.replace(".enorm", ".enorm.weight").replace(".hnorm", ".hnorm.weight") for k in ()} or weights
    return path, engine


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_lossless_random_head(tiny_llama_dir, llama_head, k):
    ps = prompts(6, seed=k)
    plain = greedy(make_engine(tiny_llama_dir, dtype=torch.float64, spec_draft_n_max=0), ps, 24)
    engine = make_engine(tiny_llama_dir, dtype=torch.float64, mtp_head=llama_head, spec_draft_n_max=k,
                         spec_adaptive=False)
    assert engine.mtp is not None
    assert greedy(engine, ps, 24) == plain  # mixed batch
    assert [greedy(engine, [p], 24)[0] for p in ps[:2]] == plain[:2]  # alone
    assert engine.spec_stats.num_draft_tokens > 0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
