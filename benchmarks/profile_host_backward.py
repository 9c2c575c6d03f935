"""Host time of the fused op's backward inside autograd vs the same work called directly (GPU machine).

    python benchmarks/profile_host_backward.py [M K N r]

Also splits an autograd.grad call into the time inside the op's backward (on whichever thread
autograd runs it: a device thread of its own unless multithreading is off) and the rest, with a
cProfile of the backward's body taken on that thread.
"""
import cProfile
import io
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from torch._library.triton import set_wrap_triton_enabled

import lora_kernels as lk
from lora_kernels.ops import lora_linear as L

from benchmarks.profile_host import host_us, print_cprofile


def main():
    M, K, N, r = (int(v) for v in sys.argv[1:5]) if len(sys.argv) > 4 else (8192, 1024, 1024, 16)
    dt, dev, p = torch.bfloat16, "cuda", 0.05
    xg = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    A = (torch.randn(r, K, device=dev, dtype=dt) / K**0.5).requires_grad_(True)
    B = (torch.randn(N, r, device=dev, dtype=dt) / r**0.5).requires_grad_(True)
    dy = torch.randn(M, N, device=dev, dtype=dt)
    y = lk.lora_linear(xg, W, A, B, 2.0, None, p)
    yn = F.linear(xg, W) + 2.0 * F.linear(F.linear(F.dropout(xg, p), A), B)
    seed = lk.dropout_seed(dev)
    S = torch.randn(M, r, device=dev)
    rows = {
        "fused fwd": lambda: lk.lora_linear(xg, W, A, B, 2.0, None, p),
        "fused bwd (autograd.grad)": lambda: torch.autograd.grad(y, [xg, A, B], dy, retain_graph=True),
        "naive bwd (autograd.grad)": lambda: torch.autograd.grad(yn, [xg, A, B], dy, retain_graph=True),
    }

    def direct():  # as the autograd Function calls it: launches not wrapped for tracing
        with set_wrap_triton_enabled(False):
            return L._bwd_triton(dy, xg.detach(), W, A.detach(), B.detach(), S, seed, 2.0, p, True)

    rows["_bwd_triton direct"] = direct
    for name, fn in rows.items():
        print(f"host us  {name:<34} {host_us(fn):8.1f}")
    with torch.autograd.set_multithreading_enabled(False):
        for name in ("fused bwd (autograd.grad)", "naive bwd (autograd.grad)"):
            print(f"host us  {name + ', one thread':<34} {host_us(rows[name]):8.1f}")
        print_cprofile(rows["fused bwd (autograd.grad)"], 50, 25)
    for threads in (True, False):
        inside_backward(rows["fused bwd (autograd.grad)"], threads, profile=False)
    for threads in (True, False):
        inside_backward(rows["fused bwd (autograd.grad)"], threads, profile=True)


def inside_backward(fn, threads: bool, n: int = 100, profile: bool = False) -> None:
    """Host us per call of fn (an autograd.grad through the fused op), and of it the time inside
    _EagerLoRALinear.backward, timed (and with `profile`, profiled) on the thread that runs it."""
    orig = L._EagerLoRALinear.backward
    inside, prof = [], cProfile.Profile()

    def timed(ctx, dy):
        t0 = time.perf_counter()
        if profile:
            prof.enable()
        try:
            return orig(ctx, dy)
        finally:
            if profile:
                prof.disable()
            inside.append(time.perf_counter() - t0)

    L._EagerLoRALinear.backward = staticmethod(timed)
    try:
        with torch.autograd.set_multithreading_enabled(threads):
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            inside.clear()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            total = (time.perf_counter() - t0) / n * 1e6
    finally:
        L._EagerLoRALinear.backward = staticmethod(orig)
    mean_in = sum(inside) / len(inside) * 1e6
    print(f"host us  autograd.grad, threads={threads}, profiled={profile}: {total:8.1f} per call, "
          f"{mean_in:8.1f} inside the backward")
    if not profile:
        return
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
    print("\n".join(line[:150] for line in buf.getvalue().splitlines()[6:]))


if __name__ == "__main__":
    main()
