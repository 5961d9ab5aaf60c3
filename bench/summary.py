"""Markdown tables of benchmark results, ready to paste into docs/BENCHMARKS.md, and the output files."""

from __future__ import annotations

import json
import os


def num(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def pm(stat: dict, digits: int = 1) -> str:
    """mean ± std of repeated runs."""
    return f"{num(stat['mean'], digits)} ± {num(stat['std'], digits)}"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def rates(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) or "-"


def accepted(a: dict) -> list[str]:
    """Acceptance rate and tokens per drafting step ("-" without drafts)."""
    if not a["num_drafts"]:
        return ["-", "-"]
    return [num(a["acceptance_rate"], 2), num(a["mean_acceptance_length"], 2)]


def engine_summary(r: dict) -> str:
    m = r["meta"]
    lines = [f"# mtpserve bench: {m['model']} ({m['dtype']}, {m['device']}, {m['threads']} threads)", "",
             f"MTP: {r['mtp']['description']}. Prompts: {m['prompts']} ({m['num_prompts']}), repeats: {m['repeats']}.",
             ""]
    for temp, rows in (r.get("decode") or {}).items():
        lines += [f"## Single-stream decode, temperature {temp}", ""]
        lines += table(["mode", "decode tok/s", "vs MTP off", "acceptance rate", "tokens per drafting step"],
                       [[row["mode"], pm(row["tok_s"]), f"{pm(row['speedup'], 2)}x", *accepted(row["acceptance"])]
                        for row in rows])
        by_kind = [[row["mode"], kind, num(by["tok_s"]), *accepted(by["acceptance"]),
                    rates(by["acceptance"]["per_position_rate"])]
                   for row in rows if row["k"] != 0 for kind, by in row["by_kind"].items()]
        if by_kind:
            lines += [f"Acceptance per prompt kind, temperature {temp} (per position: accepted / drafting steps)", ""]
            lines += table(["mode", "kind", "decode tok/s", "acceptance rate", "tokens per drafting step",
                            "per position"], by_kind)
    if r.get("prompt_processing"):
        modes = [k[:-len("_tok_s")] for k in r["prompt_processing"][0] if k.endswith("_tok_s")]
        lines += ["## Prompt processing", ""]
        lines += table(["prompt tokens", *(f"{mode.replace('_', ' ')} tok/s" for mode in modes)]
                       + (["on / off"] if "ratio" in r["prompt_processing"][0] else []),
                       [[row["prompt_tokens"], *(pm(row[f"{mode}_tok_s"], 0) for mode in modes)]
                        + ([pm(row["ratio"], 3)] if "ratio" in row else []) for row in r["prompt_processing"]])
    if r.get("concurrency"):
        lines += ["## Concurrent streams", ""]
        lines += [("Every mode on its own engine (same weights), all stepped in lockstep; tok/s over each mode's "
                   "own step time. \"vs off\": aggregate tok/s over MTP off's, per repeat."), ""]
        lines += table(["streams", "MTP", "aggregate tok/s", "vs off", "per-stream tok/s", "drafted / token",
                        "accepted / token"],
                       [[row["streams"], row["mode"], pm(row["aggregate_tok_s"]), pm(row["vs_first"], 3),
                         pm(row["per_stream_tok_s"]), f"{row['drafted_per_token']:.2f}",
                         f"{row['accepted_per_token']:.2f}"] for row in r["concurrency"]])
    mem = r["memory"]
    lines += ["## Memory", ""]
    lines += table(["KV bytes / token (no MTP)", "KV bytes / token (with MTP layers)", "peak RSS", "CUDA peak"],
                   [[mem["kv_bytes_per_token"]["without_mtp"], mem["kv_bytes_per_token"]["with_mtp"] or "-",
                     mib(mem["peak_rss_bytes"]), mib(mem["cuda_peak_bytes"])]])
    hf = r.get("hf")
    if hf and "decode_tok_s" in hf:
        d = hf["decode_tok_s"]
        lines += ["## Against transformers `generate` (no speculation on either side)", ""]
        lines += table(["", "mtpserve", "transformers", "ratio"],
                       [["decode tok/s", pm(d["mtpserve"]), pm(d["transformers"]), f"{pm(d['ratio'], 2)}x"]]
                       + [[f"prompt tok/s ({p['prompt_tokens']} tokens)", pm(p["mtpserve"], 0),
                           pm(p["transformers"], 0), f"{pm(p['ratio'], 2)}x"] for p in hf["prompt_tok_s"]])
    elif hf:
        lines += [f"Comparison with transformers skipped: {hf['skipped']}", ""]
    return "\n".join(lines)


def latency_cells(stat: dict) -> list[str]:
    return [num(stat["mean"]), num(stat["p50"]), num(stat["p99"])]


def serve_summary(r: dict) -> str:
    m = r["meta"]
    lines = [f"# mtpserve bench-serve: {m['model']} at {m['base_url']} ({m['endpoint']})", "",
             "Latencies in ms (mean / p50 / p99).", ""]
    lines += table(["concurrency", "requests", "errors", "TTFT", "TPOT", "ITL", "E2E", "output tok/s", "req/s"],
                   [[lvl["concurrency"], lvl["completed"], lvl["errors"],
                     *(" / ".join(latency_cells(lvl[key])) for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")),
                     num(lvl["output_tok_s"]), num(lvl["request_throughput"], 2)] for lvl in r["levels"]])
    spec_rows = [[lvl["concurrency"], s["num_drafts"], s["num_draft_tokens"], s["num_accepted_tokens"],
                  *accepted(s), rates(s["per_position_rate"])]
                 for lvl in r["levels"] if (s := lvl.get("speculative"))]
    if spec_rows:
        lines += ["Speculative decoding (server counters, before/after each level)", ""]
        lines += table(["concurrency", "drafts", "draft tokens", "accepted", "acceptance rate",
                        "tokens per drafting step", "per position"], spec_rows)
    return "\n".join(lines)


def write_report(out_dir: str, results: dict, summary: str) -> None:
    """results.json and summary.md in ``out_dir``; the summary also goes to stdout."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary + "\n")
    print(summary)
