"""The fused LoRA GEMMs, the package's Gluon and Triton kernels against cuBLAS. (GPU, sm_90)

    python benchmarks/probe_gluon_gemm.py [--shapes MxKxN,...] [--rounds 3] [--r 16] [--dgrad --p 0.05 [--clocks]]

Forward: y = x W^T + s S B^T against F.linear(x, W). --dgrad: dx = dy W + keep * (c G A), dy [M, K]
(K = the layer's N), W [K, N] (dx has the layer's K = N here columns), against torch.mm(dy, W), at p = 0 and --p.

`_lora_gemm_kernel` (Triton, 8 warps, persistent) runs each tile's epilogue between its main loop
and the next tile's first TMA loads, so each tile pays one pipeline fill (7.8 tiles per CTA at the
headline). Triton's own warp specialization, which would overlap them, ran 9-32% slower
(`probe_ws_gemm.py`). `lora_gemm_ws_kernel` (lora_kernels/ops/gluon_gemm.py, Gluon) states the
schedule itself: a load warp keeps a ring of x and W tiles full through TMA and runs into the next
tile while two MMA warpgroups finish this one; L = bf16(s S) (the shrink writes it beside S) and B
come in through TMA too, and the LoRA term is one more wgmma.

Prints CUDA-graph us per kernel (the Gluon one at each --configs (stages, epilogue slices), its
dispatcher's pick marked), the median of interleaved rounds, its ratio to cuBLAS's F.linear in the
same rounds, and each kernel's largest difference from float64.
"""
import argparse
import importlib

import torch
import torch.nn.functional as F
import triton
import triton.testing

from lora_kernels._bench import clocks_under_load, interleaved_ms, print_against


