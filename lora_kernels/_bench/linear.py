"""Fused LoRA linear vs naive PyTorch vs PEFT's lora.Linear, as ratios to the frozen base F.linear.

Every case times, in one run on one GPU (bf16, scale = alpha / r = 2, no bias):
    base   F.linear(x, W)                                        (W frozen)
    fused  lora_kernels.lora_linear(x, W, A, B, 2, None, p)
    naive  F.linear(x, W) + 2 * F.linear(F.linear(F.dropout(x, p), A), B)
    peft   peft.tuners.lora.Linear(nn.Linear(K, N), r, alpha = 2 r, lora_dropout = p), bf16 adapters
"fwd" is a training forward (x, A, B require grad); "fwd+bwd" adds torch.autograd.grad of
(x, A, B) for a fixed dy (no .grad accumulation kernels). Times are medians of CUDA-event timings
(triton.testing.do_bench): eager, what a Python caller sees, host launch overhead included; and,
in the note, the same callable replayed from a CUDA graph (the GPU time alone). Each is measured
in ROUNDS interleaved rounds (every implementation once per round, the order rotated; see
`interleaved_ms`): a row's time is the median over the rounds, its ratio the median of the ratios
to the base taken within each round, and the note gives the rounds' range. "kept" is the memory
one training forward leaves allocated (output + what autograd saved), the quantity the issue bounds
by base + M * r * 4 bytes.
Decode rows time inference (torch.no_grad, p = 0) at small M, in 5 interleaved rounds (see time_decode).
"""
from __future__ import annotations

import itertools
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lora_kernels as lk

from . import Row, gpu_time_ms, graph_time_ms, interleaved_ms, round_ratios

GRID_P = (0.0, 0.05, 0.1)
GRID_M = (2048, 8192, 16384)
GRID_KN = ((4096, 4096), (4096, 14336), (14336, 4096), (2048, 512), (5120, 5120), (8192, 8192))
GRID_R = (16, 64, 128)
QUICK = [  # (M, K, N, r, p): the headline targets first
    (8192, 4096, 4096, 16, 0.05),
    (8192, 4096, 4096, 16, 0.0),
    (8192, 2048, 512, 16, 0.05),
    (8192, 1024, 1024, 16, 0.05),
    (2048, 4096, 4096, 16, 0.05),
    (8192, 4096, 4096, 128, 0.05),
    (8192, 4096, 14336, 16, 0.05),
    (8192, 14336, 4096, 16, 0.05),
]
DECODE = [(1, 4096, 4096, 16), (16, 4096, 4096, 16), (64, 4096, 4096, 16), (256, 4096, 4096, 64)]
IMPLS = ("fused", "naive", "peft")
ROUNDS = 3  # interleaved timing rounds per case and mode (see time_case)


@dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    r: int
    p: float
    dtype: torch.dtype = torch.bfloat16

    @property
    def name(self) -> str:
        return f"{self.M}x{self.K}->{self.N} r{self.r} p{self.p:g}"


def _peft_layer(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, r: int, p: float):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    N, K = W.shape
    base = torch.nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
    base.weight = torch.nn.Parameter(W, requires_grad=False)
    layer = PeftLinear(base, "default", config=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p),
                       r=r, lora_alpha=2 * r)
    layer.lora_A["default"].weight = torch.nn.Parameter(A.detach().clone())
    layer.lora_B["default"].weight = torch.nn.Parameter(B.detach().clone())
    return layer


def build(case: Case, device: str = "cuda", impls=("base",) + IMPLS):
    """x, dy and {impl: (forward(x) -> y, trainable tensors)} on fresh random data."""
    M, K, N, r, p, dt = case.M, case.K, case.N, case.r, case.p, case.dtype
    x = torch.randn(M, K, device=device, dtype=dt)
    W = torch.randn(N, K, device=device, dtype=dt) / K**0.5
    A = (torch.randn(r, K, device=device, dtype=dt) / K**0.5).requires_grad_(True)
    B = (torch.randn(N, r, device=device, dtype=dt) / r**0.5).requires_grad_(True)
    dy = torch.randn(M, N, device=device, dtype=dt)
    s = 2.0
    out = {}
    if "base" in impls:
        out["base"] = (lambda x: F.linear(x, W), [])
    if "fused" in impls:
        out["fused"] = (lambda x: lk.lora_linear(x, W, A, B, s, None, p), [A, B])
    if "naive" in impls:
        out["naive"] = (lambda x: F.linear(x, W) + s * F.linear(F.linear(F.dropout(x, p), A), B), [A, B])
    if "peft" in impls:
        layer = _peft_layer(W, A, B, r, p).train()
        out["peft"] = (layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight])
    return x, dy, out


