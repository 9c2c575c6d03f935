"""patch / unpatch / merge on tiny models: the layers chosen, and outputs and gradients against PEFT."""
import copy
import io
import logging

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import LoRALinear
from ._models import (CASES, LLAMA_LAYER, R, build, layer_names, loss_of, peft_twin, randomize_adapters,
                     torch_backend)  # noqa: F401  (torch_backend: autouse)

FP32 = dict(atol=2e-5, rtol=2e-5)
FP32_GRAD = dict(atol=5e-5, rtol=5e-5)
BF16 = dict(atol=5e-2, rtol=5e-2)

PAIRS = [(name, False) for name in CASES] + [(n, True) for n, c in CASES.items() if c.expected_vision]


def _adapter_params(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("case,vision", PAIRS, ids=[f"{n}{'-vision' if v else ''}" for n, v in PAIRS])
def test_patch_selects_expected_layers_and_matches_peft(case, vision):
    c = CASES[case]
    base = build(case)
    model = copy.deepcopy(base)
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    lk.patch(model, r=R, dropout=0.0, vision=vision)
    expected = c.expected_vision if vision else c.expected
    report = model.lora_kernels_report
    assert set(report.patched) == expected
    assert {n for n, m in model.named_modules() if isinstance(m, LoRALinear)} == expected
    for n in expected:  # wrapped, not copied
        m = model.get_submodule(n)
        assert m.weight is before[n].weight and m.bias is before[n].bias and m._base is before[n]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(_adapter_params(model)) and len(trainable) == 2 * len(expected)
    assert report.trainable_params == sum(p.numel() for p in _adapter_params(model).values())

    randomize_adapters(model)
    twin = peft_twin(base, model, expected)
    g = torch.Generator().manual_seed(7)
    inputs = c.inputs(g)
    torch.testing.assert_close(c.output(model, inputs), c.output(twin, inputs), **FP32)

    model.train(), twin.train()
    loss_of(c.output(model, inputs), torch.Generator().manual_seed(3)).backward()
    loss_of(c.output(twin, inputs), torch.Generator().manual_seed(3)).backward()
    root = twin.base_model.model
    n_checked = 0
    for n in expected:
        ours, theirs = model.get_submodule(n), root.get_submodule(n)
        for which in ("lora_A", "lora_B"):
            g_ours, g_theirs = getattr(ours, which)["default"].grad, getattr(theirs, which)["default"].weight.grad
            assert (g_ours is None) == (g_theirs is None), n
            if g_ours is not None:
                torch.testing.assert_close(g_ours, g_theirs, **FP32_GRAD)
                n_checked += 1
    assert n_checked >= len(expected)  # most layers get gradients (a last vision layer may be unused)


def test_qwen2_qkv_bias_is_kept():
    model = lk.patch(build("qwen2"), r=R)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None


@pytest.mark.parametrize("case", list(CASES))
def test_training_lowers_a_regression_loss(case):
    """A few AdamW steps on the adapters alone pull every model's output towards a random target."""
    c = CASES[case]
    model = lk.patch(build(case), r=R, dropout=0.05).train()
    g = torch.Generator().manual_seed(0)
    inputs = c.inputs(g)
    with torch.no_grad():
        target = c.output(model, inputs) + torch.randn(c.output(model, inputs).shape, generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(c.output(model, inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.98 * losses[0], losses


@pytest.mark.parametrize("case", ["llama", "llava"])
def test_training_lowers_lm_loss(case):
    c = CASES[case]
    model = lk.patch(build(case), r=R, dropout=0.05).train()
    inputs = c.inputs(torch.Generator().manual_seed(0))
    labels = inputs["input_ids"].clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("kwargs,expected", [
    (dict(target_modules=["q_proj", "v_proj"]), layer_names("model.layers", 2, ["self_attn.q_proj", "self_attn.v_proj"])),
    (dict(target_modules=r".*layers\.1\.mlp\..*_proj"), layer_names("model.layers", 2, LLAMA_LAYER[4:]) - layer_names(
        "model.layers", 1, LLAMA_LAYER[4:])),
    (dict(exclude_modules=["down_proj"]), layer_names("model.layers", 2, LLAMA_LAYER[:6])),
    (dict(exclude_modules=r".*\.0\..*"), layer_names("model.layers", 2, LLAMA_LAYER) - layer_names(
        "model.layers", 1, LLAMA_LAYER)),
    (dict(filter_fn=lambda m, n: m.out_features == 128), layer_names("model.layers", 2, ["mlp.gate_proj", "mlp.up_proj"])),
    (dict(target_modules="all-linear"), layer_names("model.layers", 2, LLAMA_LAYER)),
])
def test_target_forms(kwargs, expected):
    model = lk.patch(build("llama"), r=R, **kwargs)
    assert set(model.lora_kernels_report.patched) == expected


@pytest.mark.parametrize("vision", [False, True])
def test_all_linear_never_takes_projector_or_lm_head(vision):
    model = lk.patch(build("llava"), r=R, target_modules="all-linear", vision=vision)
    report = model.lora_kernels_report
    expected = CASES["llava"].expected_vision if vision else CASES["llava"].expected
    assert set(report.patched) == expected
    assert "projector" in report.skipped["model.multi_modal_projector.linear_1"]
    assert "output head" in report.skipped["lm_head"]
    if not vision:
        assert "vision=True" in report.skipped["model.vision_tower.encoder.layers.0.self_attn.q_proj"]


def test_internvl_chat_projector_mlp1_is_never_patched():
    model = lk.patch(build("internvl_chat"), r=R, target_modules="all-linear", vision=True)
    assert "projector" in model.lora_kernels_report.skipped["mlp1.1"]
    assert "output head" in model.lora_kernels_report.skipped["language_model.output"]


def test_report_is_logged_printed_and_readable(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="lora_kernels"):
        model = lk.patch(build("llava"), r=R, verbose=True)
    text = str(model.lora_kernels_report)
    assert text in caplog.text and text in capsys.readouterr().out
    assert "patched 14" in text and "self_attn.q_proj x2" in text
    assert "12 x vision tower (pass vision=True to include it)" in text
    assert "trainable params: " in text and "|| all params: " in text and "trainable%: " in text


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 2)


@pytest.mark.parametrize("model_fn,kwargs,exc,match", [
    (_Unknown, {}, ValueError, r"no module .* was selected.*dense.*classifier.*target_modules"),
    (lambda: build("llama"), dict(r=0), ValueError, "r must be >= 1"),
    (lambda: build("llama"), dict(r=-1), ValueError, "r must be >= 1"),
    (lambda: build("llama"), dict(r=40), ValueError, r"r = 40 is larger than layer model\.layers\.0\.self_attn\.k_proj"),
    (lambda: build("llama"), dict(target_modules=3), TypeError, "target_modules must be"),
    (lambda: build("llama"), dict(target_modules=[]), ValueError, "empty"),
    (lambda: build("llama"), dict(filter_fn="q_proj"), TypeError, "filter_fn must be callable"),
    (lambda: build("llama"), dict(target_modules=["nothing_here"]), ValueError, "q_proj"),
])
def test_bad_input_raises_and_leaves_model_unchanged(model_fn, kwargs, exc, match):
    model = model_fn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        lk.patch(model, **kwargs)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == state.keys()


def test_patching_twice_raises():
    model = lk.patch(build("llama"), r=R)
    with pytest.raises(RuntimeError, match="already patched"):
        lk.patch(model, r=R)


def test_unpatch_restores_original_modules():
    base = build("llama")
    model = copy.deepcopy(base)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"]
    lk.patch(model, r=R)
    randomize_adapters(model)
    model.get_submodule("model.layers.0.self_attn.q_proj").merge()  # unpatch takes it out of W again
    lk.unpatch(model)
    assert {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)} == originals
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "lora_kernels_report")
    torch.testing.assert_close(model(ids).logits, base(ids).logits, **FP32)
    lk.patch(model, r=R)  # can be patched again
    with pytest.raises(ValueError, match="not patched"):
        lk.unpatch(build("llama"))


def test_merge_returns_plain_modules_with_same_outputs():
    model = lk.patch(build("llama"), r=R)
    randomize_adapters(model)
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"]
    before = model(ids).logits
    merged = lk.merge(model)
    assert merged is model and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(merged(ids).logits, before, **FP32)


# ------------------------------------------------------------------------------------------------
# a model PEFT already wrapped
# ------------------------------------------------------------------------------------------------
def _peft_llama(**cfg):
    from peft import LoraConfig, get_peft_model

    cfg = dict(dict(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules=[s.split(".")[-1] for s in LLAMA_LAYER]),
               **cfg)
    model = get_peft_model(build("llama"), LoraConfig(**cfg))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_peft_model_runs_fused_with_same_parameters_outputs_and_grads():
    from lora_kernels.peft_interop import FusedPeftLinear

    pm = _peft_llama()
    twin = copy.deepcopy(pm)
    params_before = dict(pm.named_parameters())
    lk.patch(pm)
    report = pm.lora_kernels_report
    assert report.mode == "peft" and len(report.patched) == 14 and not report.skipped
    assert sum(isinstance(m, FusedPeftLinear) for m in pm.modules()) == 14
    assert {n: id(p) for n, p in pm.named_parameters()} == {n: id(p) for n, p in params_before.items()}
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"]
    pm.eval(), twin.eval()
    torch.testing.assert_close(pm(ids).logits, twin(ids).logits, **FP32)
    pm.train(), twin.train()
    loss_of(pm(ids).logits, torch.Generator().manual_seed(1)).backward()
    loss_of(twin(ids).logits, torch.Generator().manual_seed(1)).backward()
    twin_params = dict(twin.named_parameters())
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert len(grads) == 28
    for n, g in grads.items():
        torch.testing.assert_close(g, twin_params[n].grad, **FP32_GRAD)


def test_peft_methods_keep_working(tmp_path):
    from peft import LoraConfig, PeftModel

    pm = _peft_llama()
    twin = copy.deepcopy(pm)
    lk.patch(pm)
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"]
    with twin.disable_adapter():
        base_out = twin(ids).logits
    with pm.disable_adapter():
        torch.testing.assert_close(pm(ids).logits, base_out, **FP32)

    for m in (pm, twin):  # a second adapter, then PEFT's set_adapter / several active adapters
        m.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for n, p in sorted(m.named_parameters()):
                if ".other." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for active in ("other", ["default", "other"]):
        for m in (pm, twin):
            m.base_model.set_adapter(active)
        torch.testing.assert_close(pm(ids).logits, twin(ids).logits, **FP32)
    for m in (pm, twin):
        m.base_model.set_adapter("default")

    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, twin(ids).logits, **FP32)

    ref = twin(ids).logits
    merged = pm.merge_and_unload()
    assert not any("lora" in type(m).__name__.lower() for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, ref, **FP32)


