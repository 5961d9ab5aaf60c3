"""Training conversations the base model writes itself (the "Magpie" technique): render the chat
template up to the start of a user message, under a steering system prompt (``steering.py``), and
let the model sample the user turn; keep the good ones (``prompt_filter.py``); the model answers
each (greedy, the default template, as a user would ask it); for a share of them it then writes a
follow-up user turn, which it answers too.

Seeds come in rounds of ``round_size``, each round's seeds and sampling fixed by (seed, round).
Each finished round is one gzip JSONL chunk of token ids (``magpie_store.py``), so an interrupted
run resumes at the first round it had not finished.
"""

from __future__ import annotations

import random
import sys
import time
import zlib
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.request import RequestStatus
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.train.magpie_store import MagpieStore, summary
from mtpserve.engine.train.prompt_filter import PromptFilter
from mtpserve.engine.train.steering import Seed, follow_up_opener, make_seed

SENTINEL = "MAGPIE0USER0TURN"
EVAL_SHARE = 16  # one conversation in EVAL_SHARE is held out (by a hash of its first user turn)
NO_YIELD_ROUNDS = 8  # rounds without a single kept conversation before giving up


@dataclass
class MagpieConfig:
    seed: int = 0
    round_size: int = 64  # seeds per chunk (what an interruption can lose)
    user_temperature: float = 1.0
    user_top_p: float = 0.95
    max_user_tokens: int = 128
    max_answer_tokens: int = 192
    follow_up_share: float = 0.3


def split_of(record: dict) -> str:
    """"eval" for one conversation in EVAL_SHARE, else "train"."""
    if zlib.crc32(record["user"][0].encode()) % EVAL_SHARE == 0:
        return "eval"
    return "train"