def step_fn(fwd, params, x, dy, mode: str):
    """The callable to time: a training forward, or forward + grads of (x, params)."""
    xg = x.detach().requires_grad_(True)
    if mode == "fwd":
        return lambda: fwd(xg)
    if mode == "infer":
        def infer():
            with torch.no_grad():
                return fwd(x)
        return infer
    inputs = [xg] + list(params)
    return lambda: torch.autograd.grad(fwd(xg), inputs, dy)


def memory_kept(fwd, x) -> int:
    """Bytes a training forward leaves allocated (its output and what autograd saved)."""
    xg = x.detach().requires_grad_(True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = fwd(xg)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    del y
    return kept


def time_case(case: Case, modes=("fwd", "fwd+bwd"), impls=IMPLS, warmup_ms=10, rep_ms=40,
              with_memory=True, graphs=True, rounds: int = ROUNDS, graph_impls=None,
              graph_rep_ms: int = 40) -> list[Row]:
    """Rows of one case: eager (and graph) times of base and each impl, ratios within rounds.
    graph_impls: the impls also timed from a CUDA graph (default: all of them)."""
    x, dy, fns = build(case, impls=("base",) + tuple(impls))
    rows = []
    for mode in modes:
        calls = {impl: step_fn(*fns[impl], x, dy, mode) for impl in ("base",) + tuple(impls)}
        eager = interleaved_ms(calls, lambda fn: gpu_time_ms(fn, warmup_ms, rep_ms), rounds)
        graph = {}
        if graphs:
            in_graph = {k: v for k, v in calls.items() if k == "base" or graph_impls is None or k in graph_impls}
            graph = interleaved_ms(in_graph, lambda fn: graph_time_ms(fn, graph_rep_ms), rounds)
        for impl in calls:
            q = round_ratios(eager[impl], eager["base"])
            g = graph.get(impl)
            gq = round_ratios(g, graph["base"]) if g else None
            g_ms = statistics.median(g) if gq else None
            g_ratio = statistics.median(gq) if gq else None
            note = ""
            if gq:
                note = f"graph {g_ms:.4f} ms" + (f" ({g_ratio:.3f}x, rounds {min(gq):.3f}-{max(gq):.3f})"
                                                 if impl != "base" else "")
            if impl != "base":
                note += f"{'; ' if note else ''}eager rounds {min(q):.2f}-{max(q):.2f}"
            rows.append(Row("linear", f"{case.name} {'decode' if mode == 'infer' else mode}", impl,
                            statistics.median(eager[impl]),
                            statistics.median(q), note,
                            {"graph_ms": g_ms, "graph_ratio": g_ratio, "rounds_ms": eager[impl], "round_ratios": q,
                             "graph_rounds_ms": g, "graph_round_ratios": gq}))
    if with_memory and "fwd" in modes:
        base_kept = memory_kept(fns["base"][0], x)
        bound = base_kept + case.M * case.r * 4
        for impl in ("base",) + tuple(impls):
            kept = memory_kept(fns[impl][0], x)
            rows.append(Row("linear", f"{case.name} kept", impl, None, kept / base_kept,
                            note=f"{kept / 2**20:.1f} MiB (bound base+M*r*4 = {bound / 2**20:.1f} MiB)",
                            extra={"kept_bytes": kept, "bound_bytes": bound}))
    del x, dy, fns
    torch.cuda.empty_cache()
    return rows


def time_decode(M, K, N, r, rounds: int = 5) -> list[Row]:
    """Decode rows: inference (torch.no_grad, p = 0) of base, fused and naive, timed like the other
    cases in interleaved rounds (more of them: an eager call of a few rows is host-bound, and one
    timing of it moved by up to 2x between calls, e.g. naive 0.082-0.136 ms at 1 x 4096 -> 4096)."""
    return time_case(Case(M, K, N, r, 0.0), modes=("infer",), impls=("fused", "naive"), with_memory=False,
                     rounds=rounds)


def full_grid():
    for M, (K, N), r, p in itertools.product(GRID_M, GRID_KN, GRID_R, GRID_P):
        yield Case(M, K, N, r, p)


def _cpu_probe() -> list[Row]:
    """No GPU: check the fused op against float64 on a small case and say what was not measured."""
    x = torch.randn(33, 40, dtype=torch.float64).float()
    W, A, B = torch.randn(24, 40) / 7, torch.randn(4, 40) / 7, torch.randn(24, 4)
    y = lk.lora_linear(x, W, A, B, 2.0)
    ref = x.double() @ W.double().t() + 2 * (x.double() @ A.double().t()) @ B.double().t()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    backend, why = lk.dispatch_reason(x, A)
    return [Row("linear", "33x40->24 r4 (cpu probe)", "fused", None, None,
                note=f"not timed (no CUDA); backend={backend} ({why}); rel err vs float64 {err:.1e}")]


def shard_cases(cases: list, shard: tuple[int, int] | None) -> list:
    """Cases i-1, i-1+n, ... of shard (i, n): interleaved, so each shard mixes small and large shapes."""
    if shard is None:
        return cases
    i, n = shard
    if not 1 <= i <= n:
        raise ValueError(f"shard must be I/N with 1 <= I <= N, got {i}/{n}")
    return cases[i - 1::n]


def match_cases(cases: list, pattern: str) -> list:
    """The cases whose name the regular expression `pattern` finds (re.search); all for ""."""
    if not pattern:
        return cases
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"match must be a regular expression, got {pattern!r}: {e}") from None
    return [c for c in cases if rx.search(c.name)]