def test_peft_dropout_follows_train_mode_and_matches_mask():
    from peft import LoraConfig, get_peft_model

    p = 0.3
    torch.manual_seed(0)
    pm = get_peft_model(nn.Sequential(nn.Linear(16, 12)), LoraConfig(r=2, lora_alpha=4, lora_dropout=p,
                                                                     target_modules=["0"]))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    lk.patch(pm)
    x = torch.randn(5, 16)
    A, B, W, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight, layer.base_layer.bias
    pm.eval()
    torch.testing.assert_close(pm(x), x @ W.t() + b + 2.0 * (x @ A.t()) @ B.t(), **FP32)
    pm.train()
    torch.manual_seed(9)
    y = pm(x)
    torch.manual_seed(9)
    mask = lk.dropout_mask(lk.dropout_seed(x.device), 5, 16, p)
    torch.testing.assert_close(y, x @ W.t() + b + 2.0 * ((x * mask / (1 - p)) @ A.t()) @ B.t(), **FP32)


def test_layers_the_fused_op_cannot_take_are_skipped_with_a_reason():
    from peft import LoraConfig, get_peft_model

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        model[1].register_forward_hook(lambda m, i, o: o * 2)  # the fused op would skip the hook
        return model

    plain = make()
    plain[2].weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)  # "quantized"
    report = lk.patch(plain, r=2, target_modules="all-linear").lora_kernels_report
    assert report.patched == ["0"]
    assert "forward hooks" in report.skipped["1"] and "torch.int8" in report.skipped["2"]
    pm = get_peft_model(make(), LoraConfig(r=2, target_modules=["0", "1"]))
    report = lk.patch(pm).lora_kernels_report
    assert [n.rsplit(".", 1)[-1] for n in report.patched] == ["0"]
    assert "forward hooks" in report.skipped["base_model.model.1"]


