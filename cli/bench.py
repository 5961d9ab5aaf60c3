"""``mtpserve bench``: the options of the offline engine benchmark (bench/engine_bench.py), the
engine they describe, and the run: measure, then write results.json, summary.md and the plots."""

from __future__ import annotations

import argparse
import os
import sys

from mtpserve.bench import decode_speed, engine_bench, llama_cpp, plots
from mtpserve.bench.engine_bench import SECTIONS
from mtpserve.bench.random_model import preset_names, random_engine
from mtpserve.bench.summary import engine_summary, write_report
from mtpserve.bench.workload import load_prompts
from mtpserve.cli.engine_args import engine_config_from_args, engine_from_args
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.errors import MtpserveError

FULL = {"per_kind": 2, "max_tokens": None, "repeats": 3, "prompt_lengths": [128, 512, 2048],
        "concurrency": [1, 2, 4, 8, 16], "sweep_tokens": 128, "sweep_rounds": 3}
QUICK = {"per_kind": 1, "max_tokens": 16, "repeats": 1, "prompt_lengths": [32, 128],
         "concurrency": [1, 2, 4], "sweep_tokens": 16, "sweep_rounds": 1}


def number_list(kind):
    """An argparse type: a comma-separated list of ``kind``."""
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError("expected a comma-separated list "
                                             f"of {kind.__name__}s: {text!r}")

    return parse


def name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_args(p) -> None:
    b = p.add_argument_group("benchmark")
    b.add_argument("--out", default="bench-results",
                   help="directory for results.json, summary.md and the plots")
    b.add_argument("--prompts", default=None,
                   help='JSONL: {"kind": ..., "prompt": ...} or {"kind": ..., '
                        '"messages": [...]} per line, optional "max_tokens" and "schema" '
                        "(the JSON schema of the answer: the schema section runs the lines "
                        "that have one, and is skipped when none has; the other sections "
                        "ignore it) "
                        "(default: the built-in held-out prompt set)")
    b.add_argument("--kinds", type=name_list, default=None,
                   help="prompt kinds to use (default: all)")
    b.add_argument("--per-kind", type=int, default=None,
                   help="prompts of each kind (default 2, --quick 1)")
    b.add_argument("--max-tokens", type=int, default=None,
                   help="cap on every prompt's max_tokens (--quick 16)")
    b.add_argument("--ignore-eos", action="store_true",
                   help="decode every prompt's max_tokens in full")
    b.add_argument("--k", type=number_list(int), default=[1, 2, 3, 4],
                   help="fixed draft lengths (default 1,2,3,4); "
                        "the adaptive row drafts up to the largest")
    b.add_argument("--temperatures", type=number_list(float), default=[0.0],
                   help="decode temperatures, e.g. 0,0.7 (default 0: greedy)")
    b.add_argument("--repeats", type=int, default=None,
                   help="runs of every measurement (default 3, --quick 1)")
    b.add_argument("--prompt-lengths", type=number_list(int), default=None,
                   help="prompt-processing lengths in tokens (default 128,512,2048)")
    b.add_argument("--concurrency", type=number_list(int), default=None,
                   help="concurrent streams of the sweep (default 1,2,4,8,16)")
    b.add_argument("--sweep-k", type=int, default=3,
                   help="fixed draft length in the concurrency sweep")
    b.add_argument("--sweep-tokens", type=int, default=None,
                   help="mean tokens per request in the sweep, "
                        "spread over 0.5x to 1.5x (default 128)")
    b.add_argument("--sweep-rounds", type=int, default=None,
                   help="each sweep level runs until every mode has output this "
                        "many times N x --sweep-tokens tokens, and at least one "
                        "request's worth per prompt (default 3, --quick 1)")
    b.add_argument("--sections", type=name_list, default=None,
                   help=f"what to measure, of {','.join(SECTIONS)} (default: all; memory is "
                        "always reported)")
    b.add_argument("--random-weights", default=None, metavar="SHAPE",
                   help="instead of the sections: decode tok/s at --batch-sizes and its ratio to "
                        "the HBM bound, on a model of this shape with random weights built on "
                        f"the device (presets {', '.join(preset_names())}, or a config.json "
                        "as JSON or YAML); no checkpoint, no MTP")
    b.add_argument("--batch-sizes", type=number_list(int), default=None,
                   help="batch sizes of --random-weights (default 1,8,64)")
    b.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="llama.cpp's llama-bench for the llamacpp section (default: on PATH or "
                        "under .llama.cpp/bin/, where `make llama-cpp` builds it; the section is "
                        "skipped without one)")
    b.add_argument("--seed", type=int, default=0,
                   help="sampling seed of the first prompt (sampled decode)")
    b.add_argument("--unseeded", action="store_true",
                   help="sampled decode without seeds: drafts are rejection-sampled instead "
                        "of coupled to the seeded target noise (compare their acceptance)")
    b.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    b.add_argument("--no-plots", action="store_true",
                   help="skip the PNG plots (no matplotlib needed)")


