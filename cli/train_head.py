"""``mtpserve train-head``: train an MTP head for a
model that has none (see engine/train/trainer.py)."""

from __future__ import annotations

import json
import os
import shlex

from mtpserve.cli.engine_args import resolve_device, resolve_quantization
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.models.quantize import QUANTIZATIONS
from mtpserve.engine.train.mix import SOURCES, parse_mix
from mtpserve.engine.train.precision import PRECISIONS, resolve_precision
from mtpserve.engine.train.prompts import KINDS
from mtpserve.engine.train.trainer import PROMPT_MIX, TRAIN_ANSWERS, HeadTrainer, TrainConfig


def add_args(p) -> None:
    p.add_argument("--model", default="default",
                   help="GGUF file, HF model directory, or 'default' (SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--out", required=True,
                   help="output directory (head, data, checkpoints); a rerun resumes")
    p.add_argument("--num-layers", type=int, default=1,
                   help="MTP layers (one is reused for every draft step)")
    p.add_argument("--depth", type=int, default=3, help="draft steps trained")
    p.add_argument("--init-head", default=None,
                   help="start from this trained head (a head directory, or 'default': the head "
                        "shipped for the default model) and fine-tune it on this run's data, "
                        "instead of from random weights")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="draft vocabulary: the N most frequent "
                        "answer tokens (0: the whole vocabulary)")
    default_mix = ",".join(f"{name}={share:g}" for name, share in PROMPT_MIX.items())
    p.add_argument("--prompt-mix", default=default_mix,
                   help=f"share of the training answers from each prompt source "
                        f"({', '.join(SOURCES)}): SOURCE=SHARE, comma-separated; builtin: prompts "
                        "built from Python's own text, magpie: conversations the model writes")
    p.add_argument("--train-answers", type=int, default=TRAIN_ANSWERS,
                   help="training answers from all sources together")
    p.add_argument("--train-per-kind", default="code=all,chat=all,json=all,math=500",
                   help=f"at most this many built-in training prompts per kind "
                        f"({', '.join(KINDS)}): KIND=N or KIND=all, comma-separated")
    p.add_argument("--eval-per-kind", type=int, default=16,
                   help="held-out built-in prompts per kind for evaluation")
    p.add_argument("--eval-magpie", type=int, default=64,
                   help="held-out Magpie conversations for evaluation")
    p.add_argument("--magpie-skip", type=int, default=0,
                   help="pass over the first N stored Magpie conversations (training and "
                        "held-out alike), e.g. those an earlier stage of --init-head learnt from")
    p.add_argument("--targets", choices=("hard", "soft"), default="hard",
                   help="hard: learn the base model's tokens; soft: its whole distribution "
                        "(KL), so sampled drafts are accepted more often")
    p.add_argument("--distill-temperature", type=float, default=1.0,
                   help="temperature of the soft targets' KL, applied to both models' logits")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--tokens-per-step", type=int, default=1024,
                   help="tokens packed into one optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=200, help="steps between evaluations")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests generated at once")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="arithmetic of the hidden-state pass and the training steps; bfloat16: "
                        "autocast, with float32 weights, optimizer and loss; auto: bfloat16 where "
                        "the device multiplies it natively (AVX512-BF16 or AMX CPUs, CUDA), else "
                        "float32")
    p.add_argument("--quantization", default="auto", choices=["auto", *QUANTIZATIONS],
                   help="weights the base model answers the prompts with; auto: as `serve` runs "
                        "the model on this device (int4 on the CPU block kernels for a GGUF on "
                        "a CPU); hidden states and training use float weights")


def parse_per_kind(text: str) -> dict:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        kind, sep, count = item.partition("=")
        if kind not in KINDS or not sep:
            raise MtpserveError(f"--train-per-kind: expected KIND=N with KIND in "
                                f"{', '.join(KINDS)}, got {item!r}")
        if count == "all":
            out[kind] = None
        elif count.isdigit():
            out[kind] = int(count)
        else:
            raise MtpserveError(f"--train-per-kind: {item!r}: the count must be a number or 'all'")
    return out


def run(args) -> int:
    positive = ("num_layers", "depth", "epochs", "tokens_per_step", "eval_every",
                "checkpoint_every", "max_num_seqs")
    for name in positive:
        if getattr(args, name) < 1:
            raise MtpserveError(f"--{name.replace('_', '-')} must be at least 1")
    counts = (args.draft_vocab, args.eval_per_kind, args.eval_magpie, args.magpie_skip)
    if min(counts) < 0 or args.lr <= 0:
        raise MtpserveError("--draft-vocab, --eval-per-kind, --eval-magpie and --magpie-skip "
                            "must be >= 0, --lr positive")
    if args.train_answers < 1 or not args.distill_temperature > 0:
        raise MtpserveError("--train-answers must be at least 1, --distill-temperature positive")
    mix = parse_mix(args.prompt_mix)
    if args.magpie_skip and "magpie" not in mix:
        raise MtpserveError("--magpie-skip needs a magpie share in --prompt-mix")
    device = resolve_device(args.device)
    if args.init_head not in (None, "default") and not os.path.isdir(args.init_head):
        raise MtpserveError(f"--init-head {args.init_head}: no such head directory")
    cfg = TrainConfig(
        out=args.out,
        num_layers=args.num_layers,
        depth=args.depth,
        draft_vocab=args.draft_vocab,
        prompt_mix=mix,
        train_answers=args.train_answers,
        train_per_kind=parse_per_kind(args.train_per_kind),
        eval_per_kind=args.eval_per_kind,
        eval_magpie=args.eval_magpie,
        magpie_skip=args.magpie_skip,
        targets=args.targets,
        distill_temperature=args.distill_temperature,
        epochs=args.epochs,
        tokens_per_step=args.tokens_per_step,
        lr=args.lr,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=device,
        max_num_seqs=args.max_num_seqs,
        generate_quantization=resolve_quantization(args.model, args.quantization, device),
        init_head=args.init_head,
        precision=resolve_precision(args.precision, device),
    )
    generator = None
    if cfg.generate_quantization != "none":
        generator = load_checkpoint(args.model, quantized=True)
    command = "mtpserve " + shlex.join(args.argv)
    report = HeadTrainer(load_checkpoint(args.model), cfg, generator).run(command)
    shown = ("steps", "train_sequences", "train_tokens", "draft_vocab_size", "data",
             "phase_seconds")
    out = {k: report[k] for k in shown}
    for name in ("eval_before", "eval"):
        out[name] = {k: v for k, v in report[name].items() if k != "by_source"}
    print(json.dumps(out, indent=2))
    return 0
