"""Where a command's options come from: the command line, ``MTPSERVE_*`` environment variables and a
YAML file (``--config``). All three become command-line tokens for the same argparse parser, so they
are checked with the same types and choices.

Precedence, highest first: the command line, then the environment, then the config file, then the
built-in defaults. ``MTPSERVE_MAX_NUM_SEQS=16`` is ``--max-num-seqs 16`` and the YAML key
``max-num-seqs`` (or ``max_num_seqs``) is the same option. A flag such as ``--no-spec`` takes true
or false (also 1/0, yes/no, on/off). An empty variable counts as unset. ``MTPSERVE_CONFIG`` names
the config file when ``--config`` does not. A variable that names an option of another command is
left to that command (the container sets ``MTPSERVE_PORT`` for ``serve``); one that names no option
of any command is an error, and so is an unknown key in the config file.
"""

from __future__ import annotations

import argparse
import re

import yaml

from mtpserve.engine.errors import MtpserveError

PREFIX = "MTPSERVE_"
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


class OptionError(MtpserveError):
    pass


class Parser(argparse.ArgumentParser):
    """An argparse parser that raises OptionError
    (printed as one line by ``main``) instead of exiting."""

    def error(self, message: str):
        raise OptionError(message)


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false.
    Under YAML 1.1 ``spec-adaptive: on`` would read as True."""


Yaml12Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                   re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options of ``parser`` by destination name (help and version left out)."""
    actions = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "version"):
            actions[action.dest] = action
    return actions


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def tokens(action: argparse.Action, value, source: str) -> list[str]:
    """Command-line tokens that set ``action`` to ``value``
    (a string, number or boolean from a file or variable)."""
    option = next(s for s in action.option_strings if s.startswith("--"))
    if action.nargs == 0:
        text = str(value).lower()
        if text in TRUE:
            return [option]
        if text in FALSE:
            return []
        raise OptionError(f"{source}: {option} is a flag, use true or false (got {value!r})")
    if isinstance(value, (dict, list)) or value is None:
        raise OptionError(f"{source}: {option} takes one value (got {value!r})")
    if isinstance(value, bool):
        value = str(value).lower()
    return [f"{option}={value}"]


def env_tokens(parser: argparse.ArgumentParser, command: str, env) -> list[tuple[str, list[str]]]:
    """(variable, tokens) for each ``MTPSERVE_*`` variable that sets an option of ``command``."""
    commands = subcommands(parser)
    own = option_actions(commands[command])
    known = set(own)
    for sub in commands.values():
        known |= set(option_actions(sub))
    out = []
    for variable in sorted(env):
        value = env[variable]
        if not variable.startswith(PREFIX) or value == "":
            continue
        dest = variable[len(PREFIX):].lower()
        if dest not in known:
            option = "--" + dest.replace("_", "-")
            raise OptionError(f"environment variable {variable}: "
                              f"no mtpserve command has an option {option}")
        if dest in own:
            out.append((variable, tokens(own[dest], value, f"environment variable {variable}")))
    return out


def config_tokens(
    parser: argparse.ArgumentParser, command: str, path: str
) -> list[tuple[str, list[str]]]:
    """(key, tokens) for each key of the YAML file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=Yaml12Loader) or {}
    except (OSError, yaml.YAMLError) as e:
        raise OptionError(f"cannot read config file {path}: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise OptionError(f"config file {path} must be a mapping of option: value")
    own = option_actions(subcommands(parser)[command])
    out = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in own or dest == "config":
            raise OptionError(f"config file {path}: unknown option {key!r} for mtpserve {command}")
        out.append((str(key), tokens(own[dest], value, f"config file {path}, {key}")))
    return out


def parse(parser: argparse.ArgumentParser, argv: list[str], env) -> argparse.Namespace:
    """Parse ``argv`` with the environment and the config file applied below it (see the module
    docstring). Each variable and key is checked on its own first, so an error names where the bad
    value came from."""
    args = parser.parse_args(argv)
    cut = argv.index(args.command)
    before = argv[:cut + 1]
    after = argv[cut + 1:]
    env_argv = []
    for variable, toks in env_tokens(parser, args.command, env):
        _check(parser, before + toks + after, f"environment variable {variable}")
        env_argv += toks
    config = None
    if hasattr(args, "config"):
        config = parser.parse_args(before + env_argv + after).config
    file_argv = []
    if config:
        for key, toks in config_tokens(parser, args.command, config):
            _check(parser, before + toks + after, f"config file {config}, {key}")
            file_argv += toks
    return parser.parse_args(before + file_argv + env_argv + after)


def _check(parser: argparse.ArgumentParser, argv: list[str], source: str) -> None:
    try:
        parser.parse_args(argv)
    except OptionError as e:
        raise OptionError(f"{source}: {e}") from None
