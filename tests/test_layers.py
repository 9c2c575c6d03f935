"""LoRALinear: y = x @ W.T + b + s * (drop(x) @ A.T) @ B.T against float64 references."""
import math

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import LoRALinear
from ._models import torch_backend  # noqa: F401  (autouse: PyTorch path unless a test takes `backend`)

# (atol, rtol) per dtype of x / W, forward and backward, against float64
TOL = {
    torch.float32: {"fwd": (2e-5, 2e-5), "bwd": (5e-5, 5e-5)},
    torch.bfloat16: {"fwd": (3e-2, 2e-2), "bwd": (6e-2, 3e-2)},
}


def _layer(K=24, N=40, r=4, bias=True, dtype=torch.float32, adapter_dtype=None, seed=0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias).to(dtype)
    m = LoRALinear.from_linear(lin, r=r, dtype=adapter_dtype, **kw)
    with torch.no_grad():
        m.lora_B["default"].normal_(std=0.5)
    return lin, m


def _ref(x, W, b, terms):
    """float64: x @ W.T + b + sum s * (x @ A.T) @ B.T, terms = [(A, B, s, mask or None, p)]."""
    x64 = x.double()
    y = x64 @ W.double().t() + (b.double() if b is not None else 0)
    for A, B, s, mask, p in terms:
        h = x64 if mask is None else x64 * mask.reshape(x.shape) / (1 - p)
        y = y + s * (h @ A.double().t()) @ B.double().t()
    return y


def _close(got, want, dtype, which):
    atol, rtol = TOL[dtype][which]
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


def test_from_linear_shares_parameters_and_defaults():
    lin = nn.Linear(32, 48)
    m = LoRALinear.from_linear(lin, r=8)
    assert m.weight is lin.weight and m.bias is lin.bias
    cfg = m.adapters["default"]
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora) == (8, 16.0, 0.05, False)
    assert cfg.scale == 2.0
    assert m.active_adapters == ["default"]
    assert m.lora_A["default"].shape == (8, 32) and m.lora_B["default"].shape == (48, 8)
    # PEFT's default init: A kaiming-uniform(a = sqrt(5)) -> |A| <= 1 / sqrt(in), B = 0
    A = m.lora_A["default"]
    assert A.abs().max() <= 1 / math.sqrt(32) and A.std() > 0.3 / math.sqrt(32)
    assert torch.count_nonzero(m.lora_B["default"]) == 0
    x = torch.randn(3, 5, 32)
    m.train()  # dropout on, B = 0: still exactly the base layer
    torch.testing.assert_close(m(x), lin(x), atol=0, rtol=0)
    assert set(m.state_dict()) == {"weight", "bias", "lora_A.default", "lora_B.default"}


def test_gaussian_init_and_rslora():
    torch.manual_seed(0)
    m = LoRALinear.from_linear(nn.Linear(256, 256), r=16, alpha=32, init="gaussian", use_rslora=True)
    assert abs(m.lora_A["default"].std().item() - 1 / 16) < 0.01
    assert m.adapters["default"].scale == 32 / 4


