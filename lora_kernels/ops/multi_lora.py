"""Multi-adapter LoRA: every row of a batch uses its own adapter (or none).

    y[i] = s[l] * (x[i] @ A[l, :r].T) @ B[l, :, :r].T,   l = idx[i], r = ranks[l];   y[i] = 0 where l = -1
        x [M, K] (or [..., K], one index per row of the flattened x), A [L, r_max, K], B [L, N, r_max],
        idx [M] int32/int64 in [-1, L), s [L] float, ranks [L] int in [1, r_max] or None (= r_max for all)

Backward (l = idx[i], r = ranks[l]; every adapter's gradients come from its own rows only, so an
adapter without rows gets zeros, and rows/columns past an adapter's rank get zeros):
    S[i]  = x[i] @ A[l, :r].T                            [M, r_max] fp32, kept from the forward
    G[i]  = dy[i] @ B[l, :, :r]                          [M, r_max] fp32
    dx[i] = s[l] * G[i] @ A[l, :r]                       [M, K]
    dA[l] = s[l] * sum_{i: idx[i] = l} G[i].T x[i]       [L, r_max, K]
    dB[l] = s[l] * sum_{i: idx[i] = l} dy[i].T S[i]      [L, N, r_max]
    ds[l] = sum_{i: idx[i] = l} S[i] . G[i]              (only when scales require grad)

Implementations (`multi_lora_dispatch` says which one a call gets, and why):
  cuda   the extension's CUDA kernels (csrc/), in one of two regimes chosen by `choose_regime`:
         decode (BGMV: each row reads its own adapter) or segment (SGMV: rows sorted by adapter, one
         small tensor-core GEMM per 64-row tile of one adapter). Backward always segments.
  cpu    the extension's C++ loop (one pass per row, fp32 accumulation): what CI tests.
  torch  `multi_lora_reference`, a PyTorch loop over the adapters in use: LORA_KERNELS_BACKEND=torch,
         or the fallback (with one warning saying why) when the extension cannot be built or loaded.

Index and rank values are checked before any kernel runs: an index outside [-1, L) raises IndexError,
a rank outside [1, r_max] ValueError. On CUDA that needs the values on the host, i.e. one
synchronisation. It is paid once per indices tensor, not per call: a tensor found valid is marked
with its version counter (any in-place change re-checks), so calls that reuse an indices tensor,
e.g. the layers of a model during one batch, check it once. The check is skipped where a
host read is impossible (torch.compile tracing, CUDA-graph capture) and with
LORA_KERNELS_CHECK_INDICES=0; the kernels never need it for memory safety: they treat an index
outside [0, L) as "no adapter" and clamp ranks, so a bad value can cost a LoRA term, never an
illegal memory access. (Inference-mode tensors carry no version counter: they are checked on every
eager call.)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .. import _backend, _ext

# ================================================================================================
# configs
# ================================================================================================
MAX_CUDA_RANK = 256  # r_max the CUDA kernels take (a row of S sits in shared memory in decode)
# Regime rule (forward; backward always uses segments). The segment regime sorts the rows once (one
# launch up to 8192 rows: ~6 us on an H100 at 1024 rows) and then reads each adapter once per tile;
# the decode regime needs no sort but re-reads a row's adapter for every row (from L2 when rows
# share it: 256 KB per row at r = 16, K = N = 4096). Measured on an H100 (bf16, H = 4096, CUDA
# graphs, `python -m lora_kernels bench --only multi`):
#   T64 L8 r16 zipf          decode 0.0088 ms, segment 0.0141 (0.0109 with the rows sorted before)
#   T256 L32 r16 uniform     decode 0.0236,    segment 0.0148
#   T1024 L128 r16 distinct  decode 0.0755,    segment 0.0364 (tile kernels: 0.114)
# so with the register kernels (16-bit, r_max <= 64, K % 8 == 0) the segment regime wins from 2 rows
# per adapter once the batch has 128 rows. The shared-memory tile kernels (fp32, larger ranks,
# unaligned sizes) pad each segment to 64 rows and need more rows per adapter to win: decode won
# up to 32 rows per adapter at r = 16 and segment from 16 at r = 64, i.e. ~512 / r.
SEGMENT_MIN_ROWS = 128
SEGMENT_ROWS_PER_ADAPTER_X_RANK = 512
SEGMENT_MIN_ROWS_PER_ADAPTER = 4
REGISTER_KERNELS_MIN_ROWS_PER_ADAPTER = 2
REGISTER_KERNELS_MAX_RANK = 64
REGIME_ENV = "LORA_KERNELS_MULTI_REGIME"  # auto (default) | decode | segment: force one (CUDA only)
CHECK_ENV = "LORA_KERNELS_CHECK_INDICES"  # 1 (default) | 0: skip the host-side value check
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _min_rows_per_adapter(r_max: int, register_kernels: bool = False) -> int:
    if register_kernels:
        return REGISTER_KERNELS_MIN_ROWS_PER_ADAPTER
    return max(SEGMENT_MIN_ROWS_PER_ADAPTER, SEGMENT_ROWS_PER_ADAPTER_X_RANK // max(1, r_max))


def register_kernels_apply(x: torch.Tensor, lora_A: torch.Tensor) -> bool:
    """Whether the segment forward of these tensors runs on the extension's register kernels (16-bit
    x, r_max a multiple of 8 up to 64, K a multiple of 8; the extension also needs N % 8 == 0 and
    16-byte aligned rows, else it takes the tile kernels)."""
    R, K = lora_A.shape[1], x.shape[-1]
    return (x.dtype in (torch.float16, torch.bfloat16) and R % 8 == 0 and R <= REGISTER_KERNELS_MAX_RANK
            and K % 8 == 0)


def _regime(M: int, L: int, r_max: int = 16, register_kernels: bool = False) -> str:
    """The regime choose_regime names, without building its reason (the per-call path)."""
    forced = os.environ.get(REGIME_ENV)
    if forced:
        forced = forced.strip().lower()
        if forced in ("decode", "segment"):
            return forced
        if forced != "auto":
            raise ValueError(f"{REGIME_ENV}={forced!r} is not understood; expected auto, decode or segment")
    if M < SEGMENT_MIN_ROWS or M < _min_rows_per_adapter(r_max, register_kernels) * L:
        return "decode"
    return "segment"


def choose_regime(M: int, L: int, r_max: int = 16, register_kernels: bool = True) -> tuple[str, str]:
    """(regime, reason) for the CUDA forward of M rows over L adapters of rank <= r_max;
    register_kernels: whether the segment forward would run on the register kernels (see
    `register_kernels_apply`; False for fp32 or unaligned sizes)."""
    register_kernels = register_kernels and r_max % 8 == 0 and r_max <= REGISTER_KERNELS_MAX_RANK
    regime = _regime(M, L, r_max, register_kernels)
    if os.environ.get(REGIME_ENV, "auto").strip().lower() != "auto":
        return regime, f"{REGIME_ENV}={regime}"
    if M < SEGMENT_MIN_ROWS:
        return regime, f"M = {M} < {SEGMENT_MIN_ROWS} rows: sorting costs more than re-reading adapters"
    k = _min_rows_per_adapter(r_max, register_kernels)
    per = (f"{k} rows per adapter (register kernels)" if register_kernels
           else f"512 / r = {k} rows per adapter (tile kernels)")
    if M < k * L:
        return regime, (f"M = {M} < {k} x L = {k * L}, below {per}: re-reading each row's adapter costs less "
                        "than sorting rows into segments")
    return regime, (f"M = {M} >= {SEGMENT_MIN_ROWS} and >= {k} x L ({per}): rows share adapters, each adapter "
                    "is read once per tile of its rows")


@dataclass(frozen=True)
class Dispatch:
    backend: str  # "cuda" | "cpu" (the extension) | "torch" (the PyTorch reference)
    regime: str  # "decode" | "segment" (CUDA), "loop" (CPU), "reference" (torch)
    reason: str
    fallback: bool = False  # the extension was wanted but cannot serve these tensors (warned once)


# ================================================================================================
# checks
# ================================================================================================
def _check(x, lora_A, lora_B, indices, scales, ranks, fn: str = "multi_lora") -> None:
    """Shapes, dtypes and devices (no device value is read here)."""
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("indices", indices), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ranks is not None and not isinstance(ranks, torch.Tensor):
        raise TypeError(f"{fn}: ranks must be a torch.Tensor or None, got {type(ranks).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must be [..., K], got a scalar")
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"{fn}: lora_A must be [L, r_max, K] and lora_B [L, N, r_max], got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    L, r_max, K = lora_A.shape
    if x.shape[-1] != K:
        raise ValueError(f"{fn}: x has {x.shape[-1]} features (last dim) but lora_A is [L, r_max, K] = "
                         f"{tuple(lora_A.shape)}; expected x.shape[-1] == {K}")
    if lora_B.shape[0] != L or lora_B.shape[2] != r_max:
        raise ValueError(f"{fn}: lora_B is {tuple(lora_B.shape)}, expected [L, N, r_max] with L = {L}, "
                         f"r_max = {r_max} (from lora_A)")
    if r_max < 1:
        raise ValueError(f"{fn}: r_max = lora_A.shape[1] is 0; adapters need rank >= 1")
    M = math.prod(x.shape[:-1])
    if indices.dim() != 1 or indices.shape[0] != M:
        raise ValueError(f"{fn}: indices must be 1-D with one entry per row of x ({M} rows for x of shape "
                         f"{tuple(x.shape)}), got shape {tuple(indices.shape)}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{fn}: indices must be int32 or int64, got {indices.dtype}")
    if tuple(scales.shape) != (L,):
        raise ValueError(f"{fn}: scales must be [L] = ({L},), got {tuple(scales.shape)}")
    if not scales.is_floating_point():
        raise TypeError(f"{fn}: scales must be a floating-point tensor, got {scales.dtype}")
    if ranks is not None:
        if tuple(ranks.shape) != (L,):
            raise ValueError(f"{fn}: ranks must be [L] = ({L},), got {tuple(ranks.shape)}")
        if ranks.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{fn}: ranks must be int32 or int64, got {ranks.dtype}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if lora_A.dtype != x.dtype or lora_B.dtype != x.dtype:
        raise TypeError(f"{fn}: lora_A and lora_B must have x's dtype {x.dtype}, got {lora_A.dtype} and "
                        f"{lora_B.dtype} (cast the stacked adapters once, e.g. lora_A.to(x.dtype))")
    tensors = (x, lora_A, lora_B, indices, scales) + ((ranks,) if ranks is not None else ())
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {sorted(map(str, devices))}")


_VALID_ATTR = "_lora_kernels_valid"  # set on an indices / ranks tensor once its values were checked


def _checked(t: torch.Tensor, bound: int) -> bool:
    """Whether t's values were found valid against `bound` and t has not been written since.

    In-place writes to a tensor (or to any view of its storage) bump its version counter, so a
    changed tensor is checked again; the mark lives and dies with the tensor object. Inference-mode
    tensors carry no version counter and are checked on every call.
    """
    if t.is_inference():
        return False
    return getattr(t, _VALID_ATTR, None) == (t._version, bound)


def _mark_checked(t: torch.Tensor, bound: int) -> None:
    if not t.is_inference():
        setattr(t, _VALID_ATTR, (t._version, bound))


def _check_values(indices: torch.Tensor, ranks: torch.Tensor | None, L: int, R: int, fn: str = "multi_lora") -> None:
    """IndexError / ValueError for an index outside [-1, L) or a rank outside [1, R] (see module doc)."""
    if torch.compiler.is_compiling():
        return
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if os.environ.get(CHECK_ENV, "1").strip() == "0":
        return
    check_idx = indices.numel() > 0 and not _checked(indices, L)
    check_rk = ranks is not None and ranks.numel() > 0 and not _checked(ranks, R)
    if not (check_idx or check_rk):
        return
    parts = (list(torch.aminmax(indices)) if check_idx else []) + (list(torch.aminmax(ranks)) if check_rk else [])
    vals = torch.stack([p.to(torch.int64) for p in parts]).tolist()  # one host read for both
    if check_idx:
        lo, hi = vals[0], vals[1]
        if lo < -1 or hi >= L:
            bad = ((indices < -1) | (indices >= L)).nonzero()[0, 0].item()
            raise IndexError(f"{fn}: indices must lie in [-1, {L}) (L = lora_A.shape[0] adapters; -1 = no "
                             f"adapter), got indices[{bad}] = {int(indices[bad])} (values span [{lo}, {hi}])")
        _mark_checked(indices, L)
    if check_rk:
        lo, hi = vals[-2], vals[-1]
        if lo < 1 or hi > R:
            raise ValueError(f"{fn}: ranks must lie in [1, r_max = {R}] (r_max = lora_A.shape[1]), got values "
                             f"in [{lo}, {hi}]")
        _mark_checked(ranks, R)


# ================================================================================================
# PyTorch reference (also the fallback)
# ================================================================================================
def multi_lora_reference(x, lora_A, lora_B, indices, scales, ranks=None):
    """PyTorch reference: a loop over the adapters in use (differentiable through autograd).

    Computes in x's dtype like a plain PyTorch implementation would; reads indices and ranks on the
    host (a synchronisation on CUDA).
    """
    K = x.shape[-1]
    N = lora_B.shape[1]
    x2d = x.reshape(-1, K)
    out = x2d.new_zeros((x2d.shape[0], N))
    for l in torch.unique(indices).tolist():
        if l < 0:
            continue
        r = int(ranks[l]) if ranks is not None else lora_A.shape[1]
        rows = (indices == l).nonzero().squeeze(1)
        delta = (x2d[rows] @ lora_A[l, :r].t()) @ lora_B[l, :, :r].t() * scales[l].to(x.dtype)
        out = out.index_add(0, rows, delta.to(out.dtype))
    return out.reshape(*x.shape[:-1], N)


# ================================================================================================
# extension ops: fake kernels and autograd
# ================================================================================================
_registered = False


def _fwd_fake(x, lora_A, lora_B, indices, scales, ranks, regime, save_s, perm=None, seg_start=None, tile_start=None):
    M, R, N = x.shape[0], lora_A.shape[1], lora_B.shape[1]
    return x.new_empty((M, N)), x.new_empty((M, R) if save_s else (0,), dtype=torch.float32)


def _bwd_fake(grad_out, x, lora_A, lora_B, indices, scales, ranks, s, need_dx, need_dA, need_dB, perm=None,
              seg_start=None, tile_start=None):
    return (x.new_empty(tuple(x.shape) if need_dx else (0,)),
            lora_A.new_empty(tuple(lora_A.shape) if need_dA else (0,)),
            lora_B.new_empty(tuple(lora_B.shape) if need_dB else (0,)),
            x.new_empty((x.shape[0], lora_A.shape[1]), dtype=torch.float32))


def _segments_fake(indices, L):
    return (indices.new_empty(indices.shape, dtype=torch.int64), indices.new_empty((L + 2,), dtype=torch.int32),
            indices.new_empty((L + 2,), dtype=torch.int32))


def _setup_context(ctx, inputs, output):
    x, lora_A, lora_B, indices, scales, ranks = inputs[:6]
    segments = tuple(inputs[8:11]) + (None,) * (3 - len(inputs[8:11]))  # (perm, seg_start, tile_start) or Nones
    _, S = output
    ctx.mark_non_differentiable(S)
    ctx.save_for_backward(x, lora_A, lora_B, indices, scales, ranks, S, *segments)


def _scale_grad(scales, indices, S, G):
    """ds[l] = sum over the rows of adapter l of S[i] . G[i] (S, G are 0 on rows without adapter, so
    clamping -1 to 0 adds nothing)."""
    return torch.zeros_like(scales).index_add_(0, indices.clamp(min=0).long(), (S * G).sum(1))


def _backward(ctx, dy, _dS):
    """dx, dA, dB from the extension's backward op (see the module docstring); ds from S and G."""
    x, lora_A, lora_B, indices, scales, ranks, S, *segments = ctx.saved_tensors
    need_x, need_a, need_b, _, need_s = ctx.needs_input_grad[:5]
    dx, dA, dB, G = torch.ops.lora_kernels_ext.multi_lora_bwd(
        dy, x, lora_A, lora_B, indices, scales, ranks, S, need_x, need_a, need_b, *segments)
    ds = _scale_grad(scales, indices, S, G) if need_s else None
    return (dx if need_x else None, dA if need_a else None, dB if need_b else None, None, ds) + (None,) * 6


