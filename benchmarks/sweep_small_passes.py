"""The three memory-bound passes of a training step at the small shapes, across tile configs (GPU, sm_90).

    python benchmarks/sweep_small_passes.py [--shapes MxKxNxR,...] [--p 0.05]

At 8192 x 1024 -> 1024 each pass reads a 16 MB activation (~6 us at the copy rate) and takes
9-14 us: few K steps per CTA, so the pipeline's fill and drain and the dA atomics weigh more than
at 4096 columns. For each shape, CUDA-graph us (median of do_bench_cudagraph) of:
  shrink  S = drop(x) A^T, TMA kernel (what the forward runs);
  dy      G = dy B and dB (fp32 atomics into a zeroed buffer, the fill included), as the backward runs it;
  dA      dA = s/(1-p) G^T drop(x), TMA kernel adding into a zeroed fp32 buffer (fill included), as the
          backward runs it, at row splits sized for 1, 2 (the table's _split) and 4 CTAs per SM.
The table's choice is printed first on each line; every other config is checked against it.
Launched as the op launches in eager mode (no torch.compile tracing wrapper, so the TMA kernels
run). At these sizes an activation (16-32 MB) fits in the H100's 50 MB L2, and back-to-back
timing reads it warm: the figures rank tiles, while inside a training step the same passes take
longer (torch profiler, 8192 x 1024 -> 1024: shrink 9.5 us, dy pass 12.5).
"""
import argparse
import dataclasses
import math

import torch
import triton.testing
from torch._library.triton import set_wrap_triton_enabled

from lora_kernels.ops import lora_linear as L

SHAPES = [(8192, 1024, 1024, 16), (8192, 2048, 512, 16), (8192, 4096, 4096, 16)]
SHRINK_CFGS = [(16, 128, 2, 6), (16, 128, 2, 8), (16, 64, 1, 8), (16, 64, 2, 8), (32, 128, 4, 6), (16, 256, 2, 4),
               (32, 64, 2, 8), (16, 128, 1, 6)]
DY_CFGS = [(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 4, 3), (32, 128, 4, 4), (64, 128, 8, 4), (64, 64, 4, 4),
           (32, 64, 4, 4), (16, 128, 4, 4), (128, 128, 8, 3), (64, 256, 8, 2)]
DA_CFGS = [(32, 256, 8, 4), (32, 128, 4, 6), (32, 128, 8, 4), (64, 256, 8, 4), (64, 128, 8, 4), (16, 256, 4, 4),
           (32, 256, 8, 3), (64, 256, 8, 3)]


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=40) * 1e3


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def with_split(factor: float):
    """L._split with `factor` CTAs per SM as the target instead of 2 (restored by the caller)."""
    def split(n_other, n_streamed, device):
        sms = L._sm_count_of(device)
        if n_other >= sms // 2:
            return 1
        return max(1, min(n_streamed, math.ceil(factor * sms / max(1, n_other))))
    return split


def main():
    with set_wrap_triton_enabled(False):  # launch as the op does in eager: the TMA kernels only run so
        sweep()


def sweep():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="")
    ap.add_argument("--p", type=float, default=0.05)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    p = args.p
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  p{p}")
    for M, K, N, R in shapes:
        dt = torch.bfloat16
        x = torch.randn(M, K, device="cuda", dtype=dt)
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        A = torch.randn(R, K, device="cuda", dtype=dt) / K**0.5
        B = torch.randn(N, R, device="cuda", dtype=dt) / R**0.5
        G = torch.randn(M, R, device="cuda")
        seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
        tag = f"{M}x{K}->{N} r{R}"
        read = torch.sum(x, 1, dtype=torch.float32)
        line = [f"{tag} read of x (torch.sum): {bench(lambda: torch.sum(x, 1, dtype=torch.float32, out=read)):6.1f} us"]

        table = L._tma_shrink_cfg(x, A, p)
        ref = L._shrink(x, A, p, seed)
        line.append(f"shrink table {dataclasses.astuple(table) if table else 'pointer'}: {bench(lambda: L._shrink(x, A, p, seed)):6.1f}")
        for c in SHRINK_CFGS:
            cfg = L._Cfg(*c)
            try:
                err = rel(L._shrink_tma(x, A, p, seed, cfg), ref)
                line.append(f"shrink {c}: {bench(lambda: L._shrink_tma(x, A, p, seed, cfg)):6.1f}  err {err:.0e}")
            except Exception as e:  # shared memory, registers
                line.append(f"shrink {c}: failed {type(e).__name__}")

        def dy_pass(cfg=None):
            return L._bwd_dy(dy, B, G, 2.0, dt, False, cfg)
        g_ref, db_ref = dy_pass()
        line.append(f"dy table {dataclasses.astuple(L._dy_cfg(M, R))}: {bench(dy_pass):6.1f}")
        for c in DY_CFGS:
            cfg = L._Cfg(*c)
            try:
                g, db = dy_pass(cfg)
                err = max(rel(g, g_ref), rel(db, db_ref))
                line.append(f"dy {c}: {bench(lambda: dy_pass(cfg)):6.1f}  err {err:.0e}")
            except Exception as e:
                line.append(f"dy {c}: failed {type(e).__name__}")

        da = torch.zeros(R, K, device="cuda")

        def da_pass(cfg):
            da.zero_()
            return L._bwd_xa_tma(x, G, seed, 2.0, p, cfg, da=da)
        da_ref = da_pass(L._XPASS_TMA_CFG).clone()
        saved = L._split
        try:
            for factor in (2, 1, 4):
                L._split = with_split(factor)
                for c in DA_CFGS if factor == 2 else DA_CFGS[:5]:
                    cfg = L._Cfg(*c)
                    try:
                        err = rel(da_pass(cfg), da_ref)
                        split = L._da_split(M, K, R, cfg, x.device, da)[0]
                        line.append(f"dA {c} {factor}/SM (split {split}): {bench(lambda: da_pass(cfg)):6.1f}  err {err:.0e}")
                    except Exception as e:
                        line.append(f"dA {c} {factor}/SM: failed {type(e).__name__}")
        finally:
            L._split = saved
        print("\n   ".join(line), flush=True)


if __name__ == "__main__":
    main()
