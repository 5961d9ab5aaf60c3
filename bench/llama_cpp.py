"""llama.cpp side by side with our engine, on the same GGUF file and in the same ``mtpserve bench``
run: llama.cpp's own ``llama-bench`` (a subprocess, ``-o json``) measures prompt processing at the
bench's prompt lengths (``-p L -n 0``) and decode after a typical prompt (``-p 0 -n N -d D``); our
engine runs the same shapes without speculation. The two alternate run by run (ABAB, ``--repeats``
times) so that machine noise hits both; results give tok/s of each and the ratio ours / llama.cpp.
Prompts of 1 and 4 tokens also give each side's cost of a step over 4 tokens against a step over 1
(``4 * pp1 / pp4``): the shape of an MTP verify step with 3 drafts.

``llama-bench`` is looked up on PATH, then under ``.llama.cpp/bin/`` (where ``make llama-cpp``
puts it) of the working directory and of the repository; ``--llama-bench PATH`` names it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess

import torch

from mtpserve.bench.engine_runs import OFF
from mtpserve.bench.stats import side_by_side
from mtpserve.bench.workload import long_prompt_ids
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.loader.gguf import default_gguf_path
from mtpserve.engine.sampling_params import SamplingParams

BINARY = "llama-bench"
BUILD_DIR = os.path.join(".llama.cpp", "bin")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "llamacpp"
STEP_SHAPES = (1, 4)  # a one-token step, and one over a token and 3 drafts


class LlamaBenchError(MtpserveError):
    """llama-bench did not run to the end, or printed something that is not its JSON."""


def find_llama_bench() -> str | None:
    """llama-bench on PATH, else under .llama.cpp/bin/ of the working directory or of the
    repository; None when it is in none of them."""
    candidates = [shutil.which(BINARY)]
    for root in (os.getcwd(), REPO):
        candidates.append(os.path.join(root, BUILD_DIR, BINARY))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def shown_path(path: str) -> str:
    """``path`` as a report shows it: relative to the repository where it lies inside it, else its
    file name (a report names no folder of the machine it ran on)."""
    full = os.path.abspath(path)
    if full.startswith(REPO + os.sep):
        return os.path.relpath(full, REPO)
    return os.path.basename(full)


def gguf_file(model: str) -> str | None:
    """The GGUF file that ``--model`` names ('default': the default model's); None for an HF
    model directory."""
    if model == "default":
        return default_gguf_path()
    path = os.path.expanduser(model)
    if path.lower().endswith(".gguf"):
        return path
    return None


def skip_reason(binary: str | None, model: str) -> str | None:
    """Why the section cannot run (no llama-bench, no GGUF file), or None."""
    if binary is None:
        return (f"{BINARY} not found on PATH or under {BUILD_DIR}/ "
                "(`make llama-cpp` builds it; --llama-bench PATH names it)")
    if gguf_file(model) is None:
        return f"llama.cpp runs GGUF files only, and --model is {model}"
    return None


def skip_without_llama_bench(sections: list[str], binary: str | None, model: str) -> dict | None:
    """Drop the "llamacpp" section when it cannot run; what the results say in its place."""
    if SECTION not in sections:
        return None
    reason = skip_reason(binary, model)
    if reason is None:
        return None
    sections.remove(SECTION)
    return {"skipped": reason}


def run_binary(args: list[str]) -> str:
    """stdout of one run of ``args``; LlamaBenchError with the end of its stderr when it fails."""
    try:
        done = subprocess.run(args, capture_output=True, text=True)
    except OSError as e:
        raise LlamaBenchError(f"{args[0]} did not start: {e}") from e
    if done.returncode != 0:
        tail = done.stderr.strip()[-500:]
        raise LlamaBenchError(f"{' '.join(args)} exited with {done.returncode}: {tail}")
    return done.stdout


def takes_depth(binary: str) -> bool:
    """Whether this llama-bench has ``-d`` (tests after a prompt of that many tokens)."""
    return "--n-depth" in run_binary([binary, "--help"])


def parse_output(text: str) -> list[dict]:
    """llama-bench's ``-o json`` output: per test, its prompt, generated and depth tokens, tok/s,
    and what it ran on."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlamaBenchError(f"llama-bench printed no JSON ({e}): {text[:200]!r}") from e
    if not isinstance(entries, list):
        raise LlamaBenchError(f"llama-bench printed no list of tests: {text[:200]!r}")
    try:
        return [entry_fields(entry) for entry in entries]
    except (KeyError, TypeError) as e:
        message = f"llama-bench printed an unexpected test ({e!r}): {text[:200]!r}"
        raise LlamaBenchError(message) from e


def entry_fields(entry: dict) -> dict:
    return {
        "n_prompt": entry["n_prompt"],
        "n_gen": entry["n_gen"],
        "n_depth": entry.get("n_depth", 0),
        "tok_s": entry["avg_ts"],
        "threads": entry["n_threads"],
        "backends": entry["backends"],
        "build": f"{entry['build_commit']} ({entry['build_number']})",
        "cpu": entry["cpu_info"],
        "model_type": entry["model_type"],
    }


def run_llama_bench(binary: str, gguf: str, threads: int, flags: list[str]) -> list[dict]:
    """One llama-bench run on ``gguf``: every test of ``flags`` once, after its own warm-up."""
    args = [binary, "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json", *flags]
    return parse_output(run_binary(args))


def prompt_flags(lengths: list[int]) -> list[str]:
    return ["-p", ",".join(str(n) for n in lengths), "-n", "0"]


def decode_flags(tokens: int, depth: int) -> list[str]:
    flags = ["-p", "0", "-n", str(tokens)]
    if depth:
        flags += ["-d", str(depth)]
    return flags


def typical_request(prompts, tokenizer) -> tuple[int, int]:
    """The median prompt length in tokens and the median max_tokens of ``prompts``."""
    lengths = [len(p.token_ids(tokenizer)) for p in prompts]
    max_tokens = [p.max_tokens for p in prompts]
    return statistics.median_low(lengths), statistics.median_low(max_tokens)


def our_decode_tok_s(runs, ids: list[int], tokens: int) -> float:
    """tok/s of ``tokens`` decode steps after the prompt ``ids`` (the first token, from the
    prompt's step, not counted), as llama-bench's ``-n tokens -d len(ids)``."""
    params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
    (req,), _ = runs.run([ids], [params], OFF)
    return req.timings()["decode_tokens_per_second"]


def measured_lengths(lengths: list[int]) -> list[int]:
    """Prompt lengths both sides run: the bench's and the step shapes."""
    return sorted(set(lengths) | set(STEP_SHAPES))


def plan_runs(lengths: list[int]) -> int:
    """Runs of one repeat (for the progress bar): two llama-bench runs and ours."""
    return 2 + len(measured_lengths(lengths)) + 1


def step_cost(pp: dict[int, list[float]]) -> list[float]:
    """Per repeat, the time of a step over 4 tokens over that of a step over 1, from prompt tok/s
    at those lengths."""
    return [4 * one / four for one, four in zip(pp[1], pp[4])]


def compare(runs, binary: str, model: str, prompts, lengths: list[int], repeats: int) -> dict:
    """Prompt tok/s per length and decode tok/s, ours without speculation and llama.cpp's,
    alternating: llama.cpp's prompts, ours, llama.cpp's decode, ours; ``repeats`` times."""
    tok = runs.engine.tokenizer
    gguf = gguf_file(model)
    threads = torch.get_num_threads()
    depth, tokens = typical_request(prompts, tok)
    depth = min(depth, runs.engine.max_model_len - tokens - 1)
    if not takes_depth(binary):
        depth = 0
    measured = measured_lengths(lengths)
    long_ids = {n: long_prompt_ids(tok, n) for n in measured}
    decode_ids = long_prompt_ids(tok, max(depth, 1))
    ours_pp = {n: [] for n in measured}
    theirs_pp = {n: [] for n in measured}
    ours_dec = []
    theirs_dec = []
    for _ in range(repeats):
        tests = run_llama_bench(binary, gguf, threads, prompt_flags(measured))
        runs.progress.update()
        for test in tests:
            theirs_pp[test["n_prompt"]].append(test["tok_s"])
        for n, ids in long_ids.items():
            ours_pp[n].append(runs.prompt_tok_s(ids))
        tests = run_llama_bench(binary, gguf, threads, decode_flags(tokens, depth))
        runs.progress.update()
        theirs_dec.append(tests[0]["tok_s"])
        ours_dec.append(our_decode_tok_s(runs, decode_ids, tokens))
    about = tests[0]
    prompt_rows = []
    for n in lengths:
        prompt_rows.append({"prompt_tokens": n, **side_by_side(ours_pp[n], theirs_pp[n], "llama_cpp")})
    return {
        "llama_bench": shown_path(binary),
        "build": about["build"],
        "backends": about["backends"],
        "cpu": about["cpu"],
        "model_type": about["model_type"],
        "gguf": shown_path(gguf),
        "threads": threads,
        "decode_tok_s": {"depth": depth, "tokens": tokens, **side_by_side(ours_dec, theirs_dec, "llama_cpp")},
        "prompt_tok_s": prompt_rows,
        "step_cost_4_over_1": side_by_side(step_cost(ours_pp), step_cost(theirs_pp), "llama_cpp"),
    }
