"""Decode speed at fixed batch sizes and its ratio to the memory-bandwidth (HBM) bound.

A decode step reads every weight once (the embedding table aside: only the batch's rows) and each
request's KV cache, so no engine can decode faster than ``batch / ((weight bytes + KV bytes read) /
bandwidth)`` tokens per second. The ratio to that bound says how much of the device a step uses.

Also a command of its own, for a bare GPU machine (no server packages needed)::

    python -m mtpserve.bench.decode_speed --random-weights llama-8b --batch-sizes 1,8,64
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.runner import kv_bytes_per_block
from mtpserve.engine.sampling_params import SamplingParams

# nominal memory bandwidth in bytes/s by a part of torch.cuda.get_device_name (first match wins)
NOMINAL_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "RTX 4090": 1.008e12,
}
WARMUP_STEPS = 3
PROMPT_LEN = 128  # tokens of each request's random prompt
STEPS = 32  # timed decode steps per batch size
BATCH_SIZES = [1, 8, 64]
PREFILL_BUDGET = 2048  # max_num_batched_tokens of the engines built here


def nominal_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, bandwidth in NOMINAL_BANDWIDTH.items():
        if part in name:
            return bandwidth
    return None


def copy_bandwidth(device: torch.device, size: int = 2**30, repeats: int = 5) -> float | None:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    if device.type != "cuda":
        return None
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * size * repeats / (time.perf_counter() - start)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the weights: all of them but the embedding table."""
    total = 0
    for name, param in model.named_parameters():
        if name == "embed_tokens":
            continue
        total += param.numel() * param.element_size()
    return total


def kv_bytes_per_token(engine: LLMEngine) -> int:
    mc = engine.model_config
    num_layers = 0
    for i in range(mc.num_hidden_layers):
        num_layers += mc.has_kv(i)
    return kv_bytes_per_block(num_layers, 1, mc.num_key_value_heads, mc.head_dim,
                              engine.config.dtype)


