"""Every option source through one parser: command line, MTPSERVE_* variables and the YAML config file, with the
same types and choices, a one-line error naming the source, and the documented precedence."""

from __future__ import annotations

import pytest

from mtpserve.cli.main import build_parser, main
from mtpserve.cli.options import OptionError, parse


def parsed(argv, env=None, config_text=None, tmp_path=None):
    if config_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(config_text)
        argv = [argv[0], "--config", str(path), *argv[1:]]
    return parse(build_parser(), argv, env or {})


def test_precedence_command_line_then_environment_then_file(tmp_path):
    text = "max_num_seqs: 8\nmax-num-batched-tokens: 64\nblock_size: 32\n"
    env = {"MTPSERVE_MAX_NUM_SEQS": "16", "MTPSERVE_BLOCK_SIZE": "", "HOME": "/x"}
    args = parsed(["serve", "--max-num-seqs", "4"], env, text, tmp_path)
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.block_size) == (4, 64, 32)
    args = parsed(["serve"], env, text, tmp_path)
    assert args.max_num_seqs == 16  # the environment over the file; an empty variable is unset
    args = parsed(["serve"], {}, text, tmp_path)
    assert (args.max_num_seqs, args.port, args.host) == (8, 8000, "127.0.0.1")


def test_config_file_named_by_the_environment(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("max_queue: 3\nlog_interval: 2.5\n")
    args = parse(build_parser(), ["serve"], {"MTPSERVE_CONFIG": str(path)})
    assert (args.max_queue, args.log_interval) == (3, 2.5)


@pytest.mark.parametrize("word,expected", [("on", "on"), ("off", "off"), ("'on'", "on")])
def test_yaml_on_off_are_words_not_booleans(tmp_path, word, expected):
    args = parsed(["serve"], {}, f"spec-adaptive: {word}\n", tmp_path)
    assert args.spec_adaptive == expected
    assert args.spec_adaptive == build_parser().parse_args(["serve", "--spec-adaptive", expected]).spec_adaptive


def test_flags_from_file_and_environment(tmp_path):
    assert parsed(["serve"], {}, "no_spec: true\nmetrics-public: yes\n", tmp_path).no_spec is True
    assert parsed(["serve"], {}, "no_spec: false\n", tmp_path).no_spec is False
    assert parsed(["serve"], {"MTPSERVE_NO_SPEC": "on"}).no_spec is True
    assert parsed(["serve"], {"MTPSERVE_NO_SPEC": "0"}).no_spec is False


def test_options_after_the_subcommand():
    args = parse(build_parser(), ["serve", "--log-level", "info"], {})
    assert args.log_level == "info"
    assert parse(build_parser(), ["--log-level", "error", "serve"], {}).log_level == "error"
    assert parse(build_parser(), ["serve"], {}).log_level == "warning"
    assert parse(build_parser(), ["train-head", "--out", "x"], {"MTPSERVE_LOG_LEVEL": "debug"}).log_level == "debug"


def test_variables_of_other_commands_are_left_to_them():
    # the container sets MTPSERVE_PORT for serve; generate has no --port and runs as given
    args = parse(build_parser(), ["generate", "--prompt", "x"], {"MTPSERVE_PORT": "9000", "MTPSERVE_MAX_NUM_SEQS": "2"})
    assert args.max_num_seqs == 2 and not hasattr(args, "port")


@pytest.mark.parametrize("config_text,env,argv,message", [
    ("dtype: fp16\n", {}, ["serve"], "c.yaml, dtype: argument --dtype: invalid choice: 'fp16'"),
    ("max_num_seqs: many\n", {}, ["serve"], "c.yaml, max_num_seqs: argument --max-num-seqs: invalid int value"),
    ("spec-adaptive: maybe\n", {}, ["serve"], "argument --spec-adaptive: invalid choice: 'maybe'"),
    ("no_spec: 3\n", {}, ["serve"], "c.yaml, no_spec: --no-spec is a flag, use true or false"),
    ("port: [1, 2]\n", {}, ["serve"], "--port takes one value"),
    ("bogus: 1\n", {}, ["serve"], "c.yaml: unknown option 'bogus' for mtpserve serve"),
    ("config: other.yaml\n", {}, ["serve"], "unknown option 'config'"),
    ("- a list\n", {}, ["serve"], "must be a mapping"),
    ("a: [\n", {}, ["serve"], "cannot read config file"),
    (None, {"MTPSERVE_DTYPE": "fp16"}, ["serve"], "environment variable MTPSERVE_DTYPE: argument --dtype: invalid"),
    (None, {"MTPSERVE_MAX_SEQS": "4"}, ["serve"], "MTPSERVE_MAX_SEQS: no mtpserve command has an option --max-seqs"),
    (None, {"MTPSERVE_NO_SPEC": "maybe"}, ["serve"], "MTPSERVE_NO_SPEC: --no-spec is a flag"),
    (None, {"MTPSERVE_CONFIG": "/nonexistent.yaml"}, ["serve"], "cannot read config file /nonexistent.yaml"),
    (None, {}, ["serve", "--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    (None, {}, ["serve", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_values_are_one_line_errors(tmp_path, capsys, config_text, env, argv, message):
    with pytest.raises(OptionError, match=None) as info:
        parsed(argv, env, config_text, tmp_path)
    assert message in str(info.value)
    if config_text is not None:
        (tmp_path / "c.yaml").write_text(config_text)
        argv = [argv[0], "--config", str(tmp_path / "c.yaml"), *argv[1:]]
    assert main(argv, env) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtpserve: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
