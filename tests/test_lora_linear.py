"""lora_linear against a float64 reference: forward, every gradient, every dtype, awkward sizes.

On CPU both backends run (the Triton kernels through the interpreter, fp32/fp16 only: the
interpreter's bf16 dot is broken upstream); on a GPU the same tests run the compiled kernels, bf16
and larger shapes included.
"""
import dataclasses
import itertools
import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels.ops import lora_linear as op_mod
from lora_kernels.ops.dropout import keep_scale

from .conftest import DEVICE, ON_GPU

# Relative Frobenius error ||out - ref|| / ||ref|| against float64, forward / backward. fp32 runs
# the LoRA dots as full fp32 and cuBLAS without TF32 (torch's default), so 1e-5 has ~100x margin
# over what fp32 gives and still fails for any real mistake; fp16 / bf16 also have to stay within
# 2x the error of the naive composition in the same dtype (check_vs_naive).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 3e-3),
    torch.bfloat16: (1.2e-2, 1.5e-2),
}


def dtypes_for(backend):
    if backend == "triton" and not ON_GPU:
        return [torch.float32, torch.float16]  # interpreter: tl.dot on bf16 is broken (triton#11584)
    return [torch.float32, torch.float16, torch.bfloat16]


def rel_err(out, ref, scale_ref=None):
    """||out - ref|| / ||scale_ref||, scale_ref defaulting to ref.

    With scale_ref = the same computation on absolute values (|x| |W| ..., see run_case) this is
    the normwise error that rounding can cause whatever the cancellation: a gradient that is one
    dot product times a vector (M = 1, r = 1) otherwise shows the dot product's conditioning, not
    the kernel's accuracy.
    """
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in output"
    den = (ref if scale_ref is None else scale_ref).double().norm().clamp_min(1e-300)
    return ((out - ref).norm() / den).item()


def make_inputs(M, K, N, r, dtype, *, bias=True, lead=(), adapter_dtype=None, seed=None):
    """Fresh random inputs, scaled so every term of y is O(1) (no cancellation hides errors)."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    adt = adapter_dtype or dtype
    x = torch.randn(*lead, M, K, generator=g).to(DEVICE, dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(DEVICE, adt)
    B = (torch.randn(N, r, generator=g) / r**0.5).to(DEVICE, adt)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    return x, W, A, B, b


def reference(x, W, A, B, scale, b, p, seed):
    """float64 y (differentiable in every float64 input), with the documented dropout mask."""
    K = x.shape[-1]
    x2 = x.double().reshape(-1, K)
    mult = (lk.dropout_mask(seed, x2.shape[0], K, p, device=x.device).double() * keep_scale(p)) if p > 0 else 1.0
    y = x2 @ W.double().t() + scale * ((x2 * mult) @ A.double().t()) @ B.double().t()
    if b is not None:
        y = y + b.double()
    return y.reshape(*x.shape[:-1], W.shape[0])


def run_case(M, K, N, r, dtype, p, *, scale=0.5, bias=True, lead=(), x_transform=None, adapter_dtype=None,
             train_weight=False, transform=None):
    """transform: applied to each of x, A, B and b (after x_transform) before the call."""
    x, W, A, B, b = make_inputs(M, K, N, r, dtype, bias=bias, lead=lead, adapter_dtype=adapter_dtype)
    if x_transform is not None:
        x = x_transform(x)
    if transform is not None:
        x, A, B = transform(x), transform(A), transform(B)
        b = transform(b) if b is not None else None
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    if train_weight:
        W.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    gen = torch.Generator(DEVICE).manual_seed(1234)
    y = lk.lora_linear(x, W, A, B, scale, b, p, generator=gen)
    seed = lk.dropout_seed(DEVICE, torch.Generator(DEVICE).manual_seed(1234)) if p > 0 else None

    leaves = [x, A, B] + ([W] + ([b] if b is not None else []) if train_weight else [])
    refs, abs_refs = [], []
    for t in leaves:
        refs.append(t.detach().double().requires_grad_(True))
        abs_refs.append(t.detach().double().abs().requires_grad_(True))

    def ref_from(ts, absolute):
        rx, rA, rB = ts[:3]
        rW = ts[3] if train_weight else (W.double().abs() if absolute else W)
        rb = (ts[4] if b is not None else None) if train_weight else (b.double().abs() if absolute and b is not None else b)
        return reference(rx, rW, rA, rB, abs(scale) if absolute else scale, rb, p, seed)

    y_ref = ref_from(refs, False)
    y_abs = ref_from(abs_refs, True)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    # dy is rounded to the op's dtype first: the op can only see the rounded values
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype).double()
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    (y_abs * dy.abs()).sum().backward()
    for r, ra in zip(refs, abs_refs):
        r.scale = ra.grad  # what each gradient's rounding error is measured against
    return y, y_ref, leaves, refs, y_abs


def assert_matches(dtype, y, y_ref, leaves, refs, y_abs):
    """run_case's output and the gradients of x, A, B within TOL[dtype] of float64."""
    ftol, btol = TOL[dtype]
    assert rel_err(y, y_ref, y_abs) < ftol, (dtype, "y")
    for name, t, rt in zip(("dx", "dA", "dB"), leaves, refs):
        assert rel_err(t.grad, rt.grad, rt.scale) < btol, (dtype, name)


