"""GPU benchmarks: `pytest benchmarks/ --benchmark-only` (skipped without CUDA).

Each test records, in benchmark.extra_info, the median GPU time from CUDA events
(triton.testing.do_bench) and the ratio to the baseline measured in the same run; pytest-benchmark's
own statistics time a synchronized block of calls. `python benchmarks/summarize.py BENCH.json`
prints the ratios as a table.
LORA_KERNELS_BENCH_GRID=full runs the issue's whole grid (~3000 timings); the default grid keeps
every (M, K, N) and p at r = 16 and adds r = 64, 128 at M = 8192; =quick takes the headline cases.
"""
import os

import pytest
import torch

GRID = os.environ.get("LORA_KERNELS_BENCH_GRID", "default")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU benchmarks need CUDA")
    for item in items:
        item.add_marker(skip)


def timed_block(fn, target_ms: float, one_ms: float):
    """A callable running fn enough times to last ~target_ms, then synchronizing."""
    k = max(1, int(target_ms / max(one_ms, 1e-3)))

    def block():
        for _ in range(k):
            fn()
        torch.cuda.synchronize()

    return block, k