def _ext_ops():
    """torch.ops.lora_kernels_ext with fake kernels and autograd registered, or None."""
    global _registered
    if _ext.load() is None:
        return None
    if not _registered:
        torch.library.register_fake("lora_kernels_ext::multi_lora_fwd")(_fwd_fake)
        torch.library.register_fake("lora_kernels_ext::multi_lora_bwd")(_bwd_fake)
        torch.library.register_fake("lora_kernels_ext::multi_lora_segments")(_segments_fake)
        torch.library.register_autograd("lora_kernels_ext::multi_lora_fwd", _backward, setup_context=_setup_context)
        _registered = True
    return torch.ops.lora_kernels_ext


def _route(x: torch.Tensor, lora_A: torch.Tensor) -> tuple[str, str]:
    """(backend, regime) of multi_lora_dispatch without its reasons: the per-call path (~1 us)."""
    if _backend.requested() == "torch":
        return "torch", "reference"
    kind = x.device.type
    if kind == "cpu":
        return ("cpu", "loop") if _ext_ops() is not None else ("torch", "reference")
    if kind != "cuda" or _ext_ops() is None or not _ext.has_cuda_kernels() or lora_A.shape[1] > MAX_CUDA_RANK:
        return "torch", "reference"
    return "cuda", _regime(math.prod(x.shape[:-1]), lora_A.shape[0], lora_A.shape[1], register_kernels_apply(x, lora_A))


