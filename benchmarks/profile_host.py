"""Where the host time of one fused-LoRA training step goes (GPU machine).

    python benchmarks/profile_host.py [M K N r]
Prints host microseconds per call of each piece (at small shapes the GPU waits on the host, so
these bound the step), a cProfile of forward + backward, and the CUDA kernels one step launches.
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


def host_us(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def print_cprofile(fn, n: int, rows: int) -> None:
    """cProfile of n calls of fn, the `rows` functions with the most time of their own."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    print("\n".join(line[:150] for line in buf.getvalue().splitlines()[6:]))


def launch_pieces(x, W, S, B) -> None:
    """The host time of one launch of the forward GEMM kernel, piece by piece: the whole
    `_lora_gemm`, the launch through `_launch`, its key, Triton's compiled launcher alone, and the
    three TMA descriptors. Needs an sm_90 GPU (the kernel's TMA path); prints why not elsewhere."""
    if not L._fused_gemm_ok(x, W, S.shape[1], W.shape[0]):
        print("launch pieces: the fused GEMM kernel does not run here (needs sm_90)")
        return
    seen = []
    real = L._launch_direct
    L._launch_direct = lambda kernel, grid, args, meta: seen.append((kernel, grid, args, meta)) or real(kernel, grid, args, meta)
    try:
        L._lora_gemm(x, W, S, B.t(), 2.0, None, True)
        L._lora_gemm(x, W, S, B.t(), 2.0, None, True)
    finally:
        L._launch_direct = real
    kernel, grid, args, meta = seen[-1]
    device = torch.cuda.current_device()
    run, function, packed, constexprs, _ = L._COMPILED[(kernel, device, tuple(meta.items()), L._launch_key(args))]
    stream = torch.cuda.current_stream().cuda_stream
    BM, BN, BK = meta["BM"], meta["BN"], meta["BK"]
    pieces = {
        "_lora_gemm (all)": lambda: L._lora_gemm(x, W, S, B.t(), 2.0, None, True),
        "_launch": lambda: L._launch(kernel, grid, *args, **meta),
        "launch key": lambda: L._launch_key(args),
        "compiled launcher": lambda: run(grid[0], grid[1], 1, stream, function, packed, None, None, None, *args, *constexprs),
        "3 TMA descriptors": lambda: (L._desc(x, [BM, BK]), L._desc(W, [BN, BK]), L._desc(x, [BM, BN])),
    }
    for name, fn in pieces.items():
        print(f"host us  {name:<24} {host_us(fn, 1000):8.1f}")


def main():
    M, K, N, r = (int(v) for v in sys.argv[1:5]) if len(sys.argv) > 4 else (8192, 1024, 1024, 16)
    dt, dev, p = torch.bfloat16, "cuda", 0.05
    x = torch.randn(M, K, device=dev, dtype=dt)
    xg = x.clone().requires_grad_(True)
    W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    A = (torch.randn(r, K, device=dev, dtype=dt) / K**0.5).requires_grad_(True)
    B = (torch.randn(N, r, device=dev, dtype=dt) / r**0.5).requires_grad_(True)
    dy = torch.randn(M, N, device=dev, dtype=dt)
    seed = lk.dropout_seed(dev)
    S = torch.randn(M, r, device=dev)
    y = torch.empty(M, N, device=dev, dtype=dt)
    step = lambda: torch.autograd.grad(lk.lora_linear(xg, W, A, B, 2.0, None, p), [xg, A, B], dy)  # noqa: E731
    with set_wrap_triton_enabled(False):
        G, _ = L._bwd_dy(dy, B, S, 2.0, dt, False)
        pieces = {
            "torch.empty": lambda: torch.empty(M, r, device=dev),
            "torch.zeros": lambda: torch.zeros(N, r, device=dev),
            "randint seed": lambda: lk.dropout_seed(dev),
            "addmm_": lambda: y.addmm_(x, W.t()),
            "F.linear": lambda: F.linear(x, W),
            "shrink (launch + glue)": lambda: L._shrink(x, A, p, seed),
            "expand": lambda: L._expand(S, B, 2.0, None, y),
            "dy pass": lambda: L._bwd_dy(dy, B, S, 2.0, dt, False),
            "x pass": lambda: L._bwd_x(x, A, G, seed, 2.0, p, True),
            "TensorDescriptor x": lambda: L.TensorDescriptor.from_tensor(x, [128, 64]),
            "_lora_gemm fwd": lambda: L._lora_gemm(x, W, S, B.t(), 2.0, None, True),
            "_lora_gemm dgrad p": lambda: L._lora_gemm(dy, W, S, A, 2.0, None, False, p=p, seed=seed),
            "dA pass (TMA)": lambda: L._bwd_x(x, A, G, seed, 2.0, p, False),
            "_fwd_triton": lambda: L._fwd_triton(x, W, A, B, 2.0, None, p, seed),
            "_bwd_triton": lambda: L._bwd_triton(dy, x, W, A, B, S, seed, 2.0, p, True),
        }
        for name, fn in pieces.items():
            print(f"host us  {name:<24} {host_us(fn):8.1f}")
        launch_pieces(x, W, S, B)
    print(f"host us  {'lora_linear fwd (grad)':<24} {host_us(lambda: lk.lora_linear(xg, W, A, B, 2.0, None, p)):8.1f}")
    print(f"host us  {'lora_linear fwd+bwd':<24} {host_us(step):8.1f}")
    naive = lambda: torch.autograd.grad(  # noqa: E731
        F.linear(xg, W) + 2.0 * F.linear(F.linear(F.dropout(xg, p), A), B), [xg, A, B], dy)
    print(f"host us  {'naive fwd+bwd':<24} {host_us(naive):8.1f}")
    print(f"host us  {'base fwd+bwd':<24} {host_us(lambda: torch.autograd.grad(F.linear(xg, W), [xg], dy)):8.1f}")

    print_cprofile(step, 50, 16)

    # the module path a patched model takes: LoRALinear, fp32 adapters (PEFT's default) on bf16,
    # at a size where the GPU waits on the host (what the end-to-end step is bound by)
    lin = torch.nn.Linear(2048, 2048, bias=False, device=dev, dtype=dt)
    mod = lk.LoRALinear.from_linear(lin, r=16, dropout=0.05).train()
    xm = torch.randn(2, 128, 2048, device=dev, dtype=dt, requires_grad=True)
    dym = torch.randn(2, 128, 2048, device=dev, dtype=dt)
    mstep = lambda: mod(xm).backward(dym)  # noqa: E731
    fstep = lambda: lin(xm).backward(dym)  # noqa: E731
    print(f"host us  {'LoRALinear fwd+bwd':<24} {host_us(mstep):8.1f}")
    print(f"host us  {'nn.Linear fwd+bwd':<24} {host_us(fstep):8.1f}")
    L._FAST_LAUNCH = False
    print(f"host us  {'LoRALinear, Triton launch':<24} {host_us(mstep):8.1f}")
    L._FAST_LAUNCH = True
    print_cprofile(mstep, 100, 30)

    # host time by operator (self CPU time), module path
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as cp:
        for _ in range(20):
            mstep()
        torch.cuda.synchronize()
    print(cp.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tp:
        step()
        torch.cuda.synchronize()
    print(tp.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
