"""``mtpserve bench``: the offline engine benchmark. Prompt processing and single-stream decode with MTP off,
fixed k and adaptive, acceptance per draft position and prompt kind, a concurrency sweep, memory, and HF
transformers on the same model and prompts; writes results.json, summary.md and PNG plots."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys

from mtpserve.engine.errors import MtpserveError

SECTIONS = ("pp", "decode", "concurrency", "hf")
FULL = {"per_kind": 2, "max_tokens": None, "repeats": 3, "prompt_lengths": [128, 512, 2048],
        "concurrency": [1, 2, 4, 8, 16], "sweep_tokens": 128, "sweep_rounds": 3}
QUICK = {"per_kind": 1, "max_tokens": 16, "repeats": 1, "prompt_lengths": [32, 128], "concurrency": [1, 2, 4],
         "sweep_tokens": 16, "sweep_rounds": 1}


def number_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}s: {text!r}")

    return parse


def name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_args(p) -> None:
    b = p.add_argument_group("benchmark")
    b.add_argument("--out", default="bench-results", help="directory for results.json, summary.md and the plots")
    b.add_argument("--prompts", default=None, help='JSONL: {"kind": ..., "prompt": ...} or {"kind": ..., '
                                                   '"messages": [...]} per line, optional "max_tokens" '
                                                   "(default: the built-in held-out prompt set)")
    b.add_argument("--kinds", type=name_list, default=None, help="prompt kinds to use (default: all)")
    b.add_argument("--per-kind", type=int, default=None, help="prompts of each kind (default 2, --quick 1)")
    b.add_argument("--max-tokens", type=int, default=None, help="cap on every prompt's max_tokens (--quick 16)")
    b.add_argument("--ignore-eos", action="store_true", help="decode every prompt's max_tokens in full")
    b.add_argument("--k", type=number_list(int), default=[1, 2, 3, 4], help="fixed draft lengths (default 1,2,3,4);"
                   " the adaptive row drafts up to the largest")
    b.add_argument("--temperatures", type=number_list(float), default=[0.0],
                   help="decode temperatures, e.g. 0,0.7 (default 0: greedy)")
    b.add_argument("--repeats", type=int, default=None, help="runs of every measurement (default 3, --quick 1)")
    b.add_argument("--prompt-lengths", type=number_list(int), default=None,
                   help="prompt-processing lengths in tokens (default 128,512,2048)")
    b.add_argument("--concurrency", type=number_list(int), default=None,
                   help="concurrent streams of the sweep (default 1,2,4,8,16)")
    b.add_argument("--sweep-k", type=int, default=3, help="fixed draft length in the concurrency sweep")
    b.add_argument("--sweep-tokens", type=int, default=None,
                   help="mean tokens per request in the sweep, spread over 0.5x to 1.5x (default 128)")
    b.add_argument("--sweep-rounds", type=int, default=None,
                   help="each sweep level runs until every mode has output this many times N x --sweep-tokens "
                        "tokens, and at least one request's worth per prompt (default 3, --quick 1)")
    b.add_argument("--sections", type=name_list, default=list(SECTIONS),
                   help=f"what to measure, of {','.join(SECTIONS)} (memory is always reported)")
    b.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt (sampled decode)")
    b.add_argument("--unseeded", action="store_true",
                   help="sampled decode without seeds: drafts are rejection-sampled instead of coupled to the "
                        "seeded target noise (compare their acceptance)")
    b.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


def resolve(args) -> None:
    """Fill the size options left unset from FULL or QUICK, then validate every option."""
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
        raise MtpserveError(f"--sections takes some of {', '.join(SECTIONS)}; got {', '.join(args.sections)}")
    if max(args.concurrency) > args.max_num_seqs:
        raise MtpserveError(f"--concurrency {max(args.concurrency)} exceeds --max-num-seqs {args.max_num_seqs}")


def build_engine(args):
    """One engine for every mode: MTP layers loaded with the largest k as cap, adaptive costs measured."""
    from mtpserve.engine.engine import LLMEngine
    from mtpserve.engine.loader import load_checkpoint
    from mtpserve.server.cli import engine_config_from_args

    spec = argparse.Namespace(**vars(args), no_spec=False, spec_draft_n_max=max(args.k), spec_adaptive="on")
    engine = LLMEngine(load_checkpoint(args.model), engine_config_from_args(spec))
    too_long = [n for n in args.prompt_lengths if n + 2 > engine.max_model_len]
    if "pp" in args.sections and too_long:
        raise MtpserveError(f"--prompt-lengths {too_long} do not fit this engine's context ({engine.max_model_len})")
    return engine


def head_label(path: str | None) -> str | None:
    """How results name a head: the shipped one by its place in the package, others as given."""
    from mtpserve.engine.loader.mtp_head import default_head_path

    if path and os.path.abspath(path) == default_head_path():
        return "heads/smollm2-135m-instruct (shipped)"
    return path


def describe_mtp(engine, args) -> dict:
    if engine.mtp is None:
        return {"available": False, "description": "no MTP head (the model has no MTP layers and no --mtp-head "
                                                   "was given): MTP off only"}
    layers = len(engine.mtp.layers)
    head = head_label(engine.config.mtp_head)
    source = f"head {head}" if head else "the model's own layers"
    return {"available": True, "num_layers": layers, "description": f"{layers} MTP layer(s) from {source}"}


def plan(args, mtp_available: bool, num_prompts: int) -> tuple[dict, int]:
    """The modes of each section, and how many runs they make (for the progress bar)."""
    from mtpserve.bench.engine_runs import OFF, adaptive, fixed

    on = mtp_available
    modes = {"pp": {"mtp_off": OFF, **({"mtp_on": fixed(1)} if on else {})},
             "decode": [OFF] + ([fixed(k) for k in args.k] + [adaptive(max(args.k))] if on else []),
             "concurrency": [OFF] + ([fixed(args.sweep_k), adaptive(max(args.k))] if on else [])}
    runs = {"pp": len(args.prompt_lengths) * len(modes["pp"]),
            "decode": len(args.temperatures) * num_prompts * len(modes["decode"]),
            "concurrency": len(args.concurrency) * len(modes["concurrency"]),
            "hf": 2 * (num_prompts + len(args.prompt_lengths))}
    twins = len(modes["concurrency"]) - 1 if "concurrency" in args.sections else 0  # each warmed up once
    return modes, len(modes["decode"]) + twins + args.repeats * sum(runs[s] for s in args.sections)


def metadata(args, engine, prompts) -> dict:
    import torch
    from mtpserve import __version__

    return {"model": args.model, "mtp_head": head_label(engine.config.mtp_head), "dtype": args.dtype,
            "device": str(engine.device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "mtpserve": __version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "prompts": args.prompts or "built-in eval set", "num_prompts": len(prompts),
            "kinds": sorted({p.kind for p in prompts}), "repeats": args.repeats, "k": args.k,
            "temperatures": args.temperatures, "sweep_k": args.sweep_k, "sweep_tokens": args.sweep_tokens,
            "sweep_rounds": args.sweep_rounds,
            "ignore_eos": args.ignore_eos, "quick": args.quick, "sections": args.sections}


def run(args) -> int:
    from mtpserve.bench import engine_runs, plots
    from mtpserve.bench.summary import engine_summary, write_report
    from mtpserve.bench.workload import load_prompts
    from tqdm import tqdm

    resolve(args)
    if not args.no_plots:
        plots.load_pyplot()  # fail before the runs, not after them
    if "hf" in args.sections and importlib.util.find_spec("transformers") is None:
        args.sections.remove("hf")
        hf_skipped = {"skipped": "transformers is not installed"}
    else:
        hf_skipped = None
    prompts = load_prompts(args.prompts, args.kinds, args.per_kind, args.max_tokens)
    engine = build_engine(args)
    mtp = describe_mtp(engine, args)
    modes, planned = plan(args, mtp["available"], len(prompts))
    progress = tqdm(total=planned, desc="mtpserve bench", unit="run", file=sys.stderr, dynamic_ncols=True)
    runs = engine_runs.EngineRuns(engine, progress)
    warm_up_ids = prompts[0].token_ids(engine.tokenizer)
    runs.warm_up(warm_up_ids, modes["decode"])
    device = str(engine.device)
    results = {"meta": metadata(args, engine, prompts), "mtp": mtp,
               "memory": {"kv_bytes_per_token": engine_runs.kv_bytes_per_token(engine),
                          "after_load": engine_runs.peak_memory(device)}}
    if "pp" in args.sections:
        results["prompt_processing"] = runs.prompt_processing(args.prompt_lengths, modes["pp"], args.repeats)
    if "decode" in args.sections:
        seed = None if args.unseeded else args.seed
        results["decode"] = {f"{t:g}": runs.decode(prompts, modes["decode"], t, args.repeats, seed, args.ignore_eos)
                             for t in args.temperatures}
    results["memory"].update(engine_runs.peak_memory(device))  # before the twins and transformers' copy
    if "concurrency" in args.sections:
        sweep = [(modes["concurrency"][0], runs)]
        for mode in modes["concurrency"][1:]:
            twin = engine_runs.EngineRuns(engine.twin(), progress)
            twin.warm_up(warm_up_ids, [mode])
            sweep.append((mode, twin))
        results["concurrency"] = engine_runs.concurrency(sweep, prompts, args.concurrency, args.sweep_tokens,
                                                         args.repeats, args.sweep_rounds)
    if "hf" in args.sections:
        from mtpserve.bench.hf_compare import compare, load_hf

        hf = load_hf(args.model, engine.config.dtype, device)
        results["hf"] = compare(runs, hf, prompts, args.prompt_lengths, args.repeats)
    elif hf_skipped:
        results["hf"] = hf_skipped
    progress.close()
    write_report(args.out, results, engine_summary(results))
    written = [] if args.no_plots else plots.write_plots(results, args.out)
    print(f"wrote {', '.join(['results.json', 'summary.md', *map(os.path.basename, written)])} to {args.out}",
          file=sys.stderr)
    return 0