def main():
    from torch._library.triton import set_wrap_triton_enabled
    from lora_kernels.ops import lora_linear as LL

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x4096x4096,8192x1024x1024,8192x2048x512,8192x4096x14336,8192x14336x4096")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--configs", default="3x1,4x4", help="Gluon kernel (stages)x(epilogue slices) to time")
    ap.add_argument("--dgrad", action="store_true", help="the backward's dgrad GEMM instead of the forward's")
    ap.add_argument("--p", type=float, default=0.05, help="--dgrad: the dropout probability of the masked runs")
    ap.add_argument("--before", default=None,
                    help="--dgrad: also the Gluon dgrad of lora_kernels.ops.MODULE (a copy of lora_linear.py)")
    ap.add_argument("--dgrad-configs", default="",
                    help="--dgrad: also the Gluon dgrad at these (stages)x(epilogue slices), e.g. 4x4")
    ap.add_argument("--clocks", action="store_true",
                    help="--dgrad: also each kernel's SM clock and board power, run back to back for 2 s")
    args = ap.parse_args()
    if args.dgrad:
        return dgrad(args)
    torch.manual_seed(0)
    dev = "cuda"
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    BR = LL._block_r(args.r)
    for shape in args.shapes.split(","):
        M, K, N = (int(v) for v in shape.split("x"))
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
        S = torch.randn(M, args.r, device=dev, dtype=torch.float32)
        B = torch.randn(N, args.r, device=dev, dtype=torch.bfloat16) / args.r ** 0.5
        s = 2.0
        Lb = torch.zeros(M, BR, device=dev, dtype=torch.bfloat16)
        Lb[:, :args.r] = (S * s).to(torch.bfloat16)  # as the shrink writes it
        exact = (x.double() @ W.double().t() + Lb.double() @ torch.nn.functional.pad(B, (0, BR - args.r)).double().t())
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 256)
        pick = LL._gluon_gemm_cfg(BR, tiles <= torch.cuda.get_device_properties(0).multi_processor_count)
        cands = {"cuBLAS F.linear": lambda: F.linear(x, W),
                 "package Triton kernel": lambda: LL._lora_gemm(x, W, S, B.t(), s, None, w_kmajor=True)}
        for c in configs:
            cands[f"Gluon {c[0]}st split{c[1]}" + (" (pick)" if c == pick else "")] = \
                lambda c=c: LL._lora_gemm_ws(x, W, Lb, B, None, cfg=c)
        errs = {}
        with set_wrap_triton_enabled(False):  # as the op's eager path launches
            for k in list(cands)[1:]:
                try:
                    errs[k] = (cands[k]().double() - exact).abs().max().item()
                except Exception as e:  # a config that does not compile or launch: say so, go on
                    print(f"  {k}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    del cands[k]
            times = interleaved_ms(cands, lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3, args.rounds)
        print_against(f"{M}x{K}->{N} r{args.r} (largest |y - float64|):", times, "cuBLAS F.linear",
                      {k: f"max err {e:.3g}" for k, e in errs.items()})


def dgrad(args):
    from torch._library.triton import set_wrap_triton_enabled
    from lora_kernels.ops import lora_linear as LL
    from lora_kernels.ops.dropout import dropout_mask

    before = importlib.import_module(f"lora_kernels.ops.{args.before}") if args.before else None
    dgrad_cfgs = [tuple(int(v) for v in c.split("x")) for c in args.dgrad_configs.split(",") if c]
    torch.manual_seed(0)
    dev = "cuda"
    BR = LL._block_r(args.r)
    seed = torch.tensor([123456789], dtype=torch.int64, device=dev)
    for shape in args.shapes.split(","):
        M, K, N = (int(v) for v in shape.split("x"))
        dy = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        W = torch.randn(K, N, device=dev, dtype=torch.bfloat16) / K ** 0.5
        G = torch.randn(M, args.r, device=dev, dtype=torch.float32)
        A = torch.randn(args.r, N, device=dev, dtype=torch.bfloat16) / args.r ** 0.5
        c = 2.0
        Gs = torch.zeros(M, BR, device=dev, dtype=torch.bfloat16)
        Gs[:, :args.r] = (G * c).to(torch.bfloat16)  # as the dy pass writes it
        lora = Gs[:, :args.r].double() @ A.double()
        exact = {0.0: dy.double() @ W.double() + lora}
        exact[args.p] = dy.double() @ W.double() + lora * dropout_mask(seed, M, N, args.p, device=dev).double()
        cands = {"cuBLAS dy @ W": lambda: torch.mm(dy, W)}
        for p in (0.0, args.p):
            cands[f"Triton p{p:g}"] = lambda p=p: LL._lora_gemm(dy, W, G, A, c, None, w_kmajor=False, p=p, seed=seed)
            bits = LL._mask_bits(M, N, p, seed, dev) if p > 0 else None  # drawn once, as the backward does
            cands[f"Gluon p{p:g}"] = lambda p=p, bits=bits: LL._lora_dgrad_ws(dy, W, Gs, A, p, seed, bits=bits)
            for cfg in dgrad_cfgs:
                cands[f"Gluon {cfg[0]}x{cfg[1]} p{p:g}"] = lambda p=p, cfg=cfg, bits=bits: LL._lora_dgrad_ws(
                    dy, W, Gs, A, p, seed, cfg=cfg, bits=bits)
            if before is not None:
                cands[f"{args.before} p{p:g}"] = lambda p=p: before._lora_dgrad_ws(dy, W, Gs, A, p, seed)
        errs = {}
        with set_wrap_triton_enabled(False):
            for k in list(cands)[1:]:
                try:
                    errs[k] = (cands[k]().double() - exact[float(k.split(" p")[1])]).abs().max().item()
                except Exception as e:
                    print(f"  {k}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    del cands[k]
            times = interleaved_ms(cands, lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3, args.rounds)
        print_against(f"dgrad {M}x{K}->{N} r{args.r} (largest |dx - float64|):", times, "cuBLAS dy @ W",
                      {k: f"max err {e:.3g}" for k, e in errs.items()})
        if args.clocks:
            with set_wrap_triton_enabled(False):
                clocks = clocks_under_load(cands)
            for k, (mhz, watts, us) in clocks.items():
                print(f"  {k:28s} {us:8.1f} us back to back  {mhz:6.0f} MHz  {watts:5.0f} W  "
                      f"{us * mhz / 1e3:8.0f} k cycles")


if __name__ == "__main__":
    main()
