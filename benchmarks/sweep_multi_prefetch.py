"""How a call that sorts its rows overlaps the sort, on decode cases (GPU, CUDA-graph timing): direct
mode (no sort: the register kernels' blocks find their rows from the raw indices; the default
where the prefetch does not apply, up to 1024 rows), and the sorted mode with the register shrink's L2
prefetch (its upper bound LORA_KERNELS_MULTI_PREFETCH_MB; 0 = off) and with either sort (the counting
sort up to 255 adapters, the radix sort with LORA_KERNELS_MULTI_SORT=radix), against gather+bmm and
the same kernels on rows sorted beforehand (RowIndex); and the sort alone.

    python benchmarks/sweep_multi_prefetch.py [T,L,r,popularity ...]

Prints one line per case and setting: us, effective bandwidth (x, y and each used adapter once) and
the speed-up over gather+bmm measured in the same run; every setting's output must equal the
pre-sorted path's bit for bit.
"""
import os
import sys

import torch
import triton.testing

from lora_kernels._bench.multi import decode_case, gather_bmm
from lora_kernels.ops.multi_lora import RowIndex, _ext_ops

CASES = ("256,32,16,uniform", "1024,128,16,distinct", "1024,64,64,distinct", "4096,128,16,distinct",
         "2048,8,16,zipf")
RADIX = {"LORA_KERNELS_MULTI_SORT": "radix"}  # the radix sort where the counting sort applies
SETTINGS = (
    ("default", {}),
    ("default, radix sort", RADIX),
    ("direct mode", {"LORA_KERNELS_MULTI_PREFETCH_MB": "0"}),
    ("sorted, prefetch  0 MB", {"LORA_KERNELS_MULTI_DIRECT": "0", "LORA_KERNELS_MULTI_PREFETCH_MB": "0"}),
    ("sorted, prefetch  0 MB, radix sort",
     {"LORA_KERNELS_MULTI_DIRECT": "0", "LORA_KERNELS_MULTI_PREFETCH_MB": "0", **RADIX}),
    ("sorted, prefetch 32 MB", {"LORA_KERNELS_MULTI_DIRECT": "0", "LORA_KERNELS_MULTI_PREFETCH_MB": "32"}),
)


def _graph_us(fn) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")) * 1e3


def main():
    op = _ext_ops().multi_lora_fwd
    names = {k for _, env in SETTINGS for k in env}
    saved = {k: os.environ.get(k) for k in names}
    for spec in sys.argv[1:] or CASES:
        x, A, B, s, idx, nbytes = decode_case(spec)
        seg = RowIndex(idx).segments(A.shape[0])
        want = op(x, A, B, idx, s, None, "segment", False, *seg)[0]
        base = _graph_us(lambda: gather_bmm(x, A, B, idx, s))
        pre = _graph_us(lambda: op(x, A, B, idx, s, None, "segment", False, *seg))
        print(f"case {spec}: gather+bmm {base:.1f} us; pre-sorted {pre:.1f} us = {base / pre:.2f}x, "
              f"{nbytes / pre / 1e3:.0f} GB/s")
        sort = torch.ops.lora_kernels_ext.multi_lora_segments
        for label, env in (("counting", {}), ("radix", RADIX)):  # the sort alone, its tables compared
            for k in names:
                os.environ.pop(k, None)
            os.environ.update(env)
            tables = sort(idx, A.shape[0])
            same = all(torch.equal(a, b) for a, b in zip(tables, seg))
            t = _graph_us(lambda: sort(idx, A.shape[0]))
            print(f"  the sort alone, {label}: {t:5.1f} us{'' if same else '  TABLES DIFFER'}")
        for label, env in SETTINGS:
            for k in names:  # the launchers read these per call
                os.environ.pop(k, None)
            os.environ.update(env)
            got = op(x, A, B, idx, s, None, "segment", False)[0]
            same = torch.equal(got, want)
            t = _graph_us(lambda: op(x, A, B, idx, s, None, "segment", False))
            print(f"  sort in the call, {label}: {t:6.1f} us = {base / t:5.2f}x gather+bmm, "
                  f"{nbytes / t / 1e3:5.0f} GB/s{'' if same else '  RESULT DIFFERS FROM THE PRE-SORTED PATH'}")
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


if __name__ == "__main__":
    main()
