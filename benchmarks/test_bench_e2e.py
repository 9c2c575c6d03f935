"""pytest-benchmark: one LoRA training step of the Llama model in lora_kernels/_bench/e2e.py.

Same setups as `python -m lora_kernels bench --only e2e` (floor, PEFT, patch, patch(PEFT)); each
round is one step followed by a synchronize, so the host timer sees the GPU work. Needs CUDA.
Run: python -m pytest benchmarks/test_bench_e2e.py --benchmark-only  (E2E_LAYERS=4 for a quick run)
"""
import os

import pytest
import torch

from lora_kernels._bench import e2e

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LAYERS = int(os.environ.get("E2E_LAYERS", e2e.FULL["num_hidden_layers"]))


@pytest.mark.parametrize("impl", e2e.IMPLS)
def test_train_step(benchmark, impl):
    setup = e2e.make_setup(impl, dict(e2e.FULL, num_hidden_layers=LAYERS))
    try:
        def step():
            setup.step()
            torch.cuda.synchronize()

        benchmark.group = f"e2e llama {LAYERS}L b{e2e.BATCH}x{e2e.SEQ}"
        benchmark.extra_info.update(bench="e2e", case=f"llama {LAYERS}L b{e2e.BATCH}x{e2e.SEQ} step", impl=impl)
        torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(step, rounds=8, warmup_rounds=3, iterations=1)
        benchmark.extra_info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        e2e.release(setup)
