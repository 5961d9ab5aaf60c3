"""The verify-cost curve: what one main-model step of one request costs over 1, 2, ..., k + 1 query
rows (the last verified token and up to k drafts) at a context of about a hundred tokens, over what
a one-row step (plain decode) costs. Drafting pays only where the tokens accepted per step outgrow
this ratio (and the draft steps' own cost).

Timed as the engine's step-cost calibration (engine/spec/calibrate.py) times a verify step: the
main model's forward over the rows through the runner's paged KV cache and attention, then, for
the step column, the logits of every row; the fastest of a few calls per measurement. Here the
request's prompt is prefilled first (real text, on blocks taken from the engine's KV cache and
given back at the end), and the row counts take turns within every repeat so that drift hits all.
"""

from __future__ import annotations

import torch

from mtpserve.bench.stats import mean_std
from mtpserve.bench.workload import long_prompt_ids
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.spec.calibrate import REPEATS, best_time
from mtpserve.kernels.attention import build_metadata

CONTEXT = 100  # prompt tokens prefilled before the timed steps
REQUEST_ID = "bench-verify-cost"


def forward(runner, ids: torch.Tensor, table: list[int], start: int):
    """The main model over ``ids`` at positions ``start`` on, for the request of ``table``."""
    meta, positions = build_metadata([table], [start], [len(ids)], runner.block_size,
                                     runner.device)
    runner.attn.prepare(meta)
    return runner.model(ids, positions, runner.kv_caches, runner.attn)


def time_rows(runner, table: list[int], context: int, rows: int) -> tuple[float, float]:
    """Seconds of a forward over ``rows`` query rows after ``context`` tokens, and of the same
    with the logits of every row."""
    ids = torch.zeros(rows, dtype=torch.long, device=runner.device)
    model = runner.model

    def step():
        model.compute_logits(forward(runner, ids, table, context))

    forward_s = best_time(lambda: forward(runner, ids, table, context), runner.device)
    return forward_s, best_time(step, runner.device)


def prefill(engine, context: int, k_max: int) -> list[int]:
    """Blocks of the engine's KV cache for ``context + k_max + 1`` tokens, the first ``context``
    holding a prompt of real text; their block table."""
    if not engine.kv.allocate_slots(REQUEST_ID, context + k_max + 1):
        raise MtpserveError("the KV cache has no room for the verify-cost request")
    table = engine.kv.block_tables[REQUEST_ID]
    ids = long_prompt_ids(engine.tokenizer, context)
    forward(engine.runner, torch.tensor(ids, device=engine.runner.device), table, 0)
    return table


def ratio_rows(times: dict[int, list[tuple[float, float]]]) -> list[dict]:
    """Per row count: ms of the forward and of the step (with logits), and each over its one-row
    time, per repeat."""
    base = times[1]
    out = []
    for rows, runs in times.items():
        forward_ms = [f * 1000 for f, _ in runs]
        step_ms = [s * 1000 for _, s in runs]
        out.append({
            "rows": rows,
            "forward_ms": mean_std(forward_ms),
            "step_ms": mean_std(step_ms),
            "forward_ratio": mean_std([f / b[0] for (f, _), b in zip(runs, base)]),
            "step_ratio": mean_std([s / b[1] for (_, s), b in zip(runs, base)]),
        })
    return out


@torch.inference_mode()
def measure(engine, k_max: int, repeats: int, progress=None) -> dict:
    """The curve for 1 to ``k_max + 1`` rows, ``repeats`` times (progress: one update a repeat)."""
    context = min(CONTEXT, engine.max_model_len - k_max - 1)
    times = {rows: [] for rows in range(1, k_max + 2)}
    table = prefill(engine, context, k_max)
    try:
        for _ in range(repeats):
            for rows, runs in times.items():
                runs.append(time_rows(engine.runner, table, context, rows))
            if progress is not None:
                progress.update()
    finally:
        engine.kv.free(REQUEST_ID)
    return {"context": context, "k_max": k_max, "best_of": REPEATS, "rows": ratio_rows(times)}