# ------------------------------------------------------------------------------------------------
# forward and backward against float64
# ------------------------------------------------------------------------------------------------
CPU_SHAPES = [  # (M, K, N, r): odd sizes, r = 1, K or N = 1, M = 1 (also run on GPU)
    (1, 17, 33, 1),
    (7, 1, 17, 8),
    (133, 17, 1, 16),
    (7, 2049, 17, 8),
    (133, 40, 2049, 3),
    (33, 130, 65, 128),
]
GPU_SHAPES = CPU_SHAPES + [(M, K, N, r) for M, (K, N), r in itertools.product(
    (1, 7, 133), ((1, 17), (17, 2049), (2049, 1), (2049, 2049)), (1, 16, 128))] + [
    (4096, 4096, 4096, 16), (1000, 1536, 4000, 256), (2048, 4096, 11008, 64)]


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("shape", GPU_SHAPES if ON_GPU else CPU_SHAPES, ids=str)
def test_matches_float64(backend, shape, p):
    M, K, N, r = shape
    if ON_GPU and backend == "torch" and shape not in CPU_SHAPES + GPU_SHAPES[-3:]:
        pytest.skip("the PyTorch path is covered at these sizes on CPU; GPU time goes to the kernels")
    for dtype in dtypes_for(backend):
        y, y_ref, leaves, refs, y_abs = run_case(M, K, N, r, dtype, p)
        ftol, btol = TOL[dtype]
        assert rel_err(y, y_ref, y_abs) < ftol, (dtype, "y")
        for name, t, rt in zip(("dx", "dA", "dB"), leaves, refs):
            assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape
            assert rel_err(t.grad, rt.grad, rt.scale) < btol, (dtype, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_2x_of_naive(backend, dtype):
    """Our error (forward and every gradient) <= 2x that of the naive composition in `dtype`."""
    if dtype not in dtypes_for(backend):
        pytest.skip("interpreter: no bf16 dot")
    M, K, N, r = (512, 1024, 768, 16) if ON_GPU else (64, 96, 80, 8)
    p, scale = 0.1, 2.0
    x, W, A, B, b = make_inputs(M, K, N, r, dtype)
    ours = [t.clone().requires_grad_(True) for t in (x, A, B)]
    naive = [t.clone().requires_grad_(True) for t in (x, A, B)]
    exact = [t.double().requires_grad_(True) for t in (x, A, B)]
    y = lk.lora_linear(*ours[:1], W, *ours[1:], scale, b, p, generator=torch.Generator(DEVICE).manual_seed(8))
    seed = lk.dropout_seed(DEVICE, torch.Generator(DEVICE).manual_seed(8))
    mask = lk.dropout_mask(seed, M, K, p, device=DEVICE)
    xn, An, Bn = naive
    y_naive = torch.nn.functional.linear(xn, W, b) + scale * ((xn * mask.to(dtype) * keep_scale(p)) @ An.t()) @ Bn.t()
    y_ref = reference(exact[0], W, exact[1], exact[2], scale, b, p, seed)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype).double()
    for out in (y, y_naive):
        (out.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    assert rel_err(y, y_ref) <= 2 * rel_err(y_naive, y_ref) + 1e-6
    for name, o, n, e in zip(("dx", "dA", "dB"), ours, naive, exact):
        assert rel_err(o.grad, e.grad) <= 2 * rel_err(n.grad, e.grad) + 1e-6, name


X_LAYOUTS = {
    "3d": lambda x: x.reshape(3, -1, x.shape[-1]),  # [3, M/3, K]
    "column_major": lambda x: x.t().contiguous().t(),  # stride (1, M)
    "strided_columns": lambda x: torch.cat([x, x], 1).reshape(x.shape[0], 2, -1).transpose(1, 2)[..., 0],
    "transposed_3d": lambda x: x.reshape(3, -1, x.shape[-1]).transpose(0, 1),  # [M/3, 3, K], not viewable
}


@pytest.mark.parametrize("layout", sorted(X_LAYOUTS))
def test_3d_and_noncontiguous_inputs(backend, layout):
    M, K, N, r = 12, 34, 20, 4
    x, W, A, B, b = make_inputs(M, K, N, r, torch.float32)
    x = X_LAYOUTS[layout](x).detach().requires_grad_(True)
    if layout != "3d":
        assert not x.is_contiguous()
    y = lk.lora_linear(x, W, A, B, 0.7, b, 0.2, generator=torch.Generator(DEVICE).manual_seed(3))
    seed = lk.dropout_seed(DEVICE, torch.Generator(DEVICE).manual_seed(3))
    rx = x.detach().double().requires_grad_(True)
    y_ref = reference(rx, W, A, B, 0.7, b, 0.2, seed)
    assert y.shape == y_ref.shape == (*x.shape[:-1], N)
    assert rel_err(y, y_ref) < TOL[torch.float32][0]
    dy = torch.randn_like(y_ref)
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    assert x.grad.shape == x.shape
    assert rel_err(x.grad, rx.grad) < TOL[torch.float32][1]


def test_weight_and_bias_gradients(backend):
    y, y_ref, leaves, refs, y_abs = run_case(13, 24, 19, 4, torch.float32, 0.1, train_weight=True)
    assert rel_err(y, y_ref, y_abs) < 1e-5
    for name, t, rt in zip(("dx", "dA", "dB", "dW", "db"), leaves, refs):
        assert rel_err(t.grad, rt.grad, rt.scale) < 1e-5, name


def test_fp32_adapters_on_half_activations(backend):
    """PEFT keeps adapters in fp32 on a 16-bit base: gradients come back in fp32."""
    dtype = torch.float16 if (backend == "triton" and not ON_GPU) else torch.bfloat16
    y, y_ref, leaves, refs, y_abs = run_case(17, 40, 24, 8, dtype, 0.1, adapter_dtype=torch.float32)
    assert leaves[1].grad.dtype == torch.float32 and leaves[2].grad.dtype == torch.float32
    assert rel_err(y, y_ref, y_abs) < TOL[dtype][0]
    for t, rt in zip(leaves, refs):
        assert rel_err(t.grad, rt.grad, rt.scale) < TOL[dtype][1]


def test_empty_batch(backend):
    x, W, A, B, b = make_inputs(0, 16, 8, 4, torch.float32, lead=(2,))
    x.requires_grad_(True)
    A.requires_grad_(True)
    y = lk.lora_linear(x, W, A, B, 1.0, b, 0.1)
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape and A.grad is not None and float(A.grad.abs().sum()) == 0.0


def test_only_adapter_grads_when_x_frozen(backend):
    x, W, A, B, b = make_inputs(11, 20, 12, 4, torch.float32)
    A.requires_grad_(True)
    B.requires_grad_(True)
    gen = torch.Generator(DEVICE).manual_seed(5)
    y = lk.lora_linear(x, W, A, B, 1.5, b, 0.3, generator=gen)
    seed = lk.dropout_seed(DEVICE, torch.Generator(DEVICE).manual_seed(5))
    rA, rB = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
    y_ref = reference(x, W, rA, rB, 1.5, b, 0.3, seed)
    dy = torch.randn_like(y_ref)
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    assert x.grad is None
    assert rel_err(A.grad, rA.grad) < 1e-5 and rel_err(B.grad, rB.grad) < 1e-5


# ------------------------------------------------------------------------------------------------
# dropout
# ------------------------------------------------------------------------------------------------
def kernel_mask(M, K, p, generator):
    """The mask the op actually applied, read back through the op itself:
    x = 1, A = I, B = I, W = 0, scale = 1  ->  y = keep * keep_scale(p)."""
    x = torch.ones(M, K, device=DEVICE)
    eye = torch.eye(K, device=DEVICE)
    y = lk.lora_linear(x, torch.zeros(K, K, device=DEVICE), eye, eye, 1.0, None, p, generator=generator)
    return y / keep_scale(p)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_kernel_mask_is_the_documented_mask(backend, p):
    M, K = (37, 130) if not ON_GPU else (1031, 256)
    m = kernel_mask(M, K, p, torch.Generator(DEVICE).manual_seed(11))
    seed = lk.dropout_seed(DEVICE, torch.Generator(DEVICE).manual_seed(11))
    expect = lk.dropout_mask(seed, M, K, p, device=DEVICE)
    assert torch.equal(m.round().bool(), expect)
    assert torch.allclose(m, expect.float(), atol=1e-6)  # 0 or 1, up to fp32 rounding of the rescale


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_rate_within_statistical_bounds(p):
    rows, cols = 256, 1024
    n = rows * cols
    mask = lk.dropout_mask(torch.tensor([987654321]), rows, cols, p)
    dropped = n - int(mask.sum())
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(dropped - n * p) < 6 * sigma
    # 8 neighbours share one Philox call (2 share a word): pairs must still be independent
    for a, b in ((0, 1), (0, 2), (1, 7)):
        both = int((~mask[:, a::8] & ~mask[:, b::8]).sum())
        n2 = n // 8
        assert abs(both - n2 * p * p) < 6 * (n2 * p * p * (1 - p * p)) ** 0.5, (a, b)
    # rows differ from each other (the row enters the counter)
    assert not torch.equal(mask[0], mask[1])


def test_same_seed_same_output_different_seed_different_mask(backend):
    x, W, A, B, b = make_inputs(16, 64, 32, 8, torch.float32)
    outs = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        outs.append(lk.lora_linear(x, W, A, B, 1.0, b, 0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_p_zero_is_exactly_no_dropout(backend):
    x, W, A, B, b = make_inputs(9, 33, 21, 5, torch.float32)
    state = torch.get_rng_state() if DEVICE == "cpu" else torch.cuda.get_rng_state()
    y0 = lk.lora_linear(x, W, A, B, 1.0, b, 0.0)
    after = torch.get_rng_state() if DEVICE == "cpu" else torch.cuda.get_rng_state()
    assert torch.equal(state, after), "p = 0 must not consume random numbers"
    assert rel_err(y0, reference(x, W, A, B, 1.0, b, 0.0, None)) < 1e-5
    assert torch.equal(y0, lk.lora_linear(x, W, A, B, 1.0, b, 0.0))


def test_backends_agree_bitwise_on_mask(monkeypatch):
    """Both paths draw the same mask from the same seed."""
    if not (ON_GPU or op_mod.HAS_TRITON):
        pytest.skip("needs triton")
    masks = []
    for be in ("torch", "triton"):
        monkeypatch.setenv("LORA_KERNELS_BACKEND", be)
        masks.append(kernel_mask(19, 68, 0.25, torch.Generator(DEVICE).manual_seed(21)))
    assert torch.equal(masks[0].round(), masks[1].round())


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input_raises_clearly():
    x, W, A, B, b = make_inputs(4, 8, 6, 2, torch.float32)
    cases = [
        ((x, W[:, :7], A, B, 1.0, b, 0.0), ValueError, "features"),
        ((x, W, A[:, :7], B, 1.0, b, 0.0), ValueError, "lora_A"),
        ((x, W, A, B[:, :1], 1.0, b, 0.0), ValueError, "lora_B"),
        ((x, W, A, B, 1.0, b[:5], 0.0), ValueError, "bias"),
        ((x, W, A[:0], B[:, :0], 1.0, b, 0.0), ValueError, "r = "),
        ((x, W, A, B, 1.0, b, 1.0), ValueError, "dropout_p"),
        ((x, W, A, B, 1.0, b, -0.1), ValueError, "dropout_p"),
        ((x, W.double(), A, B, 1.0, b, 0.0), TypeError, "dtype"),
        ((x.half(), W.half(), A.bfloat16(), B.bfloat16(), 1.0, b.half(), 0.0), TypeError, "lora_A and lora_B"),
        ((x.long(), W, A, B, 1.0, b, 0.0), TypeError, "float16"),
        ((x, W, A, B, float("nan"), b, 0.0), TypeError, "scale"),
        ((x, W, A, B, torch.tensor(1.0), b, 0.0), TypeError, "scale"),
        ((x, W[None], A, B, 1.0, b, 0.0), ValueError, "2-D"),
        ((x.numpy() if DEVICE == "cpu" else 3, W, A, B, 1.0, b, 0.0), TypeError, "torch.Tensor"),
    ]
    if DEVICE == "cpu":
        cases.append(((x, W.to("meta"), A, B, 1.0, b, 0.0), ValueError, "one device"))
    else:
        cases.append(((x, W.cpu(), A, B, 1.0, b, 0.0), ValueError, "one device"))
    for args, exc, words in cases:
        with pytest.raises(exc, match=words):
            lk.lora_linear(*args)


def test_large_rank_falls_back_visibly(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    x, W, A, B, b = make_inputs(3, 300, 5, 257, torch.float32)
    if ON_GPU or op_mod.HAS_TRITON:
        backend, why = lk.dispatch_reason(x, A)
        assert backend == "torch" and "257" in why
    y = lk.lora_linear(x, W, A, B, 1.0, b)
    assert rel_err(y, reference(x, W, A, B, 1.0, b, 0.0, None)) < 1e-5


# ------------------------------------------------------------------------------------------------
# registration: opcheck, compile, CUDA graphs, autocast, memory kept
# ------------------------------------------------------------------------------------------------
def test_opcheck(backend):
    if backend == "triton" and not ON_GPU:
        pytest.skip("the interpreter reads fake tensors' data; opcheck of the Triton path runs on GPU")
    x, W, A, B, b = make_inputs(5, 24, 12, 4, torch.float32)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    seed = lk.dropout_seed(DEVICE)
    for args in [(x, W, A, B, 0.5, b, 0.1, seed), (x, W, A, B, 2.0, None, 0.0, None)]:
        torch.library.opcheck(torch.ops.lora_kernels.lora_linear.default, args)
    dy = torch.randn(5, 12, device=DEVICE)
    S = torch.randn(5, 4, device=DEVICE)
    torch.library.opcheck(torch.ops.lora_kernels.lora_linear_backward.default,
                          (dy, x.detach(), W, A.detach(), B.detach(), S, seed, 0.5, 0.1, True))


def test_compiled_matches_eager(backend):
    """fullgraph compile of forward + backward gives the eager results (same seed, same mask)."""
    compile_backend = "inductor" if ON_GPU else "aot_eager"  # inductor on CPU needs a long C++ build
    x, W, A, B, b = make_inputs(24, 48, 40, 8, torch.float32)

    def step(x, A, B):
        return lk.lora_linear(x, W, A, B, 0.5, b, 0.0)

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    outs = []
    for fn in (step, compiled):
        xs, As, Bs = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
        y = fn(xs, As, Bs)
        (y * y).sum().backward()
        outs.append((y.detach(), xs.grad, As.grad, Bs.grad))
    for e, c in zip(*outs):
        assert rel_err(c, e) < 1e-5


@pytest.mark.gpu
def test_cuda_graph_capture():
    x, W, A, B, b = make_inputs(256, 512, 384, 16, torch.bfloat16)
    A.requires_grad_(True)
    B.requires_grad_(True)
    static_x = x.clone()

    def fwd_bwd():
        y = lk.lora_linear(static_x, W, A, B, 2.0, b, 0.1)
        y.float().square().sum().backward()
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up compiles the kernels before capture
            A.grad = B.grad = None
            fwd_bwd()
    torch.cuda.current_stream().wait_stream(s)
    A.grad = B.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = fwd_bwd()
    ys = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        ys.append(y_static.clone())
    assert torch.isfinite(ys[0].float()).all()
    assert not torch.equal(ys[0], ys[1]), "each replay must draw a fresh dropout seed"


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16(backend, x_dtype):
    """Under autocast a bf16 activation may meet fp32 weights (the usual case): cast, not reject."""
    if torch.bfloat16 not in dtypes_for(backend):
        pytest.skip("interpreter: no bf16 dot (the fp32 adapters meet bf16 activations as bf16 operands)")
    x, W, A, B, b = make_inputs(64, 128, 96, 8, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = lk.lora_linear(x.to(x_dtype), W, A, B, 1.0, b, 0.0)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference(x.to(x_dtype), W, A, B, 1.0, b, 0.0, None)) < TOL[torch.bfloat16][0]


@pytest.mark.gpu
def test_memory_kept_by_forward_is_base_plus_m_r_fp32():
    M, K, N, r = 4096, 2048, 2048, 16
    x, W, A, B, b = make_inputs(M, K, N, r, torch.bfloat16, bias=False)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = lk.lora_linear(x, W, A, B, 2.0, None, 0.1)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    base = y.numel() * y.element_size()
    # y itself + S [M, r] fp32 + the 8-byte seed (the caching allocator rounds each to 512 B)
    assert kept <= base + M * r * 4 + 4096, (kept, base)
    del y


@pytest.mark.gpu
def test_deterministic_mode_repeats_bitwise():
    x, W, A, B, b = make_inputs(1024, 512, 768, 16, torch.bfloat16)
    A.requires_grad_(True)
    B.requires_grad_(True)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            A.grad = B.grad = None
            torch.manual_seed(0)
            lk.lora_linear(x, W, A, B, 2.0, b, 0.1).float().square().sum().backward()
            grads.append((A.grad.clone(), B.grad.clone()))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 64])
def test_inference_at_few_rows_takes_the_cublas_path(monkeypatch, M):
    """No gradient, no dropout, at most DECODE_ROWS rows, eager: three cuBLAS calls instead of the
    kernels, against float64 in every dtype; with a gradient, dropout, more rows or under CUDA graph
    capture, the kernels again."""
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(op_mod, "DECODE_ROWS", 64)
    calls = []
    real = op_mod._decode_cublas
    monkeypatch.setattr(op_mod, "_decode_cublas", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bias in (True, False):
            x, W, A, B, b = make_inputs(M, 136, 72, 8, dtype, bias=bias, lead=(1,))
            with torch.no_grad():
                y = lk.lora_linear(x, W, A, B, 0.75, b)
            ref = reference(x, W, A, B, 0.75, b, 0.0, None)
            y_abs = reference(x.abs(), W.abs(), A.abs(), B.abs(), 0.75, b.abs() if bias else None, 0.0, None)
            assert y.shape == (1, M, 72) and y.dtype == dtype
            assert rel_err(y, ref, y_abs) < TOL[dtype][0], (dtype, bias)
    assert calls == [M] * 6
    x, W, A, B, b = make_inputs(M, 136, 72, 8, torch.bfloat16)
    with torch.no_grad():
        assert lk.dispatch_reason(x, A)[0] == "cublas" and lk.dispatch_reason(x, A, 0.1)[0] == "triton"
    assert lk.dispatch_reason(x, A.detach().requires_grad_(True))[0] == "triton"
    lk.lora_linear(x, W, A.requires_grad_(True), B, 0.75, b)  # a gradient to compute
    with torch.no_grad():
        lk.lora_linear(x, W, A, B, 0.75, b, 0.1)  # dropout
        lk.lora_linear(torch.randn(65, 136, device="cuda", dtype=torch.bfloat16), W, A, B, 0.75, b)  # 65 rows
        y32 = lk.lora_linear(x, W, A.float(), B.float(), 0.75, b)  # fp32 adapters on bf16 rows: this path too
        assert rel_err(y32, reference(x, W, A, B, 0.75, b, 0.0, None)) < TOL[torch.bfloat16][0]
        side = torch.cuda.Stream()  # warm-up of what the capture runs, off the default stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            monkeypatch.setattr(op_mod, "DECODE_ROWS", 0)
            lk.lora_linear(x, W, A, B, 0.75, b)
            monkeypatch.setattr(op_mod, "DECODE_ROWS", 64)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()  # captured: the kernels (faster replayed from a graph)
        with torch.cuda.graph(graph):
            y_static = lk.lora_linear(x, W, A, B, 0.75, b)
        graph.replay()
        want = lk.lora_linear(x, W, A, B, 0.75, b)  # eager: the cuBLAS path
    assert calls == [M] * 8
    torch.cuda.synchronize()
    assert rel_err(y_static, want) < TOL[torch.bfloat16][0]


# ------------------------------------------------------------------------------------------------
# the base GEMM with the LoRA expansion in its epilogue (sm_90, 16-bit activations)
# ------------------------------------------------------------------------------------------------
def _gemm_kernel_runs_here() -> bool:
    from lora_kernels import _backend

    if ON_GPU:
        return torch.cuda.get_device_capability()[0] == 9  # TMA descriptors + wgmma configs: Hopper
    return _backend.interpreting()


GEMM_KERNEL_SHAPES = (  # (M, K_RED, N_OUT, r): ragged against the 128 x 256 (or 128 x 128) x 64 tiles
    [(300, 136, 520, 5), (129, 72, 40, 16), (1000, 1032, 264, 64), (4100, 512, 4104, 16)] if ON_GPU
    else [(150, 40, 72, 5), (300, 72, 600, 16)])  # 9 tiles on the interpreter's 8 "SMs": a CTA runs two


@pytest.mark.skipif(not _gemm_kernel_runs_here(), reason="needs an sm_90 GPU or the Triton interpreter")
@pytest.mark.parametrize("shape", GEMM_KERNEL_SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["forward", "dgrad", "dgrad_dropout"])
def test_lora_gemm_kernel_matches_float64(shape, mode):
    """out = a @ op(W) + coef * (L @ Rt) [* keep] + bias against float64, both W orientations."""
    M, K_RED, N_OUT, r = shape
    w_kmajor, p = mode == "forward", (0.3 if mode == "dgrad_dropout" else 0.0)
    dtypes = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]  # interpreter: no bf16 dot
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    for dt in dtypes:
        a = torch.randn(M, K_RED, generator=g).to(DEVICE, dt)
        W = (torch.randn(*((N_OUT, K_RED) if w_kmajor else (K_RED, N_OUT)), generator=g) / K_RED**0.5).to(DEVICE, dt)
        L = torch.randn(M, r, generator=g).to(DEVICE)  # fp32, as S and G are
        rt = (torch.randn(r, N_OUT, generator=g) / r**0.5).to(DEVICE, dt)
        bias = torch.randn(N_OUT, generator=g).to(DEVICE, dt) if w_kmajor else None
        seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE)
        coef = 0.7
        out = op_mod._lora_gemm(a, W, L, rt, coef, bias, w_kmajor, p=p, seed=seed if p > 0 else None)
        base = a.double() @ (W.double().t() if w_kmajor else W.double())
        lora = coef * L.double() @ rt.double()
        if p > 0:  # dgrad: the mask is over dx = x's positions (rows, N_OUT columns)
            lora = lora * lk.dropout_mask(seed, M, N_OUT, p, device=DEVICE).double()
        ref = base + lora + (bias.double() if bias is not None else 0.0)
        scale_ref = (a.double().abs() @ (W.double().abs().t() if w_kmajor else W.double().abs())
                     + (coef * L.double().abs() @ rt.double().abs()) + (bias.double().abs() if bias is not None else 0.0))
        assert out.shape == (M, N_OUT) and out.dtype == dt
        assert rel_err(out, ref, scale_ref) < TOL[dt][0], (dt, mode)
        if p > 0:  # the mask must matter: without it the result is far off
            assert rel_err(out, base + coef * L.double() @ rt.double()) > 10 * TOL[dt][0]


def _spy_fused_gemms(monkeypatch) -> list:
    """A list that records each fused GEMM the op runs: True for the forward's, False for the dgrad's
    (the Triton kernel or the Gluon one either way)."""
    calls = []
    real, real_ws, real_dgrad = op_mod._lora_gemm, op_mod._lora_gemm_ws, op_mod._lora_dgrad_ws
    monkeypatch.setattr(op_mod, "_lora_gemm", lambda *a, **k: calls.append(k["w_kmajor"]) or real(*a, **k))
    monkeypatch.setattr(op_mod, "_lora_gemm_ws", lambda *a, **k: calls.append(True) or real_ws(*a, **k))
    monkeypatch.setattr(op_mod, "_lora_dgrad_ws", lambda *a, **k: calls.append(False) or real_dgrad(*a, **k))
    return calls


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here() and op_mod.HAS_GLUON),
                    reason="the Gluon GEMM kernel runs on sm_90 only (Gluon has no interpreter)")
