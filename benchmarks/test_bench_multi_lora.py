"""Multi-adapter LoRA vs gather+bmm, a per-adapter loop and PEFT's mixed batch, same run.

The callables come from lora_kernels/_bench/multi.py (the `python -m lora_kernels bench --only multi`
report, which adds CUDA-graph timings and GB/s against the copy bandwidth). extra_info carries the
median GPU ms (CUDA events) and the ratio to the case's baseline: gather+bmm for the LoRA term,
lora_linear on a single adapter for the whole layer (the issue's 1.3x targets).
Default grid: the report's quick decode cases and both prefill cases; LORA_KERNELS_BENCH_GRID=full
takes the report's whole decode grid.
"""
import functools
import math
import statistics

import pytest
import torch

from lora_kernels._bench import gpu_time_ms
from lora_kernels._bench import multi as MB

from .conftest import GRID, timed_block

DECODE_IMPLS = ("gather+bmm", "ext:auto", "ext:decode", "ext:segment", "loop", "peft")
DECODE = [(c, impl) for c in MB._decode_cases(quick=GRID != "full") for impl in DECODE_IMPLS]
PREFILL_IMPLS = ("gather+bmm", "ext", "loop", "linear base", "lora_linear single", "linear ext single",
                 "linear ext mixed", "linear peft mixed")
PREFILL = [(L, phase, impl) for L in (4, 8) for phase in ("fwd", "train") for impl in PREFILL_IMPLS
           if not (phase == "train" and impl == "linear peft mixed")]


def _case_name(c):
    T, L, r, pop = c
    return f"decode T{T} L{L} r{r} {pop}"


@functools.lru_cache(maxsize=1)
def _decode(c):
    torch.cuda.empty_cache()
    T, L, r, pop = c
    H = MB.HIDDEN
    A, B, s = MB.make_adapters(L, r, H, H, dtype=torch.bfloat16, device="cuda")
    idx = MB.adapter_indices(T, L, pop, device="cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    impls = MB.decode_impls(x, A, B, idx, s, with_slow=T <= 1024)
    nbytes = MB.decode_bytes(T, H, H, r, int(torch.unique(idx).numel()))
    with torch.no_grad():
        base = gpu_time_ms(impls["gather+bmm"], 10, 40)
        peft_base = gpu_time_ms(impls["peft base"], 10, 40) if "peft base" in impls else 0.0
    return impls, nbytes, base, peft_base


@pytest.mark.parametrize("case,impl", DECODE, ids=[f"{_case_name(c)}-{i}" for c, i in DECODE])
def test_decode(benchmark, case, impl):
    impls, nbytes, base, peft_base = _decode(case)
    if impl not in impls:
        pytest.skip(f"{impl} not measured here (peft missing, or T > 1024 for the slow paths)")
    fn = impls[impl]
    with torch.no_grad():
        ms = gpu_time_ms(fn, 10, 40)
        lora_ms = ms - peft_base if impl == "peft" else ms  # PEFT's forward includes its base linear
        benchmark.group = _case_name(case)
        benchmark.extra_info.update(bench="multi", case=_case_name(case), impl=impl, gpu_ms_median=lora_ms,
                                    base_ms=base, ratio_to_base=lora_ms / base, gbs=nbytes / lora_ms / 1e6)
        block, k = timed_block(fn, 10.0, ms)
        benchmark.extra_info["calls_per_round"] = k
        benchmark.pedantic(block, rounds=3, warmup_rounds=1)


@functools.lru_cache(maxsize=1)
def _prefill(L):
    torch.cuda.empty_cache()
    H = MB.HIDDEN
    idx = MB.prefill_indices(8, L, device="cuda")
    T = idx.numel()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A, B, s = MB.make_adapters(L, 16, H, H, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    W = torch.randn(H, H, device="cuda", dtype=torch.bfloat16) / math.sqrt(H)
    dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    return T, MB.prefill_impls(x, W, A, B, idx, s, dy)


@functools.lru_cache(maxsize=None)
def _prefill_ms(L, name):
    _, impls = _prefill(L)
    if name.startswith("fwd"):
        with torch.no_grad():
            return gpu_time_ms(impls[name], 10, 40)
    return gpu_time_ms(impls[name], 10, 40)


@pytest.mark.parametrize("L,phase,impl", PREFILL, ids=[f"prefill L{L} {p}-{i}" for L, p, i in PREFILL])
def test_prefill(benchmark, L, phase, impl):
    T, impls = _prefill(L)
    name = f"{phase} {impl}"
    if name not in impls:
        pytest.skip(f"{impl} not available here (peft missing?)")
    layer = impl.startswith("linear") or impl.startswith("lora_linear")
    base = _prefill_ms(L, f"{phase} lora_linear single" if layer else f"{phase} gather+bmm")
    ms = _prefill_ms(L, name)
    case = f"prefill 8 seq {T} tok L{L} r16 {phase}{' layer' if layer else ''}"
    benchmark.group = case
    benchmark.extra_info.update(bench="multi", case=case, impl=impl, gpu_ms_median=ms, base_ms=base,
                                ratio_to_base=ms / base)
    block, k = timed_block(impls[name], 10.0, ms)
    benchmark.extra_info["calls_per_round"] = k
    if phase == "fwd":
        with torch.no_grad():
            benchmark.pedantic(block, rounds=3, warmup_rounds=1)
    else:
        benchmark.pedantic(block, rounds=3, warmup_rounds=1)


MODEL = [(s, p) for p in ("fwd", "train") for s in MB.MODEL_SETTINGS]


@functools.lru_cache(maxsize=1)
def _model():
    torch.cuda.empty_cache()
    model, names = MB.adapter_model(MB.MODEL, device="cuda")
    return MB.adapter_model_steps(model, names, MB.MODEL_BATCH, MB.MODEL_SEQ)


@functools.lru_cache(maxsize=1)
def _model_round_ms():
    """Every setting and phase timed in 5 interleaved rounds (MB.model_times): {(setting, phase): [ms]}."""
    contexts, steps = _model()
    return MB.model_times(contexts, steps, rounds=5, warmup=3, iters=10)[0]


@pytest.mark.parametrize("setting,phase", MODEL, ids=[f"model {p}-{s}" for s, p in MODEL])
def test_mixed_batch_model(benchmark, setting, phase):
    """The patched 4-layer Llama, 8 seq x 1024 tok, 8 adapters: mixed vs single (target <= 1.3x)."""
    contexts, steps = _model()
    rounds = _model_round_ms()
    ms, base = statistics.median(rounds[setting, phase]), statistics.median(rounds["single", phase])
    case = f"llama 4L mixed batch {phase}"
    benchmark.group = case
    benchmark.extra_info.update(bench="multi", case=case, impl=setting, gpu_ms_median=ms, base_ms=base,
                                ratio_to_base=statistics.median(MB.round_ratios(rounds, setting, phase)))
    with contexts[setting]():
        benchmark.pedantic(steps[phase], rounds=3, warmup_rounds=1)