def test_peft_layers_the_fused_op_cannot_take_are_reported_and_still_right():
    from peft import LoraConfig

    pm = _peft_llama(target_modules=["q_proj", "v_proj", "embed_tokens"])
    pm.add_adapter("dora", LoraConfig(r=2, use_dora=True, target_modules=["v_proj"]))
    twin = copy.deepcopy(pm)
    lk.patch(pm)
    report = pm.lora_kernels_report
    assert {n.rsplit(".", 1)[-1] for n in report.patched} == {"q_proj"}
    dora = [why for n, why in report.skipped.items() if n.endswith("v_proj")]
    emb = [why for n, why in report.skipped.items() if n.endswith("embed_tokens")]
    assert len(dora) == 2 and all("DoRA" in w for w in dora)
    assert len(emb) == 1 and "Embedding" in emb[0]
    assert "kept on PEFT's path" in str(report)
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"]
    for active in ("default", "dora"):
        for m in (pm, twin):
            m.base_model.set_adapter(active)
        torch.testing.assert_close(pm(ids).logits, twin(ids).logits, **FP32)


def test_unpatch_and_merge_on_peft_model():
    from lora_kernels.peft_interop import FusedPeftLinear

    pm = _peft_llama()
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"]
    ref = pm(ids).logits
    lk.unpatch(lk.patch(pm))
    assert not any(isinstance(m, FusedPeftLinear) for m in pm.modules())
    lk.patch(pm)
    merged = lk.merge(pm)
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(merged(ids).logits, ref, **FP32)


