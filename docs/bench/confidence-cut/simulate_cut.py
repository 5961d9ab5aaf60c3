"""Replays recorded drafts (record_confidence.py) under a confidence cut: a chain keeps draft j while the product
of the head's confidences in drafts 1..j stays at or above p_min. Prints tokens per step and a modelled speed-up
over plain decoding for each draft limit and p_min, per group of prompt kinds.

    python docs/bench/confidence-cut/simulate_cut.py RECORDS.json

The step cost model is in ms, from this machine's profile of one stream: a plain step P, each verified row beyond
the first as ROW_EXTRA says, the MTP pass and first draft F, each later draft step STEP. It only ranks settings;
the bench measures them.
"""
import json
import sys

P, F, STEP = 4.5, 0.45, 0.12
ROW_EXTRA = {1: 0.0, 2: 0.3, 3: 0.75, 4: 1.3, 5: 1.8, 6: 2.3}


def cost(num_verified: int, draft_steps: int) -> float:
    drafting = 0.0
    if draft_steps:
        drafting = F + STEP * (draft_steps - 1)
    return P + ROW_EXTRA[num_verified + 1] + drafting


def replay(records, n_max: int, p_min: float) -> tuple[float, float]:
    tokens, ms = 0, 0.0
    for _, confidences, accepted in records:
        chain, kept = 1.0, 0
        for c in confidences[:n_max]:
            chain *= c
            if chain < p_min:
                break
            kept += 1
        tokens += 1 + min(accepted, kept)
        ms += cost(kept, min(kept + 1, n_max) if kept else 1)
    return tokens / len(records), tokens / ms * P


records = json.load(open(sys.argv[1]))
width = max(len(r[1]) for r in records)
records = [r for r in records if len(r[1]) == width]
kinds = sorted({r[0] for r in records})
groups = {"code": [k for k in kinds if "code" in k], "chat": [k for k in kinds if "chat" in k or "rewrite" in k],
          "all": kinds}
for name, members in groups.items():
    rows = [r for r in records if r[0] in members]
    print(f"{name} ({len(rows)} steps)")
    for n_max in range(3, width + 1):
        cells = []
        for p_min in (0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4):
            tokens, speedup = replay(rows, n_max, p_min)
            cells.append(f"{p_min}: {tokens:.2f} tok/step {speedup:.2f}x")
        print(f"  k<={n_max}  " + " | ".join(cells))
