"""Training data for an MTP head: prompts answered by the base model itself through our engine
(batched).

One JSON object per line: ``{"kind", "prompt_ids", "output_ids"}``. Generation appends to the file
as requests finish, and a rerun skips the prompts already answered, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from tqdm import tqdm

from mtpserve.engine.sampling_params import SamplingParams

logger = logging.getLogger("mtpserve.train")


def read_sequences(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by an interrupted run
                    break
    return out


def generate_sequences(engine, prompts, path: str, temperature: float = 0.0, seed: int = 0,
                       desc: str = "generate") -> list[dict]:
    """Answer ``prompts`` (engine.train.prompts.Prompt) with ``engine``, appending to ``path``;
    returns every sequence of the file in prompt order. Prompts too long for the model's context are
    left out."""
    tok = engine.tokenizer
    encoded = []
    for p in prompts:
        text = tok.apply_chat_template(p.messages)
        encoded.append((p, tok.encode(text, add_special_tokens=False)))
    fitting = [(p, ids) for p, ids in encoded if len(ids) + 8 <= engine.max_model_len]
    if len(fitting) < len(encoded):
        logger.warning("%s: %d of %d prompts do not fit the context of %d tokens and are left out",
                       desc, len(encoded) - len(fitting), len(encoded), engine.max_model_len)
    done = read_sequences(path)[:len(fitting)]
    with open(path, "w", encoding="utf-8") as f:  # rewrite what was read, dropping a line cut short
        for d in done:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
        progress = tqdm(total=len(fitting), initial=len(done), desc=desc, unit="seq",
                        file=sys.stderr, dynamic_ncols=True)
        pending = {}
        finished = {}
        next_write = len(done)
        for i, (prompt, ids) in list(enumerate(fitting))[len(done):]:
            request_seed = seed + i if temperature > 0 else None
            max_tokens = min(prompt.max_tokens, engine.max_model_len - len(ids))
            params = SamplingParams(temperature=temperature, seed=request_seed,
                                    max_tokens=max_tokens)
            req = engine.add_request(f"data-{i}", ids, params)
            pending[req.request_id] = (i, prompt, req)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished:
                    continue
                i, prompt, req = pending.pop(out.request_id)
                finished[i] = {"kind": prompt.kind, "prompt_ids": req.prompt_token_ids,
                               "output_ids": req.output_token_ids}
                # keep the file in prompt order, so a rerun can skip a prefix
                while next_write in finished:
                    f.write(json.dumps(finished.pop(next_write), ensure_ascii=False) + "\n")
                    f.flush()
                    next_write += 1
                progress.update(1)
        progress.close()
    return read_sequences(path)
