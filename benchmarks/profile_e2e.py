"""Where the GPU time of one LoRA training step goes: kernel time by kind, floor vs patch (GPU).

    python benchmarks/profile_e2e.py [--layers 4] [--impls floor,patch] [--top 20]

Builds the end-to-end benchmark's Llama (lora_kernels/_bench/e2e.py) with fewer layers (the
per-layer cost is what matters; embedding and loss are shared by every impl), profiles two steps
with torch.profiler after warm-up, and prints per impl: CUDA time per step grouped by kernel kind
(our Triton kernels by name, GEMMs, elementwise, reductions, attention, optimizer, other), then the
top kernels by total time. The difference between impls is what LoRA costs, kernel by kind.
"""
import argparse
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lora_kernels._bench import e2e

HOST_WALL: dict = {}  # impl -> (host ms per step, wall ms per step)

KINDS = [  # (kind, regex on the kernel name), first match wins
    ("lora shrink", r"_lora_shrink"),
    ("lora expand", r"_lora_expand"),
    ("lora bwd dy", r"_lora_bwd_dy"),
    ("lora bwd x", r"_lora_bwd_x"),
    ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|cublas|wgmma|Kernel2"),
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("optimizer", r"adam|foreach|multi_tensor"),
    ("reduce", r"reduce|sum|norm|softmax|nll|cross_entropy|log_softmax"),
    ("copy/cast", r"copy|cast|convert|to_copy|cat|fill|zero"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|mul|add|rsqrt|pow|neg|index"),
]


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if re.search(pat, name, re.IGNORECASE):
            return kind
    return "other"


def host_and_wall_ms(step, n: int = 3) -> tuple[float, float]:
    """(host ms until step() returns, wall ms until the GPU is done), each step started on an idle
    GPU: host ~ wall means the host is the bottleneck (the GPU waits on launches)."""
    host, wall = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    return 1e3 * min(host), 1e3 * min(wall)


def profile_impl(impl: str, layers: int, steps: int = 2):
    setup = e2e.make_setup(impl, dict(e2e.FULL, num_hidden_layers=layers))
    try:
        for _ in range(3):
            setup.step()
        HOST_WALL[impl] = host_and_wall_ms(setup.step)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                setup.step()
            torch.cuda.synchronize()
    finally:
        e2e.release(setup)
    by_name = defaultdict(lambda: [0.0, 0])  # name -> [us per step, launches per step]
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = by_name[ev.name]
            t[0] += ev.device_time / steps
            t[1] += 1 / steps
    return by_name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--impls", default="floor,patch")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    results = {impl: profile_impl(impl, args.layers) for impl in args.impls.split(",")}
    kinds = [k for k, _ in KINDS] + ["other"]
    print(f"CUDA ms per step / launches per step by kind, {args.layers} layers ({e2e.BATCH}x{e2e.SEQ} tokens, r{e2e.R}, p{e2e.DROPOUT})")
    print(f"  {'kind':<14}" + "".join(f"{impl:>22}" for impl in results))
    totals = {impl: defaultdict(lambda: [0.0, 0]) for impl in results}
    for impl, by_name in results.items():
        for name, (us, n) in by_name.items():
            t = totals[impl][kind_of(name)]
            t[0] += us
            t[1] += n
    for kind in kinds + ["TOTAL"]:
        cells = []
        for impl in results:
            us, n = ((sum(v[0] for v in totals[impl].values()), sum(v[1] for v in totals[impl].values()))
                     if kind == "TOTAL" else totals[impl][kind])
            cells.append(f"{us / 1e3:8.2f} ms /{n:5.0f}")
        print(f"  {kind:<14}" + "".join(f"{c:>22}" for c in cells))
    print(f"  {'host / wall':<14}" + "".join(f"{f'{h:.1f} / {w:.1f} ms':>22}" for h, w in HOST_WALL.values()))
    for impl, by_name in results.items():
        print(f"\n== {impl}: top {args.top} kernels (us per step, launches per step)")
        for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {us:10.1f} us {n:6.0f}  [{kind_of(name)}] {name[:110]}")


if __name__ == "__main__":
    main()
