"""Time each kernel of the fused LoRA linear alone, across candidate configs (GPU).

    python benchmarks/tune_lora_linear.py [--json F]

For each shape prints: the ceilings (device copy GB/s, cuBLAS GEMM with beta = 0 and beta = 1, so
the cost of accumulating into y is visible), then every kernel config's median time and its
effective bandwidth (bytes of the pass it makes: x read for shrink, y written for expand, dy read
for the dy pass, x read + dx written for the x pass) next to the bandwidth ceiling. The fastest
config per kernel and shape is what goes in the config table of lora_kernels/ops/lora_linear.py.
"""
import argparse
import json

import torch
from torch._library.triton import set_wrap_triton_enabled

from lora_kernels._bench import gpu_time_ms
from lora_kernels.ops import lora_linear as L
from lora_kernels.ops.dropout import draw_seed

SHAPES = [  # (M, K, N, r)
    (8192, 4096, 4096, 16),
    (8192, 4096, 4096, 128),
    (8192, 1024, 1024, 16),
    (8192, 2048, 512, 16),
    (16, 4096, 4096, 16),
]
CFGS = {  # (block_a, block_b, warps, stages)
    "shrink": [(16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 8, 3), (64, 128, 4, 3), (64, 128, 8, 3),
               (64, 64, 4, 4), (64, 256, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
    "expand": [(32, 128, 4, 2), (64, 128, 4, 2), (64, 256, 4, 2), (128, 128, 4, 2), (128, 128, 8, 2),
               (128, 256, 8, 2)],
    "dy": [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3),
           (128, 128, 8, 3)],
    "x": [(32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3),
          (128, 64, 8, 3), (128, 128, 8, 3)],
}


def ceilings():
    n = 1 << 28  # 512 MiB of bf16 each way
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = gpu_time_ms(lambda: b.copy_(a))
    del a, b
    return 2 * n * 2 / ms / 1e6  # GB/s, read + write


def tune_shape(M, K, N, r, p, copy_gbs, adt=torch.bfloat16, table_only=False):
    dt = torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=dt)
    W = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
    A = (torch.randn(r, K, device="cuda", dtype=dt) / K**0.5).to(adt)
    B = (torch.randn(N, r, device="cuda", dtype=dt) / r**0.5).to(adt)
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    y = torch.randn(M, N, device="cuda", dtype=dt)
    dx = torch.randn(M, K, device="cuda", dtype=dt)
    seed = draw_seed("cuda")
    S = L._shrink(x, A, p, seed)
    G, _ = L._bwd_dy(dy, B, S, 2.0, dt, False)
    adt_name = str(adt).replace("torch.", "")
    out = {"shape": f"{M}x{K}->{N} r{r} p{p} adapters {adt_name}", "rows": []}
    base = {
        "gemm x@W.T beta0": gpu_time_ms(lambda: torch.mm(x, W.t(), out=y)),
        "gemm x@W.T beta1": gpu_time_ms(lambda: y.addmm_(x, W.t())),
        "gemm dy@W beta0": gpu_time_ms(lambda: torch.mm(dy, W, out=dx)),
        "gemm dy@W beta1": gpu_time_ms(lambda: dx.addmm_(dy, W)),
    }
    flops = 2 * M * N * K
    for k, ms in base.items():
        out["rows"].append((k, "", ms, f"{flops / ms / 1e9:.0f} TFLOP/s"))
    nbytes = {"shrink": M * K * 2, "expand": M * N * 2, "dy": M * N * 2, "dy-noDB": M * N * 2, "x": 2 * M * K * 2}
    cfg_sets = dict(CFGS, **{"dy-noDB": CFGS["dy"]})
    for kern, cfgs in cfg_sets.items():
        for pp in ((0.0, p) if kern in ("shrink", "x") else (p,)):
            best = None
            for c in ([None] if table_only else cfgs):  # None: the config table's choice
                cfg = None if c is None else L._Cfg(*c)
                if kern == "shrink":
                    fn = lambda: L._shrink(x, A, pp, seed, cfg)  # noqa: E731
                elif kern == "expand":
                    fn = lambda: L._expand(S, B, 2.0, None, y, cfg)  # noqa: E731
                elif kern == "dy":
                    fn = lambda: L._bwd_dy(dy, B, S, 2.0, dt, False, cfg)  # noqa: E731
                elif kern == "dy-noDB":  # the same pass without its dB atomics: what they cost
                    fn = lambda: L._bwd_dy(dy, B, S, 2.0, dt, True, cfg)  # noqa: E731
                else:
                    fn = lambda: L._bwd_x(x, A, G, seed, 2.0, pp, True, cfg)  # noqa: E731
                try:
                    ms = gpu_time_ms(fn, 10, 50)
                except Exception as e:  # a config that does not compile (shared memory, registers)
                    out["rows"].append((f"{kern} p{pp}", str(c), None, f"failed: {type(e).__name__}"))
                    continue
                gbs = nbytes[kern] / ms / 1e6
                out["rows"].append((f"{kern} p{pp}", str(c), ms, f"{gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)"))
                best = min(best or (ms, c), (ms, c))
            if best:
                out["rows"].append((f"{kern} p{pp} BEST", str(best[1]), best[0], ""))
    # the whole op with the current table, forward and backward pieces
    Wg = W
    out["rows"].append(("op fwd (table cfg)", "", gpu_time_ms(lambda: L._fwd_triton(x, Wg, A, B, 2.0, None, p, seed)), ""))
    out["rows"].append(("op bwd (table cfg)", "", gpu_time_ms(lambda: L._bwd_triton(dy, x, Wg, A, B, S, seed, 2.0, p, True)), ""))
    del x, W, A, B, dy, y, dx
    torch.cuda.empty_cache()
    return out


