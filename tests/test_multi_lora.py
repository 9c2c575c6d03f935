"""Multi-adapter LoRA: the extension (C++ on CPU, CUDA kernels on GPU) against a float64 loop.

    y[i] = s[l] * (x[i] @ A[l, :r].T) @ B[l, :, :r].T,  l = idx[i] (-1: none)     x [M, K], A [L, R, K], B [L, N, R]

CPU (CI): the C++ implementation and the bindings (schemas, fake kernels, autograd, opcheck,
torch.compile), the reference, every adapter popularity, mixed ranks, -1 rows, M = 0, bad input.
GPU (`-m gpu`): the CUDA kernels in both regimes at hidden sizes 2049 / 4096 / 11008, bf16/fp16/fp32,
backward, CUDA graphs, torch.compile with inductor, and a small case for compute-sanitizer.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import lora_kernels
from lora_kernels import _ext
from lora_kernels._bench.multi import POPULARITIES, adapter_indices, make_adapters
from lora_kernels.ops import multi_lora as ml

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

BATCH_SIZES = (1, 2, 3, 4, 7, 10, 16, 32, 64, 133)
RANKS = (1, 4, 8, 16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ||out - ref|| / ||ref|| against float64, forward and backward. fp32: fp32 accumulation over K <= 11008
# (~1e-6); 16-bit: one or two roundings of the output and of S (bf16 2^-8 = 3.9e-3 per element, about
# 2.3e-3 in norm). Low precision must also stay within 2x the error of the naive computation in that dtype.
FWD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BWD_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(scope="module", autouse=True)
def ext():
    """Build (or load the cached) extension once for this module: every test below runs on it."""
    lib = _ext.load()
    assert lib is not None, f"the multi-adapter extension failed to build: {_ext.error()}\n{_ext._state.get('detail')}"
    assert ml._ext_ops() is not None
    return lib


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv(ml.REGIME_ENV, raising=False)
    monkeypatch.delenv(ml.CHECK_ENV, raising=False)


# ================================================================================================
# helpers
# ================================================================================================
def ref64(x, A, B, idx, scales, ranks=None):
    """float64 loop over adapters, independent of the code under test; differentiable."""
    K, N = x.shape[-1], B.shape[1]
    x64 = x.reshape(-1, K).double()
    out = torch.zeros(x64.shape[0], N, dtype=torch.float64, device=x.device)
    idx = idx.cpu()
    for l in range(A.shape[0]):
        rows = (idx == l).nonzero().squeeze(1).to(x.device)
        if rows.numel() == 0:
            continue
        r = A.shape[1] if ranks is None else int(ranks[l])
        h = x64[rows] @ A[l, :r].double().t()
        out = out.index_add(0, rows, scales[l].double() * (h @ B[l, :, :r].double().t()))
    return out.reshape(*x.shape[:-1], N)


def rel_err(out, ref):
    ref = ref.detach().double()
    den = ref.norm()
    num = (out.detach().double() - ref).norm()
    return float(num / den) if den > 0 else float(num)


def case(M, K, N, L, r, dtype, popularity="uniform", none_frac=0.0, seed=0, device=DEVICE, ranks=None,
         requires_grad=False):
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    A, B, s = make_adapters(L, r, K, N, dtype=dtype, device=device, seed=seed)
    idx = adapter_indices(M, L, popularity, none_frac, seed=seed, device=device)
    if requires_grad:
        for t in (x, A, B):
            t.requires_grad_(True)
    return x, A, B, idx, s, ranks


def check_forward(x, A, B, idx, s, ranks=None, naive_factor=2.0):
    out = lora_kernels.multi_lora(x, A, B, idx, s, ranks)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], B.shape[1])
    ref = ref64(x, A, B, idx, s, ranks)
    err = rel_err(out, ref)
    assert err <= FWD_TOL[x.dtype], f"relative error {err:.3g} > {FWD_TOL[x.dtype]} ({x.dtype})"
    if x.dtype != torch.float32 and ref.norm() > 0:
        naive = rel_err(lora_kernels.multi_lora_reference(x, A, B, idx, s, ranks), ref)
        assert err <= naive_factor * naive + 1e-6, f"error {err:.3g} > {naive_factor} x naive {naive:.3g}"
    none = idx < 0
    if none.any():
        assert (out.reshape(-1, B.shape[1])[none] == 0).all(), "rows without adapter must get exactly 0"
    return out


def grads_of(fn, x, A, B, s, dy):
    for t in (x, A, B, s):
        t.grad = None
    fn().backward(dy)
    return x.grad, A.grad, B.grad, s.grad


def check_backward(x, A, B, idx, s, ranks=None):
    """Gradients of x, A, B and scales against float64 autograd through ref64."""
    s = s.clone().requires_grad_(True)
    dy = torch.randn(*x.shape[:-1], B.shape[1], device=x.device, dtype=x.dtype)
    got = grads_of(lambda: lora_kernels.multi_lora(x, A, B, idx, s, ranks), x, A, B, s, dy)
    x64, A64, B64, s64 = (t.detach().double().requires_grad_(True) for t in (x, A, B, s))
    want = grads_of(lambda: ref64(x64, A64, B64, idx, s64, ranks), x64, A64, B64, s64, dy.double())
    tol = BWD_TOL[x.dtype]
    for name, g, w in zip(("dx", "dA", "dB", "ds"), got, want):
        assert g is not None and g.shape == w.shape, name
        err = rel_err(g, w)
        assert err <= (tol if name != "ds" else 10 * tol), f"{name}: relative error {err:.3g} > {tol} ({x.dtype})"
    L = A.shape[0]
    used = set(idx[idx >= 0].tolist())
    for l in range(L):  # each adapter only from its own rows; past its rank nothing
        r = A.shape[1] if ranks is None else int(ranks[l])
        if l not in used:
            assert (got[1][l] == 0).all() and (got[2][l] == 0).all(), f"adapter {l} has no rows but a gradient"
        assert (got[1][l, r:] == 0).all() and (got[2][l, :, r:] == 0).all(), f"adapter {l}: gradient past rank {r}"
    return got


# ================================================================================================
# CPU (and GPU when present): the extension on x's device
# ================================================================================================
@pytest.mark.parametrize("M", BATCH_SIZES)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("none_frac", [0.0, 0.3])
def test_forward_batch_sizes_and_popularity(M, popularity, none_frac):
    x, A, B, idx, s, _ = case(M, 72, 40, 6, 8, torch.float32, popularity, none_frac, seed=M)
    check_forward(x, A, B, idx, s)


@pytest.mark.parametrize("r", RANKS + (256,))
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_ranks(r, dtype):
    x, A, B, idx, s, _ = case(10, 64, 48, 3, r, dtype, "uniform", 0.2, seed=r)
    check_forward(x, A, B, idx, s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3])
def test_forward_hidden_2049(dtype, M):
    x, A, B, idx, s, _ = case(M, 2049, 2049, 2, 16, dtype, "distinct", seed=M)
    check_forward(x, A, B, idx, s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_ranks_ignore_what_lies_past_the_rank(dtype):
    """Adapters of ranks 1..16 in one batch; A rows / B columns past a rank hold NaN and must not leak."""
    L, R, K, N, M = 5, 16, 40, 24, 33
    x, A, B, idx, s, _ = case(M, K, N, L, R, dtype, "uniform", 0.2, seed=3)
    ranks = torch.tensor([1, 4, 16, 7, 9], device=x.device)
    with torch.no_grad():
        for l, r in enumerate(ranks.tolist()):
            A[l, r:] = float("nan")
            B[l, :, r:] = float("nan")
    out = check_forward(x, A, B, idx, s, ranks)
    assert torch.isfinite(out).all()
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    check_backward(x, A, B, idx, s, ranks)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_backward(dtype, popularity):
    # adapter 5 of 6 gets no rows under most patterns: its gradient must be exactly 0
    x, A, B, idx, s, _ = case(37, 40, 24, 6, 8, dtype, popularity, 0.25, seed=7, requires_grad=True)
    idx = torch.where(idx == 5, torch.full_like(idx, 4), idx)
    check_backward(x, A, B, idx, s)


def test_backward_only_some_inputs_require_grad():
    x, A, B, idx, s, _ = case(9, 24, 16, 3, 4, torch.float32, "uniform", seed=2)
    A.requires_grad_(True)
    lora_kernels.multi_lora(x, A, B, idx, s).sum().backward()
    assert A.grad is not None and x.grad is None and B.grad is None
    x.requires_grad_(True)
    A.grad = None
    A.requires_grad_(False)
    lora_kernels.multi_lora(x, A, B, idx, s).sum().backward()
    assert x.grad is not None and A.grad is None


def test_empty_batch_and_no_adapters():
    x, A, B, _, s, _ = case(0, 32, 16, 3, 4, torch.float32, requires_grad=True)
    idx = torch.zeros(0, dtype=torch.int64, device=x.device)
    out = lora_kernels.multi_lora(x, A, B, idx, s)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert (A.grad == 0).all() and (B.grad == 0).all() and x.grad.shape == (0, 32)
    # L = 0 adapters: every row must be -1
    x = torch.randn(4, 32, device=DEVICE)
    A0, B0 = torch.zeros(0, 4, 32, device=DEVICE), torch.zeros(0, 16, 4, device=DEVICE)
    out = lora_kernels.multi_lora(x, A0, B0, torch.full((4,), -1, device=DEVICE), torch.zeros(0, device=DEVICE))
    assert out.shape == (4, 16) and (out == 0).all()
    # every row without adapter
    x, A, B, _, s, _ = case(5, 32, 16, 3, 4, torch.float32)
    out = lora_kernels.multi_lora(x, A, B, torch.full((5,), -1, device=DEVICE), s)
    assert (out == 0).all()


def test_leading_dims_and_non_contiguous_x():
    x, A, B, idx, s, _ = case(12, 48, 20, 4, 8, torch.float32, "zipf", 0.2)
    want = check_forward(x, A, B, idx, s)
    out = lora_kernels.multi_lora(x.reshape(3, 4, 48), A, B, idx, s)
    assert out.shape == (3, 4, 20) and torch.equal(out.reshape(12, 20), want)
    wide = torch.zeros(12, 96, device=x.device)
    wide[:, ::2] = x  # column stride 2
    assert torch.equal(lora_kernels.multi_lora(wide[:, ::2], A, B, idx, s), want)
    assert torch.equal(lora_kernels.multi_lora(x.t().contiguous().t(), A, B, idx, s), want)
    idx32 = idx.to(torch.int32)
    assert torch.equal(lora_kernels.multi_lora(x, A, B, idx32, s, torch.full((4,), 8, dtype=torch.int32,
                                                                               device=x.device)), want)


def check_linear(x, W, b, A, B, idx, s, ranks=None):
    """multi_lora_linear, forward and the gradients of x, W, b, A, B and scales, against float64."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, W, b, A, B, s)]
    y = lora_kernels.multi_lora_linear(leaves[0], leaves[1], leaves[3], leaves[4], idx, leaves[5], bias=leaves[2],
                                       ranks=ranks)
    dy = torch.randn_like(y)
    y.backward(dy)
    l64 = [t.detach().double().requires_grad_(True) for t in (x, W, b, A, B, s)]
    ref = torch.nn.functional.linear(l64[0], l64[1], l64[2]) + ref64(l64[0], l64[3], l64[4], idx, l64[5], ranks)
    ref.backward(dy.double())
    tol = BWD_TOL[x.dtype]
    assert y.shape == ref.shape and rel_err(y, ref) <= FWD_TOL[x.dtype]
    for name, got, want in zip(("dx", "dW", "db", "dA", "dB", "ds"), leaves, l64):
        err = rel_err(got.grad, want.grad)
        assert err <= (tol if name != "ds" else 10 * tol), f"{name}: relative error {err:.3g} > {tol} ({x.dtype})"


