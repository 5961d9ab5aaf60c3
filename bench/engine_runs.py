"""Measurements on one engine: prompt processing, single-stream decode and concurrent streams, each
alternating speculation modes run by run so that machine drift hits every mode alike; memory from
the cache geometry.

One engine serves every mode: a request's ``spec_n_max`` picks its draft length (0: no MTP pass at
all, as plain decoding) and the draft policy's ``adaptive`` switch, read every step, picks fixed or
adaptive k.
"""

from __future__ import annotations

import itertools
import resource
import sys
import time
from dataclasses import dataclass

import torch

from mtpserve.bench.stats import acceptance_of, mean_std
from mtpserve.bench.workload import long_prompt_ids
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.runner import kv_bytes_per_block
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.spec.stats import SpecStats


@dataclass(frozen=True)
class Mode:
    name: str
    spec_n_max: int | None  # drafts per step; 0: MTP off; None: the engine's cap
    adaptive: bool = False


OFF = Mode("off", 0)


def twin(engine: LLMEngine) -> LLMEngine:
    """Another engine on ``engine``'s models, config and measured step costs, with its own KV
    cache, scheduler, draft policy and requests: runs side by side with it (the concurrency sweep
    gives each mode one)."""
    return LLMEngine(engine.checkpoint, engine.config, models=engine.models)


def fixed(k: int) -> Mode:
    return Mode(f"k={k}", k)


def adaptive(k_max: int) -> Mode:
    return Mode(f"adaptive (k<={k_max})", None, True)


@dataclass
class DecodeRun:
    mode: str
    repeat: int
    kind: str
    decoded: int  # tokens after the first
    seconds: float  # first token to last
    drafting: SpecStats


def prompt_params(prompt, index: int, temperature: float, seed: int | None,
                  ignore_eos: bool) -> SamplingParams:
    """The sampling of the ``index``-th bench prompt: its max_tokens, seed ``seed + index``
    (None: unseeded)."""
    request_seed = None if seed is None else seed + index
    return SamplingParams(max_tokens=prompt.max_tokens, temperature=temperature,
                          seed=request_seed, ignore_eos=ignore_eos)


def tok_s(runs: list[DecodeRun]) -> float:
    seconds = sum(r.seconds for r in runs)
    return sum(r.decoded for r in runs) / seconds if seconds else 0.0


def merged_acceptance(runs: list[DecodeRun]) -> dict:
    merged = SpecStats()
    for r in runs:
        merged.merge(r.drafting)
    return acceptance_of(merged)


def group_by_kind(runs: list[DecodeRun]) -> dict[str, list[DecodeRun]]:
    groups: dict[str, list[DecodeRun]] = {}
    for r in runs:
        groups.setdefault(r.kind, []).append(r)
    return groups