def host_overhead_us():
    """Host time per call (us) of small launches: what bounds tiny shapes, where the GPU waits."""
    import time

    import torch.nn.functional as F

    import lora_kernels as lk

    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    B = torch.randn(256, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.empty(64, 256, device="cuda", dtype=torch.bfloat16)
    S = torch.randn(64, 16, device="cuda")
    xg = x.clone().requires_grad_(True)
    dy = torch.randn_like(y)
    cases = {
        "F.linear": lambda: F.linear(x, W),
        "triton expand launch": lambda: L._expand(S, B, 2.0, None, y),
        "lora_linear fwd p=0 (no grad)": lambda: lk.lora_linear(x, W, A.detach(), B.detach(), 2.0),
        "lora_linear fwd p=0.05 (grad)": lambda: lk.lora_linear(xg, W, A, B, 2.0, None, 0.05),
        "lora_linear fwd+bwd p=0.05": lambda: torch.autograd.grad(lk.lora_linear(xg, W, A, B, 2.0, None, 0.05), [xg, A, B], dy),
        "base fwd+bwd": lambda: torch.autograd.grad(F.linear(xg, W), [xg], dy),
    }
    out = {}
    from benchmarks.profile_host import print_cprofile

    print_cprofile(cases["lora_linear fwd+bwd p=0.05"], 100, 22)
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t0) / 200 * 1e6
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes only")
    ap.add_argument("--shape", action="append", default=[], help="MxKxNxr instead of the built-in shapes")
    ap.add_argument("--adapter-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--table-only", action="store_true", help="time the config table's choice only")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shape] or SHAPES[: args.shapes]
    adt = getattr(torch, args.adapter_dtype)
    copy_gbs = ceilings()
    print(f"device copy: {copy_gbs:.0f} GB/s (read + write)")
    with set_wrap_triton_enabled(False):  # launch as the op does in eager: no tracing wrapper
        if not args.table_only:
            for name, us in host_overhead_us().items():
                print(f"  host us/call  {name:<32} {us:8.1f}")
        results = [tune_shape(*s, args.p, copy_gbs, adt, args.table_only) for s in shapes]
    for res in results:
        print(f"\n== {res['shape']}")
        for name, cfg, ms, note in res["rows"]:
            if "BEST" in name or name.startswith(("gemm", "op")) or args.table_only:
                print(f"  {name:<22} {cfg:<20} {'-' if ms is None else f'{ms:.4f} ms':>12}  {note}")
    if args.json:
        json.dump({"copy_gbs": copy_gbs, "results": results}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
