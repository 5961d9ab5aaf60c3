"""The base model's hidden states over a run's records, kept in ``data/hidden-<set>.pt`` by record.

Each record's states are stored under a digest of its token ids, so a rerun over the same records
(a resumed run, or another head trained on a copy of ``data/``) computes nothing, and a run over
more records (more answers generated into the same ``data/``) computes only the new ones. The file
is rewritten every few minutes while states are computed, so an interrupted run keeps them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import torch
from tqdm import tqdm

SAVE_EVERY_S = 300.0


def record_key(record: dict) -> str:
    """A digest of what a record's hidden states are computed over: its token ids."""
    ids = (record["prompt_ids"], record["output_ids"])
    return hashlib.sha256(repr(ids).encode()).hexdigest()


class HiddenStore:
    """The saved states of one set. ``model_key`` names the base model; states saved for another
    model are not used."""

    def __init__(self, path: str, model_key: str, device):
        self.path = path
        self.model_key = model_key
        self.by_record: dict[str, torch.Tensor] = {}
        if os.path.isfile(path):
            saved = torch.load(path, map_location=device)
            if saved.get("model") == model_key:
                self.by_record = saved["by_record"]

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
