"""Write the linear rows of `python -m lora_kernels bench --json F` files as one CSV.

    python benchmarks/grid_csv.py OUT.csv F1.json [F2.json ...]
Columns: case, impl, eager_ms, eager_ratio, graph_ms, graph_ratio, kept_bytes, bound_bytes (blank where
not measured); ratios are the report's, to the base measured in the same run (graph ratios to the
base's graph time).
"""
import csv
import json
import sys


def _g(v):
    return "" if v is None else f"{v:.5g}"


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    out, files = argv[0], argv[1:]
    rows = [r for f in files for r in json.load(open(f)) if r.get("bench") == "linear"]
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "impl", "eager_ms", "eager_ratio", "graph_ms", "graph_ratio", "kept_bytes", "bound_bytes"])
        for r in rows:
            ex = r.get("extra") or {}
            graph_ms = ex.get("graph_ms")
            if graph_ms is None and r["impl"] == "base" and r.get("note", "").startswith("graph "):
                graph_ms = float(r["note"].split()[1])  # the base's graph time rides in its note
            graph_ratio = ex.get("graph_ratio")
            if graph_ratio is None and r["impl"] == "base" and graph_ms is not None:
                graph_ratio = 1.0
            w.writerow([r["case"], r["impl"], _g(r.get("ms")), _g(r.get("ratio")), _g(graph_ms), _g(graph_ratio),
                        ex.get("kept_bytes", ""), ex.get("bound_bytes", "")])
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