@pytest.mark.parametrize("shape", [(300, 136, 520, 8), (129, 72, 40, 16), (2000, 200, 3000, 24),
                                   (4100, 512, 4104, 16), (256, 64, 256, 32)], ids=str)
def test_gluon_gemm_kernel_matches_float64(monkeypatch, shape):
    """lora_gemm_ws_kernel (LORA_KERNELS_GLUON_GEMM=1) against float64 for both 16-bit dtypes, with
    and without bias, B in the activations' dtype or fp32 (PEFT's adapters: cast by _gluon_gemm_b),
    at ragged M, K and N; one wave of tiles (4 stages, sliced epilogue) and several (3 stages);
    r 8 (L and B read as zeros past r), 16, 24 and 32. It must agree with the Triton kernel, which
    rounds its operands the same way."""
    from torch._library.triton import set_wrap_triton_enabled

    M, K_RED, N_OUT, r = shape
    monkeypatch.setattr(op_mod, "_GLUON_GEMM", True)
    BR = op_mod._block_r(r)
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    for dt, adt, with_bias in ((torch.bfloat16, torch.float32, True), (torch.float16, torch.float16, False),
                               (torch.bfloat16, torch.bfloat16, False)):
        a = torch.randn(M, K_RED, generator=g).to(DEVICE, dt)
        W = (torch.randn(N_OUT, K_RED, generator=g) / K_RED**0.5).to(DEVICE, dt)
        S = torch.randn(M, r, generator=g).to(DEVICE)  # fp32, as the shrink writes it
        B = (torch.randn(N_OUT, r, generator=g) / r**0.5).to(DEVICE, adt)
        bias = torch.randn(N_OUT, generator=g).to(DEVICE, dt) if with_bias else None
        coef = 0.7
        Lb = torch.full((M, BR), float("nan"), device=DEVICE, dtype=dt)  # as the shrink writes it: zeros past r
        Lb[:, r:] = 0
        Lb[:, :r] = (coef * S).to(dt)
        with set_wrap_triton_enabled(False):  # as the op's eager path launches (under torch.compile: cuBLAS)
            Bq = op_mod._gluon_gemm_b(a, B)
            assert Bq is not None and Bq.dtype == dt
            out = op_mod._lora_gemm_ws(a, W, Lb, Bq, bias)
        Lq = Lb[:, :r].double()
        ref = a.double() @ W.double().t() + Lq @ B.to(dt).double().t() + (bias.double() if with_bias else 0.0)
        scale_ref = (a.double().abs() @ W.double().abs().t() + Lq.abs() @ B.double().abs().t()
                     + (bias.double().abs() if with_bias else 0.0))
        assert out.shape == (M, N_OUT) and out.dtype == dt
        assert rel_err(out, ref, scale_ref) < TOL[dt][0], (dt, adt, with_bias)
        assert rel_err(out, a.double() @ W.double().t()) > 10 * TOL[dt][0]  # the LoRA term is there
        other = op_mod._lora_gemm(a, W, S, B.t(), coef, bias, True)  # the Triton kernel
        assert rel_err(out, other.double(), scale_ref) < TOL[dt][0]