class EngineRuns:
    def __init__(self, engine, progress):
        self.engine = engine
        self.progress = progress  # .update() after every run
        self._ids = itertools.count()

    def _use(self, mode: Mode) -> None:
        """Switch the engine's draft policy to ``mode`` (fixed or adaptive k)."""
        if mode.spec_n_max != 0 and self.engine.mtp is None:
            raise ValueError(f"mode {mode.name} needs an MTP head")
        if self.engine.mtp is not None:
            self.engine.policy.adaptive = mode.adaptive

    def run(self, prompts: list[list[int]], params: list[SamplingParams], mode: Mode):
        """Run ``prompts`` as one batch to completion; (finished requests, wall seconds)."""
        engine = self.engine
        self._use(mode)
        engine.kv.reset_prefix_cache()  # every run computes its prompts: no hit on an earlier run's
        start = time.perf_counter()
        reqs = []
        for ids, p in zip(prompts, params):
            request_id = f"bench-{next(self._ids)}"
            reqs.append(engine.add_request(request_id, ids, p, spec_n_max=mode.spec_n_max))
        while any(not r.status.finished for r in reqs):
            engine.step()
        wall = time.perf_counter() - start
        self.progress.update()
        return reqs, wall

    def warm_up(self, ids: list[int], modes: list[Mode]) -> None:
        for mode in modes:
            self.run([ids], [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)], mode)

    def prompt_tok_s(self, ids: list[int]) -> float:
        """Prompt tok/s of ``ids`` without speculation, in a request that stops at its first
        token (what the peers' prompt-processing numbers measure)."""
        params = [SamplingParams(max_tokens=1, temperature=0)]
        (req,), _ = self.run([ids], params, OFF)
        return req.timings()["prompt_tokens_per_second"]

    def prompt_processing(self, lengths: list[int], modes: dict[str, Mode],
                          repeats: int) -> list[dict]:
        """Prompt tok/s per length and mode. Two tokens are asked for, so that with MTP on the
        prefill step runs the MTP layer over the prompt and drafts (a request that stops after one
        token skips it)."""
        params = [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)]
        out = []
        for length in lengths:
            ids = long_prompt_ids(self.engine.tokenizer, length)
            runs = {name: [] for name in modes}
            for _ in range(repeats):
                for name, mode in modes.items():
                    (req,), _ = self.run([ids], params, mode)
                    runs[name].append(req.timings()["prompt_tokens_per_second"])
            row = {"prompt_tokens": length}
            for name, speeds in runs.items():
                row[f"{name}_tok_s"] = mean_std(speeds)
            if "mtp_on" in runs:
                row["ratio"] = mean_std([a / b for a, b in zip(runs["mtp_on"], runs["mtp_off"])])
            out.append(row)
        return out

    def decode(self, prompts, modes: list[Mode], temperature: float, repeats: int, seed: int | None,
               ignore_eos: bool) -> list[dict]:
        """Single-stream decode of every prompt in every mode (modes alternate prompt by prompt).
        tok/s of a repeat: its decoded tokens (after the first of each request) over their decode
        time. ``seed``: of the first prompt (None: unseeded requests)."""
        tok = self.engine.tokenizer
        ids = [p.token_ids(tok) for p in prompts]
        runs = []
        for rep in range(repeats):
            for i, (p, prompt_ids) in enumerate(zip(prompts, ids)):
                params = prompt_params(p, i, temperature, seed, ignore_eos)
                for mode in modes:
                    (req,), _ = self.run([prompt_ids], [params], mode)
                    decoded = max(len(req.output_token_ids) - 1, 0)
                    seconds = req.timings()["decode_ms"] / 1000
                    runs.append(DecodeRun(mode.name, rep, p.kind, decoded, seconds, req.spec_stats))

        def per_repeat(name) -> list[float]:
            speeds = []
            for rep in range(repeats):
                speeds.append(tok_s([r for r in runs if r.mode == name and r.repeat == rep]))
            return speeds

        base = per_repeat(OFF.name)
        rows = []
        for mode in modes:
            mine = [r for r in runs if r.mode == mode.name]
            speeds = per_repeat(mode.name)
            by_kind = {}
            for kind, of_kind in group_by_kind(mine).items():
                by_kind[kind] = {"tok_s": tok_s(of_kind), "acceptance": merged_acceptance(of_kind)}
            rows.append({
                "mode": mode.name,
                "k": mode.spec_n_max,
                "adaptive": mode.adaptive,
                "tok_s": mean_std(speeds),
                "speedup": mean_std([a / b if b else 0.0 for a, b in zip(speeds, base)]),
                "decoded_tokens": sum(r.decoded for r in mine),
                "acceptance": merged_acceptance(mine),
                "by_kind": by_kind,
            })
        return rows

    def clients(self, prompts: list[list[int]], max_tokens: int, mode: Mode, num_streams: int,
                budget: int) -> Clients:
        self._use(mode)
        return Clients(self, prompts, max_tokens, mode, num_streams, budget)


def spread_length(n: int, max_tokens: int) -> int:
    """Output length of a sweep's n-th request: spread evenly over
    [max_tokens / 2, 3 * max_tokens / 2) by the golden-ratio sequence (mean ``max_tokens``), so that
    clients do not all finish, and all send their next prompt, in the same step (as they would with
    one fixed length and plain decoding)."""
    return max(1, round(max_tokens * (0.5 + (n * 0.6180339887) % 1.0)))


class Clients:
    """``num_streams`` clients of one engine, each sending greedy requests back to back (the next as
    soon as its last one finishes) until the engine has output ``budget`` tokens; the requests still
    in flight are then aborted, so every step measured had ``num_streams`` requests in it. Client
    i's j-th request is request n = j * num_streams + i: the prompt j places after the client's
    start, i * len(prompts) // num_streams (so that few clients still spread over the whole set),
    and ``spread_length(n)`` tokens, EOS ignored; the same sequence in every mode. ``step`` advances
    the engine by one step; ``tokens`` and ``seconds`` add up the output and the time of the steps,
    ``busy[request_id]`` the time of the steps a request was in."""

    def __init__(self, runs: EngineRuns, prompts: list[list[int]], max_tokens: int, mode: Mode,
                 num_streams: int, budget: int):
        self.runs = runs
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.mode = mode
        self.num_streams = num_streams
        self.budget = budget
        self.tokens = 0
        self.seconds = 0.0
        self.busy: dict[str, float] = {}
        self.sent_requests = []  # every request sent
        self.done = []  # those that finished (not aborted)
        self.sent = [0] * num_streams
        self.active = [self._send(i) for i in range(num_streams)]

    def _send(self, client: int):
        j = self.sent[client]
        self.sent[client] += 1
        runs = self.runs
        length = spread_length(j * self.num_streams + client, self.max_tokens)
        params = SamplingParams(max_tokens=length, temperature=0, ignore_eos=True)
        start = client * len(self.prompts) // self.num_streams
        prompt = self.prompts[(start + j) % len(self.prompts)]
        runs.engine.kv.reset_prefix_cache()  # the prompt is computed, as in every mode's run
        req = runs.engine.add_request(f"bench-{next(runs._ids)}", prompt, params,
                                      spec_n_max=self.mode.spec_n_max)
        self.busy[req.request_id] = 0.0
        self.sent_requests.append(req)
        return req

    @property
    def running(self) -> bool:
        return self.tokens < self.budget

    def step(self) -> None:
        start = time.perf_counter()
        outputs = self.runs.engine.step()
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.tokens += sum(len(o.new_token_ids) for o in outputs)
        for i, req in enumerate(self.active):
            self.busy[req.request_id] += elapsed
            if req.status.finished:
                self.done.append(req)
                self.active[i] = self._send(i)
        if not self.running:
            for req in self.active:
                self.runs.engine.abort_request(req.request_id)
            self.runs.progress.update()

    def tokens_per_second(self) -> tuple[float, float]:
        """Aggregate output tok/s, and the mean over finished requests of each one's output tokens
        over the time of the steps it was in (prompt included)."""
        out = [len(r.output_token_ids) for r in self.done]
        per_stream = 0.0
        if out:
            per_stream = sum(n / self.busy[r.request_id] for n, r in zip(out, self.done)) / len(out)
        return self.tokens / self.seconds, per_stream


