"""The Gluon dgrad kernel (lora_dgrad_ws_kernel, dx = dy @ W + keep * (Gs @ A)) alone at each
(stages, epilogue column slices) that fits shared memory at r16, against cuBLAS's dy @ W in the
same rounds (GPU, sm_90).

    python benchmarks/sweep_dgrad_cfg.py [MxK_OUTxN_RED ...]

Per shape: kernel us (do_bench median) per configuration, the median of 3 interleaved rounds;
"table" is _gluon_gemm_cfg's choice. Every configuration's dx is checked bit for bit against the
table's first (same tiles, same sums: only the pipeline differs).
"""
import statistics
import sys

import torch
import triton.testing

from lora_kernels.ops import lora_linear as L
from lora_kernels.ops.dropout import draw_seed

CFGS = [None, (3, 1), (3, 2), (4, 4), (2, 1), (2, 2)]  # None: the table's
SHAPES = ["8192x2048x512", "8192x1024x1024", "16384x2048x512", "2048x4096x4096", "8192x4096x4096"]


def kernel_us(fn) -> float:
    with L._raw_launches():  # direct helper calls: no tracing wrapper (see lora_linear._raw_launches)
        return triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3


def main(shapes, r=16, p=0.05, dt=torch.bfloat16, rounds=3):
    for shape in shapes:
        M, K, N = map(int, shape.split("x"))
        dy = torch.randn(M, N, device="cuda", dtype=dt)  # [M, N_RED]
        W = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5  # [N_RED, K_OUT]
        A = torch.randn(r, K, device="cuda", dtype=dt) / K**0.5
        Gs = torch.randn(M, L._block_r(r), device="cuda", dtype=dt)
        seed = draw_seed("cuda")
        with L._raw_launches():
            Aq = L._gluon_dgrad_a(dy, A)
            bits = L._mask_bits(M, K, p, seed, dy.device)
            ref = L._lora_dgrad_ws(dy, W, Gs, Aq, p, seed, bits=bits)
        fns = {"cublas": lambda: dy @ W}
        for cfg in CFGS:
            run = (lambda c: lambda: L._lora_dgrad_ws(dy, W, Gs, Aq, p, seed, cfg=c, bits=bits))(cfg)
            try:
                with L._raw_launches():
                    out = run()
                torch.cuda.synchronize()
            except Exception as e:  # a configuration past shared memory
                print(f"  {shape} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            if not torch.equal(out, ref):
                raise AssertionError(f"{shape}: configuration {cfg} gives another dx than the table's")
            fns["table" if cfg is None else str(cfg)] = run
        res = {k: [] for k in fns}
        names = list(fns)
        for k in range(rounds):
            for name in names[k % len(names):] + names[:k % len(names)]:
                res[name].append(kernel_us(fns[name]))
        tiles = L._cdiv(M, 128) * L._cdiv(K, 256)
        print(f"== dx {M}x{K} (reduction {N}, {N // 64} K steps, {tiles} tiles), us: "
              + "  ".join(f"{k} {statistics.median(v):.1f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or SHAPES)
