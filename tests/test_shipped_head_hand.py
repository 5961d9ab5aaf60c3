"""The shipped SmolLM2 head on the committed hand-written prompts (bench/prompts/eval_hand.jsonl, never used for
training): more than 1.5 tokens per verify step on the first few prompts of each kind (greedy, 3 drafts fixed,
96 tokens, float32)."""

from __future__ import annotations

import os

import pytest
import torch

from mtpserve.bench.workload import read_prompts_file
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader.mtp_head import default_head_path
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.spec.stats import SpecStats

HAND_PROMPTS = os.path.join(os.path.dirname(__file__), "..", "bench", "prompts", "eval_hand.jsonl")
PER_KIND = 3
MIN_TOKENS_PER_STEP = 1.5


@pytest.fixture(scope="module")
def per_kind_stats(smollm2_checkpoint) -> dict[str, SpecStats]:
    prompts = read_prompts_file(HAND_PROMPTS)
    chosen = []
    for kind in sorted({p.kind for p in prompts}):
        chosen += [p for p in prompts if p.kind == kind][:PER_KIND]
    engine = LLMEngine(smollm2_checkpoint, EngineConfig(mtp_head=default_head_path(), spec_draft_n_max=3,
                                                        spec_adaptive=False, dtype=torch.float32,
                                                        kv_cache_memory_bytes=64 * 2**20))
    ids = [p.token_ids(engine.tokenizer) for p in chosen]
    reqs = engine.generate(ids, SamplingParams(temperature=0, max_tokens=96))
    stats: dict[str, SpecStats] = {}
    for p, req in zip(chosen, reqs):
        stats.setdefault(p.kind, SpecStats()).merge(req.spec_stats)
    return stats


def test_every_kind_is_present(per_kind_stats):
    assert set(per_kind_stats) == {"code", "chat", "math", "json", "rewrite"}


@pytest.mark.parametrize("kind", ["code", "chat", "math", "json", "rewrite"])
def test_shipped_head_drafts_well_on_hand_written_prompts(per_kind_stats, kind):
    stats = per_kind_stats[kind]
    assert stats.num_drafts > 0
    assert stats.mean_acceptance_length > MIN_TOKENS_PER_STEP, stats.to_dict()
