"""``mtpserve generate`` end to end on a tiny checkpoint (in process)."""

from __future__ import annotations

import json

import pytest
from mtp_helpers import save_random_head

from mtpserve.cli.main import main
from mtpserve.engine.loader import load_checkpoint


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output_with_mtp_head(capsys, tiny_llama_dir, tmp_path):
    head = save_random_head(tmp_path / "head", load_checkpoint(tiny_llama_dir).config)
    code, out, _ = run(capsys, "--model", tiny_llama_dir, "--prompt", "Hello world", "--max-tokens", "12",
                       "--temperature", "0", "--ignore-eos", "--json", "--mtp-head", head, "--spec-adaptive", "off")
    assert code == 0
    (line,) = out.strip().splitlines()
    obj = json.loads(line)
    assert obj["completion_tokens"] == len(obj["token_ids"]) == 12
    assert obj["prompt_tokens"] == len(obj["prompt_token_ids"]) > 0
    assert obj["finish_reason"] == "length"
    spec = obj["metrics"]["speculative"]
    assert spec["num_draft_tokens"] > 0 and spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    assert spec["num_accepted_tokens"] + spec["num_steps"] == 12
    assert set(obj["metrics"]["timings"]) == {"queue_ms", "prefill_ms", "ttft_ms", "decode_ms",
                                               "prompt_tokens_per_second", "decode_tokens_per_second"}
    code, plain, _ = run(capsys, "--model", tiny_llama_dir, "--prompt", "Hello world", "--max-tokens", "12",
                         "--temperature", "0", "--ignore-eos", "--json", "--mtp-head", head, "--no-spec")
    assert json.loads(plain)["token_ids"] == obj["token_ids"]
    assert json.loads(plain)["metrics"]["speculative"]["num_draft_tokens"] == 0


def test_prompts_file_concurrent(capsys, tiny_qwen3_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "The sea", "max_tokens": 5, "temperature": 0}\n\n'
                 '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "seed": 1}\n')
    code, out, _ = run(capsys, "--model", tiny_qwen3_dir, "--prompts-file", str(f), "--json", "--concurrent")
    assert code == 0
    objs = [json.loads(line) for line in out.strip().splitlines()]
    assert len(objs) == 2 and objs[0]["completion_tokens"] <= 5 and objs[1]["completion_tokens"] <= 3


@pytest.mark.parametrize("content,message", [
    ("not json\n", "invalid JSON"),
    ('{"prompt": "x", "bogus": 1}\n', "unsupported field"),
    ('{"max_tokens": 3}\n', "exactly one of"),
    ("", "no requests"),
])
def test_prompts_file_errors(capsys, tiny_llama_dir, tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    code, _, err = run(capsys, "--model", tiny_llama_dir, "--prompts-file", str(f))
    assert code == 2 and message in err and "Traceback" not in err


def test_clear_errors(capsys, tmp_path):
    code, _, err = run(capsys, "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert code == 2 and "not found" in err
    bad = tmp_path / "bad.gguf"
    bad.write_text("hello")
    code, _, err = run(capsys, "--model", str(bad), "--prompt", "x")
    assert code == 2 and "GGUF" in err


def test_confidence_cut_option(capsys, tiny_llama_dir, tmp_path):
    """``--spec-draft-p-min`` applies with a fixed draft length too: a random head is never 99% sure of a draft, so
    every chain is cut and nothing is drafted; out of [0, 1) it is refused."""
    head = save_random_head(tmp_path / "head", load_checkpoint(tiny_llama_dir).config)
    common = ("--model", tiny_llama_dir, "--prompt", "Hello world", "--max-tokens", "12", "--temperature", "0",
              "--ignore-eos", "--json", "--mtp-head", head, "--spec-adaptive", "off")
    code, out, _ = run(capsys, *common, "--spec-draft-p-min", "0.99")
    assert code == 0
    cut = json.loads(out)
    assert cut["metrics"]["speculative"]["num_draft_tokens"] == 0
    code, out, _ = run(capsys, *common)
    assert json.loads(out)["metrics"]["speculative"]["num_draft_tokens"] > 0
    assert json.loads(out)["token_ids"] == cut["token_ids"]
    code, _, err = run(capsys, *common, "--spec-draft-p-min", "1.5")
    assert code != 0 and "--spec-draft-p-min must be in [0, 1)" in err