@pytest.mark.parametrize("sms", [1, 7, 132, 144])
def test_balanced_grid_keeps_the_busiest_cta_and_frees_the_rest(sms):
    """_balanced_grid (the Gluon dgrad's persistent grid): no more CTAs than SMs or tiles, the busiest
    CTA has no more tiles than with min(tiles, sms) CTAs, and one CTA fewer would give it more."""
    for tiles in range(1, 5 * sms + 3):
        g = op_mod._balanced_grid(tiles, sms)
        rounds = -(-tiles // min(tiles, sms))
        assert 1 <= g <= min(tiles, sms), (tiles, sms, g)
        assert -(-tiles // g) == rounds, (tiles, sms, g)
        assert g == 1 or -(-tiles // (g - 1)) > rounds, (tiles, sms, g)
    assert op_mod._balanced_grid(512, 132) == 128  # 8192 x 4096 in 128 x 256 tiles: 4 each, 4 SMs free
    assert op_mod._balanced_grid(0, sms) == 0  # an empty output: no CTAs, as min(tiles, sms) gave


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here() and op_mod.HAS_GLUON),
                    reason="the Gluon dgrad kernel runs on sm_90 only (Gluon has no interpreter)")
@pytest.mark.parametrize("shape", [(300, 136, 520, 8), (129, 72, 40, 16), (2000, 200, 3000, 24),
                                   (4100, 1024, 4104, 16), (1000, 512, 2056, 5), (256, 64, 256, 32)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gluon_dgrad_kernel_matches_float64(shape, p):
    """lora_dgrad_ws_kernel: dx = dy @ W + keep * (Gs @ A) against float64 for both 16-bit dtypes, A in
    the activations' dtype or fp32 (cast by _gluon_dgrad_a), ragged M, K_RED and K_OUT, r 5 and 8
    (Gs and A read as zeros past r) to 32; one wave of tiles and several a CTA (4100 x 1024 -> 4104:
    each next tile's LoRA operands and mask bits loaded during this one; 72 or 136 deep: fewer K
    steps than stages). It must agree with the Triton kernel, which rounds G the same way."""
    from torch._library.triton import set_wrap_triton_enabled

    M, K_RED, K_OUT, r = shape
    BR = op_mod._block_r(r)
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    seed = torch.tensor([int(torch.randint(0, 2**62, (), generator=g))], dtype=torch.int64, device=DEVICE)
    coef = 0.7
    for dt, adt in ((torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)):
        dy = torch.randn(M, K_RED, generator=g).to(DEVICE, dt)
        W = (torch.randn(K_RED, K_OUT, generator=g) / K_RED**0.5).to(DEVICE, dt)
        G = torch.randn(M, r, generator=g).to(DEVICE)  # fp32, as the dy pass writes it
        A = (torch.randn(r, K_OUT, generator=g) / r**0.5).to(DEVICE, adt)
        Gs = torch.full((M, BR), float("nan"), device=DEVICE, dtype=dt)  # as the dy pass writes it: zeros past r
        Gs[:, r:] = 0
        Gs[:, :r] = (coef * G).to(dt)
        with set_wrap_triton_enabled(False):  # as the op's eager path launches (under torch.compile: cuBLAS)
            Aq = op_mod._gluon_dgrad_a(dy, A)
            assert Aq is not None and Aq.dtype == dt
            dx = op_mod._lora_dgrad_ws(dy, W, Gs, Aq, p, seed if p > 0 else None)
        base = dy.double() @ W.double()
        lora = Gs[:, :r].double() @ A.to(dt).double()
        keep = lk.dropout_mask(seed, M, K_OUT, p, device=DEVICE).double() if p > 0 else 1.0
        ref = base + lora * keep
        scale_ref = dy.double().abs() @ W.double().abs() + Gs[:, :r].double().abs() @ A.to(dt).double().abs()
        assert dx.shape == (M, K_OUT) and dx.dtype == dt
        assert rel_err(dx, ref, scale_ref) < TOL[dt][0], (dt, adt)
        assert rel_err(dx, base) > 10 * TOL[dt][0]  # the LoRA term is there
        if p > 0:  # and the mask matters
            assert rel_err(dx, base + lora) > 10 * TOL[dt][0]
        other = op_mod._lora_gemm(dy, W, G, A, coef, None, False, p=p, seed=seed if p > 0 else None)  # Triton
        assert rel_err(dx, other.double(), scale_ref) < TOL[dt][0]


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here() and op_mod.HAS_GLUON),
                    reason="the Gluon dgrad kernel runs on sm_90 only (Gluon has no interpreter)")
@pytest.mark.parametrize("p", [1 / 2**16, 0.05, 0.5, 1 - 1 / 2**16])
def test_gluon_dgrad_applies_the_documented_mask_bit_for_bit(p):
    """dy = 0 and Gs @ A = 1 make the Gluon dgrad's output its keep mask, which must be dropout_mask's
    bits exactly: thresholds on both sides of 2^15 and at both ends; one tile a CTA and several
    (each next tile's mask bits loaded during the current tile's K steps or after them)."""
    from torch._library.triton import set_wrap_triton_enabled

    seed = torch.tensor([13579], dtype=torch.int64, device=DEVICE)
    for (M, K_RED, K_OUT), dt in itertools.product([(1200, 64, 264), (8200, 1024, 1032), (8200, 64, 1032)],
                                                   (torch.bfloat16, torch.float16)):
        dy = torch.zeros(M, K_RED, device=DEVICE, dtype=dt)
        W = torch.zeros(K_RED, K_OUT, device=DEVICE, dtype=dt)
        Gs = torch.zeros(M, 16, device=DEVICE, dtype=dt)
        Gs[:, 0] = 1
        A = torch.ones(8, K_OUT, device=DEVICE, dtype=dt)
        with set_wrap_triton_enabled(False):
            dx = op_mod._lora_dgrad_ws(dy, W, Gs, A, p, seed)  # (it draws the bits with _mask_bits)
        mask = lk.dropout_mask(seed, M, K_OUT, p, device=DEVICE)
        assert torch.equal(dx, mask.to(dt)), (M, K_RED, K_OUT, dt, (dx != mask.to(dt)).sum().item())


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here() and op_mod.HAS_GLUON),
                    reason="the Gluon dA pass runs on sm_90 only (Gluon has no interpreter)")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gluon_da_pass_matches_float64(p):
    """lora_da_kernel: dA = Gs.T @ (x * keep) into a zeroed fp32 buffer against float64, both 16-bit
    dtypes, ragged M and K (K past the last 256-column strip, rows past M in the last step), r 5 to 32
    (Gs's columns past r hold NaN: they must not reach dA), the rows split over several programs
    or not, the mask read from the dgrad's bits."""
    from torch._library.triton import set_wrap_triton_enabled

    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    seed = torch.tensor([int(torch.randint(0, 2**62, (), generator=g))], dtype=torch.int64, device=DEVICE)
    for (M, K, r), dt in itertools.product([(300, 136, 5), (8200, 264, 16), (130, 1032, 32), (4100, 1000, 8)],
                                           (torch.bfloat16, torch.float16)):
        x = torch.randn(M, K, generator=g).to(DEVICE, dt)
        BR = op_mod._block_r(r)
        Gs = torch.full((M, BR), float("nan"), device=DEVICE, dtype=dt)
        Gs[:, :r] = torch.randn(M, r, generator=g).to(DEVICE, dt)
        with set_wrap_triton_enabled(False):
            bits = op_mod._mask_bits(M, K, p, seed, x.device) if p > 0 else None
            da = torch.zeros(r, K, device=DEVICE)
            dA = op_mod._bwd_xa_gluon(x, Gs, r, da, bits)
        keep = lk.dropout_mask(seed, M, K, p, device=DEVICE).double() if p > 0 else 1.0
        ref = Gs[:, :r].double().t() @ (x.double() * keep)
        scale_ref = Gs[:, :r].double().abs().t() @ (x.double().abs() * keep)
        assert dA is da and dA.shape == (r, K)
        assert rel_err(dA, ref, scale_ref) < TOL[dt][1], (M, K, r, dt)
        if p > 0:  # the mask matters
            assert rel_err(dA, Gs[:, :r].double().t() @ x.double()) > 10 * TOL[dt][1]


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here() and op_mod.HAS_GLUON),
                    reason="the Gluon dA pass runs on sm_90 only (Gluon has no interpreter)")
