"""PNG plots of ``mtpserve bench`` results (matplotlib, Agg backend): decode tok/s vs k, acceptance
by draft position, throughput vs concurrency, prompt processing with and without MTP."""

from __future__ import annotations

import os

from mtpserve.engine.errors import MtpserveError


def load_pyplot():
    try:
        import matplotlib  # optional (the bench extra): --no-plots runs without it
    except ImportError:
        raise MtpserveError("plots need matplotlib: pip install "
                            "'mtpserve[bench]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    # optional as above, and after use("Agg"): pyplot picks its backend on import
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


def decode_vs_k(plt, results: dict, out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (temp, rows) in enumerate(results["decode"].items()):
        color = f"C{i}"
        fixed = [r for r in rows if r["k"] and not r["adaptive"]]
        ax.errorbar([r["k"] for r in fixed], [r["tok_s"]["mean"] for r in fixed],
                    yerr=[r["tok_s"]["std"] for r in fixed], marker="o", color=color, capsize=3,
                    label=f"fixed k, T={temp}")
        for r in rows:
            if r["k"] == 0:
                ax.axhline(r["tok_s"]["mean"], color=color, linestyle="--",
                           label=f"MTP off, T={temp}")
            elif r["adaptive"]:
                ax.axhline(r["tok_s"]["mean"], color=color, linestyle=":",
                           label=f"{r['mode']}, T={temp}")
    hf = results.get("hf") or {}
    if "decode_tok_s" in hf:
        ax.axhline(hf["decode_tok_s"]["transformers"]["mean"], color="gray", linestyle="-.",
                   label="transformers generate")
    ax.set(xlabel="draft tokens per step (k)", ylabel="decode tok/s (single stream)",
           title="Decode speed vs k")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "decode_tok_s_vs_k.png")


def acceptance_by_position(plt, results: dict, out_dir: str) -> str:
    temps = list(results["decode"])
    ks = [r["k"] for r in results["decode"][temps[0]] if r["k"] and not r["adaptive"]]
    fig, axes = plt.subplots(len(temps), len(ks), figsize=(3.2 * len(ks), 2.8 * len(temps)),
                             squeeze=False)
    for row, temp in enumerate(temps):
        fixed = [r for r in results["decode"][temp] if r["k"] and not r["adaptive"]]
        for col, r in enumerate(fixed):
            ax = axes[row][col]
            for kind, by in sorted(r["by_kind"].items()):
                rates = by["acceptance"]["per_position_rate"]
                ax.plot(range(1, len(rates) + 1), rates, marker="o", label=kind)
            rates = r["acceptance"]["per_position_rate"]
            ax.plot(range(1, len(rates) + 1), rates, color="black", linewidth=2, label="all")
            ax.set(title=f"k={r['k']}, T={temp}", xlabel="draft position", ylim=(0, 1),
                   xticks=range(1, r["k"] + 1))
            if col == 0:
                ax.set_ylabel("accepted / drafting steps")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, out_dir, "acceptance_by_position.png")


def throughput_vs_concurrency(plt, results: dict, out_dir: str) -> str:
    fig, (agg, per) = plt.subplots(1, 2, figsize=(10, 4))
    modes = list(dict.fromkeys(r["mode"] for r in results["concurrency"]))
    for mode in modes:
        rows = [r for r in results["concurrency"] if r["mode"] == mode]
        streams = [r["streams"] for r in rows]
        for ax, key in ((agg, "aggregate_tok_s"), (per, "per_stream_tok_s")):
            ax.errorbar(streams, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows],
                        marker="o", capsize=3, label=f"MTP {mode}")
    for ax, title in ((agg, "aggregate output tok/s"), (per, "per-stream decode tok/s")):
        ax.set_xscale("log", base=2)
        ax.set(xlabel="concurrent streams", title=title)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "throughput_vs_concurrency.png")


def prompt_processing(plt, results: dict, out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = results["prompt_processing"]
    modes = [key[:-len("_tok_s")] for key in rows[0] if key.endswith("_tok_s")]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[f"{mode}_tok_s"]["mean"] for r in rows], width,
               yerr=[r[f"{mode}_tok_s"]["std"] for r in rows], capsize=3,
               label=mode.replace("_", " ").replace("mtp", "MTP"))
    ax.set_xticks(range(len(rows)), [str(r["prompt_tokens"]) for r in rows])
    ax.set(xlabel="prompt tokens", ylabel="prompt tok/s",
           title="Prompt processing with and without MTP")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "prompt_processing.png")


def write_plots(results: dict, out_dir: str) -> list[str]:
    """Every plot the results have data for; returns the files written."""
    plt = load_pyplot()
    written = []
    has_mtp = results["mtp"]["available"]
    if results.get("decode") and has_mtp:
        written.append(decode_vs_k(plt, results, out_dir))
        written.append(acceptance_by_position(plt, results, out_dir))
    if results.get("concurrency"):
        written.append(throughput_vs_concurrency(plt, results, out_dir))
    if results.get("prompt_processing"):
        written.append(prompt_processing(plt, results, out_dir))
    plt.close("all")
    return written
