"""The backward's dy pass alone, with and without its dB atomics (GPU).

    python benchmarks/probe_dy.py [MxNxR ...]

One pass over dy [M, N] computes G = dy @ B [M, R] and adds dB = s * dy.T @ S [N, R] with fp32
atomics (one add per dB element per row block). For each shape and tile: the kernel's CUDA-graph us
as the dispatcher runs it, and without the dB atomics (what the atomics cost), with the read
bandwidth of dy.
"""
import sys

import torch
import triton.testing

from lora_kernels.ops import lora_linear as L

SHAPES = [(8192, 4096, 16), (8192, 1024, 16), (8192, 512, 16), (8192, 14336, 16)]
TILES = [None, L._Cfg(128, 128, 8, 3), L._Cfg(64, 256, 8, 3), L._Cfg(32, 128, 4, 3)]


def run(dy, B, S, G, db, cfg, compute_db):
    M, N = dy.shape
    R = B.shape[1]
    L._launch(L._lora_bwd_dy_kernel, (L._cdiv(M, cfg.block_a), 1),
              dy, B, S, G, db, M, N, R, L._cdiv(N, cfg.block_b) * cfg.block_b,
              dy.stride(0), dy.stride(1), B.stride(0), B.stride(1), 2.0,
              COMPUTE_DB=compute_db, DOT_PRECISION="tf32", BLOCK_M=cfg.block_a, BLOCK_N=cfg.block_b,
              BLOCK_R=L._block_r(R), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def main():
    shapes = [tuple(int(v) for v in a.split("x")) for a in sys.argv[1:]] or SHAPES
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}; graph us (TB/s of dy)")
    for M, N, R in shapes:
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        B = torch.randn(N, R, device="cuda", dtype=torch.bfloat16)
        S = torch.randn(M, R, device="cuda")
        G = torch.empty(M, R, device="cuda")
        db = torch.zeros(N, R, device="cuda")
        cells = []
        for cfg in TILES:
            c = cfg or L._dy_cfg(M, R)
            for compute_db in (True, False):
                t = triton.testing.do_bench_cudagraph(lambda: run(dy, B, S, G, db, c, compute_db), rep=40) * 1e3
                cells.append(f"{c.block_a}x{c.block_b}x{c.num_warps}{'' if compute_db else ' no dB'} "
                             f"{t:6.1f} ({M * N * 2 / t / 1e6:4.2f})")
        print(f"M{M} N{N} r{R}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
