"""Batched token sampling: penalties, processed probabilities, per-request seeded draws.

The pieces are separate so the MTP rejection sampler can compute the target (p) and draft (q)
distributions exactly as plain sampling does: `apply_penalties` -> `processed_probs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtpserve.engine.noise import TOKEN, RequestNoise, exponentials, keys
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.truncation import truncate
from mtpserve.kernels.cpu_race import race_argmax


@dataclass
class SamplingTensors:
    """Per-row sampling settings for one step. The do_* flags say whether any row *may*
    need a stage."""
    temperature: torch.Tensor         # [B] float32
    top_p: torch.Tensor               # [B] float32
    top_k: torch.Tensor               # [B] long, vocab size when disabled
    min_p: torch.Tensor               # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    presence: torch.Tensor            # [B] float32
    frequency: torch.Tensor           # [B] float32
    greedy: torch.Tensor              # [B] bool
    do_temperature: bool = False
    do_top_k: bool = False
    do_top_p: bool = False
    do_min_p: bool = False
    do_repetition: bool = False
    do_presence_frequency: bool = False

    @classmethod
    def from_params(cls, params: list[SamplingParams], vocab_size: int,
                    device: torch.device | str = "cpu") -> SamplingTensors:
        def floats(values):
            return torch.tensor(values, dtype=torch.float32, device=device)

        top_k = [vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size) for p in params]
        sampled = [p for p in params if not p.greedy]
        return cls(
            temperature=floats([p.temperature for p in params]),
            top_p=floats([p.top_p for p in params]),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            min_p=floats([p.min_p for p in params]),
            repetition_penalty=floats([p.repetition_penalty for p in params]),
            presence=floats([p.presence_penalty for p in params]),
            frequency=floats([p.frequency_penalty for p in params]),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            do_temperature=any(p.temperature != 1.0 for p in sampled),
            do_top_k=any(k < vocab_size for k in top_k),
            do_top_p=any(p.top_p < 1.0 for p in params),
            do_min_p=any(p.min_p > 0.0 for p in params),
            do_repetition=any(p.repetition_penalty != 1.0 for p in params),
            do_presence_frequency=any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                                      for p in params),
        )

    def select(self, index: torch.Tensor) -> SamplingTensors:
        """Rows `index` (may repeat rows, e.g. one per draft position). Flags are kept as they are:
        a stage no selected row needs is a no-op, just not skipped."""
        fields = {name: getattr(self, name)[index] for name in (
            "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
            "presence", "frequency", "greedy")}
        flags = {name: getattr(self, name) for name in (
            "do_temperature", "do_top_k", "do_top_p", "do_min_p",
            "do_repetition", "do_presence_frequency")}
        return SamplingTensors(**fields, **flags)


def _token_index(token_ids: list[list[int]], vocab_size: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row, token) index pairs for a ragged batch of token lists (ids >=
    vocab dropped)."""
    rows, flat = [], []
    for i, ids in enumerate(token_ids):
        rows.extend([i] * len(ids))
        flat.extend(ids)
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    tokens_t = torch.tensor(flat, dtype=torch.long, device=device)
    keep = tokens_t < vocab_size
    return rows_t[keep], tokens_t[keep]