def multi_lora_dispatch(x: torch.Tensor, lora_A: torch.Tensor) -> Dispatch:
    """Which implementation `multi_lora` runs for these tensors, and why (builds the extension on first use)."""
    backend, regime = _route(x, lora_A)
    if backend == "cuda":
        return Dispatch("cuda", regime, choose_regime(math.prod(x.shape[:-1]), lora_A.shape[0], lora_A.shape[1],
                                                      register_kernels_apply(x, lora_A))[1])
    if backend == "cpu":
        return Dispatch("cpu", "loop", "CPU tensors: the extension's C++ implementation")
    if _backend.requested() == "torch":
        return Dispatch("torch", "reference", f"{_backend.BACKEND_ENV}=torch")
    kind = x.device.type
    if kind not in ("cpu", "cuda"):
        return Dispatch("torch", "reference", f"{kind} tensors: the extension has CPU and CUDA kernels only")
    if _ext_ops() is None:
        return Dispatch("torch", "reference", f"the multi-adapter extension is unavailable ({_ext.error()})", True)
    if not _ext.has_cuda_kernels():
        return Dispatch("torch", "reference", f"the extension was built without CUDA ({_ext.cpu_only_reason()})",
                        True)
    return Dispatch("torch", "reference", f"r_max = {lora_A.shape[1]} > {MAX_CUDA_RANK}, the largest the CUDA "
                                          "kernels take", True)


