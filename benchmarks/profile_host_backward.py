"""Host time of the fused op's backward inside autograd vs the same work called directly (GPU machine).

    python benchmarks/profile_host_backward.py [M K N r]
"""
import sys

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


if __name__ == "__main__":
    main()
