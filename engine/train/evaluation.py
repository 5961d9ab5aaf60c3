"""Held-out evaluation of a head during training, teacher-forced over the base model's answers:
greedy acceptance (tokens per verify step and per draft position), and against the base model's
distribution the KL and the expected acceptance of a sampled draft (``soft_targets.py``)."""

from __future__ import annotations

import torch

from mtpserve.engine.train.distill import chain_logits, greedy_acceptance
from mtpserve.engine.train.soft_targets import SAMPLED_TEMPERATURE, Teacher, distribution_sums


@torch.no_grad()
def eval_sums(mtp, batches: list[dict], teacher: Teacher, depth: int) -> dict:
    """Sums over the response rows of ``batches`` (combine them across sets, then ``metrics``)."""
    sums = {"rows": 0, "length": 0.0, "position": [0.0] * depth, "kl": [0.0] * depth,
            "sampled": [0.0] * depth, "depth_rows": [0] * depth}
    for batch in batches:
        student = chain_logits(mtp, batch, depth)
        length, per_position = greedy_acceptance(student, batch)
        n = int(batch["counted"][0].sum())
        sums["rows"] += n
        sums["length"] += length * n
        dist = distribution_sums(student, teacher, batch)
        for s in range(depth):
            sums["position"][s] += per_position[s] * n
            sums["kl"][s] += dist["kl"][s]
            sums["sampled"][s] += dist["sampled"][s]
            sums["depth_rows"][s] += dist["rows"][s]
    return sums


def combine(parts: list[dict]) -> dict:
    """The sums of several sets added up."""
    out = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, list):
                before = out.get(key, [0] * len(value))
                out[key] = [a + b for a, b in zip(before, value)]
            else:
                out[key] = out.get(key, 0) + value
    return out


def metrics(sums: dict) -> dict:
    rows = max(1, sums["rows"])
    kl = []
    sampled = []
    for s, n in enumerate(sums["depth_rows"]):
        kl.append(sums["kl"][s] / max(1, n))
        sampled.append(sums["sampled"][s] / max(1, n))
    length = 1.0
    if sums["rows"]:
        length = sums["length"] / rows
    return {"mean_acceptance_length": length,
            "acceptance_per_position": [p / rows for p in sums["position"]],
            "kl_per_position": kl,
            f"sampled_acceptance_per_position_t{SAMPLED_TEMPERATURE:g}": sampled}


def evaluate(mtp, eval_batches: dict[str, list[dict]], teacher: Teacher, depth: int) -> dict:
    """Metrics over every held-out set together, and per set under "by_source"."""
    was = [p.requires_grad for p in mtp.parameters()]
    parts = {name: eval_sums(mtp, batches, teacher, depth)
             for name, batches in eval_batches.items()}
    for p, w in zip(mtp.parameters(), was):
        p.requires_grad_(w)
    out = metrics(combine(list(parts.values())))
    out["by_source"] = {name: metrics(part) for name, part in parts.items()}
    return out
