"""How close does a Triton bf16 GEMM come to cuBLAS on this GPU?  y = x @ W.T, x [M, K], W [N, K].

    python benchmarks/probe_triton_gemm.py            -> one line per (shape, kernel config)

The fused LoRA forward can only beat "cuBLAS + LoRA passes" if the base GEMM inside it runs at
cuBLAS class. This measures a persistent TMA kernel (tensor descriptors made on the device, tiles
in grouped order), with and without Triton's warp specialization (on sm_90: one producer warp group
issuing TMA loads, two consumer warp groups issuing wgmma), against `F.linear` in the same process.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lora_kernels.ops.lora_linear import _tile_coords  # grouped persistent tile order


@triton.jit
def _gemm_persistent(x_ptr, w_ptr, y_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, warp_specialize=WS):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(tl.cdiv(K, BK)):
            a = x_desc.load([pid_m * BM, kk * BK])
            b = w_desc.load([pid_n * BN, kk * BK])
            acc = tl.dot(a, b.T, acc)
        y_desc.store([pid_m * BM, pid_n * BN], acc.to(y_ptr.dtype.element_ty))


# (BM, BN, BK, GROUP_M, num_stages, num_warps, warp_specialize): num_warps = 4 with WS gives
# 12 warps (producer + 2 consumer groups); without WS the 8 warps share each tile
CONFIGS = [
    (128, 256, 64, 8, 3, 4, True),
    (128, 128, 64, 8, 4, 4, True),
    (128, 256, 64, 8, 3, 8, False),
    (128, 128, 64, 8, 4, 8, False),
    (128, 256, 64, 16, 3, 4, True),
]
SHAPES = [(8192, 4096, 4096), (8192, 14336, 4096), (8192, 4096, 14336), (2048, 4096, 4096),
          (8192, 1024, 1024), (8192, 512, 2048)]  # (M, N, K)


def main() -> None:
    if not torch.cuda.is_available():
        print("no GPU: nothing to measure")
        return
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    for M, N, K in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        ref = F.linear(x, w)
        flops = 2 * M * N * K
        t_cub = triton.testing.do_bench_cudagraph(lambda: F.linear(x, w))
        print(f"M{M} N{N} K{K}: cuBLAS {t_cub * 1e3:8.1f} us {flops / t_cub / 1e9:6.0f} TFLOP/s")
        for BM, BN, BK, G, st, nw, ws in CONFIGS:
            y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            grid = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)

            def run():
                _gemm_persistent[grid](x, w, y, M, N, K, BM=BM, BN=BN, BK=BK, GROUP_M=G, NUM_SMS=grid[0],
                                       WS=ws, num_stages=st, num_warps=nw)
            try:
                run()
                torch.cuda.synchronize()
                err = (y.float() - ref.float()).abs().max().item()
                t = triton.testing.do_bench_cudagraph(run)
            except Exception as e:  # a config that does not compile or launch: say so, go on
                print(f"   {BM}x{BN}x{BK} g{G} s{st} w{nw} ws{int(ws)}: FAILED {type(e).__name__}: {str(e)[:120]}")
                continue
            print(f"   {BM}x{BN}x{BK} g{G} s{st} w{nw} ws{int(ws)}: {t * 1e3:8.1f} us "
                  f"{flops / t / 1e9:6.0f} TFLOP/s  {t_cub / t * 100:5.1f}% of cuBLAS  max err {err:.3g}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
