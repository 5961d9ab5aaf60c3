"""The container's entry point: ``MTPSERVE_<OPTION>`` environment variables become ``mtpserve serve`` options.

``MTPSERVE_MAX_NUM_SEQS=16`` is ``--max-num-seqs 16``; a flag such as ``MTPSERVE_NO_SPEC`` takes true or false
(1/0, yes/no, on/off); an empty value counts as unset. Options on the command line win over the variables, and the
variables over a ``--config`` file. ``MTPSERVE_API_KEY`` is read by the server itself. A variable that names no
option of ``serve`` is an error. Other commands (``generate``, ``--help``) run as given, without the variables.
"""

from __future__ import annotations

import os
import sys

from mtpserve.server.cli import build_parser, main

PREFIX = "MTPSERVE_"
READ_BY_SERVER = {"MTPSERVE_API_KEY"}
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class EnvError(ValueError):
    pass


def option_actions(parser) -> tuple[dict, dict]:
    """(global, serve) argparse actions by the environment variable that sets them."""
    def by_variable(p):
        return {PREFIX + a.dest.upper(): a for a in p._actions
                if a.option_strings and a.dest not in ("help", "version")}

    commands = next(a for a in parser._actions if a.dest == "command")
    return by_variable(parser), by_variable(commands.choices["serve"])


def arguments(action, variable: str, value: str) -> list[str]:
    option = next(s for s in action.option_strings if s.startswith("--"))
    if action.nargs != 0:
        return [f"{option}={value}"]
    if value.lower() in TRUE:
        return [option]
    if value.lower() in FALSE:
        return []
    raise EnvError(f"{variable}={value!r}: {option} is a flag, use true or false")


def serve_argv(argv: list[str], env) -> list[str]:
    """The ``mtpserve`` arguments for ``argv`` (the container's command) with the variables of ``env`` applied."""
    if not argv or argv[0] != "serve":
        return argv
    global_actions, serve_actions = option_actions(build_parser())
    before, after = [], []
    for variable in sorted(env):
        value = env[variable]
        if not variable.startswith(PREFIX) or variable in READ_BY_SERVER or value == "":
            continue
        if variable in global_actions:
            before += arguments(global_actions[variable], variable, value)
        elif variable in serve_actions:
            after += arguments(serve_actions[variable], variable, value)
        else:
            option = "--" + variable[len(PREFIX):].lower().replace("_", "-")
            raise EnvError(f"{variable}: mtpserve serve has no option {option}")
    return [*before, "serve", *after, *argv[1:]]


def run(argv: list[str], env) -> int:
    try:
        argv = serve_argv(argv, env)
    except EnvError as e:
        print(f"mtpserve: error: {e}", file=sys.stderr)
        return 2
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], os.environ))
