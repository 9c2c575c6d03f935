"""Run the multi-adapter forward kernels of a few decode cases twice each, for Nsight Compute (GPU).

    ncu --kernel-name regex:"rows_|sort_segments|bgmv|sgmv" --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python benchmarks/ncu_multi.py [T,L,r,popularity ...]

Each case: the segment regime (the sort, then the register shrink and expand where they
apply) and the decode regime, twice; read the second launch of each kernel in the report.
"""
import sys

import torch

from lora_kernels._bench.multi import decode_case
from lora_kernels.ops.multi_lora import _ext_ops

CASES = ("1024,128,16,distinct", "4096,128,16,distinct", "1024,64,64,distinct")


def main():
    op = _ext_ops().multi_lora_fwd
    for spec in sys.argv[1:] or CASES:
        x, A, B, s, idx, _ = decode_case(spec)
        print(f"case {spec}", flush=True)
        for regime in ("segment", "decode"):
            for _ in range(2):
                op(x, A, B, idx, s, None, regime, False)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
