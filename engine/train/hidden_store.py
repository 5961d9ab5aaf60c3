"""The base model's hidden states over a run's records, kept in ``data/hidden-<set>.pt`` by record.

Each record's states are stored under a digest of its token ids, so a rerun over the same records
(a resumed run, or another head trained on a copy of ``data/``) computes nothing, and a run over
more records (more answers generated into the same ``data/``) computes only the new ones. The file
is rewritten every few minutes while states are computed, so an interrupted run keeps them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time

import torch
from tqdm import tqdm

SAVE_EVERY_S = 300.0

logger = logging.getLogger("mtpserve.train")


def record_key(record: dict) -> str:
    """A digest of what a record's hidden states are computed over: its token ids."""
    ids = (record["prompt_ids"], record["output_ids"])
    return hashlib.sha256(repr(ids).encode()).hexdigest()


def model_key(model, precision: str) -> str:
    """What a store's states were computed with: the base model and the arithmetic (precision.py).
    The model is named by a digest of its norm weights, which differ between checkpoints of one
    shape (a base model and its instruct tune), and are small enough to hash at every start."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if "norm" in name:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return f"{digest.hexdigest()[:16]}:{precision}"


class HiddenStore:
    """The saved states of one set. ``key`` (``model_key()``) names the base model and the
    precision; states saved under another key are not used, so a resumed run never mixes states
    of two models or two precisions."""

    def __init__(self, path: str, key: str, device):
        self.path = path
        self.model_key = key
        self.by_record: dict[str, torch.Tensor] = {}
        if os.path.isfile(path):
            saved = torch.load(path, map_location=device)
            if saved.get("model") == key:
                self.by_record = saved["by_record"]
            else:
                logger.warning("%s holds states of another model or precision (%s, not %s); "
                               "computing them again", path, saved.get("model"), key)

    def save(self) -> None:
        tmp = self.path + ".tmp"
        torch.save({"model": self.model_key, "by_record": self.by_record}, tmp)
        os.replace(tmp, self.path)

    def states(self, records: list[dict], compute, desc: str) -> list[torch.Tensor]:
        """The states of every record (float16), computing the missing ones with
        ``compute(record)``."""
        keys = [record_key(r) for r in records]
        missing = []
        for i, key in enumerate(keys):
            if key not in self.by_record:
                missing.append(i)
        last_save = time.time()
        for i in tqdm(missing, desc=desc, unit="seq", file=sys.stderr, dynamic_ncols=True):
            self.by_record[keys[i]] = compute(records[i]).to(torch.float16)
            if time.time() - last_save > SAVE_EVERY_S:
                self.save()
                last_save = time.time()
        if missing:
            self.save()
        return [self.by_record[key] for key in keys]