@pytest.mark.parametrize("with_ranks", [False, True])
def test_multi_lora_linear_forward_and_every_gradient(with_ranks):
    x, A, B, idx, s, _ = case(10, 32, 24, 3, 4, torch.float32, "uniform", 0.3)
    g = torch.Generator().manual_seed(7)
    W = torch.randn(24, 32, generator=g).to(DEVICE)
    b = torch.randn(24, generator=g).to(DEVICE)
    ranks = torch.tensor([4, 1, 3], device=DEVICE) if with_ranks else None
    check_linear(x.reshape(2, 5, 32), W, b, A, B, idx, s, ranks)
    with pytest.raises(ValueError, match="weight must be"):
        lora_kernels.multi_lora_linear(x, W.t(), A, B, idx, s)
    with pytest.raises(ValueError, match="bias must be"):
        lora_kernels.multi_lora_linear(x, W, A, B, idx, s, bias=b[:3])


def test_row_index_gives_the_plain_results_and_checks_its_input():
    x, A, B, idx, s, _ = case(37, 24, 40, 3, 4, torch.float32, "zipf", 0.2, requires_grad=True)
    dy = torch.randn(37, 40, device=x.device)
    rows = lora_kernels.RowIndex(idx)
    plain = grads_of(lambda: lora_kernels.multi_lora(x, A, B, idx, s), x, A, B, s, dy)
    shared = grads_of(lambda: lora_kernels.multi_lora(x, A, B, rows, s), x, A, B, s, dy)
    for a, b in zip(plain, shared):
        assert (a is None and b is None) or torch.equal(a, b)
    assert "37 rows" in repr(rows)
    with pytest.raises(TypeError, match="RowIndex: indices must be a torch.Tensor"):
        lora_kernels.RowIndex([0, 1])
    with pytest.raises(ValueError, match="indices must be 1-D with one entry per row"):
        lora_kernels.multi_lora(x, A, B, lora_kernels.RowIndex(idx[:5]), s)


