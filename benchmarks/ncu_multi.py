"""Run the multi-adapter forward kernels of a few decode cases twice each, for Nsight Compute (GPU).

    ncu --kernel-name regex:"rows_|sort_segments|bgmv|sgmv" --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python benchmarks/ncu_multi.py [T,L,r,popularity ...]

Each case: the segment regime (the one-block sort, then the register shrink and expand where they
apply) and the decode regime, twice; read the second launch of each kernel in the report.
"""
import sys

import torch

from lora_kernels._bench.multi import HIDDEN, adapter_indices, make_adapters
from lora_kernels.ops.multi_lora import _ext_ops

CASES = ("1024,128,16,distinct", "4096,128,16,distinct", "1024,64,64,distinct")


def main():
    op = _ext_ops().multi_lora_fwd
    for spec in sys.argv[1:] or CASES:
        T, L, r, pop = spec.split(",")
        T, L, r = int(T), int(L), int(r)
        A, B, s = make_adapters(L, r, HIDDEN, HIDDEN, dtype=torch.bfloat16, device="cuda")
        idx = adapter_indices(T, L, pop, device="cuda")
        x = torch.randn(T, HIDDEN, device="cuda", dtype=torch.bfloat16)
        print(f"case T{T} L{L} r{r} {pop}", flush=True)
        for regime in ("segment", "decode"):
            for _ in range(2):
                op(x, A, B, idx, s, None, regime, False)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