def resolve(args) -> None:
    """Fill the size options left unset from FULL or QUICK, then validate every option."""
    if args.batch_sizes is not None:
        raise MtpserveError("--batch-sizes goes with --random-weights")
    if args.sections is None:
        args.sections = list(SECTIONS)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("per_kind", "max_tokens", "repeats", "sweep_tokens", "sweep_rounds", "sweep_k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MtpserveError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("k", "prompt_lengths", "concurrency"):
        values = getattr(args, name)
        if not values or min(values) < 1:
            raise MtpserveError(f"--{name.replace('_', '-')} needs positive integers")
        setattr(args, name, sorted(set(values)))
    if not args.temperatures or min(args.temperatures) < 0:
        raise MtpserveError("--temperatures needs numbers >= 0")
    if args.sweep_k > max(args.k):
        raise MtpserveError(f"--sweep-k {args.sweep_k} is above the largest --k ({max(args.k)})")
    args.sections = list(dict.fromkeys(args.sections))
    unknown = set(args.sections) - set(SECTIONS)
    if unknown or not args.sections:
        raise MtpserveError(f"--sections takes some of {', '.join(SECTIONS)}; "
                            f"got {', '.join(args.sections)}")
    resolve_llama_bench(args)
    if max(args.concurrency) > args.max_num_seqs:
        raise MtpserveError(f"--concurrency {max(args.concurrency)} "
                            f"exceeds --max-num-seqs {args.max_num_seqs}")


def resolve_llama_bench(args) -> None:
    """``--llama-bench`` as given (it must be an executable), else the one found, else None."""
    if args.llama_bench is None:
        args.llama_bench = llama_cpp.find_llama_bench()
        return
    path = os.path.expanduser(args.llama_bench)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise MtpserveError(f"--llama-bench {args.llama_bench}: no such executable")
    args.llama_bench = path


def build_engine(args) -> LLMEngine:
    """One engine for every mode:
    MTP layers loaded with the largest k as cap, adaptive costs measured."""
    engine_args = argparse.Namespace(**vars(args), no_spec=False, spec_draft_n_max=max(args.k),
                                     spec_adaptive="on", spec_draft_p_min=None)
    engine = engine_from_args(engine_args)
    too_long = [n for n in args.prompt_lengths if n + 2 > engine.max_model_len]
    if {"pp", "llamacpp"} & set(args.sections) and too_long:
        raise MtpserveError(f"--prompt-lengths {too_long} do not fit this "
                            f"engine's context ({engine.max_model_len})")
    return engine


def run_random_weights(args) -> int:
    """Decode speed of a random-weight model (bench/decode_speed.py)."""
    if args.model != "default":
        raise MtpserveError("--random-weights builds its own model: leave out --model")
    if args.sections is not None:
        raise MtpserveError("--random-weights measures decode speed only: leave out --sections")
    if args.quantization not in ("auto", "none"):
        raise MtpserveError("--random-weights runs float weights: leave out --quantization")
    batch_sizes = args.batch_sizes or decode_speed.BATCH_SIZES
    if min(batch_sizes) < 1:
        raise MtpserveError("--batch-sizes needs positive integers")
    if args.mtp_head is not None:
        raise MtpserveError("--random-weights runs without MTP: leave out --mtp-head")
    args.quantization = "none"
    base = engine_config_from_args(argparse.Namespace(**vars(args), no_spec=True,
                                                      spec_draft_n_max=0, spec_adaptive="off",
                                                      spec_draft_p_min=None))
    config = decode_speed.engine_config(
        batch_sizes, decode_speed.PROMPT_LEN, decode_speed.STEPS, device=base.device,
        dtype=base.dtype, block_size=base.block_size, attention_backend=base.attention_backend,
        enforce_eager=base.enforce_eager)
    engine = random_engine(args.random_weights, config)
    results = decode_speed.measure(engine, batch_sizes, decode_speed.PROMPT_LEN, decode_speed.STEPS)
    results["model"] = args.random_weights
    write_report(args.out, results, decode_speed.table(results))
    print(f"wrote results.json, summary.md to {args.out}", file=sys.stderr)
    return 0


def run(args) -> int:
    if args.random_weights is not None:
        return run_random_weights(args)
    resolve(args)
    if not args.no_plots:
        plots.load_pyplot()  # fail before the runs, not after them
    skipped = engine_bench.skip_sections(args)
    prompts = load_prompts(args.prompts, args.kinds, args.per_kind, args.max_tokens)
    engine = build_engine(args)
    results = engine_bench.measure(args, engine, prompts, skipped)
    write_report(args.out, results, engine_summary(results))
    written = [] if args.no_plots else plots.write_plots(results, args.out)
    names = ["results.json", "summary.md"] + [os.path.basename(path) for path in written]
    print(f"wrote {', '.join(names)} to {args.out}", file=sys.stderr)
    return 0