def test_segment_arguments_are_checked():
    """The ops' optional precomputed segments (internal; see csrc/multi_lora.cpp) come as three or none,
    with their shapes and dtypes checked."""
    x, A, B, idx, s, _ = case(6, 16, 8, 3, 4, torch.float32)
    fwd = torch.ops.lora_kernels_ext.multi_lora_fwd
    perm = torch.arange(6, device=DEVICE)
    starts = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="come together"):
        fwd(x, A, B, idx, s, None, "segment", False, perm)
    with pytest.raises(ValueError, match=r"perm must be a contiguous int64 tensor \[M\]"):
        fwd(x, A, B, idx, s, None, "segment", False, perm[:5], starts, starts)
    with pytest.raises(ValueError, match=r"seg_start must be a contiguous int32 tensor \[L \+ 2\]"):
        fwd(x, A, B, idx, s, None, "segment", False, perm, starts.long(), starts)


def test_autocast_casts_like_a_linear():
    x, A, B, idx, s, _ = case(8, 32, 16, 3, 4, torch.float32, "uniform")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = lora_kernels.multi_lora(x, A, B, idx, s)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref64(x, A, B, idx, s)) < 2e-2


# ================================================================================================
# bad input: clear Python exceptions, never a crash
# ================================================================================================
def test_bad_indices_raise_index_error():
    x, A, B, idx, s, _ = case(6, 16, 8, 3, 4, torch.float32)
    for bad in (3, 7, -2):
        wrong = idx.clone()
        wrong[4] = bad
        with pytest.raises(IndexError, match=rf"indices\[4\] = {bad}"):
            lora_kernels.multi_lora(x, A, B, wrong, s)
    # the C++ op checks on its own too (no Python in between)
    wrong = idx.clone()
    wrong[1] = 3
    if DEVICE == "cpu":
        with pytest.raises(IndexError, match=r"indices\[1\] = 3"):
            torch.ops.lora_kernels_ext.multi_lora_fwd(x, A, B, wrong, s, None, "segment", False)


def test_index_check_runs_once_per_tensor_version():
    x, A, B, idx, s, _ = case(6, 16, 8, 3, 4, torch.float32)
    ranks = torch.tensor([4, 2, 3], device=x.device)
    lora_kernels.multi_lora(x, A, B, idx, s, ranks)
    assert ml._checked(idx, 3) and ml._checked(ranks, 4)
    assert not ml._checked(idx, 2)  # valid for L = 3, not yet known for another L
    assert not ml._checked(idx.clone(), 3)  # another tensor: checked on its own
    idx[2] = 5  # in place: the version counter moves, the next call checks again
    assert not ml._checked(idx, 3)
    with pytest.raises(IndexError):
        lora_kernels.multi_lora(x, A, B, idx, s)
    ranks[1] = 9
    with pytest.raises(ValueError, match="ranks must lie"):
        lora_kernels.multi_lora(x, A, B, idx.clamp(max=2), s, ranks)
    with torch.inference_mode():  # no version counter: checked on every call
        inf_idx = idx.clamp(max=2)
        lora_kernels.multi_lora(x, A, B, inf_idx, s)
        assert not ml._checked(inf_idx, 3)