def test_adapters_are_float32_on_16bit_layers():
    m = LoRALinear.from_linear(nn.Linear(16, 16).to(torch.bfloat16), r=2)
    assert m.lora_A["default"].dtype == torch.float32  # PEFT's autocast_adapter_dtype default
    m = LoRALinear.from_linear(nn.Linear(16, 16).to(torch.bfloat16), r=2, dtype=torch.bfloat16)
    assert m.lora_B["default"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_float64(dtype, adapter_dtype, bias):
    lin, m = _layer(K=33, N=20, r=3, bias=bias, dtype=dtype, adapter_dtype=adapter_dtype, dropout=0.0)
    m.train()
    x = torch.randn(2, 7, 33).to(dtype).requires_grad_(True)
    A, B = m.lora_A["default"], m.lora_B["default"]
    y = m(x)
    assert y.dtype == dtype and y.shape == (2, 7, 20)
    xr = x.detach().double().requires_grad_(True)
    Ar, Br = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
    ref = _ref(xr, lin.weight, lin.bias, [(Ar, Br, 2.0, None, 0.0)])
    _close(y, ref, dtype, "fwd")
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    ref.backward(dy.double())
    _close(x.grad, xr.grad, dtype, "bwd")
    _close(A.grad, Ar.grad, dtype, "bwd")
    _close(B.grad, Br.grad, dtype, "bwd")
    assert lin.weight.grad is not None  # W requires grad here (from_linear leaves it as it was)


def test_bf16_error_at_most_twice_naive():
    """The fused path in bf16 (bf16 adapters) is no less accurate than the same maths done naively in bf16."""
    lin, m = _layer(K=128, N=96, r=8, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16, dropout=0.0)
    m.eval()
    x = torch.randn(64, 128).to(torch.bfloat16)
    A, B = m.lora_A["default"], m.lora_B["default"]
    ref = _ref(x, lin.weight, lin.bias, [(A, B, 2.0, None, 0.0)])
    naive = lin(x) + 2.0 * ((x @ A.t()) @ B.t())
    ours = (m(x).double() - ref).abs().max()
    assert ours <= 2 * (naive.double() - ref).abs().max() + 1e-6


def test_dropout_only_in_training_and_matches_mask():
    p = 0.25
    lin, m = _layer(K=16, N=12, r=2, dropout=p)
    x = torch.randn(5, 16)
    A, B = m.lora_A["default"].detach(), m.lora_B["default"].detach()
    m.eval()
    _close(m(x), _ref(x, lin.weight, lin.bias, [(A, B, 2.0, None, 0.0)]), torch.float32, "fwd")
    m.train()
    torch.manual_seed(123)
    y = m(x)
    torch.manual_seed(123)
    mask = lk.dropout_mask(lk.dropout_seed(x.device), 5, 16, p)
    assert 0 < mask.sum() < mask.numel()
    _close(y, _ref(x, lin.weight, lin.bias, [(A, B, 2.0, mask, p)]), torch.float32, "fwd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge(dtype):
    lin, m = _layer(K=48, N=32, r=4, dtype=dtype, dropout=0.1)
    m.eval()
    x = torch.randn(6, 48).to(dtype)
    y = m(x)
    w0 = lin.weight.detach().clone()
    m.merge()
    assert m.merged and m.lora_terms() == []  # merged adapters are not added a second time
    assert m.weight is lin.weight  # merged in place
    delta = m.delta_weight("default")
    torch.testing.assert_close(lin.weight.float(), (w0.float() + delta).to(dtype).float(), atol=0, rtol=0)
    _close(m(x), y.float(), dtype, "fwd")
    m.unmerge()
    assert not m.merged
    # back to W up to one rounding of the dtype: |W' - W| <= ulp(|W| + |delta|)
    ulp = torch.finfo(dtype).eps * (w0.float().abs() + delta.abs())
    assert ((lin.weight.float() - w0.float()).abs() <= ulp).all()
    if dtype == torch.float32:
        assert (lin.weight - w0).abs().max() < 1e-6


def test_named_adapters_active_set_enable_disable():
    lin, m = _layer(K=20, N=18, r=2, dropout=0.0)
    m.add_adapter("b", r=3, alpha=3, dropout=0.0)
    m.add_adapter("c", r=2, alpha=4, dropout=0.3)
    assert m.active_adapters == ["default"]  # added adapters are not switched on
    with torch.no_grad():
        for name in ("b", "c"):
            m.lora_B[name].normal_()
    m.eval()
    x = torch.randn(4, 20)
    t = {n: (m.lora_A[n].detach(), m.lora_B[n].detach(), m.adapters[n].scale, None, 0.0) for n in m.adapters}
    _close(m(x), _ref(x, lin.weight, lin.bias, [t["default"]]), torch.float32, "fwd")
    m.set_adapter("b")
    _close(m(x), _ref(x, lin.weight, lin.bias, [t["b"]]), torch.float32, "fwd")
    for names in (["default", "b"], ["default", "b", "c"]):  # one dropout rate / two rates (eval: all 0)
        m.set_adapter(names)
        _close(m(x), _ref(x, lin.weight, lin.bias, [t[n] for n in names]), torch.float32, "fwd")
    m.disable_adapters()
    torch.testing.assert_close(m(x), lin(x))
    m.enable_adapters()
    _close(m(x), _ref(x, lin.weight, lin.bias, [t[n] for n in ("default", "b", "c")]), torch.float32, "fwd")
    m.delete_adapter("c")
    assert m.active_adapters == ["default", "b"] and "c" not in m.lora_A


def test_several_adapters_training_gradients():
    """Two active adapters with different scales and dropout rates: each gets its own gradient."""
    lin, m = _layer(K=20, N=18, r=2, dropout=0.0)
    m.add_adapter("b", r=3, alpha=5, dropout=0.0)
    with torch.no_grad():
        m.lora_B["b"].normal_()
    m.set_adapter(["default", "b"])
    m.train()
    x = torch.randn(4, 20)
    y = m(x)
    refs = {n: (m.lora_A[n].detach().double().requires_grad_(True), m.lora_B[n].detach().double().requires_grad_(True))
            for n in ("default", "b")}
    ref = _ref(x, lin.weight, lin.bias, [(a, b, m.adapters[n].scale, None, 0.0) for n, (a, b) in refs.items()])
    dy = torch.randn(y.shape)
    y.backward(dy)
    ref.backward(dy.double())
    for n, (a, b) in refs.items():
        _close(m.lora_A[n].grad, a.grad, torch.float32, "bwd")
        _close(m.lora_B[n].grad, b.grad, torch.float32, "bwd")


def test_extra_repr_is_readable():
    _, m = _layer(K=16, N=8, r=2)
    m.add_adapter("tenant_a", r=1, alpha=1, dropout=0.0)
    text = repr(m)
    assert "in_features=16, out_features=8, bias=True" in text
    assert "default: r=2, alpha=4, scale=2, dropout=0.05, torch.float32 (active)" in text
    assert "tenant_a: r=1, alpha=1, scale=1, dropout=0" in text


def test_state_dict_round_trip():
    _, m = _layer(K=16, N=8, r=2)
    _, m2 = _layer(K=16, N=8, r=2, seed=1)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 16)
    m.eval(), m2.eval()
    torch.testing.assert_close(m(x), m2(x), atol=0, rtol=0)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16(x_dtype):
    """fp32 layer under bf16 autocast; x may already be bf16 (the output of an earlier autocast op)."""
    lin, m = _layer(K=32, N=24, r=4, dropout=0.0)
    m.eval()
    x = torch.randn(5, 32).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    ref = _ref(x, lin.weight, lin.bias, [(m.lora_A["default"], m.lora_B["default"], 2.0, None, 0.0)])
    _close(y, ref, torch.bfloat16, "fwd")


@pytest.mark.parametrize("kw,err", [
    (dict(r=0), "r must be >= 1"),
    (dict(r=-2), "r must be >= 1"),
    (dict(r=2.0), "must be an int"),
    (dict(r=17), "larger than the layer"),
    (dict(r=2, dropout=1.0), "dropout must be a number in"),
    (dict(r=2, init="pissa"), "init must be one of"),
    (dict(r=2, adapter_name="a.b"), "adapter name"),
    (dict(r=2, adapter_name="training"), "adapter name"),
])
def test_bad_arguments(kw, err):
    with pytest.raises((ValueError, TypeError), match=err):
        LoRALinear.from_linear(nn.Linear(16, 32), **kw)


def test_bad_use():
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1))
    _, m = _layer(K=16, N=8, r=2)
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("default", r=2)
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        m.set_adapter("nope")
    m.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        m.delete_adapter("default")


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) traces the module without graph breaks (aot_eager: no C++ build on CPU)."""
    _, m = _layer(K=16, N=8, r=2, dropout=0.0)
    m.train()
    x = torch.randn(3, 16, requires_grad=True)
    y = m(x)
    y.sum().backward()
    grads = [p.grad.clone() for p in (m.lora_A["default"], m.lora_B["default"])]
    m.zero_grad()
    yc = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    yc.sum().backward()
    torch.testing.assert_close(yc, y)
    for g, p in zip(grads, (m.lora_A["default"], m.lora_B["default"])):
        torch.testing.assert_close(p.grad, g)


def test_triton_interpreter_path(backend, device):
    """One small fp32 case through both backends (on CPU the Triton one runs under the interpreter)."""
    lin, m = _layer(K=24, N=20, r=4, dropout=0.0)
    lin.to(device), m.to(device)
    m.train()
    x = torch.randn(9, 24, device=device)
    y = m(x)
    A, B = m.lora_A["default"], m.lora_B["default"]
    Ar, Br = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
    ref = _ref(x, lin.weight, lin.bias, [(Ar, Br, 2.0, None, 0.0)])
    _close(y, ref, torch.float32, "fwd")
    dy = torch.randn(y.shape, device=device)
    y.backward(dy)
    ref.backward(dy.double())
    _close(A.grad, Ar.grad, torch.float32, "bwd")
    _close(B.grad, Br.grad, torch.float32, "bwd")


@pytest.mark.gpu
def test_cuda_bf16_matches_float64():
    torch.manual_seed(0)
    lin = nn.Linear(256, 192).cuda().to(torch.bfloat16)
    m = LoRALinear.from_linear(lin, r=16, dropout=0.0)
    with torch.no_grad():
        m.lora_B["default"].normal_(std=0.1)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    ref = _ref(x, lin.weight, lin.bias, [(m.lora_A["default"], m.lora_B["default"], 2.0, None, 0.0)])
    _close(m(x), ref, torch.bfloat16, "fwd")
