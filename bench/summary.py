"""Markdown tables of benchmark results, ready to
paste into docs/BENCHMARKS.md, and the output files."""

from __future__ import annotations

import json
import os


def num(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def pm(stat: dict, digits: int = 1) -> str:
    """mean ± std of repeated runs."""
    return f"{num(stat['mean'], digits)} ± {num(stat['std'], digits)}"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    lines.append("")
    return lines


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def rates(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) or "-"


def accepted(a: dict) -> list[str]:
    """Acceptance rate and tokens per drafting step ("-" without drafts)."""
    if not a["num_drafts"]:
        return ["-", "-"]
    return [num(a["acceptance_rate"], 2), num(a["mean_acceptance_length"], 2)]


def decode_section(temp: str, rows: list[dict]) -> list[str]:
    lines = [f"## Single-stream decode, temperature {temp}", ""]
    header = ["mode", "decode tok/s", "vs MTP off", "acceptance rate", "tokens per drafting step"]
    cells = []
    for row in rows:
        speedup = f"{pm(row['speedup'], 2)}x"
        cells.append([row["mode"], pm(row["tok_s"]), speedup, *accepted(row["acceptance"])])
    lines += table(header, cells)
    by_kind = []
    for row in rows:
        if row["k"] == 0:
            continue
        for kind, by in row["by_kind"].items():
            per_position = rates(by["acceptance"]["per_position_rate"])
            by_kind.append([row["mode"], kind, num(by["tok_s"]), *accepted(by["acceptance"]),
                            per_position])
    if by_kind:
        lines += [f"Acceptance per prompt kind, temperature {temp} "
                  "(per position: accepted / drafting steps)", ""]
        lines += table(["mode", "kind", "decode tok/s", "acceptance rate",
                        "tokens per drafting step", "per position"], by_kind)
    return lines


def prompt_processing_section(pp_rows: list[dict]) -> list[str]:
    modes = [k[:-len("_tok_s")] for k in pp_rows[0] if k.endswith("_tok_s")]
    header = ["prompt tokens"]
    header += [f"{mode.replace('_', ' ')} tok/s" for mode in modes]
    if "ratio" in pp_rows[0]:
        header.append("on / off")
    cells = []
    for row in pp_rows:
        cell = [row["prompt_tokens"]]
        cell += [pm(row[f"{mode}_tok_s"], 0) for mode in modes]
        if "ratio" in row:
            cell.append(pm(row["ratio"], 3))
        cells.append(cell)
    return ["## Prompt processing", ""] + table(header, cells)


def concurrency_section(rows: list[dict]) -> list[str]:
    lines = ["## Concurrent streams", ""]
    note = ("Every mode on its own engine (same weights), all stepped in lockstep; tok/s over "
            "each mode's own step time. \"vs off\": aggregate tok/s over MTP off's, "
            "per repeat.")
    lines += [note, ""]
    header = ["streams", "MTP", "aggregate tok/s", "vs off", "per-stream tok/s", "drafted / token",
              "accepted / token"]
    cells = []
    for row in rows:
        cells.append([row["streams"], row["mode"], pm(row["aggregate_tok_s"]),
                      pm(row["vs_first"], 3), pm(row["per_stream_tok_s"]),
                      f"{row['drafted_per_token']:.2f}", f"{row['accepted_per_token']:.2f}"])
    return lines + table(header, cells)


def memory_section(mem: dict) -> list[str]:
    header = ["KV bytes / token (no MTP)", "KV bytes / token (with MTP layers)", "peak RSS",
              "CUDA peak"]
    kv = mem["kv_bytes_per_token"]
    row = [kv["without_mtp"], kv["with_mtp"] or "-", mib(mem["peak_rss_bytes"]),
           mib(mem["cuda_peak_bytes"])]
    return ["## Memory", ""] + table(header, [row])


def hf_section(hf: dict) -> list[str]:
    if "decode_tok_s" not in hf:
        return [f"Comparison with transformers skipped: {hf['skipped']}", ""]
    d = hf["decode_tok_s"]
    cells = [["decode tok/s", pm(d["mtpserve"]), pm(d["transformers"]), f"{pm(d['ratio'], 2)}x"]]
    for p in hf["prompt_tok_s"]:
        cells.append([f"prompt tok/s ({p['prompt_tokens']} tokens)", pm(p["mtpserve"], 0),
                      pm(p["transformers"], 0), f"{pm(p['ratio'], 2)}x"])
    lines = ["## Against transformers `generate` (no speculation on either side)", ""]
    return lines + table(["", "mtpserve", "transformers", "ratio"], cells)


def verify_section(v: dict) -> list[str]:
    lines = ["## Verify cost", "",
             f"One request, {v['context']} tokens of context: a main-model step over 1 to "
             f"{v['k_max'] + 1} query rows (the last token and up to {v['k_max']} drafts), over a "
             "one-row step; forward alone, and with the logits of every row.", ""]
    header = ["rows", "forward ms", "forward / 1 row", "with logits ms", "with logits / 1 row"]
    cells = []
    for row in v["rows"]:
        cells.append([row["rows"], pm(row["forward_ms"], 2), pm(row["forward_ratio"], 2),
                      pm(row["step_ms"], 2), pm(row["step_ratio"], 2)])
    return lines + table(header, cells)


def quality_section(q: dict) -> list[str]:
    if "skipped" in q:
        return [f"Quality comparison skipped: {q['skipped']}", ""]
    n = q["nll"]
    g = q["greedy"]
    lines = ["## Quality against the float32 path with dequantized weights", "",
             f"This engine: {q['engine']}. Mean next-token NLL over {n['tokens']} tokens of "
             "held-out text (package descriptions), and greedy continuations of the bench "
             "prompts.", ""]
    cells = [[f"{n['nll']:.4f}", f"{n['reference_nll']:.4f}", f"{n['nll_ratio']:.4f}",
              f"{n['top1_agreement']:.3f}", f"{g['equal']} of {g['prompts']}",
              f"{g['mean_common_prefix']:.1f} of {g['mean_tokens']:.0f}"]]
    header = ["NLL", "reference NLL", "ratio", "top-1 agreement", "greedy equal",
              "mean common prefix"]
    return lines + table(header, cells)


def llama_cpp_section(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"Comparison with llama.cpp skipped: {r['skipped']}", ""]
    if "failed" in r:
        return [f"Comparison with llama.cpp failed: {r['failed']}", ""]
    d = r["decode_tok_s"]
    cells = [[f"decode tok/s ({d['tokens']} tokens after {d['depth']})", pm(d["mtpserve"]),
              pm(d["llama_cpp"]), f"{pm(d['ratio'], 2)}x"]]
    for p in r["prompt_tok_s"]:
        cells.append([f"prompt tok/s ({p['prompt_tokens']} tokens)", pm(p["mtpserve"], 0),
                      pm(p["llama_cpp"], 0), f"{pm(p['ratio'], 2)}x"])
    c = r.get("step_cost_4_over_1")
    if c:
        cells.append(["a step over 4 tokens / over 1 (4 pp1 / pp4)", pm(c["mtpserve"], 2),
                      pm(c["llama_cpp"], 2), f"{pm(c['ratio'], 2)}x"])
    lines = ["## Against llama.cpp `llama-bench` (same GGUF file, no speculation on either side)",
             "",
             f"llama.cpp build {r['build']}, backends {r['backends']}, {r['threads']} threads; "
             "runs alternating with ours.", ""]
    return lines + table(["", "mtpserve", "llama.cpp", "ours / llama.cpp"], cells)


def schema_section(rows: list[dict] | dict) -> list[str]:
    if isinstance(rows, dict):
        return [f"JSON prompts with and without a schema skipped: {rows['skipped']}", ""]
    lines = ["## JSON prompts with and without a schema (greedy)", "",
             "Free text, `response_format` json_object, and a json_schema of the keys each prompt "
             "asks for; speed-up against MTP off under the same constraint. Forbidden drafts: "
             "drafts verified that the grammar does not allow (0: grammar-aware drafting).", ""]
    header = ["constraint", "mode", "decode tok/s", "vs MTP off", "acceptance rate",
              "tokens per drafting step", "answers that parse", "forbidden drafts"]
    cells = []
    for row in rows:
        forbidden = "-"
        if row["constraint"] != "none":
            forbidden = f"{row['forbidden_drafts']} of {row['verified_drafts']}"
        cells.append([row["constraint"], row["mode"], pm(row["tok_s"]),
                      f"{pm(row['speedup'], 2)}x", *accepted(row["acceptance"]),
                      f"{row['parsed']} of {row['answers']}", forbidden])
    return lines + table(header, cells)


def acceptance_section(by_temperature: dict) -> list[str]:
    lines = ["## Acceptance over the whole prompt set", "",
             "Every prompt in one batch with a fixed number of drafts a step; counts only (per "
             "position: accepted / drafting steps).", ""]
    cells = []
    for temp, result in by_temperature.items():
        groups = [*sorted(result["by_kind"].items()), ("all", result["all"])]
        for kind, a in groups:
            cells.append([temp, result["k"], kind, *accepted(a), rates(a["per_position_rate"])])
    header = ["temperature", "k", "kind", "acceptance rate", "tokens per drafting step",
              "per position"]
    return lines + table(header, cells)


def engine_summary(r: dict) -> str:
    m = r["meta"]
    weights = m.get("quantization", "none")
    title = (f"# mtpserve bench: {m['model']} ({m['dtype']}, weights {weights}, {m['device']}, "
             f"{m['threads']} threads)")
    lines = [title,
             "",
             f"MTP: {r['mtp']['description']}. Prompts: {m['prompts']} ({m['num_prompts']}), "
             f"repeats: {m['repeats']}.",
             ""]
    for temp, rows in (r.get("decode") or {}).items():
        lines += decode_section(temp, rows)
    if r.get("prompt_processing"):
        lines += prompt_processing_section(r["prompt_processing"])
    if r.get("verify"):
        lines += verify_section(r["verify"])
    if r.get("quality"):
        lines += quality_section(r["quality"])
    if r.get("concurrency"):
        lines += concurrency_section(r["concurrency"])
    lines += memory_section(r["memory"])
    if r.get("hf"):
        lines += hf_section(r["hf"])
    if r.get("llamacpp"):
        lines += llama_cpp_section(r["llamacpp"])
    if r.get("schema"):
        lines += schema_section(r["schema"])
    if r.get("acceptance"):
        lines += acceptance_section(r["acceptance"])
    return "\n".join(lines)


def latency_cells(stat: dict) -> list[str]:
    return [num(stat["mean"]), num(stat["p50"]), num(stat["p99"])]


def serve_summary(r: dict) -> str:
    m = r["meta"]
    lines = [f"# mtpserve bench-serve: {m['model']} at {m['base_url']} ({m['endpoint']})", "",
             "Latencies in ms (mean / p50 / p99).", ""]
    header = ["concurrency", "requests", "errors", "TTFT", "TPOT", "ITL", "E2E", "output tok/s",
              "req/s"]
    cells = []
    for lvl in r["levels"]:
        latencies = []
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            latencies.append(" / ".join(latency_cells(lvl[key])))
        cells.append([lvl["concurrency"], lvl["completed"], lvl["errors"], *latencies,
                      num(lvl["output_tok_s"]), num(lvl["request_throughput"], 2)])
    lines += table(header, cells)
    lines += turn_table(r["levels"])
    drafting_rows = []
    for lvl in r["levels"]:
        s = lvl.get("speculative")
        if s:
            drafting_rows.append([lvl["concurrency"], s["num_drafts"], s["num_draft_tokens"],
                                  s["num_accepted_tokens"], *accepted(s),
                                  rates(s["per_position_rate"])])
    if drafting_rows:
        lines += ["Speculative decoding (server counters, before/after each level)", ""]
        lines += table(["concurrency", "drafts", "draft tokens", "accepted", "acceptance rate",
                        "tokens per drafting step", "per position"], drafting_rows)
    return "\n".join(lines)


def turn_table(levels: list[dict]) -> list[str]:
    """The multi-turn workload's rows: per level and turn, TTFT, prompt and cached tokens."""
    rows = []
    for lvl in levels:
        turns = lvl.get("turns", ())
        for t in turns:
            first, mean = turns[0]["ttft_ms"]["mean"], t["ttft_ms"]["mean"]
            ratio = None
            if first and mean is not None:
                ratio = mean / first
            rows.append([lvl["concurrency"], t["turn"], t["completed"], t["errors"],
                         " / ".join(latency_cells(t["ttft_ms"])), num(ratio, 2),
                         num(t["prompt_tokens"], 0), num(t["cached_tokens"], 0)])
    if not rows:
        return []
    header = ["concurrency", "turn", "requests", "errors", "TTFT", "TTFT / turn 1",
              "prompt tokens (mean)", "cached tokens (mean)"]
    return ["TTFT per turn (ms, mean / p50 / p99)", "", *table(header, rows)]


def write_report(out_dir: str, results: dict, summary: str) -> None:
    """results.json and summary.md in ``out_dir``; the summary also goes to stdout."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary + "\n")
    print(summary)
