"""Verification of MTP drafts: keep the accepted drafts, then one recovered or bonus token.

For a request with drafts d_1..d_k the main model scored the positions [last, d_1..d_k], giving
k + 1 target rows: row j is the distribution of the token at draft position j, and row k (the
*bonus row*) is the distribution of the token after the last draft.

* accepted tokens: the longest prefix of drafts the target agrees with;
* recovered token: at the first rejected position j, a replacement drawn from row j;
* bonus token: when all k drafts are accepted, one extra token drawn from row k.

So each request emits between 1 and k + 1 tokens per call.

Greedy requests accept d_j while argmax(row j) == d_j and then append argmax of the first
mismatching row (the recovered token) or of row k (the bonus token).

Seeded sampled requests use the same rule with the exponential race in place of the argmax:
row j's target token is argmax(p_j / E_j), with E_j keyed on (seed, output position of row j), and
d_j was drafted as argmax(q_j / E_j) with the same E_j (coupled drafts). Each emitted token is then
the token plain decoding would give at that position, so a seeded request's output does not depend
on drafting, batching or preemption, and is distributed exactly as plain sampling from p.

Unseeded sampled requests use lossless rejection sampling. With p the target's processed
probabilities of row j and q the draft probabilities d_j was drawn from (on a noise stream of its
own), d_j is accepted if u < min(1, p[d_j] / q[d_j]) with u a float64 uniform; the recovered token is
drawn from normalize(max(p - q, 0)) (from p if that is all zero) and the bonus token from p of row k.
Each emitted token is distributed exactly as plain sampling from p, whatever q is (a reduced draft
vocabulary, where q is zero outside a subset, included).

Penalties follow the emitted history: row j is penalized as if d_1..d_j had already been output.
All randomness is counter-based (`engine/noise.py`), keyed on the request and the output position
of the row, so no request's tokens depend on the rest of the batch. Requests with k == 0 go through
`Sampler` unchanged.
"""

from __future__ import annotations

import torch

from mtpserve.engine.noise import ACCEPT, RequestNoise, uniforms
from mtpserve.engine.sampler import (Sampler, SamplingTensors, apply_penalties, choose_tokens, processed_probs,
                                     sample_from_probs)
from mtpserve.engine.sampling_params import SamplingParams


def verify(target_logits: torch.Tensor,
           draft_token_ids: list[list[int]],
           draft_probs: list[torch.Tensor | None],
           params: list[SamplingParams],
           prompt_token_ids: list[list[int]],
           output_token_ids: list[list[int]],
           noises: list[RequestNoise]) -> list[list[int]]:
    """Per request: the accepted drafts followed by one recovered or bonus token.

    target_logits: [sum_i (k_i + 1), V] raw main-model logits; request i owns k_i + 1 consecutive rows.
    draft_token_ids[i]: the k_i >= 0 drafts of request i.
    draft_probs[i]: [k_i, V] probabilities the drafts were sampled from (None for greedy and seeded
        requests, which do not need them, and for k_i == 0).
    noises[i]: request i's noise; its rows are keyed on output positions len(output_token_ids[i]) + j.
    """
    num_drafts = [len(d) for d in draft_token_ids]
    starts = [0]
    for k in num_drafts:
        starts.append(starts[-1] + k + 1)
    if target_logits.shape[0] != starts[-1]:
        raise ValueError(f"expected {starts[-1]} target rows, got {target_logits.shape[0]}")
    device = target_logits.device
    results: list[list[int]] = [[] for _ in params]

    plain = [i for i, k in enumerate(num_drafts) if k == 0]
    if plain:
        rows = torch.tensor([starts[i] for i in plain], dtype=torch.long, device=device)
        tokens = Sampler()(target_logits[rows], [params[i] for i in plain],
                           [prompt_token_ids[i] for i in plain], [output_token_ids[i] for i in plain],
                           [noises[i] for i in plain]).token_ids.tolist()
        for i, token in zip(plain, tokens):
            results[i] = [token]

    spec = [i for i, k in enumerate(num_drafts) if k > 0]
    if not spec:
        return results
    matched = [i for i in spec if params[i].greedy or noises[i].seeded]
    rejection = [i for i in spec if i not in matched]
    for i in rejection:
        if draft_probs[i] is None:
            raise ValueError(f"request {i} samples without a seed but has no draft probabilities")

    # Target rows of the speculating requests, penalized with draft-extended histories.
    rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=device) for i in spec])
    logits = target_logits[rows].float()
    owner = torch.tensor([n for n, i in enumerate(spec) for _ in range(num_drafts[i] + 1)],
                         dtype=torch.long, device=device)
    tensors = SamplingTensors.from_params([params[i] for i in spec], logits.shape[-1], device).select(owner)
    if tensors.do_repetition or tensors.do_presence_frequency:
        row_prompts = [prompt_token_ids[i] for i in spec for _ in range(num_drafts[i] + 1)]
        row_outputs = [output_token_ids[i] + draft_token_ids[i][:j]
                       for i in spec for j in range(num_drafts[i] + 1)]
        logits = apply_penalties(logits, tensors, row_prompts, row_outputs)

    offset, row_offset = 0, {}  # row of request i inside `logits`
    for i in spec:
        row_offset[i] = offset
        offset += num_drafts[i] + 1

    if matched:
        index = _rows_of(matched, row_offset, num_drafts, device)
        row_params = [params[i] for i in matched for _ in range(num_drafts[i] + 1)]
        row_noises = [noises[i] for i in matched for _ in range(num_drafts[i] + 1)]
        positions = [len(output_token_ids[i]) + j for i in matched for j in range(num_drafts[i] + 1)]
        targets = choose_tokens(logits[index], tensors.select(index), row_params, row_noises, positions).tolist()
        position = 0
        for i in matched:
            results[i] = _greedy_accept(draft_token_ids[i], targets[position:position + num_drafts[i] + 1])
            position += num_drafts[i] + 1

    if rejection:
        index = _rows_of(rejection, row_offset, num_drafts, device)
        probs = processed_probs(logits[index], tensors.select(index))
        _rejection_sample(probs, [draft_token_ids[i] for i in rejection], [draft_probs[i] for i in rejection],
                          [noises[i] for i in rejection], [len(output_token_ids[i]) for i in rejection],
                          rejection, results)
    return results


