"""Eager calls replayed from C++ (lora_kernels/ops/replay.py): the same bits as the Python path.

The second eager call of a key runs the Python path and records its launches; later calls of that key
replay them from C++. Each case here computes the forward and every gradient once through the Python
path (replay off), then four times with replay on (first sight, record, replay, replay) from the same dropout
seed, and asserts the results are the same (bitwise but for the fp32 atomic sums of dA and dB); a key the recording cannot express (deterministic
mode's extra cuBLAS product) must be declined and still give the Python path's results.
"""
import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import replay

from .conftest import ON_GPU
from .test_lora_linear import assert_matches, run_case

from lora_kernels.ops import lora_linear as op_mod

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="replay runs CUDA launches")


@pytest.fixture(scope="module")
def replay_built():
    if ON_GPU:
        assert replay.enable(build=True), "the CUDA extension with the replay ops did not build or load"
    yield


# ------------------------------------------------------------------------------------------------
# the recorder (any machine): what it writes down, and what it refuses
# ------------------------------------------------------------------------------------------------
def test_recorder_writes_allocations_addmm_sums_and_casts():
    a, w = torch.randn(4, 5), torch.randn(3, 5)
    with replay.record([a, w]) as rec:
        out = op_mod._new((4, 3), torch.float32, a.device, zero=True)
        op_mod._addmm_(out, a, w, transpose=True)
        s = op_mod._sum0(out)
        c = op_mod._cast(s, torch.float16)
        same = op_mod._cast(out, torch.float32)  # no copy, nothing written
    assert same is out and rec.why is None
    assert torch.allclose(out, a @ w.t()) and torch.equal(c, (a @ w.t()).sum(0).half())
    f32, f16 = 6, 5  # c10::ScalarType
    one = 0x3FF0000000000000  # the bits of 1.0 (alpha)
    assert rec.program((out, c)) == [1, 2, 1, f32, 2, 4, 3,  # slot 2 = zeros [4, 3] fp32
                                     6, 2, 0, 1, 1, one, one,  # slot 2 = 1.0 * slot 2 + 1.0 * slot 0 @ slot 1 .T
                                     3, 3, 2,  # slot 3 = slot 2 .sum(0)
                                     4, 4, 3, f16,  # slot 4 = slot 3 .to(fp16)
                                     5, 2, 2, 4]  # outputs: slots 2, 4


def test_recorder_writes_cublas_products():
    """_mm steps (the backward's cuBLAS products at large rank): operands by slot with transpose
    flags, the result's dtype, alpha as the bits of a double; its own ATen ops are expected, any
    other mm still declines."""
    a, b = torch.randn(6, 4), torch.randn(6, 3)
    with replay.record([a, b]) as rec:
        m = op_mod._mm(a, b, ta=True, alpha=0.5, out_dtype=torch.float32)  # 0.5 * a.T @ b -> [4, 3]
        out = op_mod._new((6, 3), torch.float32, a.device, zero=True)
        op_mod._addmm_(out, a, m, transpose=False, alpha=2.0)  # out += 2 * a @ m
        new = op_mod._new((6, 3), torch.float32, a.device)
        op_mod._addmm_(new, a, m, transpose=False, alpha=3.0, beta=0.0)  # new = 3 * a @ m, not read
    assert rec.why is None
    torch.testing.assert_close(m, 0.5 * a.t() @ b)
    torch.testing.assert_close(out, 2 * a @ m)
    torch.testing.assert_close(new, 3 * a @ m)
    half, one, two, three = 0x3FE0000000000000, 0x3FF0000000000000, 0x4000000000000000, 0x4008000000000000
    assert rec.program((m, out, new)) == [7, 2, 0, 1, 1, 0, -1, half,  # slot 2 = 0.5 * slot 0 .T @ slot 1
                                          1, 3, 1, 6, 2, 6, 3,  # slot 3 = zeros [6, 3] fp32
                                          6, 3, 0, 2, 0, two, one,  # slot 3 = slot 3 + 2.0 * slot 0 @ slot 2
                                          1, 4, 0, 6, 2, 6, 3,  # slot 4 = empty [6, 3] fp32
                                          6, 4, 0, 2, 0, three, 0,  # slot 4 = 3.0 * slot 0 @ slot 2
                                          5, 3, 2, 3, 4]
    with replay.record([a, b]) as rec:
        op_mod._mm(a, b, ta=True)
        torch.mm(a.t(), b)  # not a recorded step: declines
    assert rec.why is not None and "mm" in rec.why
    with replay.record([a, b]) as rec:
        op_mod._mm(a[:, :2], b, ta=True)  # a view of an input, not the input: declines
    assert rec.why is not None and "view" in rec.why


