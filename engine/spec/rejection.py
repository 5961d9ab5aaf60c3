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
own), d_j is accepted if u < min(1, p[d_j] / q[d_j]) with u a float64 uniform; the recovered token
is drawn from normalize(max(p - q, 0)) (from p if that is all zero) and the bonus token from p of
row k. Each emitted token is distributed exactly as plain sampling from p, whatever q is (a reduced
draft vocabulary, where q is zero outside a subset, included).

Penalties follow the emitted history: row j is penalized as if d_1..d_j had already been output.
All randomness is counter-based (`engine/noise.py`), keyed on the request and the output position
of the row, so no request's tokens depend on the rest of the batch. A request with k == 0 gets the
token plain sampling gives.
"""

from __future__ import annotations

import torch

from mtpserve.engine.grammar import mask_logits
from mtpserve.engine.noise import ACCEPT, RequestNoise, uniforms
from mtpserve.engine.sampler import (
    SamplingBatch,
    apply_penalties,
    choose_tokens,
    processed_probs,
    sample_from_probs,
)


def verify(target_logits: torch.Tensor, batch: SamplingBatch) -> list[list[int]]:
    """Per request: the accepted drafts followed by one recovered or bonus token (one sampled token
    for a request without drafts, exactly as plain sampling gives it).

    target_logits: [L, V] raw main-model logits of the batch's rows (request i owns rows
        batch.start_loc[i]:batch.start_loc[i + 1]); row j of a request is keyed on output position
        len(output_token_ids) + j.
    """
    if target_logits.shape[0] != batch.start_loc[-1]:
        raise ValueError(f"expected {batch.start_loc[-1]} target rows, "
                         f"got {target_logits.shape[0]}")
    device = target_logits.device
    num_drafts = batch.num_drafts
    logits = _penalized(target_logits.float(), batch)
    logits = _hold_early_stops(logits, batch)
    logits = _follow_grammars(logits, batch)
    results: list[list[int]] = [[] for _ in batch.params]
    matched, rejection = [], []
    for i, (params, noise) in enumerate(zip(batch.params, batch.noises)):
        if num_drafts[i] == 0 or params.greedy or noise.seeded:
            matched.append(i)
        elif batch.draft_probs[i] is None:
            raise ValueError(f"request {i} samples without a seed but has no draft probabilities")
        else:
            rejection.append(i)
    if matched:
        index = batch.rows_of(matched, device)
        row_params, row_noises, positions = [], [], []
        for i in matched:
            for j in range(num_drafts[i] + 1):
                row_params.append(batch.params[i])
                row_noises.append(batch.noises[i])
                positions.append(len(batch.output_token_ids[i]) + j)
        tensors = batch.row_tensors.select(index)
        targets = choose_tokens(logits[index], tensors, row_params, row_noises, positions).tolist()
        position = 0
        for i in matched:
            best = targets[position:position + num_drafts[i] + 1]
            results[i] = _greedy_accept(batch.draft_token_ids[i], best)
            position += num_drafts[i] + 1
    if rejection:
        index = batch.rows_of(rejection, device)
        probs = processed_probs(logits[index], batch.row_tensors.select(index))
        _rejection_sample(probs, [batch.draft_token_ids[i] for i in rejection],
                          [batch.draft_probs[i] for i in rejection],
                          [batch.noises[i] for i in rejection],
                          [len(batch.output_token_ids[i]) for i in rejection], rejection, results)
    return results


def _penalized(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Row j of a request penalized as if its drafts d_1..d_j had already been output."""
    tensors = batch.row_tensors
    if not (tensors.do_repetition or tensors.do_presence_frequency):
        return logits
    row_prompts, row_outputs = [], []
    rows = zip(batch.prompt_token_ids, batch.output_token_ids, batch.draft_token_ids)
    for prompt, output, drafts in rows:
        for j in range(len(drafts) + 1):
            row_prompts.append(prompt)
            row_outputs.append(output + drafts[:j])
    return apply_penalties(logits, tensors, row_prompts, row_outputs)


def _hold_early_stops(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Rows at output positions before a request's ``min_tokens`` give its EOS and stop tokens
    probability zero (a new tensor; the raw logits stay for logprobs)."""
    rows, tokens = [], []
    vocab = logits.shape[-1]
    for i, params in enumerate(batch.params):
        stop_ids = [t for t in batch.early_stop_ids(i) if t < vocab]
        first = len(batch.output_token_ids[i])
        start = batch.start_loc[i]
        for j in range(batch.start_loc[i + 1] - start):
            if first + j >= params.min_tokens:
                break
            rows.extend([start + j] * len(stop_ids))
            tokens.extend(stop_ids)
    if not rows:
        return logits
    logits = logits.clone()
    logits[torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device)] = (
        float("-inf"))
    return logits


def _follow_grammars(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Row j of a request with a grammar allows only what the grammar allows after its output
    and drafts d_1..d_j (a draft it forbids is rejected there)."""
    owners = [i for i, p in enumerate(batch.params) if p.grammar is not None]
    if not owners:
        return logits
    logits = logits.clone()
    for i in owners:
        rows = slice(batch.start_loc[i], batch.start_loc[i + 1])
        allowed = batch.params[i].grammar.verify_masks(batch.output_token_ids[i],
                                                       batch.draft_token_ids[i])
        logits[rows] = mask_logits(logits[rows], allowed)
    return logits


def _greedy_accept(drafts: list[int], best: list[int]) -> list[int]:
    """Accepted drafts (while best[j] == drafts[j]) plus best at the first mismatch or the
    bonus row."""
    accepted = 0
    while accepted < len(drafts) and best[accepted] == drafts[accepted]:
        accepted += 1
    return drafts[:accepted] + [best[accepted]]


def _rejection_sample(probs: torch.Tensor, drafts: list[list[int]], draft_probs: list[torch.Tensor],
                      noises: list[RequestNoise], num_outputs: list[int], owners: list[int],
                      results: list[list[int]]) -> None:
    """probs: [sum (k + 1), V] processed target rows of the sampled requests, in order;
    num_outputs[n]: request n's output length, the output position of its first row.
    Writes results[owners[n]]."""
    device = probs.device
    starts, draft_rows, flat_drafts, draft_noises, draft_positions = [0], [], [], [], []
    # one entry per draft: its row in probs, token, noise and output position
    for n, d in enumerate(drafts):
        draft_rows.extend(range(starts[n], starts[n] + len(d)))
        flat_drafts.extend(d)
        draft_noises.extend([noises[n]] * len(d))
        draft_positions.extend(range(num_outputs[n], num_outputs[n] + len(d)))
        starts.append(starts[n] + len(d) + 1)
    draft_rows = torch.tensor(draft_rows, dtype=torch.long, device=device)
    flat_drafts = torch.tensor(flat_drafts, dtype=torch.long, device=device)
    q = torch.cat([dp[:len(d)].to(device=device, dtype=torch.float32)
                   for d, dp in zip(drafts, draft_probs)])                        # [sum k, V]
    p_draft = probs[draft_rows].gather(1, flat_drafts[:, None])[:, 0].double()   # p[d_j]
    q_draft = q.gather(1, flat_drafts[:, None])[:, 0].double()                    # q[d_j]
    # q[d_j] == 0 cannot happen for a sampled draft; then accept iff p[d_j] > 0 (0/0 -> reject).
    ratio = torch.nan_to_num(p_draft / q_draft, nan=0.0).clamp(max=1.0)
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

