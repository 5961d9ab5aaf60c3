"""The same model and prompts through HF transformers ``generate`` (greedy, no repetition penalty),
alternating run by run with our engine without speculation: single-stream decode tok/s and prompt
tok/s."""

from __future__ import annotations

import os
import time

import torch

from mtpserve.bench.engine_runs import OFF
from mtpserve.bench.stats import side_by_side
from mtpserve.bench.workload import long_prompt_ids
from mtpserve.engine.loader.gguf import default_gguf_path
from mtpserve.engine.sampling_params import SamplingParams


def load_hf(model: str, dtype: torch.dtype, device: str):
    """transformers' own load of ``model``
    (a GGUF file through ``gguf_file=``, or an HF directory)."""
    # optional (the bench extra): only the "hf" section needs it
    from transformers import AutoModelForCausalLM

    if model == "default":
        model = default_gguf_path()
    path = os.path.expanduser(model)
    if path.lower().endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path) or ".",
                                                  gguf_file=os.path.basename(path), dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return hf.to(device).eval()


@torch.inference_mode()
def generate_seconds(hf, ids: list[int], n: int) -> float:
    x = torch.tensor([ids], device=hf.device)
    start = time.perf_counter()
    hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, repetition_penalty=1.0)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(runs, hf, prompts, lengths: list[int], repeats: int) -> dict:
    """Decode tok/s over every prompt's ``max_tokens`` (EOS ignored on both sides; transformers'
    decode time is time(n tokens) - time(1 token)), and prompt tok/s per length (time of the first
    token)."""
    tok = runs.engine.tokenizer
    ours_dec = []
    hf_dec = []
    ours_pp = {n: [] for n in lengths}
    hf_pp = {n: [] for n in lengths}
    long_ids = {n: long_prompt_ids(tok, n) for n in lengths}
    generate_seconds(hf, prompts[0].token_ids(tok), 2)  # warm up
    for _ in range(repeats):
        ours_tokens = 0.0
        ours_seconds = 0.0
        hf_tokens = 0.0
        hf_seconds = 0.0
        for p in prompts:
            ids = p.token_ids(tok)
            n = max(p.max_tokens, 2)
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            (req,), _ = runs.run([ids], [params], OFF)
            ours_tokens += n - 1
            ours_seconds += req.timings()["decode_ms"] / 1000
            hf_tokens += n - 1
            hf_seconds += generate_seconds(hf, ids, n) - generate_seconds(hf, ids, 1)
            runs.progress.update()
        ours_dec.append(ours_tokens / ours_seconds)
        hf_dec.append(hf_tokens / hf_seconds)
        for n, ids in long_ids.items():
            ours_pp[n].append(runs.prompt_tok_s(ids))
            hf_pp[n].append(n / generate_seconds(hf, ids, 1))
            runs.progress.update()
    prompt_rows = []
    for n in lengths:
        prompt_rows.append({"prompt_tokens": n,
                            **side_by_side(ours_pp[n], hf_pp[n], "transformers")})
    return {
        "decode_tok_s": side_by_side(ours_dec, hf_dec, "transformers"),
        "prompt_tok_s": prompt_rows,
    }
