"""Helpers for tests that drive the engine's model directly through the paged cache."""

from __future__ import annotations

import torch

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.request import Request
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.scheduler import ScheduledRequest, SchedulerOutput


def make_engine(path: str, **config) -> LLMEngine:
    config.setdefault("block_size", 4)
    config.setdefault("num_blocks", 256)
    return LLMEngine(load_checkpoint(path), EngineConfig(**config))


def new_request(engine: LLMEngine, prompt: list[int], request_id: str = "r") -> Request:
    return Request(request_id, list(prompt), SamplingParams(temperature=0))


@torch.inference_mode()
def compute(engine: LLMEngine, reqs_and_counts: list[tuple[Request, int]]) -> list[torch.Tensor]:
    """Run the next ``n`` tokens of each request through the model in one step (one batch); return,
    per request, the logits of every computed position [n, vocab]."""
    out = SchedulerOutput([ScheduledRequest(r, n) for r, n in reqs_and_counts])
    for r, n in reqs_and_counts:
        assert engine.kv.allocate_slots(r.request_id, r.num_computed_tokens + n)
    batch = engine.runner.prepare(out)
    engine.runner.attn.prepare(batch.attn)
    hidden = engine.model(batch.input_ids, batch.positions, engine.runner.kv_caches, engine.runner.attn)
    logits = engine.model.compute_logits(hidden)
    result, start = [], 0
    for r, n in reqs_and_counts:
        r.num_computed_tokens += n
        result.append(logits[start:start + n])
        start += n
    return result


def greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    reqs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [r.output_token_ids for r in reqs]


def price_drafting_cheaply(engine: LLMEngine) -> None:
    """Give the adaptive policy step costs under which drafting pays (a verify round costs little more than a
    plain step, a draft step a tenth of one) and pin its fit to them, so that a test of adaptive drafting does
    not depend on how loaded the machine was when the engine measured itself."""
    from mtpserve.engine.spec.policy import StepCosts

    engine.policy.costs = StepCosts(main={(1, 1): 1.0, (1, 8): 1.2, (64, 1): 8.0, (64, 8): 12.0},
                                    draft={1: 0.1, 64: 0.8})
    engine.policy.fit.scale = lambda batch_size: 1.0