# ================================================================================================
# functional API
# ================================================================================================
def _autocast(x, *others):
    dt = torch.get_autocast_dtype(x.device.type)
    return tuple(None if t is None else t.to(dt) for t in (x,) + others)


def multi_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, indices: "torch.Tensor | RowIndex",
               scales: torch.Tensor, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """The LoRA term alone, each row with its own adapter: see the module docstring. -> [..., N]

    x [..., K] (float16, bfloat16 or float32), lora_A [L, r_max, K] and lora_B [L, N, r_max] in x's
    dtype, indices [M] int32/int64 with M = x.numel() / K, one adapter per row of the flattened x
    (-1: none), scales [L] (any float dtype; computed in fp32), ranks [L] int or None. Gradients flow to
    x, lora_A, lora_B and scales. Under torch.autocast, x and the adapters are cast to the autocast dtype.

    indices may be a `RowIndex(indices)`: calls that pass the same RowIndex (every layer of one decode
    step or batch) share one sort of the rows by adapter and one value check, instead of each call
    sorting (a few microseconds per call on an H100, ~10% of a T = 1024 decode call).
    """
    rows = indices if isinstance(indices, RowIndex) else None
    if rows is not None:
        indices = rows.indices
    _check(x, lora_A, lora_B, indices, scales, ranks)
    if torch.is_autocast_enabled(x.device.type):
        x, lora_A, lora_B = _autocast(x, lora_A, lora_B)
        with torch.autocast(x.device.type, enabled=False):
            return multi_lora(x, lora_A, lora_B, rows if rows is not None else indices, scales, ranks)
    L, R, K = lora_A.shape
    _check_values(indices, ranks, L, R)
    backend, regime = _route(x, lora_A)
    if backend == "torch":
        d = multi_lora_dispatch(x, lora_A)
        if d.fallback:
            _ext.warn_once(d.reason, f"lora_kernels.multi_lora: using the PyTorch path: {d.reason}")
        return multi_lora_reference(x, lora_A, lora_B, indices, scales, ranks)
    x2d = x.reshape(-1, K) if x.dim() != 2 else x
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                              or scales.requires_grad)
    args = (x2d, lora_A, lora_B, indices, scales.to(torch.float32), ranks,
            regime if backend == "cuda" else "segment", needs_grad)
    if rows is not None and (regime == "segment" or needs_grad):  # backward always works on segments
        segments = rows.segments(L)
        if segments[0] is not None:
            args = args + segments
    fwd = _ext_ops().multi_lora_fwd
    if needs_grad or torch.compiler.is_compiling():
        y, _ = fwd(*args)
    else:  # no graph to record: skip the Python autograd kernel (~15 us a call)
        with torch._C._AutoDispatchBelowAutograd():
            y, _ = fwd(*args)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], lora_B.shape[1])


