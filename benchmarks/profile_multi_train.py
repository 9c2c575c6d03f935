"""Where the multi-adapter op's training step goes at prefill shapes (GPU): kernel by kernel.

    python benchmarks/profile_multi_train.py [--k 4096] [--n 4096] [--r 16] [--adapters 8]

8 sequences of 512-2048 tokens (lora_kernels/_bench/multi.py: prefill_indices) over L adapters, bf16:
multi_lora_linear forward + backward (dy given), profiled with torch.profiler (us per step by kernel),
and its graph time next to the base F.linear's and lora_linear's on one adapter. Also prints the
bytes the LoRA part must move at least (x and dy read twice, the LoRA term and its dx share written
once) and what share of the copy bandwidth the LoRA kernels reach.
"""
import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import lora_kernels
from lora_kernels._bench import graph_time_ms
from lora_kernels._bench import multi as MB


def kernel_table(step, n: int = 5):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    by = defaultdict(lambda: [0.0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            by[ev.name][0] += ev.device_time / n
            by[ev.name][1] += 1 / n
    return by


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--steps-only", type=int, default=0, help="only run this many steps (under ncu)")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    K, N, r, L = args.k, args.n, args.r, args.adapters
    idx = MB.prefill_indices(8, L, device=dev)
    M = idx.numel()
    A, B, s = MB.make_adapters(L, r, K, N, dtype=dt, device=dev)
    A.requires_grad_(True)
    B.requires_grad_(True)
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    dy = torch.randn(M, N, device=dev, dtype=dt)
    impls = MB.prefill_impls(x, W, A, B, idx, s, dy)
    if args.steps_only:
        for _ in range(args.steps_only):
            impls["train linear ext mixed"]()
        torch.cuda.synchronize()
        return
    print(f"M {M} x K {K} -> N {N}, r{r}, {L} adapters, bf16")
    for name in ("train linear base", "train lora_linear single", "train linear ext mixed", "train ext"):
        g = graph_time_ms(impls[name])
        print(f"  {name:<26} graph {g * 1e3:8.1f} us" if g else f"  {name:<26} (no graph)")
    lora_bytes = 2 * (2 * M * K + 2 * M * N)  # x, dy read twice; T [M, N], dx share [M, K] written (bf16)
    g = graph_time_ms(impls["train ext"])
    if g:
        print(f"  LoRA term fwd + bwd: {lora_bytes / 1e6:.0f} MB at least -> {lora_bytes / g / 1e6:.0f} GB/s")
    by = kernel_table(impls["train linear ext mixed"])
    total = sum(v[0] for v in by.values())
    print(f"\n  kernels of 'train linear ext mixed' (us per step, launches): total {total:.1f} us")
    for name, (us, n) in sorted(by.items(), key=lambda kv: -kv[1][0]):
        print(f"  {us:9.1f} us {n:4.0f}  {name[:110]}")


if __name__ == "__main__":
    main()
