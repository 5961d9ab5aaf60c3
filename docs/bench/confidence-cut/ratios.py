"""Per-kind decode ratios to MTP off of A/B bench runs: every mode's tok/s over MTP off's in the same run.

    python docs/bench/confidence-cut/ratios.py docs/bench/confidence-cut/ab-greedy-chains

Runs are the folders under the argument (new1, old1, ...); prints (temperature, mode, kind, version) and the mean
ratio over that version's runs, then each run's.
"""
import collections
import glob
import json
import statistics
import sys

ratios = collections.defaultdict(list)
for path in sorted(glob.glob(sys.argv[1] + "/*/results.json")):
    version = path.split("/")[-2].rstrip("0123456789")
    results = json.load(open(path))
    for temperature, rows in results["decode"].items():
        off = {kind: row["tok_s"] for kind, row in rows[0]["by_kind"].items()}
        for row in rows[1:]:
            for kind, of_kind in row["by_kind"].items():
                ratios[temperature, row["mode"], kind, version].append(of_kind["tok_s"] / off[kind])
            ratios[temperature, row["mode"], "all", version].append(row["speedup"]["mean"])
for key in sorted(ratios):
    values = ratios[key]
    print(key, f"{statistics.mean(values):.2f}x", [round(v, 2) for v in values])
