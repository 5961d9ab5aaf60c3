"""``mtpserve bench`` and ``mtpserve bench-serve``: their statistics against numpy and hand-made Prometheus text,
and smoke runs on a tiny model (offline, and against a live ``mtpserve serve`` on loopback)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import yaml
from engine_helpers import make_engine
from mtp_helpers import save_distilled_head
from server_helpers import start_server, wait_healthy
from test_server import free_port

from mtpserve.bench.engine_runs import OFF, EngineRuns, lockstep, spread_length
from mtpserve.bench.stats import mean_std, percentile, spec_counters, spec_delta, summarize
from mtpserve.cli.main import main
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.loader import load_checkpoint

PROMPTS = [
    {"kind": "code", "prompt": "def add(a, b):", "max_tokens": 24},
    {"kind": "chat", "messages": [{"role": "user", "content": "Hello, world! How are you today?"}], "max_tokens": 20},
    {"kind": "code", "prompt": "The quick brown fox jumps", "max_tokens": 16},
    {"kind": "chat", "messages": [{"role": "user", "content": "Write a haiku about the sea."}]},
]
PNGS = ["decode_tok_s_vs_k.png", "acceptance_by_position.png", "throughput_vs_concurrency.png",
        "prompt_processing.png"]


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(n):
    rng = np.random.default_rng(n)
    values = rng.exponential(size=n).tolist()
    for q in (0, 1, 25, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    s = summarize(values)
    assert s["mean"] == pytest.approx(float(np.mean(values)))
    assert s["p50"] == pytest.approx(float(np.median(values)))
    assert s["p99"] == pytest.approx(float(np.percentile(values, 99)))
    assert mean_std(values)["std"] == pytest.approx(float(np.std(values, ddof=1)) if n > 1 else 0.0)
    with pytest.raises(ValueError):
        percentile([], 50)
    assert summarize([]) == {"mean": None, "p50": None, "p99": None}


def exposition(drafts, draft_tokens, accepted, per_position, extra_model=False) -> str:
    lines = ["# HELP mtpserve_spec_drafts_total Verify steps that carried draft tokens",
             "# TYPE mtpserve_spec_drafts_total counter",
             f'mtpserve_spec_drafts_total{{model_name="a"}} {drafts}.0',
             "# TYPE mtpserve_spec_draft_tokens_total counter",
             f'mtpserve_spec_draft_tokens_total{{model_name="a"}} {draft_tokens}.0',
             "# TYPE mtpserve_spec_accepted_tokens_total counter",
             f'mtpserve_spec_accepted_tokens_total{{model_name="a"}} {accepted}.0',
             "# TYPE mtpserve_spec_accepted_tokens_per_position_total counter"]
    lines += [f'mtpserve_spec_accepted_tokens_per_position_total{{model_name="a",position="{i}"}} {c}.0'
              for i, c in enumerate(per_position)]
    if extra_model:  # a second series of the same counters: summed
        lines.append('mtpserve_spec_drafts_total{model_name="b"} 5.0')
        lines.append('mtpserve_spec_accepted_tokens_per_position_total{model_name="b",position="0"} 2.0')
    lines += ["# TYPE mtpserve_time_to_first_token_seconds histogram",
              'mtpserve_time_to_first_token_seconds_bucket{le="0.1",model_name="a"} 3.0',
              'mtpserve_time_to_first_token_seconds_count{model_name="a"} 3.0',
              'mtpserve_time_to_first_token_seconds_sum{model_name="a"} 0.2']
    return "\n".join(lines) + "\n"


def test_acceptance_from_counter_deltas():
    before = spec_counters(exposition(10, 30, 12, [8, 3, 1]))
    assert before == {"num_drafts": 10, "num_draft_tokens": 30, "num_accepted_tokens": 12,
                      "per_position": {0: 8, 1: 3, 2: 1}}
    # 40 more drafting steps of 3 drafts: accepted 30 at position 0, 20 at 1, 10 at 2 (60 accepted)
    after = spec_counters(exposition(50, 150, 72, [38, 23, 11]))
    d = spec_delta(before, after)
    assert (d["num_drafts"], d["num_draft_tokens"], d["num_accepted_tokens"]) == (40, 120, 60)
    assert d["acceptance_rate"] == pytest.approx(0.5)
    assert d["mean_acceptance_length"] == pytest.approx(2.5)  # 1 bonus + 60 / 40 accepted per step
    assert d["accepted_per_position"] == [30, 20, 10]
    assert d["per_position_rate"] == pytest.approx([0.75, 0.5, 0.25])
    summed = spec_counters(exposition(1, 2, 1, [1], extra_model=True))
    assert summed["num_drafts"] == 6 and summed["per_position"] == {0: 3}
    assert spec_counters("# TYPE x_total counter\nx_total 3.0\n") is None  # another server: no block
    nothing = spec_delta(before, before)
    assert nothing["num_drafts"] == 0 and nothing["mean_acceptance_length"] == 0.0
    with pytest.raises(MtpserveError, match="went down"):
        spec_delta(after, before)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


@pytest.fixture(scope="module")
def trained_head(tiny_llama_dir, tmp_path_factory):
    """A head distilled on the model's greedy continuations of the benchmark prompts: greedy drafts are accepted
    often but not always."""
    tok = load_checkpoint(tiny_llama_dir).tokenizer
    ids = [tok.encode(p["prompt"]) if "prompt" in p else
           tok.encode(tok.apply_chat_template(p["messages"]), add_special_tokens=False) for p in PROMPTS]
    return save_distilled_head(tmp_path_factory.mktemp("bench_head"), tiny_llama_dir, ids, 150)[0]


class Counter:
    def __init__(self):
        self.count = 0

    def update(self):
        self.count += 1


def test_sweep_clients_keep_every_stream_busy(tiny_llama_dir):
    """The concurrency sweep's clients: every step has all N streams in it, each client sends its own fixed
    sequence of prompts and lengths, and at the end of the budget the requests in flight are aborted."""
    engine, progress = make_engine(tiny_llama_dir), Counter()
    batches = []
    schedule = engine.scheduler.schedule

    def recorded():
        out = schedule()
        batches.append(len(out.scheduled))
        return out

    engine.scheduler.schedule = recorded
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    clients = EngineRuns(engine, progress).clients(prompts, 6, OFF, 2, 50)
    lockstep([clients])
    assert clients.tokens >= 50 and progress.count == 1 and set(batches) == {2}
    assert len(clients.done) > 2 and not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    # client i starts at prompt 2 i (two clients spread over four prompts) and walks on from there
    expected = sorted((prompts[(2 * i + j) % 4], spread_length(j * 2 + i, 6))
                      for i in range(2) for j in range(clients.sent[i]))
    assert sorted((r.prompt_token_ids, r.sampling_params.max_tokens) for r in clients.sent_requests) == expected
    assert all(len(r.output_token_ids) == r.sampling_params.max_tokens for r in clients.done)
    lengths = sorted(spread_length(n, 6) for n in range(30))
    assert lengths[0] == 3 and lengths[-1] == 9  # [max_tokens / 2, 3 * max_tokens / 2)


def check_acceptance(a: dict, k: int | None) -> None:
    assert 0 <= a["num_accepted_tokens"] <= a["num_draft_tokens"]
    assert sum(a["accepted_per_position"]) == a["num_accepted_tokens"]
    counts = a["accepted_per_position"]
    assert all(x >= y for x, y in itertools.pairwise(counts))  # a draft counts only if all before it did
    if k is not None:  # fixed k: every drafting step drafts k (fewer only where max_tokens cuts it short)
        assert len(counts) == k and a["num_drafts"] <= a["num_draft_tokens"] <= k * a["num_drafts"]


def test_bench_quick(tiny_llama_dir, trained_head, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--model", tiny_llama_dir, "--mtp-head", trained_head, "--dtype", "float64",
                 "--prompts", prompts_file, "--quick", "--per-kind", "2", "--max-tokens", "20",
                 "--temperatures", "0,0.7", "--out", str(out)])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    assert r["mtp"]["available"] and r["meta"]["num_prompts"] == 4
    greedy_rows = r["decode"]["0"]
    assert [row["mode"] for row in greedy_rows] == ["off", "k=1", "k=2", "k=3", "k=4", "adaptive (k<=4)"]
    for rows in r["decode"].values():
        for row in rows:
            assert row["tok_s"]["mean"] > 0 and set(row["by_kind"]) == {"code", "chat"}
            if row["k"] == 0:
                assert row["acceptance"]["num_draft_tokens"] == 0 and row["speedup"]["mean"] == 1.0
                continue
            fixed_k = None if row["adaptive"] else row["k"]
            check_acceptance(row["acceptance"], fixed_k)
            for by in row["by_kind"].values():
                check_acceptance(by["acceptance"], fixed_k)
            assert sum(by["acceptance"]["num_accepted_tokens"] for by in row["by_kind"].values()) \
                == row["acceptance"]["num_accepted_tokens"]
    # greedy decoding is lossless (float64: no near-ties), so every mode decodes the same tokens
    assert len({row["decoded_tokens"] for row in greedy_rows}) == 1
    assert greedy_rows[1]["acceptance"]["num_accepted_tokens"] > 0  # the head was trained on these prompts
    # the acceptance section decodes every prompt in one batch, 4 drafts fixed: greedy in float64 it drafts and
    # accepts exactly what the k=4 runs, one prompt at a time, did
    batched = r["acceptance"]["0"]
    alone = greedy_rows[4]["acceptance"]
    assert batched["k"] == 4 and set(batched["by_kind"]) == {"code", "chat"}
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert batched["all"][key] == alone[key]
    check_acceptance(r["acceptance"]["0.7"]["all"], 4)
    assert [row["prompt_tokens"] for row in r["prompt_processing"]] == [32, 128]
    assert all(row["mtp_off_tok_s"]["mean"] > 0 and row["mtp_on_tok_s"]["mean"] > 0 for row in r["prompt_processing"])
    sweep = {(row["streams"], row["mode"]) for row in r["concurrency"]}
    assert sweep == {(n, m) for n in (1, 2, 4) for m in ("off", "k=3", "adaptive (k<=4)")}
    for row in r["concurrency"]:
        assert row["aggregate_tok_s"]["mean"] > 0 and 0 <= row["accepted_per_token"] <= row["drafted_per_token"]
        if row["mode"] == "off":
            assert row["drafted_per_token"] == 0 and row["vs_first"]["runs"] == [1.0]
        if row["mode"] == "k=3":  # up to 3 drafts for every token out
            assert 0 < row["drafted_per_token"] <= 3
    with open(f"{tiny_llama_dir}/config.json") as f:
        hf_config = json.load(f)
    per_layer = 2 * hf_config["num_key_value_heads"] * hf_config["head_dim"] * 8  # K and V, float64
    kv = r["memory"]["kv_bytes_per_token"]
    assert (kv["without_mtp"], kv["with_mtp"]) == (per_layer * hf_config["num_hidden_layers"],
                                                   per_layer * (hf_config["num_hidden_layers"] + 1))
    assert r["memory"]["peak_rss_bytes"] > 0
    assert r["hf"]["decode_tok_s"]["transformers"]["mean"] > 0
    assert len(r["hf"]["prompt_tok_s"]) == 2
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert summary in capsys.readouterr().out
    assert "| adaptive (k<=4) |" in summary and "## Concurrent streams" in summary
    assert "## Acceptance over the whole prompt set" in summary


def test_bench_without_mtp_head(tiny_llama_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    assert main(["bench", "--model", tiny_llama_dir, "--prompts", prompts_file, "--quick", "--sections", "decode",
                 "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert not r["mtp"]["available"] and "no MTP head" in r["mtp"]["description"]
    assert [row["mode"] for row in r["decode"]["0"]] == ["off"]
    assert r["memory"]["kv_bytes_per_token"]["with_mtp"] is None
    assert not list(out.glob("*.png"))  # nothing to plot: no k, no concurrency, no prompt processing
    assert "no MTP head" in (out / "summary.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--k", "0,2"], "--k needs positive integers"),
    (["--sweep-k", "5"], "above the largest --k"),
    (["--sections", "decode,bogus"], "--sections takes"),
    (["--concurrency", "64"], "exceeds --max-num-seqs"),
])
def test_bench_rejects_bad_options(tiny_llama_dir, tmp_path, capsys, argv, message):
    assert main(["bench", "--model", tiny_llama_dir, "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def live_server(tiny_llama_dir, trained_head, tmp_path_factory):
    """``mtpserve serve`` in its own process, drafting exactly 2 tokens a step with the trained head."""
    port = free_port()
    folder = tmp_path_factory.mktemp("serve")
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_llama_dir, "mtp_head": trained_head, "spec_draft_n_max": 2,
                                      "spec_adaptive": "off", "port": port, "num_blocks": 256,
                                      "served_model_name": "tiny"}))
    proc = start_server(config, folder / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_serve_live(live_server, prompts_file, tmp_path, endpoint):
    out = tmp_path / "out"
    assert main(["bench-serve", "--base-url", live_server + "/v1", "--endpoint", endpoint, "--prompts", prompts_file,
                 "--concurrency", "1,4", "--num-requests", "8", "--max-tokens", "8", "--ignore-eos",
                 "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["meta"]["model"] == "tiny"  # from /v1/models
    assert [lvl["concurrency"] for lvl in r["levels"]] == [1, 4]
    for lvl in r["levels"]:
        assert (lvl["completed"], lvl["errors"]) == (8, 0)
        assert lvl["total_output_tokens"] == 64  # 8 requests of exactly 8 tokens (EOS ignored)
        assert lvl["output_tok_s"] > 0 and lvl["request_throughput"] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert 0 <= lvl[key]["p50"] <= lvl[key]["p99"], key
        assert lvl["ttft_ms"]["mean"] < lvl["e2e_ms"]["mean"]
        drafting = lvl["speculative"]  # fixed k = 2 on the server
        check_acceptance(drafting, 2)
        assert drafting["num_draft_tokens"] > 0
        # each request emits its 8 tokens in drafting steps (accepted + 1 each) and plain steps: the prefill
        # step, and at most one last step where max_tokens leaves no room for a draft
        assert 6 * 8 <= drafting["num_accepted_tokens"] + drafting["num_drafts"] <= 7 * 8
    assert "| 4 | 8 | 0 |" in (out / "summary.md").read_text()


def test_bench_serve_multi_turn(live_server, prompts_file, tmp_path):
    """Conversations growing turn by turn: every turn after the first finds the conversation so far in the
    server's prefix cache."""
    out = tmp_path / "out"
    assert main(["bench-serve", "--base-url", live_server, "--workload", "multi-turn", "--prompts", prompts_file,
                 "--conversations", "2", "--turns", "3", "--system-tokens", "12", "--max-tokens", "6",
                 "--ignore-eos", "--concurrency", "2", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["meta"]["workload"] == "multi-turn" and r["meta"]["turns"] == 3
    (lvl,) = r["levels"]
    assert (lvl["completed"], lvl["errors"], lvl["total_output_tokens"]) == (6, 0, 36)
    turns = lvl["turns"]
    assert [(t["turn"], t["completed"], t["errors"]) for t in turns] == [(1, 2, 0), (2, 2, 0), (3, 2, 0)]
    assert turns[0]["cached_tokens"] == 0  # each conversation has a system prompt of its own
    assert all(t["cached_tokens"] >= 16 for t in turns[1:])  # at least a block of 16 of the turn before
    prompt_tokens = [t["prompt_tokens"] for t in turns]
    assert prompt_tokens == sorted(prompt_tokens) and prompt_tokens[0] < prompt_tokens[-1]
    assert all(0 < t["ttft_ms"]["mean"] for t in turns)
    assert "TTFT per turn" in (out / "summary.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--workload", "multi-turn", "--num-requests", "4"], "--num-requests is for the single workload"),
    (["--turns", "2"], "--turns is for --workload multi-turn"),
    (["--workload", "multi-turn", "--endpoint", "completions"], "use --endpoint chat"),
    (["--workload", "multi-turn", "--conversations", "0"], "--conversations must be at least 1"),
])
def test_bench_serve_rejects_mixed_workload_options(tmp_path, capsys, argv, message):
    assert main(["bench-serve", "--base-url", "http://127.0.0.1:9", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_serve_counts_errors(live_server, prompts_file, tmp_path):
    out = tmp_path / "out"
    assert main(["bench-serve", "--base-url", live_server, "--model", "no-such-model", "--prompts", prompts_file,
                 "--num-requests", "3", "--out", str(out)]) == 0
    (lvl,) = json.loads((out / "results.json").read_text())["levels"]
    assert (lvl["completed"], lvl["errors"]) == (0, 3)
    assert "404" in lvl["error_samples"][0]


def test_bench_quality_of_a_quantized_engine(tiny_llama_dir, prompts_file, tmp_path):
    """The quality section compares the engine's weights with the float32 dequantized path."""
    out = tmp_path / "out"
    assert main(["bench", "--model", tiny_llama_dir, "--prompts", prompts_file, "--quick", "--sections", "quality",
                 "--quantization", "int8", "--max-tokens", "8", "--no-plots", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    q = r["quality"]
    assert r["meta"]["quantization"] == "int8" and q["engine"] == "int8 weights, float32"
    assert q["nll"]["tokens"] > 1000 and q["nll"]["reference_nll"] > 0
    assert abs(q["nll"]["nll_ratio"] - q["nll"]["nll"] / q["nll"]["reference_nll"]) < 1e-9
    assert 0 < q["nll"]["top1_agreement"] <= 1
    assert 0 <= q["greedy"]["equal"] <= q["greedy"]["prompts"] == r["meta"]["num_prompts"]
    assert "## Quality against the float32 path" in (out / "summary.md").read_text()
