"""Fused LoRA linear vs naive PyTorch vs PEFT, ratio to the frozen base F.linear, same run."""
import functools
import itertools

import pytest
import torch

from lora_kernels._bench import gpu_time_ms
from lora_kernels._bench import linear as L

from .conftest import GRID, timed_block


def _cases():
    if GRID == "full":
        return list(L.full_grid())
    if GRID == "quick":
        return [L.Case(*c) for c in L.QUICK]
    cases = [L.Case(M, K, N, 16, p) for M, (K, N), p in itertools.product(L.GRID_M, L.GRID_KN, L.GRID_P)]
    cases += [L.Case(8192, K, N, r, p) for (K, N), r, p in itertools.product(L.GRID_KN, (64, 128), L.GRID_P)]
    return cases


PARAMS = [(c, impl, mode) for c in _cases() for impl in L.IMPLS for mode in ("fwd", "fwd+bwd")]


@functools.lru_cache(maxsize=1)
def _built(case):
    torch.cuda.empty_cache()
    return L.build(case)


@functools.lru_cache(maxsize=None)
def _base_ms(M, K, N, mode):
    x, dy, fns = L.build(L.Case(M, K, N, 16, 0.0), impls=("base",))
    return gpu_time_ms(L.step_fn(*fns["base"], x, dy, mode), 10, 40)


def _id(c, impl, mode):  # selectable with -k, e.g. -k "M8192_K4096_N4096_r16_p0.05"
    return f"M{c.M}_K{c.K}_N{c.N}_r{c.r}_p{c.p:g}-{impl}-{mode.replace('+', '_')}"


@pytest.mark.parametrize("case,impl,mode", PARAMS, ids=[_id(*t) for t in PARAMS])
def test_lora_linear(benchmark, case, impl, mode):
    x, dy, fns = _built(case)
    fn = L.step_fn(*fns[impl], x, dy, mode)
    ms = gpu_time_ms(fn, 10, 40)
    base = _base_ms(case.M, case.K, case.N, mode)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(bench="linear", case=f"{case.name} {mode}", impl=impl,
                                gpu_ms_median=ms, base_ms=base, ratio_to_base=ms / base)
    block, k = timed_block(fn, 10.0, ms)
    benchmark.extra_info["calls_per_round"] = k
    benchmark.pedantic(block, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ("base",) + L.IMPLS)
def test_memory_kept_by_forward(benchmark, impl):
    """8192 x 4096 -> 4096, r16, p0.05: bytes one training forward keeps (target: base + M*r*4)."""
    case = L.Case(8192, 4096, 4096, 16, 0.05)
    x, dy, fns = _built(case)
    kept = L.memory_kept(fns[impl][0], x)
    base = L.memory_kept(fns["base"][0], x)
    benchmark.extra_info.update(bench="linear", case=f"{case.name} kept MiB", impl=impl,
                                kept_bytes=kept, ratio_to_base=kept / base,
                                bound_bytes=base + case.M * case.r * 4)
    benchmark.pedantic(lambda: None, rounds=1)
