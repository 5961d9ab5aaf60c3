"""The ``mtpserve`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mtpserve.engine.errors import MtpserveError
from mtpserve.server import options
from mtpserve.server.options import OptionError, Parser

LOG_LEVELS = ["debug", "info", "warning", "error"]


def add_engine_args(p: argparse.ArgumentParser, speculation: bool = True) -> None:
    """The model and engine options; ``speculation=False`` leaves out the draft-length switches (for commands
    that set them themselves)."""
    g = p.add_argument_group("model and engine")
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


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options every command takes after its name."""
    g = p.add_argument_group("configuration")
    g.add_argument("--config", default=None,
                   help="YAML file of options (see configs/); the environment and the command line win over it")
    g.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, help="default: warning")


def add_command(sub, name: str, help_text: str, module, engine: bool = False, speculation: bool = True) -> None:
    """A subcommand: the common options, the engine options when it runs an engine, then its own."""
    p = sub.add_parser(name, help=help_text)
    add_common_args(p)
    if engine:
        add_engine_args(p, speculation)
    module.add_args(p)
    p.set_defaults(func=module.run)


def build_parser() -> argparse.ArgumentParser:
    from mtpserve import __version__
    from mtpserve.bench import engine_bench, serve_bench
    from mtpserve.server import generate_cmd, serve_cmd, stress_cmd, train_cmd

    parser = Parser(prog="mtpserve", description="MTP-first LLM inference server",
                    epilog="Every option is also an environment variable MTPSERVE_<OPTION> and a key of the "
                           "--config file; the command line wins over the environment, which wins over the file.")
    parser.add_argument("--version", action="version", version=f"mtpserve {__version__}")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_command(sub, "generate", "generate text offline with the engine", generate_cmd, engine=True)
    add_command(sub, "serve", "run the OpenAI-compatible HTTP server", serve_cmd, engine=True)
    add_command(sub, "stress", "load, random disconnects and leak checks against this server on loopback",
                stress_cmd, engine=True)
    add_command(sub, "bench", "benchmark the engine offline: MTP off / fixed k / adaptive, plots", engine_bench,
                engine=True, speculation=False)
    add_command(sub, "bench-serve", "load-test an OpenAI-compatible server over HTTP", serve_bench)
    add_command(sub, "train-head", "train an MTP head for a model that has none (self-distillation)", train_cmd)
    return parser


def main(argv: list[str] | None = None, env=None) -> int:
    """``env``: the environment to read ``MTPSERVE_*`` options from (default: os.environ)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    env = os.environ if env is None else env
    try:
        args = options.parse(build_parser(), argv, env)
    except OptionError as e:
        print(f"mtpserve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except MtpserveError as e:
        print(f"mtpserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
