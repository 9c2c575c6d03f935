"""save_adapter / load_adapter: PEFT's format both ways, and mismatched adapters rejected cleanly."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lora_kernels as lk
from lora_kernels import LoRALinear
from ._models import CASES, LLAMA_LAYER, R, build, randomize_adapters, torch_backend  # noqa: F401

FP32 = dict(atol=2e-5, rtol=2e-5)


def _patched(case, seed=1, **kw):
    model = lk.patch(build(case), r=R, dropout=0.0, **kw)
    randomize_adapters(model, seed=seed)
    return model


def _out(case, model):
    c = CASES[case]
    return c.output(model, c.inputs(torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("case", list(CASES))
def test_save_then_peft_load_gives_same_outputs(case, tmp_path):
    from peft import PeftModel

    model = _patched(case)
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", R, 2 * R, False)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    patched = model.lora_kernels_report.patched
    assert len(weights) == 2 * len(patched)
    for n in patched:
        m = model.get_submodule(n)
        assert weights[f"base_model.model.{n}.lora_A.weight"].shape == (R, m.in_features)
        assert weights[f"base_model.model.{n}.lora_B.weight"].shape == (m.out_features, R)
    if case == "llama":
        assert config["target_modules"] == sorted(s.split(".")[-1] for s in LLAMA_LAYER)
        assert config["task_type"] == "CAUSAL_LM"
    if case == "llava":  # q_proj etc. also name vision-tower layers: a regex of the exact layers instead
        assert isinstance(config["target_modules"], str)
    loaded = PeftModel.from_pretrained(build(case), tmp_path)
    matched = {n for n, m in loaded.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert matched == set(patched)
    torch.testing.assert_close(_out(case, loaded), _out(case, model), **FP32)


# PEFT configured by suffixes, by a regex, and by the exact layer names patch() picks
PEFT_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"],
                "llava": r".*language_model.*\.(q_proj|v_proj|down_proj)"}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_save_then_load_adapter_gives_same_outputs(case, tmp_path):
    from peft import LoraConfig, get_peft_model

    targets = PEFT_TARGETS.get(case) or sorted(CASES[case].expected)
    pm = get_peft_model(build(case), LoraConfig(r=3, lora_alpha=5, target_modules=targets, use_rslora=True))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path)
    model = lk.load_adapter(build(case), tmp_path)  # a plain model: the layers named in the file get LoRALinear
    layers = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == (6 if case in PEFT_TARGETS else len(CASES[case].expected))
    m = model.get_submodule(sorted(layers)[0])
    assert m.adapters["default"].scale == pytest.approx(5 / 3 ** 0.5) and m.active_adapters == ["default"]
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    torch.testing.assert_close(_out(case, model), _out(case, pm), **FP32)
    # the same file into a model already carrying adapter "default" on those layers: weights replaced in place
    again = lk.load_adapter(lk.patch(build(case), r=3, target_modules=targets), tmp_path)
    torch.testing.assert_close(_out(case, again), _out(case, pm), **FP32)


def test_rank_and_alpha_patterns_round_trip(tmp_path):
    from peft import PeftModel

    model = _patched("llama")
    q = model.get_submodule("model.layers.1.self_attn.q_proj")
    q.delete_adapter("default")
    q.add_adapter("default", r=2, alpha=7, dropout=0.0)
    with torch.no_grad():
        q.lora_B["default"].normal_()
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(config["rank_pattern"].values()) == [2] and list(config["alpha_pattern"].values()) == [7]
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path)
    torch.testing.assert_close(_out("llama", loaded), _out("llama", model), **FP32)
    back = lk.load_adapter(build("llama"), tmp_path)
    assert back.get_submodule("model.layers.1.self_attn.q_proj").adapters["default"].r == 2
    torch.testing.assert_close(_out("llama", back), _out("llama", model), **FP32)


def test_several_adapters_load_and_switch(tmp_path):
    a, b = _patched("llama", seed=1), _patched("llama", seed=2, target_modules=["q_proj", "v_proj"])
    lk.save_adapter(a, tmp_path / "a")
    lk.save_adapter(b, tmp_path / "b")
    model = lk.load_adapter(build("llama"), tmp_path / "a", name="tenant_a")
    lk.load_adapter(model, tmp_path / "b", name="tenant_b")
    torch.testing.assert_close(_out("llama", model), _out("llama", a), **FP32)  # the first stays active
    lk.set_adapter(model, "tenant_b")
    torch.testing.assert_close(_out("llama", model), _out("llama", b), **FP32)
    with pytest.raises(KeyError, match="unknown adapter 'tenant_c'"):
        lk.set_adapter(model, "tenant_c")
    lk.save_adapter(model, tmp_path / "b2", name="tenant_b")  # and out again under PEFT's key names
    assert load_file(tmp_path / "b2" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "b" / "adapter_model.safetensors").keys()


def test_load_into_peft_model_delegates(tmp_path):
    from peft import PeftModel

    src = _patched("llama")
    lk.save_adapter(src, tmp_path)
    pm = PeftModel.from_pretrained(build("llama"), tmp_path, adapter_name="first")
    lk.patch(pm)
    lk.load_adapter(pm, tmp_path, name="second")
    pm.base_model.set_adapter("second")
    torch.testing.assert_close(_out("llama", pm), _out("llama", src), **FP32)


def _model_fingerprint(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _edit(src, dst, fn):
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    weights = load_file(src / "adapter_model.safetensors")
    fn(weights)
    save_file(weights, dst / "adapter_model.safetensors")


def _drop_key(w):
    del w["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]


def _extra_key(w):
    w["base_model.model.model.layers.1.mlp.extra.lora_A.weight"] = torch.zeros(R, 64)
    w["base_model.model.model.layers.1.mlp.extra.lora_B.weight"] = torch.zeros(64, R)


def _non_lora_key(w):
    w["base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"] = torch.zeros(128)


def _bad_shape(w):
    w["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(R, 65)


def _drop_layer(w):
    del w["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    del w["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]


@pytest.mark.parametrize("edit,target,match", [
    (_drop_key, "plain", r"missing key 'base_model\.model\.model\.layers\.1\.mlp\.up_proj\.lora_B\.weight'"),
    (_drop_layer, "plain", r"missing key 'base_model\.model\.model\.layers\.1\.mlp\.up_proj\.lora_A\.weight'.*target_modules"),
    (_drop_layer, "patched", r"missing key 'base_model\.model\.model\.layers\.1\.mlp\.up_proj\.lora_A\.weight'"),
    (_extra_key, "plain", r"unexpected key 'base_model\.model\.model\.layers\.1\.mlp\.extra\.lora_A\.weight'"),
    (_non_lora_key, "patched", r"unexpected key 'base_model\.model\.model\.layers\.1\.mlp\.up_proj\.lora_magnitude_vector'"),
    (_bad_shape, "patched", r"shape mismatch at 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight'"),
])
def test_mismatched_adapter_raises_and_leaves_model_unchanged(edit, target, match, tmp_path):
    lk.save_adapter(_patched("llama"), tmp_path / "good")
    _edit(tmp_path / "good", tmp_path / "bad", edit)
    model = build("llama") if target == "plain" else lk.patch(build("llama"), r=R)
    before = _model_fingerprint(model)
    with pytest.raises(ValueError, match=match):
        lk.load_adapter(model, tmp_path / "bad")
    after = _model_fingerprint(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in before[1])


def test_adapter_of_another_architecture_is_rejected(tmp_path):
    lk.save_adapter(_patched("internlm2"), tmp_path / "internlm2")
    lk.save_adapter(lk.patch(build("qwen2"), r=R, target_modules=["q_proj"]), tmp_path / "qwen2")
    model = build("llama")
    before = _model_fingerprint(model)
    with pytest.raises(ValueError, match=r"unexpected key 'base_model\.model\.model\.layers\.0\.attention\.w.*no module"):
        lk.load_adapter(model, tmp_path / "internlm2")
    lk.save_adapter(lk.patch(build("llava"), r=R), tmp_path / "llava")
    with pytest.raises(ValueError, match=r"unexpected key 'base_model\.model\.model\.language_model\.layers"):
        lk.load_adapter(model, tmp_path / "llava")
    assert _model_fingerprint(model)[0] == before[0]


def test_unsupported_peft_options_are_rejected(tmp_path):
    lk.save_adapter(_patched("llama"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_dora"):
        lk.load_adapter(build("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lk.load_adapter(build("llama"), tmp_path / "nowhere")


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no layer holds adapter 'x'"):
        lk.save_adapter(_patched("llama"), tmp_path, name="x")
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no layer holds adapter"):
        lk.save_adapter(model, tmp_path)