def apply_penalties(logits: torch.Tensor, tensors: SamplingTensors,
                    prompt_token_ids: list[list[int]],
                    output_token_ids: list[list[int]]) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (HF: positive logits divided, negative
    multiplied), then logit -= frequency * count + presence * (count > 0) over output tokens.
    Returns a new float32 tensor (the input is never modified); the input itself if
    nothing applies."""
    if not (tensors.do_repetition or tensors.do_presence_frequency):
        return logits
    batch, vocab = logits.shape
    logits = logits.float()
    out_rows, out_tokens = _token_index(output_token_ids, vocab, logits.device)
    if tensors.do_repetition:
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=logits.device)
        seen[out_rows, out_tokens] = True
        prompt_rows, prompt_tokens = _token_index(prompt_token_ids, vocab, logits.device)
        seen[prompt_rows, prompt_tokens] = True
        penalty = tensors.repetition_penalty[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if tensors.do_presence_frequency:
        counts = torch.zeros(batch, vocab, dtype=torch.float32, device=logits.device)
        counts.index_put_((out_rows, out_tokens), torch.ones_like(out_rows, dtype=torch.float32),
                          accumulate=True)
        logits = logits - (tensors.frequency[:, None] * counts
                           + tensors.presence[:, None] * (counts > 0).float())
    return logits


def processed_probs(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """[B, V] float32 probabilities after temperature (1 for greedy rows), top-k, top-p, min-p.

    Top-k keeps every token tied with the k-th largest; top-p keeps the smallest prefix of the
    sorted distribution whose mass reaches top_p; min-p keeps tokens with prob >= min_p * max prob.
    The most likely token always survives."""
    logits = logits.float()
    if tensors.do_temperature:
        temperature = torch.where(tensors.greedy, torch.ones_like(tensors.temperature),
                                  tensors.temperature)
        logits = logits / temperature[:, None]
    if tensors.do_top_k or tensors.do_top_p:
        logits = truncate(logits, tensors.top_k, tensors.top_p)
    probs = logits.softmax(dim=-1)
    if tensors.do_min_p:
        threshold = tensors.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        filtered = probs.masked_fill(probs < threshold, 0.0)
        filtered = filtered / filtered.sum(dim=-1, keepdim=True)
        # rows without min-p keep their probabilities bit for bit, whatever else is in the batch
        probs = torch.where((tensors.min_p > 0)[:, None], filtered, probs)
    return probs


def sample_from_probs(probs: torch.Tensor, noises: list[RequestNoise], positions: list[int],
                      stream: int = TOKEN) -> torch.Tensor:
    """[B] long: one draw per row by the exponential race argmax(p / E), E ~ Exp(1) i.i.d.

    Row b's E is keyed on (its request's seed, positions[b], stream), so a row's token depends only
    on its probabilities and that key, never on the rest of the batch or on earlier draws. On a CPU
    the race runs on the CPU kernels (kernels/cpu/race.cpp), which skip the tokens that cannot
    win."""
    probs = probs.float()
    if probs.device.type == "cpu":
        pairs = [keys(n.seed, p, stream) for n, p in zip(noises, positions)]
        tokens = race_argmax(probs, pairs)
        if tokens is not None:
            return tokens
    race = exponentials(noises, positions, stream, probs.shape[-1], probs.device)
    return (probs / race).argmax(dim=-1)


def choose_tokens(penalized: torch.Tensor, tensors: SamplingTensors, params: list[SamplingParams],
                  noises: list[RequestNoise], positions: list[int]) -> torch.Tensor:
    """[B] long. Greedy rows: argmax of the penalized logits. Sampled rows: the race over
    processed_probs, keyed on the row's request noise at output position positions[row]."""
    token_ids = penalized.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, dtype=torch.long, device=penalized.device)
        probs = processed_probs(penalized[index], tensors.select(index))
        token_ids[index] = sample_from_probs(probs, [noises[i] for i in sampled_rows],
                                             [positions[i] for i in sampled_rows])
    return token_ids


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                                        # [B] long
    # per row: None, or (chosen token's logprob, [(token, logprob)] top-n), from the raw logits
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None


