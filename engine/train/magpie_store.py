"""Where Magpie conversations are kept (``magpie.py``): one gzip JSONL chunk of token ids per
finished round and ``manifest.json`` listing the chunks in round order with their filter
statistics, token counts and wall time. A chunk is written before the manifest names it, both
atomically, so an interrupted run loses at most the rounds in flight."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter

from mtpserve.engine.errors import MtpserveError

MANIFEST = "manifest.json"


class MagpieStore:
    """The chunks and manifest of one generation directory."""

    def __init__(self, path: str, settings: dict):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.manifest = {"format": "mtpserve-magpie", "settings": settings, "chunks": []}
        file = os.path.join(path, MANIFEST)
        if not os.path.isfile(file):
            _refuse_nested(path)
            return
        with open(file, encoding="utf-8") as f:
            stored = json.load(f)
        if stored.get("settings") != settings:
            raise MtpserveError(f"{path} holds Magpie data made with other settings "
                                f"({stored.get('settings')}): pick another --out")
        self.manifest = stored

    @property
    def num_rounds(self) -> int:
        return len(self.manifest["chunks"])

    def records(self) -> list[dict]:
        out = []
        for chunk in self.manifest["chunks"]:
            with gzip.open(os.path.join(self.path, chunk["file"]), "rt", encoding="utf-8") as f:
                out += [json.loads(line) for line in f if line.strip()]
        return out

    def append(self, records: list[dict], info: dict) -> None:
        """Write the next round's chunk, then list it in the manifest."""
        name = f"chunk-{self.num_rounds:05d}.jsonl.gz"
        tmp = os.path.join(self.path, name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
        os.replace(tmp, os.path.join(self.path, name))
        self.manifest["chunks"].append({"file": name, "records": len(records), **info})
        file = os.path.join(self.path, MANIFEST)
        with open(file + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.manifest, f, indent=1)
        os.replace(file + ".tmp", file)


def _refuse_nested(path: str) -> None:
    """A store copied one folder too deep (``cp -r stored path`` where ``path`` already existed)
    would be passed over and every conversation generated again, hours on a CPU: refuse it."""
    for name in sorted(os.listdir(path)):
        if os.path.isfile(os.path.join(path, name, MANIFEST)):
            raise MtpserveError(f"{path} has no {MANIFEST} but {os.path.join(path, name)} has: move "
                                f"that folder's files up into {path} to use the stored conversations")


def summary(manifest: dict) -> dict:
    """Totals over the chunks of a manifest: records, tokens, seconds, filter statistics."""
    totals = Counter()
    first = Counter()
    follow = Counter()
    for chunk in manifest["chunks"]:
        for key in ("records", "user_tokens", "answer_tokens", "seconds"):
            totals[key] += chunk.get(key, 0)
        first.update(chunk.get("filter", {}))
        follow.update(chunk.get("follow_up_filter", {}))
    seconds = totals["seconds"]
    tokens = totals["user_tokens"] + totals["answer_tokens"]
    rate = None
    if seconds:
        rate = round(tokens / seconds, 1)
    return {"rounds": len(manifest["chunks"]), **totals, "generated_tokens_per_second": rate,
            "filter": dict(first), "follow_up_filter": dict(follow)}