@pytest.mark.parametrize("p", [1 / 2**16, 0.05, 0.5, 1 - 1 / 2**16])
def test_gluon_da_pass_applies_the_documented_mask_bit_for_bit(p):
    """x = 1 and Gs one-hot by row % 16 make dA[j, k] the count of kept rows m = j (mod 16) in column k,
    exact in fp32: it must equal dropout_mask's, at thresholds on both sides of 2^15 and at both ends."""
    from torch._library.triton import set_wrap_triton_enabled

    seed = torch.tensor([24680], dtype=torch.int64, device=DEVICE)
    for (M, K), dt in itertools.product([(1200, 264), (8200, 1032)], (torch.bfloat16, torch.float16)):
        x = torch.ones(M, K, device=DEVICE, dtype=dt)
        Gs = torch.nn.functional.one_hot(torch.arange(M, device=DEVICE) % 16, 16).to(dt)
        with set_wrap_triton_enabled(False):
            dA = op_mod._bwd_xa_gluon(x, Gs, 16, torch.zeros(16, K, device=DEVICE),
                                      op_mod._mask_bits(M, K, p, seed, x.device))
        keep = lk.dropout_mask(seed, M, K, p, device=DEVICE)
        counts = torch.zeros(16, K, device=DEVICE).index_add_(0, torch.arange(M, device=DEVICE) % 16, keep.float())
        assert torch.equal(dA, counts), (M, K, dt, (dA != counts).sum().item())


def _cases_with_launches(monkeypatch, shape, p):
    """run_case at shape (M, K, N, r) and p, bf16 with bf16 adapters and a bias, then fp16 with fp32
    adapters: yields (dtype, [(kernel, launch meta)] of that case, run_case's result)."""
    launched = []
    real_launch = op_mod._launch
    monkeypatch.setattr(op_mod, "_launch", lambda kernel, *a, **k: launched.append((kernel, k)) or real_launch(kernel, *a, **k))
    for dtype, adt, bias in ((torch.bfloat16, None, True), (torch.float16, torch.float32, False)):
        launched.clear()
        yield dtype, launched, run_case(*shape, dtype, p, bias=bias, adapter_dtype=adt)


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here() and op_mod.HAS_GLUON),
                    reason="the Gluon dgrad kernel runs on sm_90 only (Gluon has no interpreter)")
@pytest.mark.parametrize("shape", [(4100, 1024, 512, 16), (3000, 1280, 768, 24), (2400, 1536, 1024, 8),
                                   (3000, 1280, 768, 40), (8500, 2048, 1024, 16)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_backward_takes_the_gluon_dgrad(monkeypatch, shape, p):
    """lora_linear's backward at r <= 32 on the fused path runs the dy pass (with Gs = s/(1-p) G in x's
    dtype, from the kernel or, with the N range split at these row counts, from the summed G), then
    lora_dgrad_ws_kernel and lora_da_kernel; every output and gradient against float64, with fp32
    adapters too. r = 40 keeps the Triton GEMM and dA pass. At 8500 x 2048 -> 1024 the mask's bits
    kernel runs persistent on an H100: 1072 items on 536 programs."""
    r = shape[3]
    for dtype, launched, (y, y_ref, leaves, refs, y_abs) in _cases_with_launches(monkeypatch, shape, p):
        kernels = [k for k, _ in launched]
        gluon = r <= 32
        assert (op_mod.lora_dgrad_ws_kernel in kernels) == gluon, kernels
        assert (op_mod.lora_da_kernel in kernels) == gluon, kernels  # (the dA pass reads its Gs and bits)
        assert (op_mod._lora_gemm_kernel in kernels) == (not gluon), kernels  # (the forward: Gluon at r % 8 == 0)
        dy_pass = [meta for k, meta in launched if k is op_mod._lora_bwd_dy_kernel]
        assert len(dy_pass) == 1 and (gluon or not dy_pass[0]["WRITE_GS"]), kernels  # (split: Gs from the sum)
        assert_matches(dtype, y, y_ref, leaves, refs, y_abs)


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here() and op_mod.HAS_GLUON),
                    reason="the Gluon GEMM kernel runs on sm_90 only (Gluon has no interpreter)")