def test_bad_ranks_shapes_and_dtypes():
    x, A, B, idx, s, _ = case(6, 16, 8, 3, 4, torch.float32)
    with pytest.raises(ValueError, match=r"ranks must lie in \[1, r_max = 4\]"):
        lora_kernels.multi_lora(x, A, B, idx, s, torch.tensor([1, 5, 2], device=x.device))
    with pytest.raises(ValueError, match=r"ranks must lie"):
        lora_kernels.multi_lora(x, A, B, idx, s, torch.tensor([0, 1, 2], device=x.device))
    with pytest.raises(ValueError, match=r"ranks must be \[L\]"):
        lora_kernels.multi_lora(x, A, B, idx, s, torch.tensor([1, 2], device=x.device))
    with pytest.raises(TypeError, match="ranks must be int32 or int64"):
        lora_kernels.multi_lora(x, A, B, idx, s, torch.ones(3, device=x.device))
    with pytest.raises(TypeError, match="must have x's dtype"):
        lora_kernels.multi_lora(x, A.to(torch.bfloat16), B.to(torch.bfloat16), idx, s)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        lora_kernels.multi_lora(x.double(), A.double(), B.double(), idx, s)
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        lora_kernels.multi_lora(x, A, B, idx.float(), s)
    with pytest.raises(ValueError, match="one entry per row"):
        lora_kernels.multi_lora(x, A, B, idx[:5], s)
    with pytest.raises(ValueError, match="features"):
        lora_kernels.multi_lora(x[:, :15], A, B, idx, s)
    with pytest.raises(ValueError, match="lora_B is"):
        lora_kernels.multi_lora(x, A, B[:, :, :3], idx, s)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_kernels.multi_lora(x, A[0], B, idx, s)
    with pytest.raises(ValueError, match=r"scales must be \[L\]"):
        lora_kernels.multi_lora(x, A, B, idx, s[:2])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        lora_kernels.multi_lora(x, A, B, idx.tolist(), s)
    # the C++ op's own messages
    with pytest.raises(TypeError, match="scales must be float32"):
        torch.ops.lora_kernels_ext.multi_lora_fwd(x, A, B, idx, s.double(), None, "segment", False)
    with pytest.raises(ValueError, match="regime must be"):
        torch.ops.lora_kernels_ext.multi_lora_fwd(x, A, B, idx, s, None, "fast", False)


# ================================================================================================
# the bindings: opcheck, torch.compile, dispatch decisions, the fallback
# ================================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_ranks", [False, True])
def test_opcheck(dtype, with_ranks):
    x, A, B, idx, s, _ = case(11, 24, 16, 3, 8, dtype, "skewed", 0.2, requires_grad=True)
    ranks = torch.tensor([8, 3, 5], device=x.device) if with_ranks else None
    idx32 = idx.to(torch.int32)
    torch.library.opcheck(torch.ops.lora_kernels_ext.multi_lora_fwd, (x, A, B, idx32, s, ranks, "segment", True))
    torch.library.opcheck(torch.ops.lora_kernels_ext.multi_lora_fwd, (x, A, B, idx, s, ranks, "decode", False),
                          test_utils=("test_schema", "test_faketensor"))
    with torch.no_grad():
        _, S = torch.ops.lora_kernels_ext.multi_lora_fwd(x, A, B, idx, s, ranks, "segment", True)
    dy = torch.randn(11, 16, device=x.device, dtype=dtype)
    torch.library.opcheck(torch.ops.lora_kernels_ext.multi_lora_bwd,
                          (dy, x.detach(), A.detach(), B.detach(), idx, s, ranks, S, True, True, True))
    torch.library.opcheck(torch.ops.lora_kernels_ext.multi_lora_bwd,
                          (dy, x.detach(), A.detach(), B.detach(), idx, s, ranks, S, False, True, False))


def test_torch_compile_fullgraph_matches_eager():
    x, A, B, idx, s, _ = case(20, 32, 24, 4, 8, torch.float32, "zipf", 0.2, requires_grad=True)
    dy = torch.randn(20, 24, device=x.device)
    eager = grads_of(lambda: lora_kernels.multi_lora(x, A, B, idx, s), x, A, B, s, dy)
    y_eager = lora_kernels.multi_lora(x, A, B, idx, s)
    compiled = torch.compile(lora_kernels.multi_lora, fullgraph=True, backend="aot_eager" if not ON_GPU else "inductor")
    y = compiled(x, A, B, idx, s)
    assert torch.allclose(y, y_eager, rtol=1e-6, atol=1e-6)
    got = grads_of(lambda: compiled(x, A, B, idx, s), x, A, B, s, dy)
    for g, w in zip(got[:3], eager[:3]):
        assert torch.allclose(g, w, rtol=1e-6, atol=1e-6)


def test_dispatch_is_visible_and_env_forces_the_reference(monkeypatch):
    x, A, B, idx, s, _ = case(8, 16, 8, 2, 4, torch.float32)
    d = lora_kernels.multi_lora_dispatch(x, A)
    assert d.backend == ("cuda" if ON_GPU else "cpu") and d.reason and not d.fallback
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    d = lora_kernels.multi_lora_dispatch(x, A)
    assert (d.backend, d.regime) == ("torch", "reference") and "LORA_KERNELS_BACKEND=torch" in d.reason
    check_forward(x, A, B, idx, s)


def test_route_agrees_with_dispatch_and_grad_recording(monkeypatch):
    x, A, B, idx, s, _ = case(8, 16, 8, 2, 4, torch.float32)
    d = lora_kernels.multi_lora_dispatch(x, A)
    assert ml._route(x, A) == (d.backend, d.regime)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    d = lora_kernels.multi_lora_dispatch(x, A)
    assert ml._route(x, A) == (d.backend, d.regime)
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    assert lora_kernels.multi_lora(x, A, B, idx, s).grad_fn is None  # nothing requires grad
    A.requires_grad_(True)
    assert lora_kernels.multi_lora(x, A, B, idx, s).grad_fn is not None
    with torch.no_grad():
        assert lora_kernels.multi_lora(x, A, B, idx, s).grad_fn is None


def test_regime_rule():
    """The measured crossovers (H100, graphs): with the register kernels segment from 2 rows per
    adapter (and 128 rows); with the tile kernels decode below ~512 / r rows per adapter."""
    regime = lora_kernels.multi_lora_regime
    assert regime(64, 8)[0] == "decode"  # few rows: the sort costs more than the re-reads
    assert regime(256, 32, 16)[0] == "segment"  # 8 rows/adapter, register kernels
    assert regime(1024, 128, 16)[0] == "segment"
    assert regime(256, 256, 16)[0] == "decode"  # 1 row/adapter: nothing to share
    assert regime(1024, 128, 16, register_kernels=False)[0] == "decode"  # 8 rows/adapter at r16, tile kernels
    assert regime(1024, 64, 64, register_kernels=False)[0] == "segment"  # 16 rows/adapter at r64
    assert regime(256, 128, 128)[0] == "decode"  # r > 64: tile kernels (512 / r = 4 rows), whatever the flag says
    assert regime(8192, 8, 16)[0] == "segment"  # prefill: 1024 rows/adapter
    r, why = regime(4096, 64, 16)
    assert r == "segment" and "register kernels" in why and "tile of its rows" in why
    r, why = regime(1024, 128, 16, register_kernels=False)
    assert r == "decode" and "512 / r" in why