def _rows_of(requests: list[int], row_offset: dict[int, int], num_drafts: list[int], device) -> torch.Tensor:
    """The rows of ``requests`` (k_i + 1 each) inside the speculating requests' logits."""
    return torch.cat([torch.arange(row_offset[i], row_offset[i] + num_drafts[i] + 1, device=device)
                      for i in requests])


def _greedy_accept(drafts: list[int], best: list[int]) -> list[int]:
    """Accepted drafts (while best[j] == drafts[j]) plus best at the first mismatch or the bonus row."""
    accepted = 0
    while accepted < len(drafts) and best[accepted] == drafts[accepted]:
        accepted += 1
    return drafts[:accepted] + [best[accepted]]


def _rejection_sample(probs: torch.Tensor, drafts: list[list[int]], draft_probs: list[torch.Tensor],
                      noises: list[RequestNoise], num_outputs: list[int], owners: list[int],
                      results: list[list[int]]) -> None:
    """probs: [sum (k + 1), V] processed target rows of the sampled requests, in order; num_outputs[n]:
    request n's output length, the output position of its first row. Writes results[owners[n]]."""
    device = probs.device
    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)
    draft_rows = torch.tensor([starts[n] + j for n, d in enumerate(drafts) for j in range(len(d))],
                              dtype=torch.long, device=device)
    flat_drafts = torch.tensor([t for d in drafts for t in d], dtype=torch.long, device=device)
    q = torch.cat([dp[:len(d)].to(device=device, dtype=torch.float32)
                   for d, dp in zip(drafts, draft_probs)])                        # [sum k, V]
    p_draft = probs[draft_rows].gather(1, flat_drafts[:, None])[:, 0].double()   # p[d_j]
    q_draft = q.gather(1, flat_drafts[:, None])[:, 0].double()                    # q[d_j]
    # q[d_j] == 0 cannot happen for a sampled draft; then accept iff p[d_j] > 0 (0/0 -> reject).
    ratio = torch.nan_to_num(p_draft / q_draft, nan=0.0).clamp(max=1.0)

    draft_noises = [noise for noise, d in zip(noises, drafts) for _ in d]
    draft_positions = [start + j for start, d in zip(num_outputs, drafts) for j in range(len(d))]
    accepted_mask = (uniforms(draft_noises, draft_positions, ACCEPT, device) < ratio).tolist()

    # One final row per request: the residual at the first rejection, or the bonus row.
    final_rows, residual_q, num_accepted = [], [], []
    position = 0
    for n, d in enumerate(drafts):
        mask = accepted_mask[position:position + len(d)]
        accepted = mask.index(False) if False in mask else len(d)
        num_accepted.append(accepted)
        final_rows.append(starts[n] + accepted)
        residual_q.append(position + accepted if accepted < len(d) else -1)
        position += len(d)
    p_final = probs[torch.tensor(final_rows, dtype=torch.long, device=device)]
    rejected = torch.tensor([r >= 0 for r in residual_q], dtype=torch.bool, device=device)
    q_final = q[torch.tensor([max(r, 0) for r in residual_q], dtype=torch.long, device=device)]
    residual = (p_final - q_final).clamp(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = residual / mass.clamp(min=torch.finfo(torch.float32).tiny)
    use_residual = rejected[:, None] & (mass > 0)
    final = torch.where(use_residual, residual, p_final)
    final_positions = [start + accepted for start, accepted in zip(num_outputs, num_accepted)]
    tokens = sample_from_probs(final, noises, final_positions).tolist()

    for n, (d, accepted) in enumerate(zip(drafts, num_accepted)):
        results[owners[n]] = d[:accepted] + [tokens[n]]