class RowIndex:
    """An indices tensor [M] with its segments (CUDA: rows sorted by adapter, what the segment regime
    and every backward work on), sorted on first need and then kept.

    One RowIndex serves every call on the same rows, e.g. the layers of a model during one
    adapter_batch, forward and backward: one sort per batch instead of two per layer. Its value check
    (see the module docstring) is also paid once, since the indices tensor is the same object.
    Public as `lora_kernels.RowIndex`: `multi_lora(x, A, B, RowIndex(indices), scales)`. Writing into
    the indices tensor in place is seen (its version counter) and sorts again on the next call.
    """

    __slots__ = ("indices", "_segments")

    def __init__(self, indices: torch.Tensor):
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"RowIndex: indices must be a torch.Tensor, got {type(indices).__name__}")
        self.indices = indices
        self._segments: dict[int, tuple] = {}  # L -> (indices' version when sorted, segments)

    def __repr__(self) -> str:
        return f"RowIndex({self.indices.shape[0] if self.indices.dim() == 1 else tuple(self.indices.shape)} rows)"

    def segments(self, L: int) -> tuple:
        """(perm, seg_start, tile_start) over L adapters (lora_A.shape[0]) for the extension's CUDA
        ops, or three Nones where there is nothing to keep (CPU, tracing): the op then sorts itself."""
        if not self.indices.is_cuda or torch.compiler.is_compiling():
            return (None, None, None)
        version = self.indices._version
        hit = self._segments.get(L)
        if hit is None or hit[0] != version:
            with torch._C._AutoDispatchBelowAutograd():
                hit = self._segments[L] = (version, torch.ops.lora_kernels_ext.multi_lora_segments(self.indices, L))
        return hit[1]


