"""The ``acceptance`` section of ``mtpserve bench``: every prompt decoded in one batch with
``max(--k)`` drafts a step, fixed, at each temperature; tokens per verify step and acceptance per
draft position, per prompt kind and over all prompts. Counts only, no timing: a busy machine gives
the same numbers, and a whole prompt set takes minutes, which is what comparing heads needs (the
decode section times each prompt alone, every mode in turn)."""

from __future__ import annotations

from mtpserve.bench.engine_runs import fixed, prompt_params
from mtpserve.bench.stats import acceptance_of
from mtpserve.engine.spec.stats import SpecStats


def measure(runs, prompts, k: int, temperatures: list[float], seed: int | None,
            ignore_eos: bool) -> dict:
    """{temperature: {"k", "by_kind": {kind: acceptance}, "all": acceptance}}."""
    ids = [p.token_ids(runs.engine.tokenizer) for p in prompts]
    out = {}
    for t in temperatures:
        params = [prompt_params(p, i, t, seed, ignore_eos) for i, p in enumerate(prompts)]
        reqs, _ = runs.run(ids, params, fixed(k))
        by_kind: dict[str, SpecStats] = {}
        merged = SpecStats()
        for p, req in zip(prompts, reqs):
            by_kind.setdefault(p.kind, SpecStats()).merge(req.spec_stats)
            merged.merge(req.spec_stats)
        out[f"{t:g}"] = {"k": k,
                         "by_kind": {kind: acceptance_of(s) for kind, s in by_kind.items()},
                         "all": acceptance_of(merged)}
    return out
