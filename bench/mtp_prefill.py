"""Prompt processing with MTP on vs off, side by side in one process.

With MTP on, prefill also runs the MTP layer over every prompt position (to fill its KV), but computes
logits only for the last one. This measures what that costs: prompt tok/s for a 512-token prompt
with and without the MTP layer, alternating runs.

    python bench/mtp_prefill.py [--model default] [--mtp-head DIR] [--prompt-tokens 512] [--repeats 5]

Without ``--mtp-head`` a randomly initialized head of the right shape is used (prefill cost does not
depend on the head's weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile


from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.train.head_init import save_new_head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--mtp-head", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="docs/bench_mtp_prefill.json")
    args = ap.parse_args()

    checkpoint = load_checkpoint(args.model)
    head = args.mtp_head or save_new_head(tempfile.mkdtemp(), checkpoint.config)
    engines = {"mtp_off": LLMEngine(checkpoint, EngineConfig(spec_draft_n_max=0)),
               "mtp_on": LLMEngine(checkpoint, EngineConfig(mtp_head=head, spec_draft_n_max=3))}
    tok = engines["mtp_off"].tokenizer
    text = " ".join(open(json.__file__.replace("__init__.py", "decoder.py")).read().split())
    ids = tok.encode(text, add_special_tokens=False)[: args.prompt_tokens]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    runs = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            (req,) = engine.generate([ids], params)
            runs[name].append(req.timings()["prompt_tokens_per_second"])
    result = {name: statistics.median(v) for name, v in runs.items()}
    result["ratio"] = result["mtp_on"] / result["mtp_off"]
    result["prompt_tokens"] = len(ids)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({**result, "runs": runs}, f, indent=2)
    print(f"| prompt tok/s ({len(ids)} tokens) | MTP off | MTP on | ratio |\n|---|---|---|---|\n"
          f"| {args.model} | {result['mtp_off']:.0f} | {result['mtp_on']:.0f} | {result['ratio']:.3f} |")


if __name__ == "__main__":
    main()
