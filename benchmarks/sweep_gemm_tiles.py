"""The GEMM-epilogue kernel (_lora_gemm_kernel) alone at several tile configurations, against
cuBLAS's plain GEMM of the same operands in the same run (GPU).

    python benchmarks/sweep_gemm_tiles.py [MxKxN ...]

Per shape (M x K -> N, r16): the forward (x @ W.T + s S @ B.T), the dgrad (dy @ W + s G @ A) and the
masked dgrad (p0.05), each as CUDA-graph us and its ratio to torch.mm of the same operands, and each
candidate's largest difference to the table's configuration. The candidates are the tiles that
compile for sm_90 within shared memory and without spills at r16 (offline compile).
"""
import gc
import sys

import torch
import triton.testing

from lora_kernels.ops import lora_linear as L
from lora_kernels.ops.dropout import draw_seed

SHAPES = [(8192, 1024, 1024), (8192, 2048, 512), (2048, 4096, 4096), (8192, 4096, 4096), (8192, 4096, 14336),
          (8192, 14336, 4096)]
C = L._Cfg
CANDIDATES = {"table": None, "128x128 s4": C(128, 128, 8, 4), "128x128 s5": C(128, 128, 8, 5),
              "64x256 w4 s4": C(64, 256, 4, 4), "256x128 s3": C(256, 128, 8, 3)}
SKIP = {("256x128 s3", "dgrad p")}  # spills with the mask (offline compile)


def graph_us(fn) -> float:
    # rep 20 ms: every call allocates its output inside the capture (2000 calls of a 16 MB output at 60)
    t = triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
    gc.collect()  # each capture's memory pool goes with its graph
    torch.cuda.empty_cache()
    return t


def main():
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}; graph us (ratio to torch.mm), max |diff| to table")
    dt, r = torch.bfloat16, 16
    seed = draw_seed("cuda")
    shapes = [tuple(int(v) for v in a.split("x")) for a in sys.argv[1:]] or SHAPES
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
            "fwd": (lambda: torch.mm(x, W.t()), lambda c: L._lora_gemm(x, W, S, B.t(), 2.0, None, True, cfg=c)),
            "dgrad": (lambda: torch.mm(dy, W), lambda c: L._lora_gemm(dy, W, G, A, 2.0, None, False, cfg=c)),
            "dgrad p": (lambda: torch.mm(dy, W),
                        lambda c: L._lora_gemm(dy, W, G, A, 2.0, None, False, p=0.05, seed=seed, cfg=c)),
        }
        for mode, (cublas, ours) in modes.items():
            base = graph_us(cublas)
            ref = ours(None).float()
            t_path = graph_us(cublas_paths[mode])
            cells = [f"cuBLAS path {t_path:7.1f} ({t_path / base:.3f}x)"]
            for name, c in CANDIDATES.items():
                if (name, mode) in SKIP:
                    continue
                diff = (ours(c).float() - ref).abs().max().item()
                t = graph_us(lambda: ours(c))
                cells.append(f"{name} {t:7.1f} ({t / base:.3f}x, {diff:.0e})")
            print(f"{M}x{K}->{N} {mode:8s} cuBLAS {base:7.1f}   " + "   ".join(cells), flush=True)
        del x, dy, W, A, B, S, G, y, dx
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