def test_recorder_declines_what_it_cannot_replay():
    a, w = torch.randn(4, 5), torch.randn(3, 5)
    with replay.record([a, w]) as rec:
        y = torch.mm(a, w.t())  # an op the program has no step for
    assert rec.program((y,)) == [-1] and "mm" in rec.why
    stray = torch.randn(5, 3)
    with replay.record([a, w]) as rec:
        out = op_mod._new((4, 3), torch.float32, a.device)
        op_mod._addmm_(out, a, stray, transpose=False)  # an operand that is neither input nor buffer
    assert rec.program((out,)) == [-1] and "addmm_ operand 2" in rec.why
    with replay.record([a, a]) as rec:
        pass
    assert rec.program((a,)) == [-1] and "share memory" in rec.why


# ------------------------------------------------------------------------------------------------
# replay on the GPU: the Python path's results, bit for bit
# ------------------------------------------------------------------------------------------------
def _gpu(fn):
    for mark in (pytest.mark.gpu, needs_gpu, pytest.mark.usefixtures("replay_built")):
        fn = mark(fn)
    return fn


def _step(x, W, A, B, b, scale, p, dy, need_x):
    """y and the gradients of (x,) A, B of one eager call, its dropout seed drawn from generator 1."""
    gen = torch.Generator("cuda").manual_seed(1) if p > 0 else None  # (no new generator inside a capture)
    y = lk.lora_linear(x, W, A, B, scale, b, p, generator=gen)
    leaves = ([x] if need_x else []) + [A, B]
    return [y.detach()] + list(torch.autograd.grad(y, leaves, dy))


def _inputs(M, K, N, r, dtype, adt, bias, need_x, offset=0):
    g = torch.Generator().manual_seed(M * 7 + K * 3 + N + r)
    x = torch.randn(M, K + offset, generator=g).to("cuda", dtype)[:, offset:]  # offset: misaligned rows
    x.requires_grad_(need_x)
    W = (torch.randn(N, K, generator=g) / K**0.5).to("cuda", dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to("cuda", adt).requires_grad_(True)
    B = (torch.randn(N, r, generator=g) / r**0.5).to("cuda", adt).requires_grad_(True)
    b = torch.randn(N, generator=g).to("cuda", dtype) if bias else None
    dy = torch.randn(M, N, generator=g).to("cuda", dtype)
    return x, W, A, B, b, dy


def _assert_same(got, want, need_x, what=None):
    """y and dx bitwise; dA and dB (fp32 atomic sums, whose order varies from run to run even on the
    Python path) within 1e-3 relative Frobenius error: a wrong plan (a missed zero fill, a wrong
    buffer) is off by O(1)."""
    names = ["y"] + (["dx"] if need_x else []) + ["dA", "dB"]
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, name)
        if name in ("y", "dx"):
            assert torch.equal(g, w), (what, name, (g.float() - w.float()).abs().max().item())
        else:
            err = ((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-300)).item()
            assert err < 1e-3, (what, name, err)


def _python_path(monkeypatch, *args):
    with monkeypatch.context() as m:
        m.setitem(replay._state, "ok", False)
        return _step(*args)


bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
# (M, K, N, r, dtype, adapter dtype, p, bias, x requires grad)
CASES = [
    (4300, 512, 512, 16, bf16, bf16, 0.1, True, True),  # sm_90: fused GEMMs (68 tiles), TMA shrink and dA pass
    (4300, 512, 512, 16, bf16, fp32, 0.1, False, True),  # the same with fp32 adapters (the dA pass's fp32 copies)
    (2176, 512, 512, 16, bf16, bf16, 0.0, False, True),  # 34 tiles: the cuBLAS GEMM (beta = 1)
    (1000, 1024, 1024, 128, bf16, fp32, 0.0, True, True),  # r > 64: the backward's products in cuBLAS
    (700, 512, 768, 96, fp16, fp16, 0.1, False, True),  # the same with dropout: Triton dA, masked expand
    (1000, 1024, 1024, 16, bf16, bf16, 0.05, False, True),
    # sm_90: the Gluon dgrad (128 tiles) after a dy pass split over N (16 row blocks), its G and Gs summed by a kernel
    (2048, 2048, 512, 16, bf16, bf16, 0.0, False, True),
    (2048, 2048, 1024, 16, bf16, fp32, 0.05, True, True),
    (300, 136, 520, 5, fp16, fp16, 0.1, True, False),  # x frozen: no dx; ragged N: cuBLAS beta = 1
    (2177, 520, 504, 16, bf16, fp32, 0.0, False, True),  # ragged N / K, fp32 adapters
    (64, 256, 256, 8, fp32, fp32, 0.1, True, True),  # fp32 activations: pointer kernels and cuBLAS
    (133, 17, 2049, 3, fp16, fp32, 0.3, True, True),  # few rows: split K / N partials summed
]


