"""Sweep the grid targets of the register kernels (blocks per SM of the shrink and the expand) on a
few decode cases, CUDA-graph timing of the segment forward on pre-sorted rows (GPU).

    python benchmarks/sweep_multi_rows.py [T,L,r,popularity ...]

Prints one line per case and setting: ms and effective bandwidth (x, y and each used adapter once).
"""
import os
import sys

import torch
import triton.testing

from lora_kernels._bench.multi import decode_case
from lora_kernels.ops.multi_lora import RowIndex, _ext_ops

CASES = ("256,32,16,uniform", "1024,128,16,distinct", "4096,128,16,distinct", "1024,64,64,distinct")
SHRINK = (3, 4, 6, 8, 12, 16)
EXPAND = (1, 2, 3, 4, 6, 8, 12)


def main():
    op = _ext_ops().multi_lora_fwd
    for spec in sys.argv[1:] or CASES:
        x, A, B, s, idx, nbytes = decode_case(spec)
        seg = RowIndex(idx).segments(A.shape[0])

        def timed(sb, eb):
            os.environ["LORA_KERNELS_MULTI_ROWS_BPS"] = f"{sb},{eb}"
            ms = triton.testing.do_bench_cudagraph(lambda: op(x, A, B, idx, s, None, "segment", False, *seg),
                                                   rep=30, return_mode="median")
            return float(ms)

        base = timed(0, 0)
        print(f"case {spec}: defaults {base * 1e3:.1f} us ({nbytes / base / 1e6:.0f} GB/s)")
        shrink = {sb: timed(sb, 0) for sb in SHRINK}
        for sb, t in shrink.items():
            print(f"  shrink bps {sb:2d}: {t * 1e3:6.1f} us")
        best_s = min(shrink, key=shrink.get)
        for eb in EXPAND:
            t = timed(best_s, eb)
            print(f"  shrink bps {best_s} expand bps {eb:2d}: {t * 1e3:6.1f} us = {nbytes / t / 1e6:.0f} GB/s")
    os.environ.pop("LORA_KERNELS_MULTI_ROWS_BPS", None)


if __name__ == "__main__":
    main()