class Sampler:
    """Greedy rows: argmax of the penalized logits. Sampled rows: a draw from processed_probs,
    keyed on the request's noise at its next output position."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 prompt_token_ids: list[list[int]], output_token_ids: list[list[int]],
                 noises: list[RequestNoise]) -> SamplerOutput:
        logits = logits.float()
        tensors = SamplingTensors.from_params(params, logits.shape[-1], logits.device)
        penalized = apply_penalties(logits, tensors, prompt_token_ids, output_token_ids)

        positions = [len(ids) for ids in output_token_ids]
        token_ids = choose_tokens(penalized, tensors, params, noises, positions)
        logprobs = None
        if any(p.logprobs is not None for p in params):
            logprobs = token_logprobs(logits, token_ids, params)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]):
    """Per row: None, or (logprob of ``token_ids[row]``, top-n [(token, logprob)]) of the raw model
    distribution (before penalties and temperature), as vLLM reports them."""
    log_probs = logits.float().log_softmax(dim=-1)
    chosen = log_probs.gather(1, token_ids[:, None])[:, 0].tolist()
    n_max = min(max(p.logprobs or 0 for p in params), logits.shape[-1])
    top_values, top_ids = log_probs.topk(n_max, dim=-1) if n_max else (None, None)
    top_values = top_values.tolist() if n_max else None
    top_ids = top_ids.tolist() if n_max else None
    result = []
    for row, p in enumerate(params):
        if p.logprobs is None:
            result.append(None)
            continue
        n = min(p.logprobs, n_max)
        top = [(top_ids[row][j], top_values[row][j]) for j in range(n)] if n else []
        result.append((chosen[row], top))
    return result


@dataclass
class SamplingBatch:
    """The requests that sample in a step and their logits rows, built once per step: request i
    owns rows ``start_loc[i]:start_loc[i + 1]``, one per draft it verifies plus one
    (k_i + 1 rows)."""

    params: list[SamplingParams]            # [S]
    prompt_token_ids: list[list[int]]       # [S]
    output_token_ids: list[list[int]]       # [S]
    noises: list[RequestNoise]              # [S]
    draft_token_ids: list[list[int]]        # [S] k_i drafts each (empty: plain sampling)
    # [S] [k_i, V] q of unseeded sampled requests' drafts, else None
    draft_probs: list[torch.Tensor | None]
    start_loc: list[int]                    # [S + 1] cumulative k_i + 1
    row_tensors: SamplingTensors            # [L] the settings of each logits row's request
    # [S] the EOS ids of each request (held back with its stop_token_ids before min_tokens)
    eos_token_ids: list[frozenset[int]] | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
              output_token_ids: list[list[int]], noises: list[RequestNoise], vocab_size: int,
              device, draft_token_ids: list[list[int]] | None = None,
              draft_probs: list[torch.Tensor | None] | None = None,
              eos_token_ids: list[frozenset[int]] | None = None) -> SamplingBatch:
        if draft_token_ids is None:
            draft_token_ids = [[] for _ in params]
        if draft_probs is None:
            draft_probs = [None] * len(params)
        start_loc, owners = [0], []
        for i, drafts in enumerate(draft_token_ids):
            start_loc.append(start_loc[-1] + len(drafts) + 1)
            owners.extend([i] * (len(drafts) + 1))
        tensors = SamplingTensors.from_params(params, vocab_size, device)
        if len(owners) != len(params):
            tensors = tensors.select(torch.tensor(owners, dtype=torch.long, device=device))
        return cls(params, prompt_token_ids, output_token_ids, noises, draft_token_ids, draft_probs,
                   start_loc, tensors, eos_token_ids)

    def early_stop_ids(self, i: int) -> list[int]:
        """The tokens request ``i`` may not end with before ``min_tokens`` outputs."""
        params = self.params[i]
        if not params.min_tokens:
            return []
        ids = set(params.stop_token_ids)
        if self.eos_token_ids is not None and not params.ignore_eos:
            ids |= self.eos_token_ids[i]
        return sorted(ids)

    @property
    def num_drafts(self) -> list[int]:
        return [len(d) for d in self.draft_token_ids]

    def rows_of(self, requests: list[int], device) -> torch.Tensor:
        """[sum k_i + 1] the logits rows of ``requests``, in order."""
        rows = []
        for i in requests:
            rows.extend(range(self.start_loc[i], self.start_loc[i + 1]))
        return torch.tensor(rows, dtype=torch.long, device=device)
