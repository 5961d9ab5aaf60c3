"""CUDA graphs on a GPU (skipped without one): greedy output with graphs replayed equals the CPU's
in float64, with and without MTP drafts, and the graphs were what ran."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy, make_engine
from mtp_helpers import save_distilled_head

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[3, 17, 5, 9, 11, 2, 8, 30, 4], [7, 7, 1, 40, 12], [5, 8, 13, 21, 34, 55, 1], [9, 2]]


@pytest.mark.parametrize("num_drafts", [0, 3])
def test_graphs_greedy_equals_cpu_float64(tiny_llama_dir, tmp_path, num_drafts):
    head = None
    if num_drafts:
        head, _ = save_distilled_head(tmp_path / "head", tiny_llama_dir, PROMPTS, steps=30)
    options = dict(mtp_head=head, spec_draft_n_max=num_drafts, spec_adaptive=False)
    cpu = make_engine(tiny_llama_dir, dtype=torch.float64, device="cpu", **options)
    gpu = make_engine(tiny_llama_dir, dtype=torch.float32, device="cuda", **options)
    assert gpu.runner.graphs is not None
    want = greedy(cpu, PROMPTS, 24)
    got = greedy(gpu, PROMPTS, 24)
    assert got == want
    assert gpu.runner.graphs.num_replays > 0
    if num_drafts:
        assert gpu.spec_stats.num_accepted_tokens > 0  # the verify buckets ran with real drafts


def test_enforce_eager_captures_nothing(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, dtype=torch.float32, device="cuda", enforce_eager=True)
    assert engine.runner.graphs is None
