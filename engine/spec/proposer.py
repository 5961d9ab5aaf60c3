"""The MTP proposer: fills the MTP layer's KV for what the main model just computed, then drafts.

Draft step 0 runs the MTP layer over every position ``p`` the main model computed in this step whose
next token is now known (prompt chunks included), pairing ``h[p]`` with ``t[p+1]``; its last row
gives draft 1. Steps 1..k-1 feed the MTP output and the previous draft back, one token each.
Drafts of greedy requests are argmaxes; sampled requests draw from q (the head's processed
probabilities, same penalties and filters as the target): seeded ones with the race noise of the
target at the same output position (coupled drafts, see `rejection.py`), the others on a draft
stream of their own, keeping q for rejection sampling.

A request that drafts nothing this step (the policy chose k = 0, or a prompt chunk) does not run the
MTP layer: its (hidden, next token) pairs wait in ``pending`` and are computed in one pass the next
time it drafts, so speculation that is backed off costs nothing per step.

After a prefix-cache hit the MTP KV of the cached positions is already in the shared blocks (a block
is cached only once its MTP KV is filled, and its hash covers the token its last MTP entry read), so
the first pass starts at the request's first computed position like any other.

Per-request state lives in the proposer's own tables, keyed by request id (``pending``,
``last_rows``, ``draft_probs``); ``free`` drops it when a request finishes, is aborted or
is preempted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, partial

import torch

from mtpserve.engine.cuda_graph import CUDAGraphs
from mtpserve.engine.grammar import allowed_drafts, mask_logits
from mtpserve.engine.kv_cache import KVCacheManager
from mtpserve.engine.noise import DRAFT, TOKEN
from mtpserve.engine.noise import keys as noise_keys
from mtpserve.engine.request import Request
from mtpserve.engine.sampler import (
    SamplingTensors,
    apply_penalties,
    processed_probs,
    sample_from_probs,
)
from mtpserve.kernels.attention import AttentionBackend, build_metadata


@dataclass
class DraftInput:
    request: Request
    start: int  # first position the main model computed this step
    hidden: torch.Tensor  # [v, H] the main model's hidden states at positions start..start+v-1
    next_tokens: list[int]  # t[p+1] for those positions
    history: list[int]  # output tokens so far incl. this step's (for penalties on q)
    num_drafts: int  # 0: only fill the MTP KV


def grammar_masked(logits: torch.Tensor, items: list[DraftInput],
                   drafts: list[list[int]]) -> torch.Tensor:
    """Drafts of requests with a grammar are chosen among the tokens it allows after their output
    and earlier drafts, so a draft the grammar forbids is never proposed."""
    owners = [i for i, it in enumerate(items) if it.request.sampling_params.grammar is not None]
    if not owners:
        return logits
    logits = logits.clone()
    for i in owners:
        grammar = items[i].request.sampling_params.grammar
        allowed = grammar.next_mask(items[i].history, drafts[i])
        logits[i:i + 1] = mask_logits(logits[i:i + 1], allowed)
    return logits


def _plain(params) -> bool:
    """No penalties and no grammar: a draft is the head's argmax, or a draw from its logits shaped
    by the temperature, top-k, top-p and min-p alone (kernels/cpu_draft.py draws it)."""
    if params.grammar is not None or params.repetition_penalty != 1.0:
        return False
    return params.presence_penalty == 0.0 and params.frequency_penalty == 0.0


def _race_keys(item: DraftInput) -> list[tuple[int, int]]:
    """The keys of the races that pick a sampled request's drafts, as ``_choose`` keys them: its
    noise at the output position of each draft, on the token stream where its seed came from the
    request (drafts coupled to the tokens verification draws), else the draft stream."""
    noise = item.request.noise
    stream = DRAFT
    if noise.seeded:
        stream = TOKEN
    first = len(item.history)
    return [noise_keys(noise.seed, first + j, stream) for j in range(item.num_drafts)]


def _unshaped(params: list, tensors: SamplingTensors) -> bool:
    """Whether the drafts of ``params`` depend on the head's logits alone, with no penalties
    (``tensors``: the settings of a batch that holds them) and no grammar. Such drafts are chosen
    over the draft vocabulary without widening its logits to the whole vocabulary."""
    if tensors.do_repetition or tensors.do_presence_frequency:
        return False
    return all(p.grammar is None for p in params)


class MTPProposer:
    def __init__(self, mtp, kv: KVCacheManager, kv_caches: list, vocab_size: int,
                 device: torch.device, attn: AttentionBackend):
        """``attn``: the draft steps' paged attention, of the main model's kind."""
        self.mtp = mtp
        self.kv = kv
        self.kv_caches = kv_caches
        self.vocab_size = vocab_size
        self.device = device
        self.attn = attn
        self.graphs: list[CUDAGraphs] = []  # per MTP layer: its one-token steps, captured
        self.pending: dict[str, list[DraftInput]] = {}  # MTP inputs deferred while not drafting
        # per chained MTP layer j: y_j at the last filled position
        self.last_rows: dict[str, list] = {}
        # [k, V] q of the drafts to verify (unseeded sampling)
        self.draft_probs: dict[str, torch.Tensor] = {}

    def free(self, request_id: str) -> None:
        self.pending.pop(request_id, None)
        self.last_rows.pop(request_id, None)
        self.draft_probs.pop(request_id, None)

    def _run(self, step, reqs, token_ids, hidden, starts: list[int], lengths: list[int]):
        """MTP layer ``step`` over ``lengths[i]`` tokens of request i, KV slots from position
        ``starts[i]`` on; the pair at slot p is rotated as position p + 1 (the token it reads)."""
        tables = [self.kv.block_tables[r.request_id] for r in reqs]
        meta, slot_positions = build_metadata(tables, starts, lengths, self.kv.block_size,
                                              self.device)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        layer = min(step, len(self.mtp.layers) - 1)
        if self.graphs and self.graphs[layer].can_run(meta):
            return self.graphs[layer].run(ids, slot_positions, meta, hidden)
        self.attn.prepare(meta)
        return self._layer_forward(layer, ids, slot_positions, hidden, self.attn)

    def _layer_forward(self, layer: int, input_ids, slot_positions, hidden, attn):
        return self.mtp(layer, input_ids, hidden, slot_positions + 1, self.kv_caches, attn)

    def capture_graphs(self, max_num_seqs: int, max_blocks: int, dtype: torch.dtype,
                       pool) -> None:
        """One graph set per MTP layer for its one-token steps (cuda_graph.py)."""
        width = self.mtp.model[0].config.hidden_size
        for layer in range(len(self.mtp.layers)):
            graphs = CUDAGraphs(partial(self._layer_forward, layer), self.attn, self.kv.block_size,
                                max_num_seqs, [1], max_blocks, self.device, (width, dtype))
            graphs.capture(f"MTP layer {layer}", pool)
            self.graphs.append(graphs)

    def _choose(self, step, items: list[DraftInput], tensors: SamplingTensors, rows: list[int],
                y_last: torch.Tensor, drafts: list[list[int]], probs: list[list[torch.Tensor]],
                confident: bool) -> tuple[list[int], list[float] | None]:
        """The next draft of each of ``items`` (their sampling settings: ``tensors``' ``rows``),
        and with ``confident`` the head's confidence in it: the largest probability of the softmax
        of its logits (greedy) or of q (sampled), as kernels/cpu_draft.py gives it (else None)."""
        params = [it.request.sampling_params for it in items]
        unshaped = _unshaped(params, tensors)
        if unshaped and all(p.greedy for p in params):  # the argmax over the draft vocabulary
            logits = self.mtp.draft_logits(step, y_last)
            tokens = self.mtp.vocab_ids(logits.argmax(-1)).tolist()
            if not confident:
                return tokens, None
            return tokens, torch.softmax(logits.float(), -1).amax(-1).tolist()
        t = tensors.select(torch.tensor(rows, dtype=torch.long, device=self.device))
        histories = [it.history + d for it, d in zip(items, drafts)]
        if unshaped:  # over the draft vocabulary; q is widened for the race and for verification
            logits = self.mtp.draft_logits(step, y_last).float()
            tokens = self.mtp.vocab_ids(logits.argmax(-1))
        else:
            logits = self.mtp.compute_logits(step, y_last).float()
            prompts = [it.request.prompt_token_ids for it in items]
            logits = apply_penalties(logits, t, prompts, histories)
            logits = grammar_masked(logits, items, drafts)
            tokens = logits.argmax(-1)
        confidence = None
        if confident:
            confidence = torch.softmax(logits, -1).amax(-1)
        for seeded in (True, False):
            sampled = [i for i, p in enumerate(params)
                       if not p.greedy and items[i].request.noise.seeded == seeded]
            if not sampled:
                continue
            idx = torch.tensor(sampled, device=self.device)
            q = processed_probs(logits[idx], t.select(idx))
            if confident:
                confidence[idx] = q.amax(-1)
            if unshaped:
                q = self.mtp.widen(q, 0.0)
            noises = [items[i].request.noise for i in sampled]
            positions = [len(histories[i]) for i in sampled]
            tokens[idx] = sample_from_probs(q, noises, positions, TOKEN if seeded else DRAFT)
            for row, i in enumerate(sampled):
                if not seeded:
                    probs[i].append(q[row])
        if confidence is None:
            return tokens.tolist(), None
        return tokens.tolist(), confidence.tolist()

    def _defer_or_merge(self, items: list[DraftInput]) -> list[DraftInput]:
        """Park the inputs of requests that draft nothing; prepend parked inputs to those
        that draft. With prefix caching, prompt positions are never parked: their MTP KV is
        filled at once, so the prompt's blocks can be cached (and shared) as soon as computed."""
        run = []
        for it in items:
            pending = self.pending.setdefault(it.request.request_id, [])
            in_prompt = it.start < it.request.num_prompt_tokens
            if it.num_drafts == 0 and not (self.kv.prefix_caching and in_prompt):
                pending.append(it)
                continue
            if pending:
                it.start = pending[0].start
                it.hidden = torch.cat([p.hidden for p in pending] + [it.hidden])
                merged = []
                for p in pending:
                    merged.extend(p.next_tokens)
                it.next_tokens = merged + it.next_tokens
                pending.clear()
            run.append(it)
        return run

    def _chain(self, items, reqs, tokens, starts, lengths, y, ends):
        """Later MTP layers: layer j at position p reads (y_{j-1}[p-1], t[p+1]). Fill their KV over
        the same positions, with each request's y_{j-1} row before ``start`` kept from its previous
        pass (zeros at 0). Returns the output of layer 0 (the first draft step continues
        from there)."""
        first = y
        for j in range(1, len(self.mtp.layers)):
            rows, start = [], 0
            for it, end in zip(items, ends.tolist()):
                last_rows = self.last_rows.setdefault(it.request.request_id, [])
                prev = last_rows[j - 1] if len(last_rows) >= j else y.new_zeros(1, y.shape[1])
                rows.append(torch.cat([prev, y[start:end]]))
                if len(last_rows) < j:
                    last_rows.append(None)
                last_rows[j - 1] = y[end:end + 1]
                start = end + 1
            y = self._run(j, reqs, tokens, torch.cat(rows), starts, lengths)
        return first

    def one_call_drafter(self, requests: list[Request]):
        """The MTP layer's draft loop in one kernel call (kernels/cpu_draft.py), where none of
        ``requests`` has penalties or a grammar and the layer runs fused; else None."""
        if not requests:
            return None
        if not all(_plain(r.sampling_params) for r in requests):
            return None
        return self.drafter

    @cached_property
    def drafter(self):
        """The MTP layer's one-call draft loop, or None (``MTPModule.fused_drafter``): its weights
        and KV caches are the proposer's for its whole life, so it is looked up once."""
        return self.mtp.fused_drafter(self.kv_caches)

    def _propose_fused(self, drafter, items: list[DraftInput], p_min: float):
        """Draft step 0 and every draft of ``items`` in one call of ``drafter``: (drafts, the q of
        each draft over the whole vocabulary for unseeded sampled requests, else [])."""
        tables, params, race_keys, tokens = [], [], [], []
        for it in items:
            tables.append(self.kv.block_tables[it.request.request_id])
            params.append(it.request.sampling_params)
            race_keys.append([])
            if it.num_drafts and not params[-1].greedy:
                race_keys[-1] = _race_keys(it)
            tokens.extend(it.next_tokens)
        if all(p.greedy for p in params):
            params = None
        unseeded = [i for i, it in enumerate(items)
                    if race_keys[i] and not it.request.noise.seeded]
        hidden = torch.cat([it.hidden for it in items])
        drafts, q = drafter.propose(hidden, tokens, [it.start for it in items],
                                    [len(it.next_tokens) for it in items],
                                    [it.num_drafts for it in items], tables, self.kv.block_size,
                                    params, race_keys, bool(unseeded), p_min)
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        for i in unseeded:
            probs[i] = list(self.mtp.widen(q[i, :len(drafts[i])], 0.0))
        return drafts, probs

    def _propose_per_step(self, items: list[DraftInput], active: list[int], p_min: float):
        """Draft step 0, then one draft step at a time for the ``active`` items: (drafts, the q of
        each draft for unseeded sampled requests, else []). A chain stops where the product of
        the head's confidences in its drafts falls below ``p_min``."""
        reqs = [it.request for it in items]
        starts = [it.start for it in items]
        lengths = [len(it.next_tokens) for it in items]
        tokens = []
        for it in items:
            tokens.extend(it.next_tokens)
        y = self._run(0, reqs, tokens, torch.cat([it.hidden for it in items]), starts, lengths)
        ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
        y = self._chain(items, reqs, tokens, starts, lengths, y, ends)
        req_params = [r.sampling_params for r in reqs]
        tensors = SamplingTensors.from_params(req_params, self.vocab_size, self.device)
        drafts: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        y_last = y[ends]
        chain = [1.0] * len(items)
        step = 0
        while active:
            chosen, confidence = self._choose(step, [items[i] for i in active], tensors, active,
                                              y_last[active], [drafts[i] for i in active],
                                              [probs[i] for i in active], p_min > 0)
            still = []
            for j, (i, tok) in enumerate(zip(active, chosen)):
                if confidence is not None:
                    chain[i] *= confidence[j]
                    if chain[i] < p_min:
                        continue
                drafts[i].append(tok)
                if len(drafts[i]) < items[i].num_drafts:
                    still.append(i)
            if not still:
                break
            step += 1
            slots = [starts[i] + lengths[i] - 1 + step for i in still]
            y_step = self._run(step, [reqs[i] for i in still], [drafts[i][-1] for i in still],
                               y_last[still], slots, [1] * len(still))
            y_last = y_last.clone()
            y_last[still] = y_step
            active = still
        return drafts, probs

    @torch.inference_mode()
    def propose(self, items: list[DraftInput], p_min: float = 0.0) -> dict[str, list[int]]:
        """Drafts per request id; the q of unseeded sampled requests' drafts go
        to ``draft_probs``. ``p_min`` > 0: a request's drafts stop where the product of the head's
        confidences in them falls below it (the head's own estimate that they are all accepted)."""
        for it in items:
            self.draft_probs.pop(it.request.request_id, None)
        items = self._defer_or_merge(items)
        if not items:
            return {}
        bs = self.kv.block_size
        for it in items:  # draft steps 1..k-1 write the MTP KV of positions beyond this step's
            last = it.start + len(it.next_tokens) - 1
            need = last + max(it.num_drafts, 1)
            if it.num_drafts > 1 and not self.kv.allocate_slots(it.request.request_id, need):
                have = len(self.kv.block_tables[it.request.request_id]) * bs
                it.num_drafts = max(1, min(it.num_drafts, have - last))
        active = [i for i, it in enumerate(items) if it.num_drafts > 0]  # the others only fill
        drafter = self.one_call_drafter([items[i].request for i in active])
        if drafter is not None:
            drafts, probs = self._propose_fused(drafter, items, p_min)
        else:
            drafts, probs = self._propose_per_step(items, active, p_min)
        for it in items:  # verified positions only: the prefix cache may now keep these blocks
            self.kv.mark_draft_kv(it.request.request_id, it.start + len(it.next_tokens))
        out = {}
        for i, it in enumerate(items):
            if it.num_drafts == 0:
                continue
            kept = allowed_drafts(it.request.sampling_params.grammar, it.history, drafts[i])
            out[it.request.request_id] = kept
            if probs[i] and kept:
                self.draft_probs[it.request.request_id] = torch.stack(probs[i][:len(kept)])
        return out