@pytest.mark.parametrize("shape", [(4100, 512, 1024, 16), (3000, 320, 1280, 24), (2400, 256, 1536, 8),
                                   (3000, 320, 1280, 12)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_forward_takes_the_gluon_gemm(monkeypatch, shape, p):
    """With LORA_KERNELS_GLUON_GEMM=1, lora_linear's forward at r % 8 == 0 and r <= 32 runs the TMA
    shrink writing L = s S in x's dtype and then lora_gemm_ws_kernel; every output and gradient
    against float64, with fp32 adapters too. r = 12 (B's rows not 16-byte multiples) keeps the
    Triton GEMM."""
    monkeypatch.setattr(op_mod, "_GLUON_GEMM", True)
    r = shape[3]
    for dtype, launched, (y, y_ref, leaves, refs, y_abs) in _cases_with_launches(monkeypatch, shape, p):
        kernels = [k for k, _ in launched]
        gluon = r % 8 == 0
        assert (op_mod.lora_gemm_ws_kernel in kernels) == gluon, kernels
        shrink = [meta for k, meta in launched if k is op_mod._lora_shrink_tma_kernel]
        assert len(shrink) == 1 and shrink[0]["WRITE_LB"] == gluon, kernels
        assert_matches(dtype, y, y_ref, leaves, refs, y_abs)


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here()), reason="the fused GEMM path runs on sm_90 only")
@pytest.mark.parametrize("shape", [(300, 136, 520, 5), (1000, 1032, 264, 16), (4100, 512, 4104, 64),
                                   (300, 136, 517, 5)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_takes_the_fused_gemm_and_matches_float64(monkeypatch, shape, p):
    """lora_linear at >= FUSED_GEMM_MIN_ROWS rows: forward and dx through the GEMM-epilogue kernel,
    every output and gradient against float64, for bias / no bias and both 16-bit dtypes. With N = 517
    the rows of y and dy are not 16-byte aligned for TMA: both go the cuBLAS way, not a crash."""
    calls = _spy_fused_gemms(monkeypatch)
    monkeypatch.setattr(op_mod, "_GEMM_MIN_TILE_USE", 0.0)  # ragged N and K on purpose: the tiles' edges
    monkeypatch.setattr(op_mod, "_GEMM_MIN_WAVE", 0.0)  # and few tiles
    M, K, N, r = shape
    for dtype, bias in ((torch.bfloat16, True), (torch.float16, False)):
        calls.clear()
        y, y_ref, leaves, refs, y_abs = run_case(M, K, N, r, dtype, p, bias=bias)
        want = [True, False] if N % 8 == 0 else []
        assert calls == want, f"expected {want} (forward: True, dgrad: False) through the fused GEMM, got {calls}"
        assert_matches(dtype, y, y_ref, leaves, refs, y_abs)


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here()), reason="the fused GEMM path runs on sm_90 only")
def test_fused_gemm_only_where_its_tiles_fit_the_feature_dims(monkeypatch):
    """Ragged N or K (more than 5% of the [128, 256] x 64 tiles empty) take cuBLAS, which picks its
    tiles per shape; ragged M does not matter. Each way, every output against float64."""
    calls = _spy_fused_gemms(monkeypatch)
    monkeypatch.setattr(op_mod, "_GEMM_MIN_WAVE", 0.0)  # (few tiles: the next test)
    for (M, K, N), want in (((300, 512, 512), [True, False]), ((300, 512, 1056), [False]),
                            ((300, 1056, 512), [True]), ((300, 1032, 2056), [])):
        calls.clear()
        y, y_ref, leaves, refs, y_abs = run_case(M, K, N, 16, torch.bfloat16, 0.1)
        assert calls == want, f"{M}x{K}->{N}: expected {want} (forward: True, dgrad: False), got {calls}"
        assert_matches(torch.bfloat16, y, y_ref, leaves, refs, y_abs)


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here()), reason="the fused GEMM path runs on sm_90 only")
def test_fused_gemm_only_with_half_a_wave_of_tiles(monkeypatch):
    """Fewer [128, 256] output tiles than half the SMs take cuBLAS (which picks smaller tiles), per
    GEMM: the forward's tiles are rows x N, the dgrad's rows x K. Each way, against float64."""
    calls = _spy_fused_gemms(monkeypatch)
    half_wave = 0.5 * op_mod._sm_count_of(torch.device(DEVICE))
    rows = 128 * math.ceil(half_wave / 2)  # 2 column tiles of 256: exactly half a wave or more
    for (M, K, N) in ((rows, 512, 512), (rows - 128, 512, 512), (rows - 128, 1024, 512), (256, 4096, 4096)):
        calls.clear()
        y, y_ref, leaves, refs, y_abs = run_case(M, K, N, 16, torch.bfloat16, 0.1)
        tiles = lambda cols: math.ceil(M / 128) * math.ceil(cols / 256)
        want = [True] * (tiles(N) >= half_wave) + [False] * (tiles(K) >= half_wave)
        assert calls == want, f"{M}x{K}->{N}: expected {want} (forward: True, dgrad: False), got {calls}"
        assert_matches(torch.bfloat16, y, y_ref, leaves, refs, y_abs)


def test_cublas_rank_rule(monkeypatch):
    """The rank-r products go to cuBLAS past r = 64, and past r = 32 at <= 4096 rows while a CUDA
    graph is captured, for 16-bit activations only (see _CUBLAS_MIN_RANK_FEW_ROWS)."""
    ok = lambda M, r, dt=torch.bfloat16: op_mod._cublas_products_ok(torch.empty(M, 8, dtype=dt, device="meta"), r)
    cases = [(4096, 32), (4096, 33), (4096, 64), (4097, 64), (4097, 65), (1, 33), (1, 65)]
    monkeypatch.setattr(op_mod, "_capturing", lambda x: False)
    assert [ok(M, r) for M, r in cases] == [False, False, False, False, True, False, True]
    monkeypatch.setattr(op_mod, "_capturing", lambda x: True)
    assert [ok(M, r) for M, r in cases] == [False, True, True, False, True, True, True]
    assert not ok(100, 128, torch.float32) and ok(100, 128, torch.float16)
    assert not ok(100, 64, torch.float32)


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(133, 72, 40, 33), (70, 130, 65, 128)] + (
    [(1000, 1024, 3000, 64), (4100, 512, 520, 96)] if ON_GPU else []), ids=str)
def test_backward_products_in_cublas_past_rank_32(monkeypatch, shape, p):
    """16-bit activations at r > 64 (r > 32 at few rows under CUDA-graph capture): G, dB, and without
    dropout also dA, G @ A and the forward's S through cuBLAS; with dropout dA and the masked G @ A
    through one Triton x pass. At r <= 64 the forward's GEMM keeps its LoRA epilogue, fed by the
    cuBLAS S at p = 0. Every output and gradient against float64. fp32 activations, r <= 32 and
    r33-64 outside a capture keep the Triton passes."""
    from lora_kernels import _backend

    if not (ON_GPU or _backend.interpreting()):
        pytest.skip("needs a GPU or the Triton interpreter")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    calls = []
    real = op_mod._bwd_cublas

    def spy(*a):  # the rank, and dA / dB as returned: in the adapters' dtype, not cast by autograd
        dx, da, db = real(*a)
        calls.append((a[3].shape[0], da.dtype, db.dtype))
        return dx, da, db

    monkeypatch.setattr(op_mod, "_bwd_cublas", spy)
    gemms = []
    real_gemm = op_mod._lora_gemm

    def gemm_spy(a, weight, L, *rest, **kw):  # the GEMM-epilogue kernel: its L [M, r] (S in forward)
        gemms.append(L.dtype)
        return real_gemm(a, weight, L, *rest, **kw)

    monkeypatch.setattr(op_mod, "_lora_gemm", gemm_spy)
    M, K, N, r = shape
    if r <= 64:  # r33-64 take cuBLAS only while a graph is captured: pretend (tests/test_replay.py captures)
        monkeypatch.setattr(op_mod, "_capturing", lambda x: True)
    # (1000, 1024, 3000, 64) on an H100: 96 output tiles of 128 x 256, so the forward keeps the
    # GEMM-epilogue kernel (see _fused_gemm_ok) with S from cuBLAS at p = 0 or the shrink kernel
    gemm_fwd = ON_GPU and r <= op_mod._GEMM_MAX_RANK and M >= 1000 and _gemm_kernel_runs_here()
    for dtype in ([torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]):  # interpreter: no bf16 dot
        for adt in (dtype, torch.float32):  # PEFT's default keeps adapters in fp32
            calls.clear()
            gemms.clear()
            y, y_ref, leaves, refs, y_abs = run_case(M, K, N, r, dtype, p, adapter_dtype=adt)
            assert calls == [(r, adt, adt)], calls
            assert gemms == ([torch.float32] if gemm_fwd else []), gemms  # forward only: dx from cuBLAS
            assert_matches(dtype, y, y_ref, leaves, refs, y_abs)
    calls.clear()
    run_case(M, K, N, 32, torch.float16, p)
    run_case(M, K, N, r, torch.float32, p)
    monkeypatch.setattr(op_mod, "_capturing", lambda x: False)
    run_case(M, K, N, 33, torch.float16, p)  # not captured: r33-64 keep the Triton passes
    assert calls == []