class _MultiLinear(torch.autograd.Function):
    """y = x @ W.T + b + multi_lora(x, ...) on the extension, as one autograd node.

        forward:  y  = T.addmm_(x, W.T) (+ b)          T = the LoRA term [M, N], cuBLAS's C operand
        backward: dx = dX_lora.addmm_(dy, W)           dX_lora [M, K] from the extension's backward
                  dW = dy.T @ x, db = sum_i dy[i]      (only when W / b require grad)
    so neither the LoRA term nor its share of dx costs a separate pass over y or dx: autograd would
    otherwise add the two branches' dx in an extra elementwise kernel, and an out-of-place addmm
    copies its C operand into the result before the GEMM (measured in the patched 4-layer Llama's
    training step: 2.1 ms of device-to-device copies). Segments come from `rows`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, indices, scales, ranks, regime, rows):
        need = ctx.needs_input_grad
        save_s = need[3] or need[4] or need[6]  # dB and ds need S = x @ A_l.T
        seg = rows.segments(lora_A.shape[0]) if regime == "segment" else (None, None, None)
        with torch._C._AutoDispatchBelowAutograd():
            term, S = torch.ops.lora_kernels_ext.multi_lora_fwd(x, lora_A, lora_B, indices, scales, ranks, regime,
                                                               save_s, *seg)
            y = term.addmm_(x, weight.t())  # in place: out-of-place addmm would first copy C into y
            if bias is not None:
                y.add_(bias)
        ctx.rows = rows
        ctx.save_for_backward(x, weight, lora_A, lora_B, indices, scales, ranks, S)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, indices, scales, ranks, S = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, _, need_s = ctx.needs_input_grad[:7]
        dx = dW = db = dA = dB = ds = None
        with torch._C._AutoDispatchBelowAutograd():
            if need_x or need_a or need_bb or need_s:
                dxl, dA, dB, G = torch.ops.lora_kernels_ext.multi_lora_bwd(
                    dy, x, lora_A, lora_B, indices, scales, ranks, S, need_x, need_a, need_bb,
                    *ctx.rows.segments(lora_A.shape[0]))
                if need_x:
                    dx = dxl.addmm_(dy, weight)
                ds = _scale_grad(scales, indices, S, G) if need_s else None
            if need_w:
                dW = dy.t() @ x
            if need_b:
                db = dy.sum(0)
        return (dx, dW, db, dA if need_a else None, dB if need_bb else None, None, ds, None, None, None)


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      indices: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                      ranks: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias + multi_lora(x, ...): the base linear with each row's adapter. -> [..., N]

    weight [N, K] and bias [N] (or None) in x's dtype. The base GEMM is one cuBLAS addmm that adds the
    LoRA term as its C operand (beta = 1), so the term costs no extra pass over y; in backward the
    LoRA share of dx is likewise the C operand of dy @ W. Gradients flow to x, weight and bias (when
    they require grad), lora_A, lora_B and scales.
    """
    return multi_lora_linear_rows(x, weight, lora_A, lora_B, RowIndex(indices), scales, bias, ranks)