def lockstep(clients: list[Clients]) -> None:
    """Step every engine in turn, one step each, until all their clients are done: a slower or
    faster machine moment hits every mode alike. The order rotates so that no mode always steps
    first."""
    turn = 0
    while any(c.running for c in clients):
        for c in clients[turn % len(clients):] + clients[:turn % len(clients)]:
            if c.running:
                c.step()
        turn += 1


def concurrency(runs: list[tuple[Mode, EngineRuns]], prompts, levels: list[int], max_tokens: int,
                repeats: int, rounds: int) -> list[dict]:
    """N streams (``Clients``: requests of ``max_tokens`` tokens on average, for as many tokens as
    ``rounds`` requests per stream, or one request per prompt where that is more), every mode on its
    own engine (``twin``) and all of them run in lockstep. Per mode: aggregate output
    tok/s, the mean per-stream tok/s of the finished requests, drafted and accepted tokens per
    output token, the draft policy's fitted price of speculation at N (``StepFit.scale``); and, per
    repeat, aggregate tok/s over that of the first mode (MTP off)."""
    tok = runs[0][1].engine.tokenizer
    ids = [p.token_ids(tok) for p in prompts]
    rows = []
    for n in levels:
        # aggregate, per stream, requests sent
        measured = {mode.name: ([], [], []) for mode, _ in runs}
        for _ in range(repeats):
            budget = max(n * rounds, len(ids)) * max_tokens
            clients = [r.clients(ids, max_tokens, mode, n, budget) for mode, r in runs]
            lockstep(clients)
            for c in clients:
                aggregate, per_stream, sent = measured[c.mode.name]
                total, stream = c.tokens_per_second()
                aggregate.append(total)
                per_stream.append(stream)
                sent.extend(c.sent_requests)
        base = measured[runs[0][0].name][0]
        for mode, mode_runs in runs:
            aggregate, per_stream, sent = measured[mode.name]
            output = sum(len(r.output_token_ids) for r in sent)
            drafted = sum(r.spec_stats.num_draft_tokens for r in sent)
            accepted = sum(r.spec_stats.num_accepted_tokens for r in sent)
            policy_scale = None
            if mode.adaptive:
                policy_scale = mode_runs.engine.policy.fit.scale(n)
            rows.append({
                "streams": n,
                "mode": mode.name,
                "aggregate_tok_s": mean_std(aggregate),
                "per_stream_tok_s": mean_std(per_stream),
                "vs_first": mean_std([a / b for a, b in zip(aggregate, base)]),
                "drafted_per_token": drafted / output,
                "accepted_per_token": accepted / output,
                "policy_scale": policy_scale,
            })
    return rows


def kv_bytes_per_token(engine) -> dict:
    """Paged-KV bytes one token takes in the main model's attention layers, and with the MTP layers'
    own KV added (recurrent layers of hybrid models hold a state per request instead, not counted
    here)."""
    mc = engine.model_config
    num_mtp = len(engine.mtp.layers) if engine.mtp is not None else 0

    def per_token(layers: int) -> int:
        with_kv = sum(mc.has_kv(i) for i in range(layers))
        return kv_bytes_per_block(with_kv, 1, mc.num_key_value_heads, mc.head_dim,
                                  engine.config.dtype)

    return {"without_mtp": per_token(mc.num_hidden_layers),
            "with_mtp": per_token(mc.num_hidden_layers + num_mtp) if num_mtp else None,
            "num_mtp_layers": num_mtp}


def peak_memory(device: str) -> dict:
    """Peak resident set size of this process so far,
    and the CUDA allocator's peak on a CUDA device."""
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_unit
    cuda = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {"peak_rss_bytes": rss, "cuda_peak_bytes": cuda}