def user_turn_prefix(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """The chat template rendered for ``messages`` up to where the next user message's text
    starts, and the text that closes a user message."""
    turn = messages + [{"role": "user", "content": SENTINEL}]
    text = tokenizer.apply_chat_template(turn, add_generation_prompt=False)
    if text.count(SENTINEL) != 1:
        raise MtpserveError("the chat template does not render user messages verbatim")
    before, after = text.split(SENTINEL)
    return before, after


def end_of_turn_ids(tokenizer, eos_ids) -> list[int]:
    """Tokens that end a generated user message: the first token of the template's closing text
    (e.g. ``<|im_end|>``) and the model's EOS tokens."""
    _, after = user_turn_prefix(tokenizer, [])
    closing = tokenizer.encode(after, add_special_tokens=False)
    out = set(eos_ids)
    if closing:
        out.add(closing[0])
    return sorted(out)


@dataclass
class Round:
    number: int
    unstarted: int  # seeds not yet sent
    pending: int = 0  # requests in the engine
    records: list = field(default_factory=list)  # (seed index, turn, record)
    filter: Counter = field(default_factory=Counter)
    follow_up_filter: Counter = field(default_factory=Counter)
    user_tokens: int = 0
    answer_tokens: int = 0

    @property
    def done(self) -> bool:
        return self.unstarted == 0 and self.pending == 0


@dataclass
class Job:
    stage: str  # "user", "answer", "follow_up", "follow_up_answer"
    round: Round
    index: int
    seed: Seed
    conv: list  # the user and assistant messages so far
    opener: str = ""
    opener_ids: list = field(default_factory=list)
    request: object = None


class MagpieGenerator:
    """Streams conversations through the engine: a finished request starts the next stage of its
    conversation at once, and new seeds keep the batch full, so no stage waits for a whole round.
    Rounds are written in order as they complete."""

    def __init__(self, engine, path: str, cfg: MagpieConfig):
        self.engine = engine
        self.tok = engine.tokenizer
        self.cfg = cfg
        self.stop_ids = end_of_turn_ids(self.tok, engine.eos_token_ids)
        self.store = MagpieStore(path, asdict(cfg))
        self.first_filter = PromptFilter()
        self.follow_filter = PromptFilter()
        for r in self.store.records():  # the duplicate checks see what earlier sessions kept
            self.first_filter.add(r["user"][0])
            if len(r["user"]) > 1:
                self.follow_filter.add(r["user"][-1])
        self.jobs: dict[str, Job] = {}
        self.seeds: deque = deque()  # (round, index, seed) not yet sent
        self.rounds: dict[int, Round] = {}
        self.next_round = self.store.num_rounds
        self.last_write = time.time()

    def generate(self, num_records: int) -> list[dict]:
        """Rounds until the directory holds at least ``num_records`` records; returns them."""
        records = self.store.records()
        bar = tqdm(total=num_records, initial=min(len(records), num_records), desc="magpie",
                   unit="conv", file=sys.stderr, dynamic_ncols=True)
        self.last_write = time.time()
        while True:
            self.feed(num_records - len(records))
            if not self.jobs:
                break
            for out in self.engine.step():
                if out.finished:
                    self.finish(self.jobs.pop(out.request_id))
            for new in self.flush():
                records += new
                self.check_yield(len(records))
                bar.update(max(0, min(len(new), num_records - bar.n)))
                stats = summary(self.store.manifest)
                bar.set_postfix(rounds=stats["rounds"], tok_s=stats["generated_tokens_per_second"])
        bar.close()
        return records[:num_records]

    def check_yield(self, num_records: int) -> None:
        """Stop when many rounds have given nothing: the model writes no usable user turns."""
        if num_records == 0 and self.store.num_rounds >= NO_YIELD_ROUNDS:
            raise MtpserveError(f"{self.store.num_rounds} rounds of Magpie seeds gave no usable "
                                "conversation (see the filter counts in "
                                f"{self.store.path}/manifest.json): this model does not write "
                                "user turns; train with --prompt-mix builtin=1")

    def feed(self, missing: int) -> None:
        """Send seeds while fewer than ``max_num_seqs`` requests are in flight, opening new rounds
        while the rounds in flight are not expected to bring ``missing`` records. The next stages
        of conversations are sent as their requests finish, before any new seed, so they never
        queue behind new rounds."""
        limit = self.engine.config.max_num_seqs
        while len(self.jobs) < limit:
            if not self.seeds:
                if self.expected_in_flight() >= missing:
                    return
                self.open_round()
            number, index, seed = self.seeds.popleft()
            job = Job("user", self.rounds[number], index, seed, [], seed.opener)
            job.round.unstarted -= 1
            self.submit(job, [{"role": "system", "content": seed.system}])

    def expected_in_flight(self) -> float:
        stats = summary(self.store.manifest)
        seeds = stats["rounds"] * self.cfg.round_size
        per_seed = stats.get("records", 0) / seeds if seeds else 1.0
        return len(self.rounds) * self.cfg.round_size * max(per_seed, 0.05)

    def open_round(self) -> None:
        number = self.next_round
        self.next_round += 1
        rng = random.Random(f"{self.cfg.seed}:{number}")
        self.rounds[number] = Round(number, self.cfg.round_size)
        for index in range(self.cfg.round_size):
            self.seeds.append((number, index, make_seed(rng)))

    def submit(self, job: Job, context: list[dict]) -> None:
        """Send ``job``: a user turn sampled after ``context``, or the answer to ``job.conv``.
        A conversation that has outgrown the context is dropped."""
        cfg = self.cfg
        if job.stage in ("user", "follow_up"):
            prefix, _ = user_turn_prefix(self.tok, context)
            job.opener_ids = []
            if job.opener:
                job.opener_ids = self.tok.encode(job.opener, add_special_tokens=False)
            ids = self.tok.encode(prefix, add_special_tokens=False) + job.opener_ids
            key = f"{cfg.seed}:{job.round.number}:{job.index}:{job.stage}"
            params = SamplingParams(temperature=cfg.user_temperature, top_p=cfg.user_top_p,
                                    seed=zlib.crc32(key.encode()), max_tokens=cfg.max_user_tokens)
        else:
            ids = self.prompt_ids(job.conv)
            params = SamplingParams(temperature=0, max_tokens=cfg.max_answer_tokens)
        room = self.engine.max_model_len - len(ids)
        if room < 1:
            return
        params.max_tokens = min(params.max_tokens, room)
        params.stop_token_ids = list(self.stop_ids)
        request_id = f"magpie-{job.round.number}-{job.index}-{job.stage}"
        job.request = self.engine.add_request(request_id, ids, params)
        job.round.pending += 1
        self.jobs[request_id] = job

    def finish(self, job: Job) -> None:
        """Take a finished request's output and start its conversation's next stage."""
        job.round.pending -= 1
        req = job.request
        if req.status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR):
            return
        if job.stage in ("user", "follow_up"):
            self.finish_user_turn(job, req)
        else:
            self.finish_answer(job, req)

    def finish_user_turn(self, job: Job, req) -> None:
        ended = req.status == RequestStatus.FINISHED_STOPPED
        ids = req.output_token_ids
        if ended:
            ids = ids[:-1]
        job.round.user_tokens += len(req.output_token_ids)
        text = self.tok.decode(job.opener_ids + ids).strip()
        first = job.stage == "user"
        keep = self.first_filter if first else self.follow_filter
        stats = job.round.filter if first else job.round.follow_up_filter
        why = keep.reason(text, ended, job.opener)
        stats[why or "kept"] += 1
        if why is not None:
            return
        keep.add(text)
        job.conv = job.conv + [{"role": "user", "content": text}]
        job.stage = "answer" if first else "follow_up_answer"
        self.submit(job, [])

    def finish_answer(self, job: Job, req) -> None:
        answer = req.output_token_ids
        job.round.answer_tokens += len(answer)
        turn = len(job.conv) // 2 + 1
        record = {"kind": job.seed.kind, "source": "magpie",
                  "user": [m["content"] for m in job.conv if m["role"] == "user"],
                  "prompt_ids": req.prompt_token_ids, "output_ids": answer}
        job.round.records.append((job.index, turn, record))
        ended = bool(answer) and answer[-1] in self.stop_ids
        rng = random.Random(f"{self.cfg.seed}:{job.round.number}:{job.index}:follow_up")
        if job.stage == "answer" and ended and rng.random() < self.cfg.follow_up_share:
            text = self.tok.decode(answer[:-1])
            job.conv = job.conv + [{"role": "assistant", "content": text}]
            job.stage = "follow_up"
            job.opener = follow_up_opener(rng)
            self.submit(job, [{"role": "system", "content": job.seed.system}, *job.conv])

    def flush(self) -> list[list[dict]]:
        """Write the completed rounds that are next in order; their records."""
        out = []
        while self.rounds.get(self.store.num_rounds) and self.rounds[self.store.num_rounds].done:
            rnd = self.rounds.pop(self.store.num_rounds)
            records = [r for _, _, r in sorted(rnd.records, key=lambda x: x[:2])]
            now = time.time()
            info = {"user_tokens": rnd.user_tokens, "answer_tokens": rnd.answer_tokens,
                    "seconds": round(now - self.last_write, 2), "filter": dict(rnd.filter),
                    "follow_up_filter": dict(rnd.follow_up_filter)}
            self.last_write = now
            self.store.append(records, info)
            out.append(records)
        return out

    def prompt_ids(self, conv: list[dict]) -> list[int]:
        return self.tok.encode(self.tok.apply_chat_template(conv), add_special_tokens=False)