@pytest.mark.skipif(not _gemm_kernel_runs_here(), reason="needs an sm_90 GPU or the Triton interpreter")
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("cfg", [dataclasses.astuple(c) for c in (op_mod._TMA_SHRINK_DROPOUT_CFG, op_mod._TMA_SHRINK_CFG,
                                                                    op_mod._TMA_SHRINK_DROPOUT_SMALL_A_CFG)], ids=str)
def test_tma_shrink_kernel_matches_float64(cfg, p):
    """S = drop(x) @ A.T through the TMA-load shrink, ragged M and K (x's tiles zero-filled past them);
    with lb, also the forward Gluon GEMM's operand lb = s S in x's dtype, zeros past r, bit for bit
    the rounding the Triton GEMM applies to S."""
    shapes = [(300, 136, 5), (1000, 1032, 16), (130, 520, 32)] if ON_GPU else [(70, 264, 5), (33, 136, 16)]
    for (M, K, r), dt in itertools.product(shapes, [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]):
        x, _, A, _, _ = make_inputs(M, K, 8, r, dt, bias=False)
        seed = torch.tensor([24680], dtype=torch.int64, device=DEVICE)
        S = op_mod._shrink_tma(x, A, p, seed if p > 0 else None, op_mod._Cfg(*cfg))
        mult = lk.dropout_mask(seed, M, K, p, device=DEVICE).double() * keep_scale(p) if p > 0 else 1.0
        ref = (x.double() * mult) @ A.double().t()
        assert S.shape == (M, r) and S.dtype == torch.float32
        assert rel_err(S, ref, (x.double().abs() * mult) @ A.double().abs().t()) < TOL[dt][0], (M, K, r, dt)
        BR = op_mod._block_r(r)
        lb = torch.full((M, BR), float("nan"), dtype=dt, device=DEVICE)
        S2 = op_mod._shrink_tma(x, A, p, seed if p > 0 else None, op_mod._Cfg(*cfg), lb=lb, lb_scale=0.375)
        assert torch.equal(S2, S), (M, K, r, dt)  # (one CTA per row block: the same sums in the same order)
        assert torch.equal(lb[:, :r], (S * 0.375).to(dt)), (M, K, r, dt)
        assert torch.equal(lb[:, r:], torch.zeros_like(lb[:, r:])), (M, K, r, dt)


def test_pair_kernels_zero_and_round_like_torch():
    """_zero2_kernel zeroes both buffers (NaN-filled before) to their ends, and _cast2 rounds both fp32
    buffers exactly as Tensor.to does, at sizes that end inside a program's block."""
    from lora_kernels import _backend

    if not (ON_GPU or _backend.interpreting()):
        pytest.skip("needs a GPU or the Triton interpreter")
    dtypes = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]  # (interpreter: bf16 casts truncate)
    for (sa, sb), dt in itertools.product([((5, 4099), (4097, 3)), ((1, 1), (16, 8192))], dtypes):
        a = torch.full(sa, float("nan"), device=DEVICE)
        b = torch.full(sb, float("nan"), device=DEVICE)
        na, nb = a.numel(), b.numel()
        blk = op_mod._PAIR_BLOCK
        op_mod._launch(op_mod._zero2_kernel, (op_mod._cdiv(na, blk) + op_mod._cdiv(nb, blk), 1), a, na, b, nb,
                       BLOCK=blk)
        assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b)), (sa, sb)
        za, zb = op_mod._zeros2(sa, sb, DEVICE)
        assert za.shape == sa and zb.shape == sb and not za.any() and not zb.any()
        a, b = torch.randn(sa, device=DEVICE) * 3, torch.randn(sb, device=DEVICE) / 7
        ca, cb = op_mod._cast2(a, dt, b, dt)
        assert ca.dtype == dt and cb.dtype == dt and ca.shape == sa and cb.shape == sb
        assert torch.equal(ca, a.to(dt)) and torch.equal(cb, b.to(dt)), (sa, sb, dt)
    a32 = torch.randn(3, 5, device=DEVICE)
    same, other = op_mod._cast2(a32, torch.float32, torch.ones(2, 2, device=DEVICE), torch.float16)
    assert same is a32 and torch.equal(other, torch.ones(2, 2, dtype=torch.float16, device=DEVICE))


def test_dy_pass_matches_float64_and_writes_gs():
    """The dy pass: G = dy @ B and dB = s dy.T @ S against float64, and with gs also Gs = c G rounded to
    dy's dtype, zeros past r, bit for bit the rounding the Triton dgrad GEMM applies to G: written by
    the kernel (one split) or with G from the parts by _lora_g_sum_kernel (few row blocks: N split)."""
    from lora_kernels import _backend

    if not (ON_GPU or _backend.interpreting()):
        pytest.skip("needs a GPU or the Triton interpreter")
    # split N (few row blocks; the interpreter counts 8 SMs): (300, 136, 5), (130, 1032, 32) / (70, 136, 16), (33, 1000, 3)
    shapes = [(300, 136, 5), (8200, 264, 16), (130, 1032, 32)] if ON_GPU else [(300, 72, 5), (70, 136, 16), (33, 1000, 3)]
    for (M, N, r), dt in itertools.product(shapes, [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]):
        g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
        dy = torch.randn(M, N, generator=g).to(DEVICE, dt)
        B = (torch.randn(N, r, generator=g) / r**0.5).to(DEVICE, dt)
        S = torch.randn(M, r, generator=g).to(DEVICE)
        BR = op_mod._block_r(r)
        gs = torch.full((M, BR), float("nan"), dtype=dt, device=DEVICE)
        G, db = op_mod._bwd_dy(dy, B, S, 0.5, dt, False, gs=gs, gs_scale=0.375)
        assert rel_err(G, dy.double() @ B.double(), dy.double().abs() @ B.double().abs()) < TOL[dt][0], (M, N, r, dt)
        ref_db = 0.5 * dy.double().t() @ S.to(dt).double()
        assert rel_err(db, ref_db, 0.5 * dy.double().abs().t() @ S.to(dt).double().abs()) < TOL[dt][0], (M, N, r, dt)
        assert torch.equal(gs[:, :r], (G * 0.375).to(dt)), (M, N, r, dt)
        assert torch.equal(gs[:, r:], torch.zeros_like(gs[:, r:])), (M, N, r, dt)


def _bit_weights(first: int, length: int) -> torch.Tensor:
    """[16, length] fp32: row j holds 2^i at column first + 8 j + i (i < 8), zeros elsewhere, so a
    product with 0/1 flags gives each row's 8 flags as the bits of an exact integer (sums of
    distinct powers of two below 2^8 are exact in fp32 and in the 16-bit dtypes' products)."""
    w = torch.zeros(16, length)
    cols = first + torch.arange(128).view(16, 8)  # row j: columns first + 8 j .. first + 8 j + 7
    w.scatter_(1, cols, (2.0 ** torch.arange(8.0)).expand(16, 8))
    return w


def _flags(values: torch.Tensor, scale: float) -> torch.Tensor:
    """[..., 16] integers (times `scale`) -> [..., 128] 0/1 flags, bit i of entry j at 8 j + i."""
    ints = (values.double() / scale).round().long()
    assert torch.allclose(values.double(), ints.double() * scale, rtol=1e-6, atol=0), "not integers"
    bits = (ints.unsqueeze(-1) >> torch.arange(8, device=ints.device)) & 1
    return bits.flatten(-2).bool()


@pytest.mark.skipif(not _gemm_kernel_runs_here(), reason="needs an sm_90 GPU or the Triton interpreter")
@pytest.mark.parametrize("p", [1 / 2**16, 0.05, 0.5, 0.7, 1 - 1 / 2**16])
def test_masked_passes_apply_the_documented_mask_bit_for_bit(p):
    """The shrink (pointer and TMA kernels) and the TMA dA pass drop exactly dropout_mask's
    elements: x = 1 and power-of-two adapters turn every output into 8 keep flags. Thresholds on
    both sides of 2^15 (the top bit of the 16-bit draws) and at both ends of the range."""
    M, K = 1200, 264  # ragged rows; columns 136.. cross several Philox groups and a K tile
    seed = torch.tensor([13579], dtype=torch.int64, device=DEVICE)
    mask = lk.dropout_mask(seed, M, K, p, device=DEVICE)
    ks = keep_scale(p)
    for dt in [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]:
        x = torch.ones(M, K, device=DEVICE, dtype=dt)
        for first in (0, 136):  # columns first .. first + 127
            A = _bit_weights(first, K).to(device=DEVICE, dtype=dt)
            cols = slice(first, first + 128)
            shrinks = {"pointer": op_mod._shrink(x, A, p, seed, op_mod._shrink_cfg(M, 16, True))}
            for cfg in (op_mod._TMA_SHRINK_DROPOUT_CFG, op_mod._TMA_SHRINK_DROPOUT_SMALL_A_CFG):
                shrinks[f"tma {cfg}"] = op_mod._shrink_tma(x, A, p, seed, cfg)
            for name, S in shrinks.items():
                assert torch.equal(_flags(S, ks), mask[:, cols]), (name, dt, first)
        # dA = s ks G.T @ (x keep): G's column j holds 2^i at row first + 8 j + i -> rows' flags
        for first in (0, 1064):
            G = _bit_weights(first, M).t().contiguous().to(DEVICE)  # [M, 16] fp32
            dA = op_mod._bwd_xa_tma(x, G, seed, 0.5, p, op_mod._XPASS_TMA_CFG)  # [16, K]
            assert torch.equal(_flags(dA.t(), 0.5 * ks).t(), mask[first:first + 128]), (dt, first)


