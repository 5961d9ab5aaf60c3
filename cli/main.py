"""The ``mtpserve`` command line: the parser of every subcommand, and ``main``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mtpserve import __version__
from mtpserve.cli import bench, bench_serve, generate, options, serve, stress, train_head
from mtpserve.cli.engine_args import add_engine_args
from mtpserve.cli.options import OptionError, Parser
from mtpserve.engine.errors import MtpserveError

LOG_LEVELS = ["debug", "info", "warning", "error"]


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options every command takes after its name."""
    g = p.add_argument_group("configuration")
    g.add_argument("--config", default=None,
                   help="YAML file of options (see configs/); the "
                        "environment and the command line win over it")
    g.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                   help="default: warning")


def add_command(sub, name: str, help_text: str, module, engine: bool = False,
                speculation: bool = True) -> None:
    """A subcommand: the common options, the engine options when it runs an engine, then its own."""
    p = sub.add_parser(name, help=help_text)
    add_common_args(p)
    if engine:
        add_engine_args(p, speculation)
    module.add_args(p)
    p.set_defaults(func=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mtpserve", description="MTP-first LLM inference server",
                    epilog="Every option is also an environment variable MTPSERVE_<OPTION> and a "
                           "key of the --config file; the command line wins over the environment, "
                           "which wins over the file.")
    parser.add_argument("--version", action="version", version=f"mtpserve {__version__}")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_command(sub, "generate", "generate text offline with the engine", generate, engine=True)
    add_command(sub, "serve", "run the OpenAI-compatible HTTP server", serve, engine=True)
    add_command(sub, "stress",
                "load, random disconnects and leak checks against this server on loopback",
                stress, engine=True)
    add_command(sub, "bench", "benchmark the engine offline: MTP off / fixed k / adaptive, plots",
                bench, engine=True, speculation=False)
    add_command(sub, "bench-serve", "load-test an OpenAI-compatible server over HTTP", bench_serve)
    add_command(sub, "train-head",
                "train an MTP head for a model that has none (self-distillation)", train_head)
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
    args.argv = argv  # as given, for reports that name their command (train-head)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except MtpserveError as e:
        print(f"mtpserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
