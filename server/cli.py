"""The ``mtpserve`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from mtpserve.engine.errors import MtpserveError


def add_engine_args(p: argparse.ArgumentParser, speculation: bool = True) -> None:
    """The model and engine options; ``speculation=False`` leaves out the draft-length switches (for commands
    that set them themselves)."""
    g = p.add_argument_group("model and engine")
    g.add_argument("--config", default=None, help="YAML file of option defaults (see configs/)")
    g.add_argument("--model", default="default",
                   help="GGUF file, HF model directory, or 'default' (SmolLM2-135M-Instruct GGUF)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-blocks", "--kv-cache-blocks", dest="num_blocks", type=int, default=None,
                   help="KV cache blocks (overrides --kv-cache-memory)")
    g.add_argument("--kv-cache-memory", type=float, default=0.5, help="KV cache budget in GiB")
    g.add_argument("--max-num-seqs", type=int, default=32)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--max-model-len", type=int, default=None)
    s = p.add_argument_group("speculative decoding (MTP)")
    s.add_argument("--mtp-head", default=None,
                   help="MTP head directory for a model without MTP layers (the default model uses its shipped head)")
    if speculation:
        s.add_argument("--spec-draft-n-max", type=int, default=3, help="most draft tokens per step (0 disables)")
        s.add_argument("--no-spec", action="store_true", help="plain decoding even when the model has MTP layers")
        s.add_argument("--spec-adaptive", default="on", choices=["on", "off"],
                       help="on: draft length follows acceptance and batch size; off: always --spec-draft-n-max")
    s.add_argument("--mtp-feedback", default="pre_norm", choices=["pre_norm", "post_norm"],
                   help="hidden state fed back between draft steps (MTP block output, or after its shared norm)")


def resolve_device(device: str | None) -> str:
    """``--device``: cuda when available unless given; a cuda request without CUDA is an error."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MtpserveError("--device cuda requested but CUDA is not available")
    return device


def engine_config_from_args(args):
    """The EngineConfig of the engine options (validated). The default model gets its shipped MTP head."""
    import torch
    from mtpserve.engine.config import EngineConfig
    from mtpserve.engine.loader.mtp_head import default_head_path

    if args.model == "default" and args.mtp_head is None:
        args.mtp_head = default_head_path()

    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            raise MtpserveError(f"--{name.replace('_', '-')} must be at least 1")
    if args.spec_draft_n_max < 0:
        raise MtpserveError("--spec-draft-n-max must be >= 0")
    if args.kv_cache_memory <= 0:
        raise MtpserveError("--kv-cache-memory must be positive")
    device = resolve_device(args.device)
    return EngineConfig(
        block_size=args.block_size, num_blocks=args.num_blocks,
        kv_cache_memory_bytes=int(args.kv_cache_memory * 2**30), max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        dtype=getattr(torch, args.dtype), device=device,
        spec_draft_n_max=0 if args.no_spec else args.spec_draft_n_max, spec_adaptive=args.spec_adaptive == "on",
        mtp_head=args.mtp_head, mtp_feedback=args.mtp_feedback)


def engine_from_args(args):
    from mtpserve.engine.engine import LLMEngine
    from mtpserve.engine.loader import load_checkpoint

    return LLMEngine(load_checkpoint(args.model), engine_config_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    from mtpserve import __version__
    from mtpserve.bench import engine_bench, serve_bench
    from mtpserve.server import generate_cmd, serve_cmd, stress_cmd, train_cmd

    parser = argparse.ArgumentParser(prog="mtpserve", description="MTP-first LLM inference server")
    parser.add_argument("--version", action="version", version=f"mtpserve {__version__}")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text offline with the engine")
    add_engine_args(gen)
    generate_cmd.add_args(gen)
    gen.set_defaults(func=generate_cmd.run)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_engine_args(serve)
    serve_cmd.add_args(serve)
    serve.set_defaults(func=serve_cmd.run)
    stress = sub.add_parser("stress", help="load, random disconnects and leak checks against this server on loopback")
    add_engine_args(stress)
    stress_cmd.add_args(stress)
    stress.set_defaults(func=stress_cmd.run)
    bench = sub.add_parser("bench", help="benchmark the engine offline: MTP off / fixed k / adaptive, plots")
    add_engine_args(bench, speculation=False)
    engine_bench.add_args(bench)
    bench.set_defaults(func=engine_bench.run)
    bench_serve = sub.add_parser("bench-serve", help="load-test an OpenAI-compatible server over HTTP")
    serve_bench.add_args(bench_serve)
    bench_serve.set_defaults(func=serve_bench.run)
    train = sub.add_parser("train-head", help="train an MTP head for a model that has none (self-distillation)")
    train_cmd.add_args(train)
    train.set_defaults(func=train_cmd.run)
    return parser


def apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> argparse.Namespace:
    """Re-parse with the YAML file's values as defaults, so explicit command-line options still win."""
    import yaml

    try:
        with open(args.config, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MtpserveError(f"cannot read config file {args.config}: {e}") from None
    if not isinstance(values, dict):
        raise MtpserveError(f"config file {args.config} must be a mapping of option: value")
    known = vars(args)
    defaults = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known or name in ("command", "func", "config"):
            raise MtpserveError(f"config file {args.config}: unknown option {key!r}")
        defaults[name] = value
    sub = parser._subparsers._group_actions[0].choices[args.command]
    sub.set_defaults(**defaults)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "config", None):
            args = apply_config_file(parser, args, argv)
        return args.func(args) or 0
    except MtpserveError as e:
        print(f"mtpserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