def _decode_mask_bits(bits: torch.Tensor, M: int, K: int) -> torch.Tensor:
    """_mask_bits' words -> the [M, K] keep mask, from the layout its docstring states: word (t, q, r,
    h) of tile t = pid_m num_n + pid_n, bit jj + 16 b = keep(pid_m BM + r, pid_n BN + 128 h + 8 jj + 2 q + b)."""
    BM, BN = op_mod._GEMM_TILE.block_a, op_mod._GEMM_TILE.block_b
    num_m, num_n, H = -(-M // BM), -(-K // BN), BN // 128
    assert bits.dtype == torch.int32 and bits.shape == (num_m * num_n * 4, BM * H)
    w = bits.view(num_m, num_n, 4, BM, H).to(torch.int64) & 0xFFFFFFFF
    bit = torch.arange(16, device=bits.device).view(16, 1) + 16 * torch.arange(2, device=bits.device).view(1, 2)
    flags = (w[..., None, None] >> bit) & 1  # [num_m, num_n, q, r, h, jj, b]
    return flags.permute(0, 3, 1, 4, 5, 2, 6).reshape(num_m * BM, num_n * BN)[:M, :K].bool()


@pytest.mark.parametrize("M,K", [(200, 300), (128, 256), (70, 520), (300, 520)] + ([(2000, 1032)] if ON_GPU else []))
@pytest.mark.parametrize("p", [1 / 2**16, 0.05, 0.5, 1 - 1 / 2**16])
@pytest.mark.parametrize("per_sm", [None, 1])
def test_mask_bits_are_the_documented_mask(monkeypatch, M, K, p, per_sm):
    """_mask_bits_kernel draws dropout_mask's bits exactly, in the Gluon dgrad's tile order: ragged M
    and K (the last tiles partly past the data), thresholds on both sides of 2^15 and at both ends;
    one program an SM (per_sm = 1), so that programs take several items each (18 items at 300 x 520
    on the interpreter's 8 SMs, 160 at 2000 x 1032 on an H100's 132)."""
    if per_sm is not None:
        monkeypatch.setattr(op_mod, "_MASK_BITS_CTAS_PER_SM", per_sm)
    seed = lk.dropout_seed(DEVICE)
    bits = op_mod._mask_bits(M, K, p, seed, DEVICE, persistent=True if per_sm else None)
    mask = lk.dropout_mask(seed, M, K, p, device=DEVICE)
    assert torch.equal(_decode_mask_bits(bits, M, K), mask)
    assert 0 < mask.sum() < mask.numel() or p in (1 / 2**16, 1 - 1 / 2**16)


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here()), reason="the TMA shrink runs on sm_90 only")
def test_lora_linear_takes_the_tma_shrink_at_many_rows(monkeypatch):
    calls = []
    real = op_mod._shrink_tma
    monkeypatch.setattr(op_mod, "_shrink_tma", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    for dtype, p in ((torch.bfloat16, 0.1), (torch.float16, 0.0)):
        calls.clear()
        y, y_ref, leaves, refs, y_abs = run_case(8200, 136, 264, 16, dtype, p)
        assert len(calls) == 1, "expected the forward's shrink through the TMA kernel"
        assert_matches(dtype, y, y_ref, leaves, refs, y_abs)


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and _gemm_kernel_runs_here()), reason="the TMA shrink runs on sm_90 only")
def test_tma_shrink_tiles_follow_the_adapters_bytes():
    """[16, 128] tiles with dropout only where A's step tile is no larger than x's (16-bit, r <= 16)."""
    x = torch.randn(8200, 136, device=DEVICE, dtype=torch.bfloat16)
    cases = ((torch.bfloat16, 16, 0.1, op_mod._TMA_SHRINK_DROPOUT_SMALL_A_CFG),
             (torch.bfloat16, 8, 0.1, op_mod._TMA_SHRINK_DROPOUT_SMALL_A_CFG),
             (torch.float32, 16, 0.1, op_mod._TMA_SHRINK_DROPOUT_CFG),
             (torch.bfloat16, 32, 0.1, op_mod._TMA_SHRINK_DROPOUT_CFG),
             (torch.bfloat16, 16, 0.0, op_mod._TMA_SHRINK_CFG))
    with op_mod._raw_launches():  # (under wrap_triton's tracing the TMA kernels are not taken)
        for adt, r, p, want in cases:
            A = torch.randn(r, 136, device=DEVICE, dtype=adt)
            assert op_mod._tma_shrink_cfg(x, A, p) == want, (adt, r, p)


def _offset_copy(t: torch.Tensor, elems: int) -> torch.Tensor:
    """t's values in fresh storage starting `elems` elements past a 16-byte boundary."""
    buf = torch.empty(t.numel() + elems, dtype=t.dtype, device=t.device)
    return buf[elems:].view(t.shape).copy_(t)


@pytest.mark.gpu
def test_direct_launches_follow_each_calls_specialization():
    """Eager calls launch compiled kernels from a cache keyed on what Triton specializes on (tensor
    alignment, ints' divisibility by 16): the same shapes with 16-byte aligned inputs, then inputs
    2 bytes off (the TMA paths then give way to pointer kernels compiled without the alignment
    assumption), then aligned again, and sizes of other divisibility, each match float64."""
    for (M, K, N), shift in itertools.product(((2176, 512, 512), (2177, 520, 504)), (0, 1, 0)):
        transform = (lambda t: _offset_copy(t, shift)) if shift else None
        for p in (0.0, 0.1):
            y, y_ref, leaves, refs, y_abs = run_case(M, K, N, 16, torch.bfloat16, p, transform=transform)
            if shift:
                assert all(t.data_ptr() % 16 for t in leaves), "the inputs were meant to be misaligned"
            assert_matches(torch.bfloat16, y, y_ref, leaves, refs, y_abs)


def _da_pass(kernel, x, A, G, seed, p, da):
    if kernel == "tma":
        return op_mod._bwd_xa_tma(x, G, seed, 0.5, p, op_mod._XPASS_TMA_CFG, da=da)
    return op_mod._bwd_x(x, A, G, seed, 0.5, p, False, op_mod._x_cfg(x.shape[0], A.shape[0]), da=da)[0]


@pytest.mark.parametrize("kernel", ["tma", "pointer"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_da_pass_matches_float64(kernel, p):
    """dA = s/(1-p) G.T @ (x * keep) through the dA pass (TMA loads or pointer loads), ragged M and K,
    with the rows split or not, the strips added atomically into a zeroed dA or kept as partials
    (deterministic mode)."""
    from lora_kernels import _backend

    if not (ON_GPU or _backend.interpreting()) or (kernel == "tma" and not _gemm_kernel_runs_here()):
        pytest.skip("needs a GPU or the Triton interpreter (the TMA kernel: sm_90 or the interpreter)")
    shapes = [(300, 136, 5), (8200, 264, 16), (130, 1032, 32)] if ON_GPU else [(70, 264, 5), (150, 136, 16)]
    for (M, K, r), dt, atomic in itertools.product(
            shapes, [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16], (True, False)):
        x, _, A, _, _ = make_inputs(M, K, 8, r, dt, bias=False)
        G = torch.randn(M, r, device=DEVICE)
        seed = torch.tensor([13579], dtype=torch.int64, device=DEVICE)
        da = torch.zeros(r, K, device=DEVICE) if atomic else None
        dA = _da_pass(kernel, x, A, G, seed if p > 0 else None, p, da)
        mult = lk.dropout_mask(seed, M, K, p, device=DEVICE).double() * keep_scale(p) if p > 0 else 1.0
        ref = 0.5 * G.double().t() @ (x.double() * mult)
        assert dA.shape == (r, K) and dA.dtype == torch.float32 and (dA is da or not atomic)
        scale_ref = 0.5 * G.double().abs().t() @ (x.double().abs() * mult)
        assert rel_err(dA, ref, scale_ref) < TOL[dt][1], (M, K, r, dt, atomic)