@pytest.mark.parametrize("case", CASES, ids=str)
@_gpu
def test_replay_is_bitwise_the_python_path(monkeypatch, case):
    M, K, N, r, dt, adt, p, bias, need_x = case
    x, W, A, B, b, dy = _inputs(M, K, N, r, dt, adt, bias, need_x)
    args = (x, W, A, B, b, 0.5, p, dy, need_x)
    want = _python_path(monkeypatch, *args)
    before = dict(replay.stats)
    for call in range(4):
        _assert_same(_step(*args), want, need_x, call)
    # a key is recorded on its second call: calls 2 and 3 replay forward and backward
    assert replay.stats["replayed"] - before["replayed"] == 4, (replay.stats, before, replay.last_declined)
    assert replay.stats["declined"] == before["declined"], replay.last_declined


@_gpu
def test_replayed_calls_match_float64():
    """run_case three times at one key (the third call is replayed) against the float64 reference."""
    for _ in range(3):
        before = replay.stats["replayed"]
        y, y_ref, leaves, refs, y_abs = run_case(2176, 512, 512, 16, bf16, 0.1)
        assert_matches(bf16, y, y_ref, leaves, refs, y_abs)
    assert replay.stats["replayed"] > before


@_gpu
def test_other_alignment_or_strides_are_other_keys(monkeypatch):
    """A plan recorded for aligned inputs is not used for inputs 2 bytes off (other kernels), and a
    non-contiguous dy gets its own backward plan; both match the Python path bitwise."""
    for offset, dy_t in ((0, False), (1, False), (0, True), (1, True), (0, False)):
        x, W, A, B, b, dy = _inputs(2176, 512, 512, 16, bf16, bf16, True, True, offset=offset)
        if dy_t:
            dy = dy.t().contiguous().t()  # column-major dy
        args = (x, W, A, B, b, 0.5, 0.1, dy, True)
        want = _python_path(monkeypatch, *args)
        before = replay.stats["replayed"]
        for _ in range(3):
            _assert_same(_step(*args), want, True, (offset, dy_t))
        assert replay.stats["replayed"] >= before + 2, (offset, dy_t, replay.last_declined)  # (a key seen before: 6)