def engine_config(batch_sizes: list[int], prompt_len: int, steps: int, **options) -> EngineConfig:
    """An engine sized for ``decode`` runs of these batch sizes: every request in every step, and
    a KV cache that holds them all (``options``: the other EngineConfig fields)."""
    max_batch = max(batch_sizes)
    max_len = prompt_len + max_new_tokens(max_batch, prompt_len, steps) + 1
    blocks_per_request = -(-max_len // options.get("block_size", 16))
    return EngineConfig(max_num_seqs=max_batch, max_num_batched_tokens=PREFILL_BUDGET,
                        num_blocks=max_batch * blocks_per_request + 1, max_model_len=max_len,
                        spec_draft_n_max=0, **options)


def max_new_tokens(batch_size: int, prompt_len: int, steps: int) -> int:
    """Enough for the timed steps after the longest wait for the batch's last prompt."""
    prefill_steps = -(-batch_size * prompt_len // PREFILL_BUDGET)
    return prefill_steps + WARMUP_STEPS + steps + 2


def decode(engine: LLMEngine, batch_size: int, prompt_len: int, steps: int, seed: int = 0) -> dict:
    """Time ``steps`` decode steps of ``batch_size`` requests (random prompts of ``prompt_len``
    tokens, greedy, no MTP) once every prompt is in: tokens per second and what was read."""
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, ignore_eos=True,
                            max_tokens=max_new_tokens(batch_size, prompt_len, steps))
    reqs = []
    for i in range(batch_size):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        reqs.append(engine.add_request(f"decode-{batch_size}-{seed}-{i}", prompt, params, 0))
    while any(not r.output_token_ids and not r.status.finished for r in reqs):
        engine.step()
    for _ in range(WARMUP_STEPS):
        engine.step()
    context_before = sum(r.num_computed_tokens for r in reqs)
    tokens_before = sum(len(r.output_token_ids) for r in reqs)
    synchronize(engine.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    synchronize(engine.device)
    seconds = time.perf_counter() - start
    if any(r.status.finished for r in reqs):  # a failed step (logged) or a context too short
        raise MtpserveError(f"the decode run at batch {batch_size} ended early")
    tokens = sum(len(r.output_token_ids) for r in reqs) - tokens_before
    context_after = sum(r.num_computed_tokens for r in reqs)
    for r in reqs:
        engine.abort_request(r.request_id)
    return {"batch_size": batch_size, "steps": steps, "tokens": tokens, "seconds": seconds,
            "tok_s": tokens / seconds, "step_ms": 1000 * seconds / steps,
            "mean_context_tokens": (context_before + context_after) / 2}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def with_bound(row: dict, weights: int, kv_per_token: int, bandwidth: float | None) -> dict:
    """``row`` plus the bytes a step reads and, with a bandwidth, the bound and the ratio."""
    step_bytes = weights + row["mean_context_tokens"] * kv_per_token
    row = dict(row, step_bytes=step_bytes)
    if bandwidth:
        row["bound_tok_s"] = row["batch_size"] * bandwidth / step_bytes
        row["ratio_to_bound"] = row["tok_s"] / row["bound_tok_s"]
    return row


def measure(engine: LLMEngine, batch_sizes: list[int], prompt_len: int, steps: int) -> dict:
    """Decode rows per batch size against the nominal bandwidth (the measured copy bandwidth where
    the device is not in NOMINAL_BANDWIDTH)."""
    device = engine.device
    nominal = nominal_bandwidth(device)
    copied = copy_bandwidth(device)
    bandwidth = nominal or copied
    weights = weight_bytes(engine.model)
    kv_per_token = kv_bytes_per_token(engine)
    rows = []
    for seed, batch_size in enumerate(batch_sizes):
        row = decode(engine, batch_size, prompt_len, steps, seed)
        rows.append(with_bound(row, weights, kv_per_token, bandwidth))
    device_name = str(device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    return {"device": device_name, "engine": engine.summary(), "weight_bytes": weights,
            "kv_bytes_per_token": kv_per_token, "nominal_bandwidth": nominal,
            "copy_bandwidth": copied, "prompt_len": prompt_len, "rows": rows}


def table(results: dict) -> str:
    """The results as Markdown."""
    bandwidth = results["nominal_bandwidth"] or results["copy_bandwidth"]
    lines = [f"Decode on {results['device']}: {results['engine']}", "",
             f"Weights read per step {results['weight_bytes'] / 1e9:.2f} GB; bandwidth "
             f"{_gbs(results['nominal_bandwidth'])} nominal, {_gbs(results['copy_bandwidth'])} "
             f"measured by a copy; bound at {_gbs(bandwidth)}.", "",
             "| batch | tok/s | step ms | bound tok/s | of bound |", "|---|---|---|---|---|"]
    for row in results["rows"]:
        bound = row.get("bound_tok_s")
        ratio = row.get("ratio_to_bound")
        lines.append(f"| {row['batch_size']} | {row['tok_s']:.1f} | {row['step_ms']:.2f} | "
                     f"{_or_dash(bound, '.1f')} | {_or_dash(ratio, '.0%')} |")
    return "\n".join(lines)


def _gbs(bandwidth: float | None) -> str:
    if bandwidth is None:
        return "unknown"
    return f"{bandwidth / 1e9:.0f} GB/s"


def _or_dash(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def main(argv: list[str] | None = None) -> int:
    """The random-weight decode measurement without the ``mtpserve`` command (and its server
    packages)."""
    from mtpserve.bench.random_model import random_engine

    p = argparse.ArgumentParser(prog="python -m mtpserve.bench.decode_speed")
    p.add_argument("--random-weights", required=True, help="preset (configs/models) or file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--batch-sizes", default=",".join(str(b) for b in BATCH_SIZES))
    p.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    config = engine_config(batch_sizes, args.prompt_len, args.steps, device=args.device,
                           dtype=getattr(torch, args.dtype),
                           attention_backend=args.attention_backend,
                           enforce_eager=args.enforce_eager)
    start = time.perf_counter()
    engine = random_engine(args.random_weights, config)
    print(f"engine built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    results = measure(engine, batch_sizes, args.prompt_len, args.steps)
    results["model"] = args.random_weights
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
