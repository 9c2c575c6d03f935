"""Wave quantization of the persistent GEMM-epilogue kernel against cuBLAS (GPU).

    python benchmarks/probe_waves.py [MxKxN ...]

The kernel walks [BM, BN] tiles on one CTA per SM, so its time goes in whole waves:
ceil(tiles / SMs) tile times. For each shape: the kernel's forward (x @ W.T + s S @ B.T) and
cuBLAS's F.linear, CUDA-graph us, the tile count, the waves (tiles / SMs) and the kernel's time per
wave. Shapes whose tile count is a multiple of the SM count show the kernel's per-tile speed
without a partly idle last wave.
"""
import sys

import torch
import torch.nn.functional as F
import triton.testing

from lora_kernels.ops import lora_linear as L


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bm, bn = L._GEMM_TILE.block_a, L._GEMM_TILE.block_b
    default = [(8192, 4096, 4096), (128 * sms // 2, 4096, 4096), (128 * sms, 4096, 4096), (2048, 4096, 4096)]
    shapes = [tuple(int(v) for v in a.split("x")) for a in sys.argv[1:]] or default
    print(f"{torch.cuda.get_device_name()} ({sms} SMs)  torch {torch.__version__}; tiles [{bm}, {bn}]; graph us")
    dt, r = torch.bfloat16, 16
    for M, K, N in shapes:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        W = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) / r**0.5
        S = torch.randn(M, r, device="cuda")
        tiles = -(-M // bm) * -(-N // bn)
        t_cub = triton.testing.do_bench_cudagraph(lambda: F.linear(x, W), rep=40, return_mode="median") * 1e3
        t_ker = triton.testing.do_bench_cudagraph(lambda: L._lora_gemm(x, W, S, B.t(), 2.0, None, True), rep=40,
                                                  return_mode="median") * 1e3
        waves = tiles / sms
        print(f"  {M}x{K}->{N}: tiles {tiles} = {waves:.2f} waves; cuBLAS {t_cub:7.1f}  kernel {t_ker:7.1f} "
              f"({t_cub / t_ker:.3f} of cuBLAS); kernel per wave {t_ker / -(-tiles // sms):6.1f}, "
              f"cuBLAS per wave-equivalent {t_cub / waves:6.1f}")


if __name__ == "__main__":
    main()