def multi_lora_linear_rows(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           rows: RowIndex, scales: torch.Tensor, bias: torch.Tensor | None = None,
                           ranks: torch.Tensor | None = None) -> torch.Tensor:
    """multi_lora_linear with the indices given as a RowIndex, whose sort is shared by every call that
    passes the same one (adapter_batch passes one per batch to every layer)."""
    indices = rows.indices
    for name, t in (("weight", weight),) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"multi_lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    _check(x, lora_A, lora_B, indices, scales, ranks, fn="multi_lora_linear")
    N = lora_B.shape[1]
    if weight.dim() != 2 or tuple(weight.shape) != (N, x.shape[-1]):
        raise ValueError(f"multi_lora_linear: weight must be [N, K] = ({N}, {x.shape[-1]}) (N = lora_B.shape[1]), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"multi_lora_linear: bias must be [N] = ({N},), got {tuple(bias.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
        with torch.autocast(x.device.type, enabled=False):
            return multi_lora_linear_rows(x, weight, lora_A, lora_B, rows, scales, bias, ranks)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"multi_lora_linear: weight and bias must have x's dtype {x.dtype}, got {weight.dtype}"
                        f"{'' if bias is None else ' and ' + str(bias.dtype)}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    backend, regime = _route(x, lora_A)
    if backend == "torch" or torch.compiler.is_compiling():  # traced: the registered ops, autograd by op
        y = torch.addmm(multi_lora(x2d, lora_A, lora_B, indices, scales, ranks), x2d, weight.t())
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, N)
    L, R, _ = lora_A.shape
    _check_values(indices, ranks, L, R, fn="multi_lora_linear")
    y = _MultiLinear.apply(x2d, weight, bias, lora_A, lora_B, indices, scales.to(torch.float32), ranks,
                           regime if backend == "cuda" else "segment", rows)
    return y.reshape(*lead, N)
