"""Print the ratios recorded by `pytest benchmarks/ --benchmark-only --benchmark-json=F` as a table.

    python benchmarks/summarize.py F [--bench linear]
Rows: one per case; columns: each implementation's median GPU ms (CUDA events) and its ratio to
the case's baseline measured in the same run.
"""
import argparse
import json
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json_file")
    ap.add_argument("--bench", default="")
    args = ap.parse_args()
    data = json.load(open(args.json_file))
    table = defaultdict(dict)
    impls = []
    entries = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if args.bench and info.get("bench") != args.bench:
            continue
        key = (info.get("bench", "?"), info.get("case") or b.get("group") or b["name"])
        entries.append((key, info.get("impl", b["name"]), info, b["stats"]["median"] * 1e3))
    medians = defaultdict(dict)  # wall-clock medians (synchronized steps) where no GPU-event time is recorded
    for key, impl, _, wall_ms in entries:
        medians[key][impl] = wall_ms
    for key, impl, info, _ in entries:
        if impl not in impls:
            impls.append(impl)
        ms = info.get("gpu_ms_median")
        ratio = info.get("ratio_to_base")
        if ms is None and "kept_bytes" not in info:  # e.g. the e2e step: synchronized wall-clock median
            ms = medians[key][impl]
            floor = medians[key].get("floor") or medians[key].get("base")
            ratio = ms / floor if floor else None
        cell = f"{ratio:.2f}x" if ratio is not None else "-"
        if ms is not None:
            cell = f"{ms:.3f} ({cell})"
        elif "kept_bytes" in info:
            cell = f"{info['kept_bytes'] / 2**20:.0f}MiB ({cell})"
        table[key][impl] = cell
    head = ["bench", "case"] + impls
    rows = [[k[0], k[1]] + [v.get(i, "") for i in impls] for k, v in table.items()]
    widths = [max(len(str(r[j])) for r in rows + [head]) for j in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(*r))


if __name__ == "__main__":
    main()
