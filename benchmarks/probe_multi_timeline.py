"""Timeline of the multi-adapter segment forward inside a replayed CUDA graph (GPU): when each kernel
(sort, shrink, expand) starts and ends relative to the call's first kernel, from the profiler's
kernel records, averaged over the calls of the graph.

    python benchmarks/probe_multi_timeline.py [--trace DIR] [--env VAR=v1,v2] [T,L,r,popularity ...]

With programmatic dependent launch a kernel "starts" when its first block is resident, which may be
long before the kernel it depends on ends; the ends say where the critical path goes.
"""
import argparse
import json
import os
import statistics
import tempfile

import torch

from lora_kernels._bench.multi import decode_case
from lora_kernels.ops.multi_lora import RowIndex, _ext_ops

CASES = ("256,32,16,uniform", "1024,128,16,distinct")
CALLS = 20  # calls per graph


def _short(name: str) -> str:
    for key in ("sort_segments", "rows_shrink", "rows_expand", "sgmv_shrink", "sgmv_expand", "bgmv"):
        if key in name:
            return key
    return name[:24]


def timeline(fn, trace_path: str):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            for _ in range(CALLS):
                fn()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kern = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    names = [_short(e["name"]) for e in kern]
    if not kern:
        return None
    first = names[0]  # the kernel that opens a call
    calls, cur = [], []
    for e, n in zip(kern, names):
        if n == first and cur:
            calls.append(cur)
            cur = []
        cur.append((n, float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    calls.append(cur)
    calls = calls[1:-1]  # drop the edges of the replays
    per = {}
    for c in calls:
        t0 = c[0][1]
        for n, a, b in c:
            per.setdefault(n, []).append((a - t0, b - t0, b - a))
    period = statistics.median(b[0][1] - a[0][1] for a, b in zip(calls, calls[1:]))
    return per, period


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=None, help="folder for the chrome traces")
    ap.add_argument("--env", default="", help="VAR=v1,v2,...: time the call that sorts once per value of VAR (and the pre-sorted path)")
    ap.add_argument("cases", nargs="*")
    args = ap.parse_args()
    op = _ext_ops().multi_lora_fwd
    tdir = args.trace or tempfile.mkdtemp()
    os.makedirs(tdir, exist_ok=True)
    for spec in args.cases or CASES:
        x, A, B, s, idx, nbytes = decode_case(spec)
        seg = RowIndex(idx).segments(A.shape[0])
        modes = {
            "sort in call": lambda: op(x, A, B, idx, s, None, "segment", False),
            "pre-sorted": lambda: op(x, A, B, idx, s, None, "segment", False, *seg),
        }
        if args.env:
            var, values = args.env.split("=", 1)
            modes = {"pre-sorted": modes["pre-sorted"]}
            for v in values.split(","):
                def run(v=v):  # read by the launchers on every call, so set before each
                    os.environ[var] = v
                    return op(x, A, B, idx, s, None, "segment", False)
                modes[f"sort in call, {var}={v}"] = run
        for mode, fn in modes.items():
            got = timeline(fn, os.path.join(tdir, f"{spec.replace(',', '_')}_{mode.replace(' ', '_')}.json"))
            if got is None:
                print(f"{spec} {mode}: no kernel records")
                continue
            per, period = got
            print(f"{spec} {mode}: period {period:.2f} us ({nbytes / period / 1e3:.0f} GB/s)")
            for n, v in per.items():
                print(f"   {n:14s} start {statistics.median(a for a, _, _ in v):6.2f}  end "
                      f"{statistics.median(b for _, b, _ in v):6.2f}  dur {statistics.median(d for _, _, d in v):6.2f} us")


if __name__ == "__main__":
    main()
