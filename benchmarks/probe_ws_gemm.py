"""Triton's warp specialization for the forward LoRA GEMM (y = x W^T + s S B^T): is it faster? (GPU, sm_90)

    python benchmarks/probe_ws_gemm.py [--shapes MxKxN,...] [--rounds 3] [--r 16]

`_lora_gemm_kernel` (the package's GEMM, 8 warps, no warp specialization) runs each tile's epilogue
between its main loop and the next tile's: no loads are in flight meanwhile. With
`tl.range(..., warp_specialize=True)` Triton 3.6 gives sm_90 kernels a producer warp group that
could load the next tile's operands during the epilogue. Its passes take device-side tensor
descriptors only and no pointer loads in the loop, so this variant loads S and B through
descriptors too. What the offline sm_90 compile allows (r16, bf16): the forward at [128, 256] x 64
needs 279 KB of shared memory at 3 stages (limit 227 KB), so 2 stages, or 32-deep steps at 4
stages (230 KB), or [128, 128] tiles. The masked dgrad epilogue (the dropout mask's interleaves, and
the column slices it needs against spills) fails in the pass's data partitioning
(WSDataPartition.cpp: "Unexpected op"), so only the forward is measured here.
Prints CUDA-graph us per kernel, the median of interleaved rounds, its ratio to cuBLAS's F.linear
in the same rounds, and the largest difference from the package kernel's output.
"""
import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing
from torch._library.triton import set_wrap_triton_enabled

from lora_kernels._bench import interleaved_ms, print_against
from lora_kernels.ops import lora_linear as L
from lora_kernels.ops.lora_linear import _tile_coords


@triton.jit
def _ws_lora_gemm(a_ptr, w_ptr, y_ptr, l_ptr, b_ptr,  # a [M, K], W [N, K], y [M, N], L [M, R] fp32, B [N, R]
                  M, N, K, R, coef,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_R: tl.constexpr,
                  GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr):
    dt = y_ptr.dtype.element_ty
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    l_desc = tl.make_tensor_descriptor(l_ptr, shape=[M, R], strides=[R, 1], block_shape=[BM, BLOCK_R])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, R], strides=[R, 1], block_shape=[BN, BLOCK_R])
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, warp_specialize=WS):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        m0 = pid_m * BM
        n0 = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(tl.cdiv(K, BK)):
            acc = tl.dot(a_desc.load([m0, kk * BK]), w_desc.load([n0, kk * BK]).T, acc)
        l = (l_desc.load([m0, 0]) * coef).to(dt)
        acc = tl.dot(l, b_desc.load([n0, 0]).to(dt).T, acc)
        y_desc.store([m0, n0], acc.to(dt))


# (BM, BN, BK, GROUP_M, num_stages, num_warps, WS); WS with num_warps = 4 is 12 warps (a producer
# and two consumer groups). The last: the same kernel without warp specialization.
CONFIGS = [(128, 256, 64, 8, 2, 4, True), (128, 256, 32, 8, 4, 4, True), (128, 128, 64, 8, 4, 4, True),
           (128, 128, 64, 8, 3, 4, True), (128, 256, 32, 16, 4, 4, True), (128, 256, 64, 8, 3, 8, False)]
SHAPES = [(8192, 4096, 4096), (8192, 1024, 1024), (8192, 2048, 512), (8192, 4096, 14336), (8192, 14336, 4096)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    if not torch.cuda.is_available():
        print("no GPU: nothing to measure")
        return
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  r{args.r}")
    torch.manual_seed(0)
    for M, K, N in shapes:
        R = args.r
        dt = torch.bfloat16
        x = torch.randn(M, K, device="cuda", dtype=dt)
        w = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
        S = torch.randn(M, R, device="cuda")
        B = torch.randn(N, R, device="cuda", dtype=dt) / R**0.5
        with set_wrap_triton_enabled(False):
            ref = L._lora_gemm(x, w, S, B.t(), 0.5, None, w_kmajor=True)
        cands = {"cuBLAS F.linear": lambda: F.linear(x, w)}
        cands["package kernel"] = lambda: L._lora_gemm(x, w, S, B.t(), 0.5, None, w_kmajor=True)
        errs = {}
        for BM, BN, BK, G, st, nw, ws in CONFIGS:
            y = torch.empty(M, N, device="cuda", dtype=dt)
            grid = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
            name = f"{'WS' if ws else '  '} {BM}x{BN}x{BK} g{G} s{st} w{nw}"

            def run(y=y, grid=grid, BM=BM, BN=BN, BK=BK, G=G, st=st, nw=nw, ws=ws):
                _ws_lora_gemm[grid](x, w, y, S, B, M, N, K, R, 0.5, BM=BM, BN=BN, BK=BK, BLOCK_R=L._block_r(R),
                                    GROUP_M=G, NUM_SMS=grid[0], WS=ws, num_stages=st, num_warps=nw)
            try:
                run()
                torch.cuda.synchronize()
                errs[name] = (y.float() - ref.float()).abs().max().item()
            except Exception as e:  # a config that does not compile or launch: say so, go on
                print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:160]}")
                continue
            cands[name] = run
        with set_wrap_triton_enabled(False):
            times = interleaved_ms(cands, lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3, args.rounds)
        print_against(f"{M}x{K}->{N}:", times, "cuBLAS F.linear", {k: f"max diff {e:.3g}" for k, e in errs.items()})


if __name__ == "__main__":
    main()
