"""Inference calls of the fused LoRA linear at few rows: the Triton kernels against the cuBLAS path
(lora_linear's DECODE_ROWS) and naive PyTorch, eager and CUDA-graph timing (GPU).

    python benchmarks/sweep_decode.py [K N r]

Prints one line per row count: ms of the frozen base F.linear, and each implementation's ratio to it.
"""
import sys

import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels._bench import gpu_time_ms, graph_time_ms
from lora_kernels.ops import lora_linear as op_mod

ROWS = (1, 4, 16, 32, 64, 128, 256, 512)


def main():
    K, N, r = (int(v) for v in sys.argv[1:4]) if len(sys.argv) > 3 else (4096, 4096, 16)
    dt, dev, s = torch.bfloat16, "cuda", 2.0
    W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    A = torch.randn(r, K, device=dev, dtype=dt) / K**0.5
    B = torch.randn(N, r, device=dev, dtype=dt) / r**0.5
    saved = op_mod.DECODE_ROWS
    print(f"K={K} N={N} r={r} bf16, inference (no grad, no dropout); eager / graph, ratio to base F.linear")
    for M in ROWS:
        x = torch.randn(M, K, device=dev, dtype=dt)

        def fused(rows):
            def f():
                op_mod.DECODE_ROWS = rows
                return lk.lora_linear(x, W, A, B, s)
            return f

        impls = {
            "base": lambda: F.linear(x, W),
            "naive": lambda: F.linear(x, W) + s * F.linear(F.linear(x, A), B),
            "triton": fused(0),
            "cublas": fused(1 << 30),
        }
        with torch.no_grad():
            ref = impls["naive"]().float()
            for name in ("triton", "cublas"):
                err = ((impls[name]().float() - ref).norm() / ref.norm()).item()
                assert err < 2e-2, (name, M, err)
            times = {name: (gpu_time_ms(fn, 10, 40), graph_time_ms(fn)) for name, fn in impls.items()}
        be, bg = times["base"]
        cells = "  ".join(f"{n} {e / be:5.2f}x / {g / bg:4.2f}x" for n, (e, g) in times.items() if n != "base")
        print(f"M={M:4d}: base {be:.4f} / {bg:.4f} ms   {cells}")
    op_mod.DECODE_ROWS = saved


if __name__ == "__main__":
    main()
