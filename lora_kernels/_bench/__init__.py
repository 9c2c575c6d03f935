"""Benchmark report behind `python -m lora_kernels bench`.

Each module here (linear, multi, e2e) exposes `run(quick: bool) -> list[Row]`. Rows carry GPU
times (median of CUDA-event timings through triton.testing.do_bench) and a ratio to the baseline
measured in the same run. The pytest-benchmark suite in benchmarks/ times the same callables.
"""
from __future__ import annotations

import importlib
import statistics
from dataclasses import dataclass, field

MODULES = ("linear", "multi", "e2e")


@dataclass
class Row:
    bench: str  # which report: "linear", "multi", "e2e"
    case: str  # the shape / setting, e.g. "8192x4096->4096 r16 p0.05 fwd"
    impl: str  # "base", "fused", "naive", "peft", ...
    ms: float | None  # median GPU time; None when not measured
    ratio: float | None = None  # ms / baseline ms of the same case in the same run
    note: str = ""
    extra: dict = field(default_factory=dict)


def lm_train_step(model, ids, opt):
    """One language-model training step on token ids: forward with labels, backward, opt.step,
    gradients dropped; returns the detached loss."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def gpu_time_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() on the current CUDA device (CUDA events, after warm-up)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_time_ms(fn, rep_ms: int = 40) -> float | None:
    """Median ms of fn() replayed from a CUDA graph: the GPU time with the host's launch overhead
    gone (what torch.compile(mode="reduce-overhead") or a captured training step sees). None when
    fn cannot be captured."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    except Exception:
        return None


def interleaved_ms(fns: dict, timer, rounds: int) -> dict:
    """{name: [timer(fns[name]) of round 0, 1, ...]}: each round times every callable once, in an
    order rotated from round to round, so that none is always the one timed first or last. Back to
    back, the H100 runs power-limited and its clocks drift over a call (the same Triton GEMM
    measured 360-415 us in different rounds of one call, cuBLAS 367-396): a ratio of two medians
    taken at different times carries that drift, a ratio within one round does not."""
    out = {name: [] for name in fns}
    order = list(fns)
    for k in range(rounds):
        for name in order[k % len(order):] + order[:k % len(order)]:
            out[name].append(timer(fns[name]))
    return out


def print_against(title: str, times: dict, base: str, notes: dict | None = None) -> None:
    """Print interleaved_ms's times as one line per callable: median us, its ratio to the median of
    `base` (same rounds), the rounds' range, and notes[name] if any (e.g. a difference from float64)."""
    ref = statistics.median(times[base])
    print(title)
    for k, t in times.items():
        med = statistics.median(t)
        note = f"  {notes[k]}" if notes and k in notes else ""
        print(f"  {k:28s} {med:8.1f} us  {med / ref:6.3f}x {base}  (rounds {min(t):.1f}-{max(t):.1f}){note}")


def round_ratios(times: list, base: list) -> list | None:
    """Per-round ratios times[k] / base[k], or None if a round has no time (e.g. not capturable)."""
    if any(t is None for t in times) or any(b is None for b in base):
        return None
    return [t / b for t, b in zip(times, base)]


def load(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def available() -> list[str]:
    found = []
    for name in MODULES:
        try:
            load(name)
        except ModuleNotFoundError:
            continue
        found.append(name)
    return found


def clocks_under_load(fns: dict, seconds: float = 2.0, calls: int = 20) -> dict:
    """{name: (median SM MHz, median W, us per call)} with fns[name] replayed back to back from a CUDA
    graph of `calls` calls for `seconds`, while nvidia-smi samples the SM clock and board power every
    50 ms (the first quarter of the samples dropped: the clock settles). Back to back the H100 runs at
    its power limit, so two kernels of equal cycle counts can differ in time through the clock alone:
    this says whether a kernel's extra instructions cost cycles or clock. Empty when nvidia-smi is
    missing."""
    import shutil
    import subprocess
    import time

    import torch

    if shutil.which("nvidia-smi") is None:
        return {}
    out = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
            for _ in range(calls):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        time.sleep(0.5)  # a short rest, the same before each kernel
        smi = subprocess.Popen(["nvidia-smi", f"--id={torch.cuda.current_device()}", "--query-gpu=clocks.sm,power.draw",
                                "--format=csv,noheader,nounits", "-lms", "50"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        t0, n = time.perf_counter(), 0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        while time.perf_counter() - t0 < seconds:
            g.replay()
            n += 1
            if n % 4 == 0:
                torch.cuda.synchronize()  # the host stays near the GPU, so the samples cover the replays
        end.record()
        torch.cuda.synchronize()
        smi.terminate()
        text, _ = smi.communicate()
        samples = []
        for line in text.splitlines():
            try:
                mhz, watts = (float(v) for v in line.split(","))
                samples.append((mhz, watts))
            except ValueError:
                continue
        samples = samples[len(samples) // 4:]
        if samples:
            out[name] = (statistics.median(m for m, _ in samples), statistics.median(w for _, w in samples),
                         start.elapsed_time(end) * 1e3 / (n * calls))
    return out


def training_inputs(shape: str, dtype=None, device: str = "cuda"):
    """(x [M, K], W [N, K], A [r, K], B [N, r], dy [M, N]) for shape "MxKxNxr": random, x, A and B
    requiring grad, W, A and B scaled so the products stay O(1); bf16 unless dtype says otherwise."""
    import torch

    M, K, N, r = (int(v) for v in shape.split("x"))
    dt = dtype or torch.bfloat16
    x = torch.randn(M, K, device=device, dtype=dt, requires_grad=True)
    W = torch.randn(N, K, device=device, dtype=dt) / K**0.5
    A = (torch.randn(r, K, device=device, dtype=dt) / K**0.5).requires_grad_(True)
    B = (torch.randn(N, r, device=device, dtype=dt) / r**0.5).requires_grad_(True)
    return x, W, A, B, torch.randn(M, N, device=device, dtype=dt)
