"""``mtpserve train-head``: a DeepSeek-style MTP head for a frozen base model, trained by
self-distillation.

1. Generate: a mix of prompt sources (``mix.py``: the built-in set of ``prompts.py`` and
   conversations the model writes itself, ``magpie.py``), answered by the base model through our
   engine, greedy, batched; held-out records of each source give the evaluation sets.
2. Hidden: the base model's final hidden states over every record.
3. Train: the draft vocabulary is the ``draft_vocab`` most frequent tokens of the answers; the head
   (``num_layers`` layers of the base model's kind, sharing its embedding and lm_head) learns the
   base model's tokens ``depth`` steps ahead, teacher-forced (``distill.py``), against its argmax
   (hard targets) or its whole distribution (soft targets, ``soft_targets.py``).

Everything lands in ``out``: the data (``data/``, with the hidden states of step 2 and the held-out
prompts as a bench prompts file, ``heldout.py``), the head (``mtp_head.json`` +
``mtp_head.safetensors``, loadable by ``--mtp-head``), ``trainer_state.pt`` (optimizer, position and
learning curve; a rerun resumes from it), ``phases.json`` (wall time per phase over every session)
and ``train_report.json``.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.loader.mtp_head import (
    HEAD_CONFIG,
    default_head_path,
    load_mtp_head,
    save_mtp_head,
)
from mtpserve.engine.models.mtp import DEEPSEEK_LAYOUT, build_mtp
from mtpserve.engine.train.distill import base_hidden, mtp_loss, pack
from mtpserve.engine.train.draft_vocab import draft_vocabulary, vocab_map_of
from mtpserve.engine.train.evaluation import evaluate
from mtpserve.engine.train.head_init import head_config, init_head_weights
from mtpserve.engine.train.hidden_store import HiddenStore, model_key
from mtpserve.engine.train.magpie_store import summary
from mtpserve.engine.train.mix import recipe_records
from mtpserve.engine.train.phases import PhaseClock, hardware
from mtpserve.engine.train.precision import autocast
from mtpserve.engine.train.soft_targets import Teacher, teacher_head

STATE = "trainer_state.pt"
TRAIN_PER_KIND = {"code": None, "chat": None, "json": None, "math": 500}  # None: every prompt
PROMPT_MIX = {"builtin": 0.25, "magpie": 0.75}
TRAIN_ANSWERS = 2000  # sized for a 2-core CPU; the shipped head uses more (README)


@dataclass
class TrainConfig:
    out: str
    num_layers: int = 1
    depth: int = 3  # draft steps trained (the chain a verify step checks)
    draft_vocab: int = 8192  # 0: the whole vocabulary
    prompt_mix: dict = field(default_factory=lambda: dict(PROMPT_MIX))  # source -> share
    train_answers: int = TRAIN_ANSWERS  # training answers from all sources together
    train_per_kind: dict = field(default_factory=lambda: dict(TRAIN_PER_KIND))  # built-in caps
    eval_per_kind: int = 16
    eval_magpie: int = 64  # held-out Magpie conversations evaluated
    magpie_skip: int = 0  # stored Magpie conversations passed over (an earlier stage's)
    targets: str = "hard"  # "hard": the base model's tokens; "soft": its distribution
    distill_temperature: float = 1.0  # T of the soft targets' KL, on both sides as at inference
    epochs: int = 3
    tokens_per_step: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 50
    eval_every: int = 200
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    max_num_seqs: int = 64  # generation batch
    # a trained head to start from (fine-tuning it on this run's data) instead of random weights:
    # its directory, or "default" for the head shipped for the default model
    init_head: str | None = None
    # weights the base model answers with: "none" (float, as the hidden states and the training
    # use them) or a quantization, e.g. "int4" on the CPU block kernels, as `serve` runs a GGUF on
    # a CPU (needs the checkpoint loaded quantized: HeadTrainer's generator_checkpoint)
    generate_quantization: str = "none"
    # arithmetic of the hidden-state pass and the training steps (precision.py): "float32" or
    # "bfloat16" (autocast: float32 weights, optimizer and loss)
    precision: str = "float32"


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


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


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
    def __init__(self, checkpoint, cfg: TrainConfig, generator_checkpoint=None):
        """``checkpoint``: the base model with float weights (hidden states, training);
        ``generator_checkpoint``: the same model loaded quantized, which answers the prompts when
        ``cfg.generate_quantization`` is not "none"."""
        if (cfg.generate_quantization != "none") != (generator_checkpoint is not None):
            raise MtpserveError("a quantized generator needs generate_quantization and the "
                                "checkpoint loaded quantized, both or neither")
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
        self.generator = self.engine
        if generator_checkpoint is not None:
            quantized = replace(engine_config, quantization=cfg.generate_quantization)
            self.generator = LLMEngine(generator_checkpoint, quantized)

    def data(self) -> tuple[list[dict], dict[str, list[dict]], dict]:
        return recipe_records(self.generator, self.cfg)

    def hidden(self, sequences: list[dict], name: str) -> list[torch.Tensor]:
        """The base model's hidden states over each record of the set ``name``, float16, kept for
        every epoch and saved by record in ``data/`` (``hidden_store.py``)."""
        path = os.path.join(self.cfg.out, "data", f"hidden-{name}.pt")
        key = model_key(self.model, self.cfg.precision)
        store = HiddenStore(path, key, self.device)
        return store.states(sequences, self.record_hidden, f"base hidden states ({name})")

    def record_hidden(self, record: dict) -> torch.Tensor:
        ids = torch.tensor(record["prompt_ids"] + record["output_ids"], device=self.device)
        with autocast(self.cfg.precision, self.device):
            return base_hidden(self.model, ids)

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{self.mc.num_hidden_layers + i}."

    def build_head(self, draft_vocab):
        cfg = self.cfg
        mc = self.mc
        has_head = os.path.isfile(os.path.join(cfg.out, HEAD_CONFIG))
        resume = has_head and os.path.isfile(os.path.join(cfg.out, STATE))
        if resume:
            weights = self.head_weights(cfg.out, "pick another --out")
        elif cfg.init_head is not None:
            weights = self.head_weights(self.init_head_path(), "pick another --init-head")
        else:
            weights = init_head_weights(mc, cfg.num_layers, cfg.seed)
        mtp = build_mtp(self.model, weights, cfg.num_layers, DEEPSEEK_LAYOUT, self.layer_prefix,
                        "pre_norm", draft_vocab)
        return mtp.to(self.device).float(), resume

    def init_head_path(self) -> str:
        if self.cfg.init_head == "default":
            return default_head_path()
        return self.cfg.init_head

    def earlier_report(self) -> dict | None:
        """The report of the head this run starts from (``--init-head``), so a head fine-tuned in
        stages carries every stage's command, hardware and learning curve."""
        if self.cfg.init_head is None:
            return None
        path = os.path.join(self.init_head_path(), "train_report.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def head_weights(self, path: str, hint: str) -> dict:
        """The weights of the head in ``path``, which must have ``num_layers`` layers. Its draft
        vocabulary is not kept: the head is trained on this run's (the layers share the base
        model's embedding and lm_head, so any subset of the vocabulary fits them)."""
        weights, head = load_mtp_head(path, self.mc)
        layers = head.get("num_nextn_predict_layers")
        if layers != self.cfg.num_layers:
            raise MtpserveError(f"{path} holds a head of {layers} layer(s), "
                                f"not {self.cfg.num_layers}: {hint}")
        return weights

    def save(self, mtp, draft_vocab, step, opt, curve, report=None) -> None:
        cfg = self.cfg
        weights = {}
        for i, layer in enumerate(mtp.layers):
            weights.update(layer.export(self.layer_prefix(i)))
        state_file = os.path.join(cfg.out, STATE)
        state = {"step": step, "optimizer": opt.state_dict(), "curve": curve}
        torch.save(state, state_file + ".tmp")
        head = head_config(self.mc, cfg.num_layers)
        save_mtp_head(cfg.out, weights, head, draft_vocab, torch.float16)
        os.replace(state_file + ".tmp", state_file)
        if report is not None:
            with open(os.path.join(cfg.out, "train_report.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)

    def pack_batch(self, seqs, hidden, batch: list[int], vocab_map) -> dict:
        """The packed rows of the sequences ``batch`` indexes."""
        picked = [seqs[i] for i in batch]
        picked_hidden = [hidden[i] for i in batch]
        return pack(picked, picked_hidden, self.cfg.depth, vocab_map, self.device)

    def optimizer(self, mtp, resumed: bool):
        """(the head's weights, AdamW over them, the step to start from and the learning curve
        so far: restored on a resumed run)."""
        params = list(mtp.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        step = 0
        curve = []
        if resumed:
            state = torch.load(os.path.join(self.cfg.out, STATE), map_location=self.device)
            opt.load_state_dict(state["optimizer"])
            step = state["step"]
            curve = state.get("curve", [])
        return params, opt, step, curve

    def train_step(self, mtp, opt, params, batch: dict, teacher: Teacher | None) -> float | None:
        """One optimizer step on ``batch``; its loss (None: nothing to count, no step)."""
        with autocast(self.cfg.precision, self.device):
            loss = mtp_loss(mtp, batch, self.cfg.depth, teacher)
        opt.zero_grad(set_to_none=True)
        if loss is None:
            return None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    def eval_batches(self, name: str, records: list[dict], vocab_map) -> list[dict]:
        """The packed batches of one held-out set (hidden states computed here)."""
        hidden = self.hidden(records, f"eval-{name}")
        seqs = _sequences(records)
        lengths = [len(s[0]) for s in seqs]
        plan = _batches(list(range(len(seqs))), lengths, self.cfg.tokens_per_step)
        return [self.pack_batch(seqs, hidden, b, vocab_map) for b in plan]

    def run(self, command: str | None = None) -> dict:
        """The whole recipe; ``command``: the command line that started it, for the report."""
        cfg = self.cfg
        clock = PhaseClock(cfg.out)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        clock.start("generate")
        train, evals, data_info = self.data()
        clock.stop()
        eos = frozenset(self.checkpoint.generation.eos_token_ids or self.mc.eos_token_ids)
        draft_vocab = draft_vocabulary(train, cfg.draft_vocab, self.mc.vocab_size, eos)
        vocab_map = None
        if draft_vocab is not None:
            vocab_map = vocab_map_of(draft_vocab, self.mc.vocab_size, train)
        mtp, resumed = self.build_head(draft_vocab)
        clock.start("hidden")
        train_h = self.hidden(train, "train")
        eval_batches = {name: self.eval_batches(name, records, vocab_map)
                        for name, records in evals.items()}
        clock.stop()
        clock.start("train")
        teacher = Teacher(teacher_head(self.model, draft_vocab), cfg.distill_temperature)
        seqs = _sequences(train)
        trained = self.train(mtp, seqs, train_h, eval_batches, vocab_map, draft_vocab, teacher,
                             resumed, clock)
        clock.stop()
        opt = trained.pop("optimizer")
        draft_vocab_size = self.mc.vocab_size
        if draft_vocab is not None:
            draft_vocab_size = len(draft_vocab)
        report = {
            "config": asdict(cfg),
            **trained,
            "train_sequences": len(seqs),
            "train_tokens": sum(len(s[0]) for s in seqs),
            "eval_sequences": {name: len(records) for name, records in evals.items()},
            "draft_vocab_size": draft_vocab_size,
            "data": {k: v for k, v in data_info.items() if k != "magpie_manifest"},
            "phase_seconds": dict(clock.seconds),
            "wall_seconds": round(sum(clock.seconds.values()), 1),
            "sessions": clock.sessions,
            "resumed": resumed,
            "command": command,
            "hardware": hardware(self.device),
            "init_head_report": self.earlier_report(),
        }
        if "magpie_manifest" in data_info:
            report["data"]["magpie"] = summary(data_info["magpie_manifest"])
        self.save(mtp, draft_vocab, trained["steps"], opt, trained["curve"], report)
        return report

    def train(self, mtp, seqs, train_h, eval_batches, vocab_map, draft_vocab, teacher, resumed,
              clock) -> dict:
        """The training loop (resumed from the last checkpoint): evaluation every ``eval_every``
        steps into the learning curve, a checkpoint every ``checkpoint_every``."""
        cfg = self.cfg
        soft = None
        if cfg.targets == "soft":
            soft = teacher
        lengths = [len(s[0]) for s in seqs]
        plan = _epoch_plan(lengths, cfg.epochs, cfg.tokens_per_step, cfg.seed)
        params, opt, step, curve = self.optimizer(mtp, resumed)
        seen = [0]
        for batch in plan:
            seen.append(seen[-1] + sum(lengths[i] for i in batch))
        if step == 0:
            curve = [{"step": 0, "train_tokens": 0,
                      **evaluate(mtp, eval_batches, teacher, cfg.depth)}]
        bar = tqdm(total=len(plan), initial=step, desc="train head", unit="step",
                   file=sys.stderr, dynamic_ncols=True)
        running = None
        losses = []
        while step < len(plan):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _schedule(step, len(plan), cfg.warmup_steps)
            batch = self.pack_batch(seqs, train_h, plan[step], vocab_map)
            value = self.train_step(mtp, opt, params, batch, soft)
            if value is not None:
                running = value if running is None else 0.95 * running + 0.05 * value
                losses.append(value)
            step += 1
            if step % cfg.eval_every == 0 or step == len(plan):
                curve.append({"step": step, "train_tokens": seen[step],
                              **evaluate(mtp, eval_batches, teacher, cfg.depth)})
            if step % cfg.checkpoint_every == 0 or step == len(plan):
                self.save(mtp, draft_vocab, step, opt, curve)
                clock.lap()
            shown_loss = f"{running:.3f}" if running is not None else "-"
            bar.set_postfix(loss=shown_loss,
                            eval_len=f"{curve[-1]['mean_acceptance_length']:.2f}")
            bar.update(1)
        bar.close()
        return {"steps": step, "eval_before": curve[0], "eval": curve[-1], "curve": curve,
                "loss_first": _mean(losses[:20]), "loss_last": _mean(losses[-20:]),
                "optimizer": opt}
