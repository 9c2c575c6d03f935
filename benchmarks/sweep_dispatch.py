"""Dispatch variants of the fused op side by side, CUDA-graph time over the base F.linear (GPU).

    python benchmarks/sweep_dispatch.py [MxKxNxr[@p] ...] [--rounds 3] [--variants now,before,...]
                                        [--before MODULE]

Each variant is a set of module-level settings of lora_kernels.ops.lora_linear applied while its
callable runs (and so while its CUDA graph is captured); "now" is the code's own. Rows: training
forward and forward + backward of (x, A, B) per shape, graph ms of base, naive PyTorch and each
variant, and each one's ratio to base as the median of per-round ratios (rounds in turn, so the
GPU's clock drift hits all alike; see lora_kernels._bench.interleaved_ms). Eager replay is off:
a recorded plan does not know which variant recorded it. --before MODULE adds a column for
lora_kernels.ops.MODULE's lora_linear (a copy of the op module from an earlier commit with its
torch.library namespace renamed, as in benchmarks/host_step.py): code no setting can reach.
"""
import argparse
import contextlib
import importlib
import statistics

import torch

import lora_kernels as lk
from lora_kernels._bench import graph_time_ms, interleaved_ms, round_ratios
from lora_kernels._bench import linear as LB
from lora_kernels.ops import lora_linear as LL
from lora_kernels.ops import replay

VARIANTS = {
    "now": {},
    "before": {"_CUBLAS_MIN_RANK": 10**9, "_CUBLAS_MIN_RANK_FEW_ROWS": 10**9,  # before the twenty-first
               "_GEMM_MIN_WAVE": 0.0},  # session's dispatch changes
    "cublas_from_r65": {"_CUBLAS_MIN_RANK": 65, "_CUBLAS_MIN_RANK_FEW_ROWS": 65},  # before the few-rows rule
    "cublas_from_r33": {"_CUBLAS_MIN_RANK": 33},  # r33-64 through cuBLAS at every row count
    "few_rows_from_r17": {"_CUBLAS_MIN_RANK_FEW_ROWS": 17},  # r17-32 through cuBLAS too at <= 4096 rows
    "no_wave_rule": {"_GEMM_MIN_WAVE": 0.0},
    "split_xpass": {"_ONE_XPASS_MAX_BLOCK_R": 0},  # r > 64 with dropout: dA and the masked dx_lora in two passes
    "cublas_gemm_r64": {"_GEMM_MAX_RANK": 32},  # r64: the base GEMMs in cuBLAS, the LoRA terms in the expand kernel
    "cublas_all_r64": {"_GEMM_MAX_RANK": 32, "_CUBLAS_MIN_RANK": 33},  # r64 as r128 runs
}
SHAPES = ["8192x4096x4096x128@0", "8192x4096x4096x128@0.05", "2048x4096x4096x128@0", "2048x4096x4096x128@0.05",
          "8192x14336x4096x128@0.05", "8192x2048x512x128@0", "8192x2048x512x128@0.05", "2048x5120x5120x128@0.05",
          "8192x4096x4096x64@0", "8192x4096x4096x64@0.05", "2048x2048x512x16@0", "2048x2048x512x64@0.05",
          "2048x2048x512x128@0.05", "256x4096x4096x64@0", "8192x4096x4096x16@0.05", "8192x1024x1024x16@0.05"]


@contextlib.contextmanager
def settings(over: dict):
    """Module globals of lora_linear.py; "lk.NAME" sets lora_kernels.NAME (the bench's callables
    look up lk.lora_linear at each call)."""
    where = {k: (lk, k[3:]) if k.startswith("lk.") else (LL, k) for k in over}
    old = {k: getattr(*where[k]) for k in over}
    for k, v in over.items():
        setattr(*where[k], v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(*where[k], v)


def with_settings(fn, over):
    def run():
        with settings(over):
            return fn()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*", default=SHAPES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--before", default="", help="an op module copy under lora_kernels/ops/ to time beside")
    args = ap.parse_args()
    if args.before:
        VARIANTS[args.before] = {"lk.lora_linear": importlib.import_module(f"lora_kernels.ops.{args.before}").lora_linear}
    replay._state["ok"] = False
    names = args.variants.split(",") + ([args.before] if args.before else [])
    print(f"{'case':34s} {'base ms':>8s} {'naive':>7s} " + " ".join(f"{n:>14s}" for n in names))
    for spec in args.shapes:
        shape, _, p = spec.partition("@")
        M, K, N, r = map(int, shape.split("x"))
        case = LB.Case(M, K, N, r, float(p or 0.05))
        x, dy, fns = LB.build(case, impls=("base", "fused", "naive"))
        for mode in ("fwd", "fwd+bwd"):
            calls = {impl: LB.step_fn(*fns[impl], x, dy, mode) for impl in ("base", "naive")}
            fused = LB.step_fn(*fns["fused"], x, dy, mode)
            for n in names:
                calls[n] = with_settings(fused, VARIANTS[n])
            g = interleaved_ms(calls, lambda fn: graph_time_ms(fn, 20), args.rounds)
            ratio = {k: statistics.median(round_ratios(v, g["base"]) or [float("nan")]) for k, v in g.items()}
            cells = " ".join(f"{statistics.median(g[n]) * 1e3:7.1f}us {ratio[n]:5.3f}" for n in names)
            print(f"{case.name + ' ' + mode:34s} {statistics.median(g['base']):8.4f} {ratio['naive']:7.3f} {cells}",
                  flush=True)
        del x, dy, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
