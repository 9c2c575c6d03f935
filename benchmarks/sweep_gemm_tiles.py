"""The GEMM-epilogue kernel (_lora_gemm_kernel) alone at several tile configurations, against
cuBLAS's plain GEMM of the same operands in the same run (GPU).

    python benchmarks/sweep_gemm_tiles.py [--pipeline] [MxKxN ...]

Per shape (M x K -> N, r16): the forward (x @ W.T + s S @ B.T), the dgrad (dy @ W + s G @ A) and the
masked dgrad (p0.05), each as CUDA-graph us and its ratio to torch.mm of the same operands, and each
candidate's largest difference to the table's configuration. The candidates are the tiles that
compile for sm_90 within shared memory and without spills at r16 (offline compile); with --pipeline,
the table's [128, 256] tile at other K steps, stage counts, epilogue slices and tile groupings.
"""
import argparse
import gc
import statistics

import torch
import triton.testing

from lora_kernels.ops import lora_linear as L
from lora_kernels.ops.dropout import draw_seed

SHAPES = [(8192, 1024, 1024), (8192, 2048, 512), (2048, 4096, 4096), (8192, 4096, 4096), (8192, 4096, 14336),
          (8192, 14336, 4096)]
C = L._Cfg
TILES = {"table": {}, "128x128 s4": dict(cfg=C(128, 128, 8, 4)), "128x128 s5": dict(cfg=C(128, 128, 8, 5)),
         "64x256 w4 s4": dict(cfg=C(64, 256, 4, 4)), "256x128 s3": dict(cfg=C(256, 128, 8, 3))}
# [128, 256] variants that fit the 227 KB of shared memory without spills at r16 (offline sm_90
# compile): 4 stages of 64-deep steps or 2 of 128-deep ones need the epilogue in 4 column slices
# (its TMA store buffer 16 KB instead of the forward's 64)
PIPELINE = {"table": {}, "g16": dict(group_m=16), "g4": dict(group_m=4),
            "s4 split4": dict(cfg=C(128, 256, 8, 4), epi_split=4),
            "g16 s4 split4": dict(cfg=C(128, 256, 8, 4), epi_split=4, group_m=16),
            "bk128 s2 split4": dict(cfg=C(128, 256, 8, 2), bk=128, epi_split=4)}
SKIP = {("256x128 s3", "dgrad p")}  # spills with the mask (offline compile)


def graph_us(fn) -> float:
    # rep 20 ms: every call allocates its output inside the capture (2000 calls of a 16 MB output at 60)
    t = triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
    gc.collect()  # each capture's memory pool goes with its graph
    torch.cuda.empty_cache()
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*", help="MxKxN")
    ap.add_argument("--pipeline", action="store_true", help="the [128, 256] tile's pipeline variants")
    ap.add_argument("--only", default=None, help="comma-separated candidate names")
    ap.add_argument("--modes", default="fwd,dgrad,dgrad p", help="comma-separated: fwd, dgrad, dgrad p")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over the candidates in turn (median shown)")
    args = ap.parse_args()
    candidates = PIPELINE if args.pipeline else TILES
    if args.only:
        candidates = {k: v for k, v in candidates.items() if k in args.only.split(",") or k == "table"}
    shapes = [tuple(int(v) for v in a.split("x")) for a in args.shapes] or SHAPES
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}; graph us (ratio to torch.mm), max |diff| to "
          f"table; median of {args.rounds} round(s) taken in turn")
    dt, r = torch.bfloat16, 16
    seed = draw_seed("cuda")
    for M, K, N in shapes:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        W = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
        A = torch.randn(r, K, device="cuda", dtype=dt) / K**0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) / r**0.5
        S = torch.randn(M, r, device="cuda")
        G = torch.randn(M, r, device="cuda")
        y = torch.empty(M, N, device="cuda", dtype=dt)
        dx = torch.empty(M, K, device="cuda", dtype=dt)

        def fwd_cublas_path():  # what runs where the GEMM kernel does not: expand writes y, cuBLAS adds x W^T
            L._expand(S, B, 2.0, None, y)
            return y.addmm_(x, W.t())

        def dgrad_cublas_path(p=0.0):
            L._expand(G, A.t(), 2.0, None, dx, p=p, seed=seed)
            return dx.addmm_(dy, W)

        cublas_paths = {"fwd": fwd_cublas_path, "dgrad": dgrad_cublas_path, "dgrad p": lambda: dgrad_cublas_path(0.05)}
        modes = {
            "fwd": (lambda: torch.mm(x, W.t()), lambda c: L._lora_gemm(x, W, S, B.t(), 2.0, None, True, **c)),
            "dgrad": (lambda: torch.mm(dy, W), lambda c: L._lora_gemm(dy, W, G, A, 2.0, None, False, **c)),
            "dgrad p": (lambda: torch.mm(dy, W),
                        lambda c: L._lora_gemm(dy, W, G, A, 2.0, None, False, p=0.05, seed=seed, **c)),
        }
        for mode in args.modes.split(","):
            cublas, ours = modes[mode]
            ref = ours({}).float()
            names = [n for n in candidates if (n, mode) not in SKIP]
            diffs = {n: (ours(candidates[n]).float() - ref).abs().max().item() for n in names}
            times = {n: [] for n in ["cuBLAS", "cuBLAS path"] + names}
            for _ in range(args.rounds):
                times["cuBLAS"].append(graph_us(cublas))
                times["cuBLAS path"].append(graph_us(cublas_paths[mode]))
                for n in names:
                    times[n].append(graph_us(lambda: ours(candidates[n])))
            med = {n: statistics.median(ts) for n, ts in times.items()}
            base = med["cuBLAS"]
            cells = [f"{n} {med[n]:7.1f} ({med[n] / base:.3f}x" + (f", {diffs[n]:.0e})" if n in diffs else ")")
                     for n in times if n != "cuBLAS"]
            print(f"{M}x{K}->{N} {mode:8s} cuBLAS {base:7.1f}   " + "   ".join(cells), flush=True)
            if args.rounds > 1:
                print("    rounds: " + "; ".join(f"{n} " + " ".join(f"{t:.1f}" for t in ts) for n, ts in times.items()))
        del x, dy, W, A, B, S, G, y, dx
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
