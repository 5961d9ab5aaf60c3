"""``mtpserve train-head``: a DeepSeek-style MTP head for a frozen base model, trained by
self-distillation.

1. Prompts of four kinds (``engine/train/prompts.py``) are answered by the base model through our
   engine, greedy, batched (``data.py``); held-out prompts give the evaluation set.
2. The draft vocabulary is the ``draft_vocab`` most frequent tokens of the answers.
3. The head (``num_layers`` layers of the base model's kind, sharing its embedding and lm_head)
   learns to predict the base model's own tokens ``depth`` steps ahead, teacher-forced
   (``distill.py``).

Everything lands in ``out``: the data files, the head (``mtp_head.json`` + ``mtp_head.safetensors``,
loadable by ``--mtp-head``), ``trainer_state.pt`` (optimizer and position; a rerun resumes from it)
and ``train_report.json`` (evaluation acceptance, wall time).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.loader.mtp_head import HEAD_CONFIG, load_mtp_head, save_mtp_head
from mtpserve.engine.models.mtp import DEEPSEEK_LAYOUT, build_mtp
from mtpserve.engine.train.data import generate_sequences
from mtpserve.engine.train.distill import IGNORE, acceptance_length, base_hidden, mtp_loss, pack
from mtpserve.engine.train.head_init import head_config, init_head_weights
from mtpserve.engine.train.prompts import KINDS, prompt_set

logger = logging.getLogger("mtpserve.train")
STATE = "trainer_state.pt"
TRAIN_PER_KIND = {"code": None, "chat": None, "json": None, "math": 500}  # None: every prompt


@dataclass
class TrainConfig:
    out: str
    num_layers: int = 1
    depth: int = 3  # draft steps trained (the chain a verify step checks)
    draft_vocab: int = 8192  # 0: the whole vocabulary
    train_per_kind: dict = field(default_factory=lambda: dict(TRAIN_PER_KIND))
    eval_per_kind: int = 16
    epochs: int = 3
    tokens_per_step: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 50
    eval_every: int = 200
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    max_num_seqs: int = 64  # generation batch


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def _batches(order: list[int], lengths: list[int], tokens_per_step: int) -> list[list[int]]:
    batches = []
    cur = []
    size = 0
    for i in order:
        if cur and size + lengths[i] > tokens_per_step:
            batches.append(cur)
            cur = []
            size = 0
        cur.append(i)
        size += lengths[i]
    if cur:
        batches.append(cur)
    return batches


def _draft_vocab(
    sequences: list[dict], size: int, vocab_size: int, eos: frozenset
) -> torch.Tensor | None:
    if size <= 0 or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in sequences:
        ids = torch.tensor(s["output_ids"], dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab_size)
    for t in eos:
        counts[t] = counts.max() + 1  # ending a reply is always draftable
    return counts.argsort(descending=True, stable=True)[:size].sort().values


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _vocab_map(draft_vocab: torch.Tensor, vocab_size: int, train: list[dict]) -> torch.Tensor:
    """Token id -> its index in the draft vocabulary (IGNORE outside it); logs the coverage."""
    vocab_map = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    vocab_map[draft_vocab] = torch.arange(len(draft_vocab))
    covered = sum(int((vocab_map[torch.tensor(s["output_ids"])] >= 0).sum()) for s in train)
    answer_tokens = sum(len(s["output_ids"]) for s in train)
    logger.warning("draft vocabulary: %d tokens cover %.1f%% of the answer tokens",
                   len(draft_vocab), 100 * covered / max(1, answer_tokens))
    return vocab_map


def _sequences(records: list[dict]) -> list[tuple[list[int], int]]:
    """(prompt + answer ids, where the answer starts) of each generated record."""
    return [(s["prompt_ids"] + s["output_ids"], len(s["prompt_ids"])) for s in records]


def _epoch_plan(lengths: list[int], epochs: int, tokens_per_step: int, seed: int) -> list[list]:
    """The batches of every epoch in order, each epoch shuffled."""
    rng = random.Random(seed)
    plan = []
    for _ in range(epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        plan.extend(_batches(order, lengths, tokens_per_step))
    return plan


class HeadTrainer:
    def __init__(self, checkpoint, cfg: TrainConfig):
        self.cfg = cfg
        self.checkpoint = checkpoint
        os.makedirs(cfg.out, exist_ok=True)
        kv_cache_gib = 16 if cfg.device.startswith("cuda") else 2
        engine_config = EngineConfig(
            dtype=torch.float32,
            device=cfg.device,
            spec_draft_n_max=0,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=max(2048, cfg.max_num_seqs),
            kv_cache_memory_bytes=kv_cache_gib << 30,
        )
        self.engine = LLMEngine(checkpoint, engine_config)
        self.model = self.engine.model
        self.mc = checkpoint.config
        self.device = self.engine.device

    def data(self) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg
        os.makedirs(os.path.join(cfg.out, "data"), exist_ok=True)
        train_prompts = []
        for kind in KINDS:
            train_prompts += prompt_set("train", [kind], cfg.train_per_kind.get(kind))
        eval_prompts = prompt_set("eval", KINDS, cfg.eval_per_kind)
        train_file = os.path.join(cfg.out, "data", "train.jsonl")
        eval_file = os.path.join(cfg.out, "data", "eval.jsonl")
        train = generate_sequences(self.engine, train_prompts, train_file,
                                   desc="answer train prompts")
        evals = generate_sequences(self.engine, eval_prompts, eval_file,
                                   desc="answer eval prompts")
        return train, evals

    def hidden(self, sequences: list[dict], desc: str) -> list[torch.Tensor]:
        out = []
        for s in tqdm(sequences, desc=desc, unit="seq", file=sys.stderr, dynamic_ncols=True):
            ids = torch.tensor(s["prompt_ids"] + s["output_ids"], device=self.device)
            out.append(base_hidden(self.model, ids).to(torch.float16))  # kept for every epoch
        return out

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{self.mc.num_hidden_layers + i}."

    def build_head(self, draft_vocab):
        cfg = self.cfg
        mc = self.mc
        has_head = os.path.isfile(os.path.join(cfg.out, HEAD_CONFIG))
        resume = has_head and os.path.isfile(os.path.join(cfg.out, STATE))
        if resume:
            weights, head = load_mtp_head(cfg.out, mc)
            layers = head.get("num_nextn_predict_layers")
            if layers != cfg.num_layers:
                raise MtpserveError(f"{cfg.out} holds a head of {layers} layer(s), "
                                    f"not {cfg.num_layers}: pick another --out")
        else:
            weights = init_head_weights(mc, cfg.num_layers, cfg.seed)
        mtp = build_mtp(self.model, weights, cfg.num_layers, DEEPSEEK_LAYOUT, self.layer_prefix,
                        "pre_norm", draft_vocab)
        return mtp.to(self.device).float(), resume

    def save(self, mtp, draft_vocab, step, opt, report=None) -> None:
        cfg = self.cfg
        weights = {}
        for i, layer in enumerate(mtp.layers):
            weights.update(layer.export(self.layer_prefix(i)))
        state_file = os.path.join(cfg.out, STATE)
        torch.save({"step": step, "optimizer": opt.state_dict()}, state_file + ".tmp")
        head = head_config(self.mc, cfg.num_layers)
        save_mtp_head(cfg.out, weights, head, draft_vocab, torch.float16)
        os.replace(state_file + ".tmp", state_file)
        if report is not None:
            with open(os.path.join(cfg.out, "train_report.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)

    def evaluate(self, mtp, eval_batches) -> dict:
        was = [p.requires_grad for p in mtp.parameters()]
        lengths = []
        positions = []
        weights = []
        for batch in eval_batches:
            length, per_position = acceptance_length(mtp, batch, self.cfg.depth)
            n = int(batch["counted"][0].sum())
            lengths.append(length * n)
            positions.append([a * n for a in per_position])
            weights.append(n)
        for p, w in zip(mtp.parameters(), was):
            p.requires_grad_(w)
        total = max(1, sum(weights))
        return {"mean_acceptance_length": sum(lengths) / total,
                "acceptance_per_position": [sum(col) / total for col in zip(*positions)]}

    def pack_batch(self, seqs, hidden, batch: list[int], vocab_map) -> dict:
        """The packed rows of the sequences ``batch`` indexes."""
        picked = [seqs[i] for i in batch]
        picked_hidden = [hidden[i] for i in batch]
        return pack(picked, picked_hidden, self.cfg.depth, vocab_map, self.device)

    def optimizer(self, mtp, resumed: bool):
        """(the head's weights, AdamW over them, the step to start from:
        restored on a resumed run)."""
        params = list(mtp.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        step = 0
        if resumed:
            state = torch.load(os.path.join(self.cfg.out, STATE), map_location=self.device)
            opt.load_state_dict(state["optimizer"])
            step = state["step"]
        return params, opt, step

    def train_step(self, mtp, opt, params, batch: dict) -> float | None:
        """One optimizer step on ``batch``; its loss (None: nothing to count, no step)."""
        loss = mtp_loss(mtp, batch, self.cfg.depth)
        opt.zero_grad(set_to_none=True)
        if loss is None:
            return None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    def run(self) -> dict:
        cfg = self.cfg
        start = time.time()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        train, evals = self.data()
        eos = frozenset(self.checkpoint.generation.eos_token_ids or self.mc.eos_token_ids)
        draft_vocab = _draft_vocab(train, cfg.draft_vocab, self.mc.vocab_size, eos)
        vocab_map = None
        if draft_vocab is not None:
            vocab_map = _vocab_map(draft_vocab, self.mc.vocab_size, train)
        mtp, resumed = self.build_head(draft_vocab)
        train_h = self.hidden(train, "base hidden states (train)")
        eval_h = self.hidden(evals, "base hidden states (eval)")
        seqs = _sequences(train)
        eval_seqs = _sequences(evals)
        eval_lengths = [len(s[0]) for s in eval_seqs]
        eval_plan = _batches(list(range(len(eval_seqs))), eval_lengths, cfg.tokens_per_step)
        eval_batches = [self.pack_batch(eval_seqs, eval_h, b, vocab_map) for b in eval_plan]
        lengths = [len(s[0]) for s in seqs]
        plan = _epoch_plan(lengths, cfg.epochs, cfg.tokens_per_step, cfg.seed)
        params, opt, step = self.optimizer(mtp, resumed)
        first = self.evaluate(mtp, eval_batches) if step == 0 else None
        bar = tqdm(total=len(plan), initial=step, desc="train head", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
        last_eval = first or {}
        running = None
        losses = []
        while step < len(plan):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _schedule(step, len(plan), cfg.warmup_steps)
            batch = self.pack_batch(seqs, train_h, plan[step], vocab_map)
            value = self.train_step(mtp, opt, params, batch)
            if value is not None:
                running = value if running is None else 0.95 * running + 0.05 * value
                losses.append(value)
            step += 1
            if step % cfg.eval_every == 0 or step == len(plan):
                last_eval = self.evaluate(mtp, eval_batches)
            if step % cfg.checkpoint_every == 0 or step == len(plan):
                self.save(mtp, draft_vocab, step, opt)
            shown_loss = f"{running:.3f}" if running is not None else "-"
            bar.set_postfix(loss=shown_loss,
                            eval_len=f"{last_eval.get('mean_acceptance_length', 0):.2f}")
            bar.update(1)
        bar.close()
        draft_vocab_size = self.mc.vocab_size
        if draft_vocab is not None:
            draft_vocab_size = len(draft_vocab)
        report = {
            "config": asdict(cfg),
            "steps": step,
            "train_sequences": len(seqs),
            "train_tokens": sum(lengths),
            "eval_sequences": len(eval_seqs),
            "draft_vocab_size": draft_vocab_size,
            "eval_before": first,
            "eval": last_eval,
            "loss_first": _mean(losses[:20]),
            "loss_last": _mean(losses[-20:]),
            "wall_seconds": round(time.time() - start, 1),
            "resumed": resumed,
        }
        self.save(mtp, draft_vocab, step, opt, report)
        return report
