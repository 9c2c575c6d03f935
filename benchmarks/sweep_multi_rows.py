"""Sweep the grid targets of the register kernels (blocks per SM of the shrink and the expand) on a
few decode cases, CUDA-graph timing of the segment forward on pre-sorted rows (GPU).

    python benchmarks/sweep_multi_rows.py [T,L,r,popularity ...]

Prints one line per case and setting: ms and effective bandwidth (x, y and each used adapter once).
"""
import os
import sys

import torch
import triton.testing

from lora_kernels._bench.multi import HIDDEN, adapter_indices, decode_bytes, make_adapters
from lora_kernels.ops.multi_lora import RowIndex, _ext_ops

CASES = ("256,32,16,uniform", "1024,128,16,distinct", "4096,128,16,distinct", "1024,64,64,distinct")
SHRINK = (4, 6, 8, 12, 16, 24)
EXPAND = (3, 5, 8, 12, 16, 24)


def main():
    op = _ext_ops().multi_lora_fwd
    for spec in sys.argv[1:] or CASES:
        T, L, r, pop = spec.split(",")
        T, L, r = int(T), int(L), int(r)
        A, B, s = make_adapters(L, r, HIDDEN, HIDDEN, dtype=torch.bfloat16, device="cuda")
        idx = adapter_indices(T, L, pop, device="cuda")
        x = torch.randn(T, HIDDEN, device="cuda", dtype=torch.bfloat16)
        seg = RowIndex(idx).segments(L)
        nbytes = decode_bytes(T, HIDDEN, HIDDEN, r, int(torch.unique(idx).numel()))

        def timed(sb, eb):
            os.environ["LORA_KERNELS_MULTI_ROWS_BPS"] = f"{sb},{eb}"
            ms = triton.testing.do_bench_cudagraph(lambda: op(x, A, B, idx, s, None, "segment", False, *seg),
                                                   rep=30, return_mode="median")
            return float(ms)

        base = timed(0, 0)
        print(f"case T{T} L{L} r{r} {pop}: defaults {base * 1e3:.1f} us ({nbytes / base / 1e6:.0f} GB/s)")
        best_s = min(SHRINK, key=lambda sb: timed(sb, 0))
        for sb in SHRINK:
            print(f"  shrink bps {sb:2d}: {timed(sb, 0) * 1e3:6.1f} us")
        for eb in EXPAND:
            t = timed(best_s, eb)
            print(f"  shrink bps {best_s} expand bps {eb:2d}: {t * 1e3:6.1f} us = {nbytes / t / 1e6:.0f} GB/s")
    os.environ.pop("LORA_KERNELS_MULTI_ROWS_BPS", None)


if __name__ == "__main__":
    main()