def run(quick: bool = False, shard: tuple[int, int] | None = None, graphs: bool | None = None,
        on_rows=None, match: str = "") -> list[Row]:
    """The report's rows. quick: the QUICK set, else the issue's whole grid (162 cases); shard
    (i, n): every n-th case from the i-th (decode rows only in shard 1); graphs: also time from CUDA
    graphs (default: the quick set only; in the grid base, fused and naive, at a shorter repetition,
    as the graph timings would otherwise double its run time); match: a regular expression, only
    the cases whose name it finds (re.search, e.g. "^2048x.* r64 "; no decode rows then);
    on_rows(rows) after each case."""
    if not torch.cuda.is_available():
        rows = _cpu_probe()
        if on_rows:
            on_rows(rows)
        return rows
    from ..ops import replay

    replay.enable(build=True)  # eager calls replayed from C++, as a user with the extension built gets them
    graphs = quick if graphs is None else graphs
    rows = []
    cases = shard_cases([Case(*c) for c in QUICK] if quick else list(full_grid()), shard)
    n_cases = len(cases)
    cases = match_cases(cases, match)
    if match and not cases:
        print(f"[linear] --match {match!r} matched none of the {n_cases} case names (e.g. {Case(*QUICK[0]).name!r})",
              file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        case_rows = time_case(case, with_memory=case.p > 0 or quick, graphs=graphs,
                              graph_impls=None if quick else ("fused", "naive"), graph_rep_ms=40 if quick else 20)
        rows.extend(case_rows)
        if on_rows:
            on_rows(case_rows)
        print(f"[linear] {i}/{len(cases)} {case.name}: {time.perf_counter() - t0:.1f} s "
              f"({time.perf_counter() - t_start:.0f} s in all)", file=sys.stderr, flush=True)
    for d in DECODE[: 2 if quick else None] if (shard is None or shard[0] == 1) and not match else ():
        case_rows = time_decode(*d)
        rows.extend(case_rows)
        if on_rows:
            on_rows(case_rows)
    return rows


def versus_naive(rows: list[Row]) -> dict:
    """Where fused is slower than naive PyTorch in this report's rows: {"eager"|"graph": (slower
    cases as (case, fused ratio, naive ratio), cases compared)}, ratios the medians of the rounds."""
    by_case: dict = {}
    for r in rows:
        if r.bench == "linear" and r.impl in ("fused", "naive") and r.ms is not None:
            by_case.setdefault(r.case, {})[r.impl] = r
    out = {"eager": ([], 0), "graph": ([], 0)}
    for case, d in by_case.items():
        if len(d) < 2:
            continue
        f, n = d["fused"], d["naive"]
        for mode, fq, nq in (("eager", f.ratio, n.ratio),
                             ("graph", f.extra.get("graph_ratio"), n.extra.get("graph_ratio"))):
            if fq is None or nq is None:
                continue
            slower, count = out[mode]
            if fq > nq:
                slower.append((case, fq, nq))
            out[mode] = (slower, count + 1)
    return out