def test_register_kernels_apply_follows_dtype_rank_and_alignment():
    x = torch.empty(4, 64, dtype=torch.bfloat16)
    assert ml.register_kernels_apply(x, torch.empty(3, 16, 64, dtype=torch.bfloat16))
    assert not ml.register_kernels_apply(x.float(), torch.empty(3, 16, 64))  # fp32: tile kernels
    assert not ml.register_kernels_apply(x, torch.empty(3, 12, 64, dtype=torch.bfloat16))  # r % 8
    assert not ml.register_kernels_apply(x, torch.empty(3, 128, 64, dtype=torch.bfloat16))  # r > 64
    assert not ml.register_kernels_apply(torch.empty(4, 65, dtype=torch.half), torch.empty(3, 16, 65))  # K % 8


def test_regime_env_override(monkeypatch):
    monkeypatch.setenv(ml.REGIME_ENV, "decode")
    assert lora_kernels.multi_lora_regime(8192, 1) == ("decode", f"{ml.REGIME_ENV}=decode")
    monkeypatch.setenv(ml.REGIME_ENV, "quick")
    with pytest.raises(ValueError, match="not understood"):
        lora_kernels.multi_lora_regime(8, 1)


def test_fallback_warns_once_and_stays_correct(monkeypatch):
    monkeypatch.setattr(_ext, "_state", {"error": "RuntimeError: simulated build failure"})
    monkeypatch.setattr(_ext, "_warned", set())
    x, A, B, idx, s, _ = case(8, 16, 8, 2, 4, torch.float32)
    d = lora_kernels.multi_lora_dispatch(x, A)
    assert d.backend == "torch" and d.fallback and "simulated build failure" in d.reason
    with pytest.warns(RuntimeWarning, match="simulated build failure"):
        check_forward(x, A, B, idx, s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_kernels.multi_lora(x, A, B, idx, s)  # no second warning


def test_build_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(_ext.EXT_DIR_ENV, str(tmp_path))
    d = _ext.build_dir(cuda=False)
    assert d.parent == tmp_path and d.name.startswith("lora_kernels_multi_cpu_torch")
    assert (_ext.sources_dir() / "multi_lora.cpp").is_file()


# ================================================================================================
# GPU: the CUDA kernels
# ================================================================================================
# "segment" runs the register kernels where a call qualifies (16-bit, r_max <= 64, aligned rows) and
# the tile kernels elsewhere; "segment-tile" forces the tile kernels everywhere.
REGIMES = ("decode", "segment", "segment-tile")


@pytest.fixture(params=REGIMES)
def regime(request, monkeypatch):
    name = request.param
    if name == "segment-tile":
        monkeypatch.setenv("LORA_KERNELS_MULTI_SEG_KERNELS", "tile")
        name = "segment"
    monkeypatch.setenv(ml.REGIME_ENV, name)
    return name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [2049, 4096, 11008])
@pytest.mark.parametrize("M", BATCH_SIZES)
def test_cuda_forward_sizes(regime, dtype, hidden, M):
    x, A, B, idx, s, _ = case(M, hidden, hidden, 8, 16, dtype, "uniform", 0.2, seed=M, device="cuda")
    assert lora_kernels.multi_lora_dispatch(x, A).regime == regime
    check_forward(x, A, B, idx, s)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", RANKS + (256,))
def test_cuda_forward_ranks(regime, dtype, r):
    x, A, B, idx, s, _ = case(64, 4096, 4096, 4, r, dtype, "zipf", 0.1, seed=r, device="cuda")
    check_forward(x, A, B, idx, s)


@pytest.mark.gpu
@pytest.mark.parametrize("popularity", POPULARITIES + ("sequences",))
@pytest.mark.parametrize("none_frac", [0.0, 0.3])
@pytest.mark.parametrize("M", [16, 133, 1024])
def test_cuda_forward_popularity(regime, popularity, none_frac, M):
    x, A, B, idx, s, _ = case(M, 4096, 4096, 32, 16, torch.bfloat16, popularity, none_frac, seed=M, device="cuda")
    check_forward(x, A, B, idx, s)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_mixed_ranks(regime, dtype):
    L, R = 6, 64
    x, A, B, idx, s, _ = case(133, 2049, 4096, L, R, dtype, "uniform", 0.2, seed=5, device="cuda")
    ranks = torch.tensor([1, 4, 16, 64, 33, 8], device="cuda")
    with torch.no_grad():
        for l, r in enumerate(ranks.tolist()):
            A[l, r:] = float("nan")
            B[l, :, r:] = float("nan")
    assert torch.isfinite(check_forward(x, A, B, idx, s, ranks)).all()
    for t in (x, A, B):
        t.requires_grad_(True)
    check_backward(x, A, B, idx, s, ranks)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [2049, 4096])
@pytest.mark.parametrize("popularity", ["distinct", "identical", "zipf", "sequences"])
@pytest.mark.parametrize("M", [7, 133, 2048])
def test_cuda_backward(regime, dtype, hidden, popularity, M):
    x, A, B, idx, s, _ = case(M, hidden, hidden, 8, 16, dtype, popularity, 0.2, seed=M, device="cuda",
                              requires_grad=True)
    check_backward(x, A, B, idx, s)


