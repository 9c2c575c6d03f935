"""pytest-benchmark view of the multi-adapter benchmark (the same callables as `python -m lora_kernels
bench --only multi`, from lora_kernels/_bench/multi.py). Needs CUDA; run with

    python -m pytest benchmarks/test_bench_multi_lora.py --benchmark-columns=median,iqr,rounds

Each round ends with torch.cuda.synchronize(), so a round is the GPU time plus the launch overhead
of one call (what an eager caller sees). The report module adds CUDA-graph timings and GB/s.
"""
from __future__ import annotations

import math

import pytest
import torch

from lora_kernels._bench import multi as bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DECODE_CASES = [(256, 32, 16, "uniform"), (1024, 128, 16, "distinct"), (4096, 128, 16, "distinct"),
                (64, 8, 16, "zipf"), (1024, 64, 64, "distinct")]
DECODE_IMPLS = ("gather+bmm", "ext:auto", "ext:decode", "ext:segment", "loop", "peft")
PREFILL_IMPLS = ("fwd gather+bmm", "fwd ext", "train gather+bmm", "train ext", "fwd linear ext mixed",
                 "fwd lora_linear single", "train linear ext mixed", "train lora_linear single")


def _synced(fn):
    def call():
        fn()
        torch.cuda.synchronize()
    return call


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("T,L,r,popularity", DECODE_CASES, ids=lambda v: str(v))
def test_decode(benchmark, T, L, r, popularity, impl):
    H = bench.HIDDEN
    A, B, s = bench.make_adapters(L, r, H, H, dtype=torch.bfloat16, device="cuda")
    idx = bench.adapter_indices(T, L, popularity, device="cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    impls = bench.decode_impls(x, A, B, idx, s, with_slow=impl in ("loop", "peft"))
    if impl not in impls:
        pytest.skip(f"{impl} is not available here (peft not installed?)")
    used = int(torch.unique(idx).numel())
    benchmark.extra_info["bytes"] = bench.decode_bytes(T, H, H, r, used)
    with torch.no_grad():
        benchmark(_synced(impls[impl]))


@pytest.mark.parametrize("impl", PREFILL_IMPLS)
@pytest.mark.parametrize("L", [4, 8])
def test_prefill(benchmark, L, impl):
    H = bench.HIDDEN
    idx = bench.prefill_indices(8, L, device="cuda")
    T = idx.numel()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A, B, s = bench.make_adapters(L, 16, H, H, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    W = torch.randn(H, H, device="cuda", dtype=torch.bfloat16) / math.sqrt(H)
    dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    fn = bench.prefill_impls(x, W, A, B, idx, s, dy)[impl]
    if impl.startswith("fwd"):
        with torch.no_grad():
            benchmark(_synced(fn))
    else:
        benchmark(_synced(fn))