@_gpu
def test_replay_is_captured_by_cuda_graphs(monkeypatch):
    """A replayed forward + backward captured in a CUDA graph gives what the eager call gives."""
    x, W, A, B, b, dy = _inputs(1000, 1024, 1024, 16, bf16, bf16, True, True)
    for _ in range(3):  # first sight, record, replay
        _step(x, W, A, B, b, 0.5, 0.0, dy, True)
    want = _python_path(monkeypatch, x, W, A, B, b, 0.5, 0.0, dy, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _step(x, W, A, B, b, 0.5, 0.0, dy, True)  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before = replay.stats["replayed"]
    with torch.cuda.graph(graph):
        out = _step(x, W, A, B, b, 0.5, 0.0, dy, True)
    assert replay.stats["replayed"] == before + 2
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(out, want, True)


@_gpu
def test_capture_is_its_own_key_where_the_path_depends_on_it(monkeypatch):
    """r64 at few rows: eager calls keep the Triton passes (less host time), a captured call takes the
    cuBLAS products (less GPU time; see _CUBLAS_MIN_RANK_FEW_ROWS). The captured call must not replay
    the eager call's plan, and its replayed graph matches the float64-checked eager results."""
    cublas = []
    real = op_mod._bwd_cublas
    monkeypatch.setattr(op_mod, "_bwd_cublas", lambda *a: cublas.append(1) or real(*a))
    x, W, A, B, b, dy = _inputs(1000, 1024, 1024, 64, bf16, bf16, True, True)
    args = (x, W, A, B, b, 0.5, 0.0, dy, True)
    eager = [_step(*args) for _ in range(3)]  # first sight, record, replay
    assert cublas == [] and replay.stats["declined"] == 0, replay.last_declined
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _step(*args)  # warm-up on the side stream (an eager call: the eager plan)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before = replay.stats["replayed"]
    with torch.cuda.graph(graph):
        out = _step(*args)
    assert replay.stats["replayed"] == before and cublas == [1], (replay.stats, cublas)  # own key: first sight
    graph.replay()
    torch.cuda.synchronize()
    for name, g, w in zip(["y", "dx", "dA", "dB"], out, eager[-1]):  # other kernels: not bitwise
        err = ((g.double() - w.double()).norm() / w.double().norm()).item()
        assert err < 2e-2, (name, err)


@_gpu
def test_deterministic_mode_is_its_own_key(monkeypatch):
    """Deterministic mode sums partials in a fixed order with a cuBLAS dB: declined, still right."""
    x, W, A, B, b, dy = _inputs(2176, 512, 512, 16, bf16, bf16, True, True)
    args = (x, W, A, B, b, 0.5, 0.1, dy, True)
    for _ in range(3):
        _step(*args)  # plans for the default mode exist now
    torch.use_deterministic_algorithms(True)
    try:
        want = _python_path(monkeypatch, *args)
        before = dict(replay.stats)
        for _ in range(3):  # deterministic mode: no atomics, every output bitwise
            assert all(torch.equal(g, w) for g, w in zip(_step(*args), want))
        assert replay.stats["declined"] == before["declined"] + 1, replay.stats  # the backward, once
        assert replay.stats["replayed"] == before["replayed"] + 1, replay.stats  # the third forward
    finally:
        torch.use_deterministic_algorithms(False)


@_gpu
def test_forced_pytorch_backend_is_not_replayed(monkeypatch):
    """LORA_KERNELS_BACKEND is read per call: with it set to torch, a key that has a plan runs the
    PyTorch path (no replay), whose results agree with the kernels' to bf16 rounding."""
    x, W, A, B, b, dy = _inputs(1000, 1024, 1024, 16, bf16, bf16, True, True)
    args = (x, W, A, B, b, 0.5, 0.05, dy, True)
    for _ in range(3):
        kernels = _step(*args)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    before = dict(replay.stats)
    torch_path = _step(*args)
    assert replay.stats == before
    for name, g, w in zip(("y", "dx", "dA", "dB"), torch_path, kernels):
        err = ((g.double() - w.double()).norm() / w.double().norm()).item()
        assert err < 2e-2, (name, err)


@_gpu
def test_tma_descriptors_follow_their_tensors(monkeypatch):
    """Replay reuses a TMA descriptor while its tensor's address is unchanged. Calls at one key with
    new tensors (other addresses and values), and with the same tensors rewritten in place, each
    give the Python path's results; with descriptor reuse off they are the same bits, and reuse
    makes fewer descriptors than encoding each one every call."""
    ops = torch.ops.lora_kernels_ext
    M, K, N, r, dt, adt, p, bias, need_x = CASES[0]  # the Gluon GEMMs, TMA shrink and dA pass: ~15 descriptors
    x, W, A, B, b, dy = _inputs(M, K, N, r, dt, adt, bias, need_x)
    for _ in range(2):  # first sight, record: the key's next calls replay
        _step(x, W, A, B, b, 0.5, p, dy, need_x)
    g = torch.Generator().manual_seed(5)
    for call in range(6):
        if call % 2 == 0:  # new tensors: every input at another address
            x = (torch.randn(M, K, generator=g).to("cuda", dt)).requires_grad_(True)
            W = (torch.randn(N, K, generator=g) / K**0.5).to("cuda", dt)
            dy = torch.randn(M, N, generator=g).to("cuda", dt)
        else:  # the same tensors, new values
            with torch.no_grad():
                for t in (x, W, dy):
                    t.copy_(torch.randn(t.shape, generator=g).to("cuda", dt) / (K**0.5 if t is W else 1.0))
        args = (x, W, A, B, b, 0.5, p, dy, need_x)
        want = _python_path(monkeypatch, *args)
        before = replay.stats["replayed"]
        got = _step(*args)
        assert replay.stats["replayed"] == before + 2, (call, replay.last_declined)
        _assert_same(got, want, need_x, call)
    encodes = ops.replay_tma_encodes()
    for _ in range(3):
        _step(*args)
    with_reuse = ops.replay_tma_encodes() - encodes
    was_on = ops.replay_tma_cache(False)
    try:
        encodes = ops.replay_tma_encodes()
        for _ in range(3):
            got = _step(*args)
        without = ops.replay_tma_encodes() - encodes
    finally:
        ops.replay_tma_cache(was_on)
    assert was_on and without >= 3 * 10, without  # every descriptor of every replayed call
    assert with_reuse < without, (with_reuse, without)
    _assert_same(got, want, need_x, "reuse off")
