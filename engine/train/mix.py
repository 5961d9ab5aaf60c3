"""The records a ``train-head`` run learns from and is evaluated on: a mix of prompt sources, each
answered by the base model itself.

- ``builtin``: prompts built from Python's own text (``prompts.py``), answered by ``data.py``; its
  held-out split is an evaluation set.
- ``magpie``: conversations the model writes itself (``magpie.py``); one in 16, by a hash of the
  first user turn, is held out for evaluation.

``--prompt-mix`` gives each source's share of ``--train-answers``. A source can give no more than it
has: the built-in set holds about 2,300 training prompts under the default ``--train-per-kind``.
"""

from __future__ import annotations

import logging
import math
import os

from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.train.data import generate_sequences
from mtpserve.engine.train.heldout import heldout_lines, write_heldout
from mtpserve.engine.train.magpie import MagpieConfig, MagpieGenerator, split_of
from mtpserve.engine.train.prompts import KINDS, prompt_set

logger = logging.getLogger("mtpserve.train")
SOURCES = ("builtin", "magpie")


def parse_mix(text: str) -> dict[str, float]:
    """"builtin=0.25,magpie=0.75" -> shares that sum to 1."""
    mix = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, share = item.partition("=")
        if name not in SOURCES or not sep:
            raise MtpserveError(f"--prompt-mix: expected SOURCE=SHARE with SOURCE in "
                                f"{', '.join(SOURCES)}, got {item!r}")
        try:
            value = float(share)
        except ValueError:
            raise MtpserveError(f"--prompt-mix: {item!r}: the share must be a number") from None
        if not math.isfinite(value) or value < 0:
            raise MtpserveError(f"--prompt-mix: {item!r}: the share must be >= 0")
        mix[name] = value
    total = sum(mix.values())
    if total <= 0:
        raise MtpserveError("--prompt-mix: at least one source needs a positive share")
    return {name: share / total for name, share in mix.items() if share > 0}


def source_counts(mix: dict[str, float], total: int) -> dict[str, int]:
    """Answers wanted from each source: ``total`` split by the shares (rounded down, the rest to
    the largest share)."""
    counts = {name: int(share * total) for name, share in mix.items()}
    largest = max(mix, key=mix.get)
    counts[largest] += total - sum(counts.values())
    return counts


def builtin_train_prompts(per_kind: dict, count: int) -> list:
    """Up to ``count`` built-in training prompts, kinds taking turns (each capped by
    ``per_kind``, None: all of that kind)."""
    groups = [prompt_set("train", [kind], per_kind.get(kind)) for kind in KINDS]
    out = []
    turn = 0
    while len(out) < count and any(turn < len(g) for g in groups):
        out += [g[turn] for g in groups if turn < len(g)]
        turn += 1
    if len(out) < count:
        logger.warning("the built-in prompt set gives %d training prompts, not %d",
                       len(out), count)
    return out[:count]


def magpie_records(engine, folder: str, count: int, eval_count: int, seed: int,
                   cfg: MagpieConfig | None = None,
                   skip: int = 0) -> tuple[list[dict], list[dict], dict]:
    """``count`` training and up to ``eval_count`` held-out Magpie records, and the manifest.
    The first ``skip`` stored records are passed over: a later stage can learn from, and be
    judged on, conversations an earlier stage never saw."""
    cfg = cfg or MagpieConfig(seed=seed)
    generator = MagpieGenerator(engine, folder, cfg)
    wanted = math.ceil(count * 16 / 15) + 4  # one in 16 is held out
    records = generator.generate(skip + wanted)[skip:]
    train = [r for r in records if split_of(r) == "train"][:count]
    evals = [r for r in records if split_of(r) == "eval"][:eval_count]
    return train, evals, generator.store.manifest


def recipe_records(engine, cfg) -> tuple[list[dict], dict[str, list[dict]], dict]:
    """(training records, held-out records per source, what the sources gave) for the
    ``TrainConfig`` ``cfg``."""
    folder = os.path.join(cfg.out, "data")
    os.makedirs(folder, exist_ok=True)
    counts = source_counts(cfg.prompt_mix, cfg.train_answers)
    train = []
    evals = {}
    info = {"wanted": counts}
    eval_prompts = []
    if "builtin" in counts:
        prompts = builtin_train_prompts(cfg.train_per_kind, counts["builtin"])
        train += generate_sequences(engine, prompts, os.path.join(folder, "train.jsonl"),
                                    desc="answer built-in prompts")
        eval_prompts = prompt_set("eval", KINDS, cfg.eval_per_kind)
        evals["builtin"] = generate_sequences(engine, eval_prompts,
                                              os.path.join(folder, "eval.jsonl"),
                                              desc="answer built-in eval prompts")
    magpie_cfg = MagpieConfig(seed=cfg.seed)
    if "magpie" in counts:
        records, held_out, manifest = magpie_records(
            engine, os.path.join(folder, "magpie"), counts["magpie"], cfg.eval_magpie, cfg.seed,
            magpie_cfg, cfg.magpie_skip)
        train += records
        evals["magpie"] = held_out
        info["magpie_manifest"] = manifest
    lines = heldout_lines(eval_prompts, evals.get("magpie", []), engine.tokenizer,
                          magpie_cfg.max_answer_tokens)
    write_heldout(folder, lines)
    info["train"] = {name: sum(r.get("source", "builtin") == name for r in train)
                     for name in counts}
    info["eval"] = {name: len(records) for name, records in evals.items()}
    return train, evals, info