@pytest.mark.gpu
@pytest.mark.parametrize("outer", ["segment", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,L,r", [(7, 3, 8), (133, 8, 16), (2048, 40, 16), (133, 6, 64)])
def test_cuda_backward_reductions_both_ways(outer, dtype, M, L, r, monkeypatch):
    """dA and dB through the segment kernel and through the GEMMs over G and S spread by adapter,
    each forced (by default the GEMMs take L r <= 512; (40, 16) is past that), with ranks below
    r_max (NaN past them), rows without adapter, against float64."""
    monkeypatch.setenv("LORA_KERNELS_MULTI_OUTER", outer)
    x, A, B, idx, s, _ = case(M, 520, 264, L, r, dtype, "zipf", 0.2, seed=M + L, device="cuda")
    ranks = torch.randint(1, r + 1, (L,), generator=torch.Generator().manual_seed(L)).to("cuda")
    with torch.no_grad():
        for l, rl in enumerate(ranks.tolist()):
            A[l, rl:] = float("nan")
            B[l, :, rl:] = float("nan")
    for t in (x, A, B):
        t.requires_grad_(True)
    check_backward(x, A, B, idx, s, ranks)


@pytest.mark.gpu
def test_cuda_backward_is_deterministic():
    x, A, B, idx, s, _ = case(4096, 4096, 4096, 2, 16, torch.bfloat16, "skewed", 0.1, device="cuda",
                              requires_grad=True)
    dy = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    first = grads_of(lambda: lora_kernels.multi_lora(x, A, B, idx, s), x, A, B, s, dy)
    again = grads_of(lambda: lora_kernels.multi_lora(x, A, B, idx, s), x, A, B, s, dy)
    for a, b in zip(first[:3], again[:3]):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_strided_and_unaligned_inputs(regime):
    x, A, B, idx, s, _ = case(33, 1000, 520, 3, 12, torch.bfloat16, "uniform", 0.2, device="cuda")
    check_forward(x, A, B, idx, s)
    wide = torch.zeros(33, 1003, device="cuda", dtype=torch.bfloat16)
    wide[:, 3:] = x  # rows 2006 bytes apart, 6 bytes off: the scalar (non-vector) load paths
    check_forward(wide[:, 3:], A, B, idx, s)
    check_forward(x[:, :999].contiguous(), A[:, :, :999].contiguous(), B, idx, s)  # K = 999
    check_forward(x, A[:, :10].contiguous(), B[:, :, :10].contiguous(), idx, s)  # r_max = 10: no vectors in B


@pytest.mark.gpu
def test_cuda_bad_index_raises_and_device_stays_usable():
    x, A, B, idx, s, _ = case(64, 256, 256, 4, 8, torch.bfloat16, device="cuda")
    wrong = idx.clone()
    wrong[10] = 4
    with pytest.raises(IndexError, match=r"indices\[10\] = 4"):
        lora_kernels.multi_lora(x, A, B, wrong, s)
    check_forward(x, A, B, idx, s)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_kernels_are_memory_safe_without_the_check(monkeypatch, regime):
    """With the host check off, out-of-range indices and ranks reach the kernels: they must treat
    such rows as having no adapter and clamp ranks (run under compute-sanitizer to see no access)."""
    monkeypatch.setenv(ml.CHECK_ENV, "0")
    x, A, B, idx, s, _ = case(200, 256, 256, 4, 8, torch.bfloat16, "uniform", device="cuda", requires_grad=True)
    wrong = idx.clone()
    wrong[::7] = 1 << 20
    wrong[1::7] = -99
    ranks = torch.tensor([8, 1 << 20, -5, 3], device="cuda")
    out = lora_kernels.multi_lora(x, A, B, wrong, s, ranks)
    out.sum().backward()
    torch.cuda.synchronize()
    bad = (wrong < 0) | (wrong >= 4)
    assert (out[bad] == 0).all()


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_with_new_indices(regime):
    x, A, B, idx, s, _ = case(256, 1024, 1024, 8, 16, torch.bfloat16, "uniform", 0.1, device="cuda")
    static_idx = idx.clone()
    lora_kernels.multi_lora(x, A, B, static_idx, s)  # build + warm up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lora_kernels.multi_lora(x, A, B, static_idx, s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_kernels.multi_lora(x, A, B, static_idx, s)
    for seed in range(3):
        new = adapter_indices(256, 8, "zipf", 0.2, seed=seed, device="cuda")
        static_idx.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref64(x, A, B, new, s)) < FWD_TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_opcheck(dtype, regime):
    x, A, B, idx, s, _ = case(70, 136, 72, 3, 16, dtype, "skewed", 0.2, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.lora_kernels_ext.multi_lora_fwd, (x, A, B, idx, s, None, regime, True))
    with torch.no_grad():
        _, S = torch.ops.lora_kernels_ext.multi_lora_fwd(x, A, B, idx, s, None, regime, True)
    dy = torch.randn(70, 72, device="cuda", dtype=dtype)
    torch.library.opcheck(torch.ops.lora_kernels_ext.multi_lora_bwd,
                          (dy, x.detach(), A.detach(), B.detach(), idx, s, None, S, True, True, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_multi_lora_linear_gradients(regime, dtype):
    x, A, B, idx, s, _ = case(300, 1000, 520, 5, 16, dtype, "zipf", 0.2, seed=3, device="cuda")
    g = torch.Generator().manual_seed(8)
    W = (torch.randn(520, 1000, generator=g) / 32).to("cuda", dtype)
    b = torch.randn(520, generator=g).to("cuda", dtype)
    check_linear(x, W, b, A, B, idx, s, torch.tensor([16, 3, 9, 1, 12], device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("popularity", ["distinct", "zipf"])
def test_cuda_prefetch_case_for_sanitizer(popularity):
    """A call that sorts its rows with 16-32 MB of x and adapters' A prefetches them into L2 while the
    sort runs (rows_prefetch): the result is bit for bit the pre-sorted path's (no prefetch) and
    matches float64. Also run under compute-sanitizer (`-k sanitizer`): the prefetch's addresses."""
    L = 128 if popularity == "distinct" else 8
    x, A, B, idx, s, _ = case(1024 if L == 128 else 2048, 4096, 1024, L, 16, torch.bfloat16, popularity, 0.1,
                              device="cuda")
    assert 16 << 20 <= x.numel() * 2 + min(L, x.shape[0]) * 16 * 4096 * 2 <= 32 << 20  # in the prefetch window
    ops = torch.ops.lora_kernels_ext
    y = lora_kernels.multi_lora(x, A, B, idx, s)
    # (not check_forward: its bf16 per-adapter loop runs a cuBLAS split-K kernel that racecheck flags)
    assert rel_err(y, ref64(x, A, B, idx, s)) <= FWD_TOL[torch.bfloat16]
    y_pre, _ = ops.multi_lora_fwd(x, A, B, idx, s, None, "segment", False, *ml.RowIndex(idx).segments(L))
    assert torch.equal(y, y_pre)


@pytest.mark.gpu
@pytest.mark.parametrize("M,L,popularity", [(256, 32, "uniform"), (1024, 128, "distinct"), (700, 6, "zipf"),
                                            (2048, 200, "uniform"), (600, 1, "identical"),
                                            (1024, 255, "uniform"), (1000, 8, "skewed"), (1024, 1, "identical")])
def test_cuda_direct_mode_matches_the_sorted_mode(M, L, popularity, monkeypatch):
    """A call that sorts its rows (up to 1024 of them; above, the sorted mode) runs the register kernels
    in direct mode: no sort, every block finds its rows from the raw indices (the slots past the groups'
    first tiles from a histogram of them: zipf, identical, skewed; 256 groups with the "no adapter"
    one). Bit for bit the pre-sorted path's y and S, over many back-to-back calls
    whose x is written by the kernel just before (the shrink reads x at once, so its launch must not
    overlap that kernel), and the same as the sorted mode (LORA_KERNELS_MULTI_DIRECT=0)."""
    x, A, B, idx, s, _ = case(M, 1024, 512, L, 16, torch.bfloat16, popularity, 0.1, device="cuda")
    ops = torch.ops.lora_kernels_ext
    y_pre, S_pre = ops.multi_lora_fwd(x, A, B, idx, s, None, "segment", True, *ml.RowIndex(idx).segments(L))
    assert rel_err(y_pre, ref64(x, A, B, idx, s)) <= FWD_TOL[torch.bfloat16]
    calls = []
    for i in range(20):
        xi = x * 1.0 if i % 2 else x.clone()  # a fresh x from a kernel right before the call
        calls.append(ops.multi_lora_fwd(xi, A, B, idx, s, None, "segment", True))
    for y, S in calls:
        assert torch.equal(y, y_pre) and torch.equal(S, S_pre)
    monkeypatch.setenv("LORA_KERNELS_MULTI_DIRECT", "0")
    y0, S0 = ops.multi_lora_fwd(x, A, B, idx, s, None, "segment", True)
    assert torch.equal(y0, y_pre) and torch.equal(S0, S_pre)


@pytest.mark.gpu
@pytest.mark.parametrize("M,L,popularity", [(300, 3, "skewed"), (1024, 5, "zipf")])
def test_cuda_direct_mode_case_for_sanitizer(M, L, popularity, monkeypatch):
    """Direct mode with tiles past the groups' first, "no adapter" rows and out-of-range indices (as
    "no adapter"), at and below the bound on rows: small enough for compute-sanitizer
    (`-k sanitizer`); the same bits as the pre-sorted path."""
    monkeypatch.setenv(ml.CHECK_ENV, "0")
    x, A, B, idx, s, _ = case(M, 256, 128, L, 16, torch.bfloat16, popularity, 0.1, device="cuda")
    idx[::11] = L + 3
    idx[5::13] = -7
    ops = torch.ops.lora_kernels_ext
    y_pre, S_pre = ops.multi_lora_fwd(x, A, B, idx, s, None, "segment", True, *ml.RowIndex(idx).segments(L))
    y, S = ops.multi_lora_fwd(x, A, B, idx, s, None, "segment", True)
    assert torch.equal(y, y_pre) and torch.equal(S, S_pre)
    assert rel_err(y, ref64(x, A, B, idx, s)) <= FWD_TOL[torch.bfloat16]


def check_call_sort(M, L, itype, monkeypatch):
    """The sort of a call's rows (up to 8192, one launch) against torch's stable sort, its tables
    (perm, seg_start, tile_start) with the counting sort (the default up to 255 adapters: one block
    up to 1024 rows, a thread-block cluster of up to 8 past that) and the radix sort
    (LORA_KERNELS_MULTI_SORT=radix; the only one past 255 adapters). -1 and out-of-range indices
    count as "no adapter"; half the rows go to adapter 0, so that its rows fill whole warps and
    many tiles."""
    g = torch.Generator().manual_seed(M * 1000 + L)
    idx = torch.randint(-1, L, (M,), generator=g)
    idx[torch.rand(M, generator=g) < 0.5] = 0
    idx[torch.rand(M, generator=g) < 0.02] = L + 5
    keys = torch.where((idx >= 0) & (idx < L), idx, torch.full_like(idx, L))
    perm_ref = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=L + 1)
    seg_ref = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    tile_ref = torch.cat([torch.zeros(1, dtype=torch.long), ((counts + 63) // 64).cumsum(0)])
    idx = idx.to("cuda", itype)
    for env in ("", "radix"):
        monkeypatch.setenv("LORA_KERNELS_MULTI_SORT", env)
        perm, seg, tile = torch.ops.lora_kernels_ext.multi_lora_segments(idx, L)
        assert torch.equal(perm.cpu(), perm_ref), env
        assert torch.equal(seg.cpu().long(), seg_ref), env
        assert torch.equal(tile.cpu().long(), tile_ref), env


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 100, 1024, 1025, 2048, 3000, 4096, 4097, 7000, 8192])
@pytest.mark.parametrize("L", [1, 37, 255, 256])
@pytest.mark.parametrize("itype", [torch.int64, torch.int32])
def test_cuda_call_sort_matches_the_stable_sort(M, L, itype, monkeypatch):
    """Every variant (one block; clusters of 2, 3, 4, 5, 7, 8 blocks; the radix sort's 2, 8 and 16
    rows per thread; 4- and 8-bit keys; both index dtypes)."""
    check_call_sort(M, L, itype, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("M,L", [(1000, 37), (5000, 255)])
def test_cuda_call_sort_case_for_sanitizer(M, L, monkeypatch):
    """The counting sort's shared memory, warp-synchronous ranking and (5000 rows: a cluster of 5
    blocks) distributed shared memory under compute-sanitizer (`-k sanitizer`; racecheck flags a
    remote store into a block not known to have started)."""
    check_call_sort(M, L, torch.int64, monkeypatch)


@pytest.mark.gpu
def test_cuda_precomputed_segments_give_the_same_results():
    """Segments sorted once (RowIndex, as adapter_batch shares them across layers) and passed to the
    ops give bit-identical results to the ops sorting themselves; the RowIndex keeps them."""
    x, A, B, idx, s, _ = case(700, 520, 264, 6, 16, torch.bfloat16, "zipf", 0.2, device="cuda")
    rows = ml.RowIndex(idx)
    seg = rows.segments(6)
    assert rows.segments(6) is seg and seg[0].dtype == torch.int64 and tuple(seg[1].shape) == (8,)
    ops = torch.ops.lora_kernels_ext
    y0, S0 = ops.multi_lora_fwd(x, A, B, idx, s, None, "segment", True)
    y1, S1 = ops.multi_lora_fwd(x, A, B, idx, s, None, "segment", True, *seg)
    assert torch.equal(y0, y1) and torch.equal(S0, S1)
    dy = torch.randn(700, 264, device="cuda", dtype=torch.bfloat16)
    g0 = ops.multi_lora_bwd(dy, x, A, B, idx, s, None, S0, True, True, True)
    g1 = ops.multi_lora_bwd(dy, x, A, B, idx, s, None, S0, True, True, True, *seg)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("decode", [False, True])
def test_cuda_row_index_in_the_public_api(decode, monkeypatch):
    """multi_lora(x, A, B, RowIndex(idx), s): the shared sort gives the same forward and gradients as
    the plain indices (bit for bit), in both regimes, and an in-place change of the indices sorts again."""
    if decode:
        monkeypatch.setenv(ml.REGIME_ENV, "decode")
    x, A, B, idx, s, _ = case(300, 520, 264, 6, 16, torch.bfloat16, "zipf", 0.2, device="cuda",
                              requires_grad=True)
    rows = lora_kernels.RowIndex(idx)
    dy = torch.randn(300, 264, device="cuda", dtype=torch.bfloat16)
    plain = grads_of(lambda: lora_kernels.multi_lora(x, A, B, idx, s), x, A, B, s, dy)
    shared = grads_of(lambda: lora_kernels.multi_lora(x, A, B, rows, s), x, A, B, s, dy)
    for a, b in zip(plain, shared):
        assert (a is None and b is None) or torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(lora_kernels.multi_lora(x, A, B, rows, s), lora_kernels.multi_lora(x, A, B, idx, s))
        idx.copy_(adapter_indices(300, 6, "uniform", 0.1, seed=5, device="cuda"))  # same tensor, new rows
        out = lora_kernels.multi_lora(x, A, B, rows, s)
        assert rel_err(out, ref64(x, A, B, idx, s)) <= FWD_TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [0, 1, 700, 1025, 4096, 8192, 8193, 20000])
@pytest.mark.parametrize("L", [1, 6, 300, 5000])
def test_cuda_segments_match_a_stable_sort(M, L):
    """multi_lora_segments (one launch up to 8192 rows, CUB's sort beyond) against torch's stable sort:
    perm, each group's first row (groups 0..L-1, L = rows without adapter, then M) and each group's
    first 64-row tile."""
    g = torch.Generator().manual_seed(M + L)
    idx = torch.randint(-1, L + 1, (M,), generator=g)
    idx[torch.rand(M, generator=g) < 0.02] = L + 7  # out of range: no adapter
    keys = torch.where((idx >= 0) & (idx < L), idx, torch.full_like(idx, L))
    want_perm = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=L + 1)
    want_seg = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    tiles = (counts + 63) // 64
    want_tile = torch.cat([torch.zeros(1, dtype=torch.int64), tiles.cumsum(0)])
    perm, seg_start, tile_start = torch.ops.lora_kernels_ext.multi_lora_segments(idx.cuda(), L)
    assert torch.equal(perm.cpu(), want_perm)
    assert torch.equal(seg_start.cpu().long(), want_seg)
    assert torch.equal(tile_start.cpu().long(), want_tile)


@pytest.mark.gpu
def test_cuda_matches_cpu_extension():
    x, A, B, idx, s, _ = case(133, 520, 264, 5, 24, torch.float32, "zipf", 0.2, device="cpu")
    want = lora_kernels.multi_lora(x, A, B, idx, s)
    to = [t.cuda() for t in (x, A, B, idx, s)]
    assert rel_err(lora_kernels.multi_lora(*to).cpu(), want.double()) < 1e-5


@pytest.mark.gpu
def test_cuda_small_case_for_sanitizer(regime, monkeypatch):
    """Small enough for `compute-sanitizer --tool memcheck python -m pytest ... -k sanitizer`."""
    for dtype in DTYPES:
        # r_max 8: the register kernels of the segment forward (16-bit); 5: the tile kernels
        for r in (5, 8):
            x, A, B, idx, s, _ = case(7, 40, 24, 3, r, dtype, "uniform", 0.3, device="cuda", requires_grad=True)
            check_forward(x, A, B, idx, s, naive_factor=math.inf)
            for outer in ("segment", "gemm"):  # the backward's dA and dB both ways
                monkeypatch.setenv("LORA_KERNELS_MULTI_OUTER", outer)
                check_backward(x, A, B, idx, s, torch.tensor([r, 2, 3], device="cuda"))
            monkeypatch.delenv("LORA_KERNELS_MULTI_OUTER")
        W, b = torch.randn(24, 40, device="cuda", dtype=dtype), torch.randn(24, device="cuda", dtype=dtype)
        check_linear(x, W, b, A, B, idx, s)  # precomputed segments shared by forward and backward