# ------------------------------------------------------------------------------------------------
# works with
# ------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients():
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"]
    grads = []
    for ckpt in (False, True):
        model = lk.patch(build("llama"), r=R, dropout=0.1)
        randomize_adapters(model)
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(4)  # same dropout seeds; checkpointing replays the RNG state on recompute
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], **FP32_GRAD)


def test_train_eval_switch_dropout():
    model = lk.patch(build("llama"), r=R, dropout=0.2)
    randomize_adapters(model)
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"]
    model.eval()
    y1, y2 = model(ids).logits, model(ids).logits
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    model.train()
    assert (model(ids).logits - y1).abs().max() > 1e-4


def test_generate_matches_peft():
    base = build("llama")
    model = lk.patch(copy.deepcopy(base), r=R, dropout=0.05)
    randomize_adapters(model, std=0.5)
    twin = peft_twin(base, model, model.lora_kernels_report.patched, dropout=0.05)
    model.eval(), twin.eval()
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"][:, :6]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kw)
    assert out.shape == (2, 11)
    assert torch.equal(out, twin.generate(input_ids=ids, **kw))


def test_state_dict_save_and_load():
    model = lk.patch(build("llama"), r=R)
    randomize_adapters(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = lk.patch(build("llama", seed=1), r=R)
    other.load_state_dict(torch.load(buf, weights_only=True))
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"]
    torch.testing.assert_close(other(ids).logits, model(ids).logits, atol=0, rtol=0)
    # the base keys are unchanged: a base checkpoint loads into a patched model, only adapters missing
    result = other.load_state_dict(build("llama").state_dict(), strict=False)
    assert not result.unexpected_keys and all(".lora_" in k for k in result.missing_keys)
    assert len(result.missing_keys) == 28


def test_autocast_bf16_matches_peft():
    base = build("llama")
    model = lk.patch(copy.deepcopy(base), r=R, dropout=0.0)
    randomize_adapters(model)
    twin = peft_twin(base, model, model.lora_kernels_report.patched)
    ids = CASES["llama"].inputs(torch.Generator().manual_seed(0))["input_ids"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yt = model(ids).logits, twin(ids).logits
    torch.testing.assert_close(y.float(), yt.float(), **BF16)


def _adapter_grads(model, names, peft_layout=False) -> torch.Tensor:
    """All adapter gradients of `names`, flattened into one fp32 vector (fixed order)."""
    out = []
    for n in names:
        m = model.get_submodule(n)
        for part in (m.lora_A, m.lora_B):
            t = part["default"]
            out.append((t.weight if peft_layout else t).grad.float().flatten())
    return torch.cat(out)


def _train_grads(model, ids, names, peft_layout=False):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.float(), _adapter_grads(model, names, peft_layout)


def _err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("peft_first", [False, True])
def test_compile_fullgraph_on_gpu(peft_first):
    """torch.compile(model, fullgraph=True) of a patched bf16 model: logits and every adapter gradient
    as close to an fp32 run of the same model as eager bf16 is (within 2x). bf16 rounding through the
    model differs between inductor's fused code and eager, so the two bf16 runs are compared through
    the precise reference, not to each other (directly they differ by ~5% of a gradient's largest
    element, which says nothing about the LoRA path)."""
    if peft_first:
        model = _peft_llama(lora_dropout=0.0).cuda()
        lk.patch(model)
        names = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    else:
        model = lk.patch(build("llama").cuda(), r=R, dropout=0.0)
        randomize_adapters(model)
        names = sorted(model.lora_kernels_report.patched)
    assert len(names) == 14
    model.train()
    ids = torch.randint(0, 120, (2, 16), device="cuda")
    logits32, grads32 = _train_grads(model, ids, names, peft_first)
    model16 = model.to(torch.bfloat16)
    logits_e, grads_e = _train_grads(model16, ids, names, peft_first)
    compiled = torch.compile(model16, fullgraph=True)
    logits_c, grads_c = _train_grads(compiled, ids, names, peft_first)
    assert torch.isfinite(grads_c).all() and grads_c.abs().sum() > 0
    assert _err(logits_c, logits32) <= 2 * _err(logits_e, logits32) + 1e-3
    assert _err(grads_c, grads32) <= 2 * _err(grads_e, grads32) + 1e-3, (_err(grads_c, grads32), _err(grads_e, grads32))


@pytest.mark.gpu
def test_bf16_training_step_on_gpu_within_2x_of_peft():
    """One bf16 training step: our adapter gradients are as close to an fp32 run as PEFT's bf16
    gradients are (within 2x), on the same weights."""
    base = build("llama").cuda()
    model = lk.patch(copy.deepcopy(base), r=R, dropout=0.0)
    randomize_adapters(model)
    names = sorted(model.lora_kernels_report.patched)
    twin = peft_twin(base, model, names)
    peft_names = [f"base_model.model.{n}" for n in names]
    # a fixed batch: on some random batches this 2-layer random model's bf16 gradients are mostly
    # rounding noise (PEFT's own error reached 22% of the fp32 gradient on the GPU), and comparing
    # two noise levels says nothing; the check below makes sure this batch is not one of those
    ids = torch.randint(0, 120, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    model.train(), twin.train()
    _, ref = _train_grads(model, ids, names)  # fp32
    _, ref_peft = _train_grads(twin, ids, peft_names, peft_layout=True)
    assert _err(ref_peft, ref) < 1e-4  # fp32: the same maths on the same weights agree
    _, ours = _train_grads(model.to(torch.bfloat16), ids, names)
    _, theirs = _train_grads(twin.to(torch.bfloat16), ids, peft_names, peft_layout=True)
    assert _err(theirs, ref) < 0.15, "ill-conditioned batch: bf16 gradients are mostly noise"
    assert _err(ours, ref) <= 2 * _err(theirs, ref), (_err(ours, ref), _err(theirs, ref))
