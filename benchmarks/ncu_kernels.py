"""Run each kernel of the fused LoRA linear twice at one shape, for Nsight Compute (GPU).

    ncu --kernel-name regex:_lora_ --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section WarpStateStats python benchmarks/ncu_kernels.py [MxKxNxr] [--p 0.05]

Two launches per kernel (the first compiles and warms the caches' state the same way for every
kernel); read the second of each in the report.
"""
import argparse

import torch
from torch._library.triton import set_wrap_triton_enabled

from lora_kernels.ops import lora_linear as L
from lora_kernels.ops.dropout import draw_seed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="8192x4096x4096x16")
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--adapter-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    M, K, N, r = (int(v) for v in args.shape.split("x"))
    dt, adt = torch.bfloat16, getattr(torch, args.adapter_dtype)
    x = torch.randn(M, K, device="cuda", dtype=dt)
    A = (torch.randn(r, K, device="cuda") / K**0.5).to(adt)
    B = (torch.randn(N, r, device="cuda") / r**0.5).to(adt)
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    y = torch.empty(M, N, device="cuda", dtype=dt)
    seed = draw_seed("cuda")
    with set_wrap_triton_enabled(False):
        for _ in range(2):
            S = L._shrink(x, A, args.p, seed)
            L._expand(S, B, 2.0, None, y)
            G, _ = L._bwd_dy(dy, B, S, 2.0, dt, False)
            L._bwd_x(x, A, G, seed, 2.0, args.p, True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
