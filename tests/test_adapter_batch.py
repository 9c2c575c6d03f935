"""adapter_batch: each sequence of a batch with its own adapter, as if it ran alone with that adapter."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import lora_kernels as lk
from ._models import R, build, randomize_adapters, torch_backend  # noqa: F401

FP32 = dict(atol=2e-5, rtol=2e-5)
# Mixed-batch vs one-sequence gradients of an adapter: two fp32 summation orders through two
# attention layers. Measured on a 2-core CPU (MKL): relative Frobenius error up to 4.6e-5, median
# 4.6e-6, while single small elements differed by 6e-4 relative, past an elementwise 5e-5 bound. A
# sequence routed to the wrong adapter is off by O(1).
GRAD_REL_NORM = 2e-4
NAMES = ["tenant_a", "tenant_b", None, "tenant_a", "tenant_c"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama with three adapters loaded from PEFT-format files: tenant_a (r=4, all 7
    projections), tenant_b (r=2, q/v only), tenant_c (r=3, rsLoRA, MLP only)."""
    d = tmp_path_factory.mktemp("adapters")
    for i, (name, kw) in enumerate({"tenant_a": dict(r=R), "tenant_b": dict(r=2, target_modules=["q_proj", "v_proj"]),
                                    "tenant_c": dict(r=3, alpha=5, use_rslora=True,
                                                     target_modules=["gate_proj", "up_proj", "down_proj"])}.items()):
        src = lk.patch(build("llama"), dropout=0.0, **kw)
        randomize_adapters(src, seed=10 + i, std=0.3)
        lk.save_adapter(src, d / name)
    model = build("llama")
    for name in ("tenant_a", "tenant_b", "tenant_c"):
        lk.load_adapter(model, d / name, name=name)
    return model, d


def _ids(n=5, T=7, seed=0):
    return torch.randint(0, 120, (n, T), generator=torch.Generator().manual_seed(seed))


def _alone(model, ids_row, name, **kw):
    """One sequence through the model with only `name` active (None: base model)."""
    layers = [m for m in model.modules() if isinstance(m, lk.LoRALinear)]
    for m in layers:
        m.set_adapter([name] if name in m.adapters else [])
    try:
        return model(ids_row[None], **kw)
    finally:
        for m in layers:
            m.set_adapter(["tenant_a"])


def test_mixed_batch_matches_each_sequence_alone(served):
    model, _ = served
    model.eval()
    ids = _ids()
    with lk.adapter_batch(model, NAMES):
        mixed = model(ids).logits
    base = {b: _alone(model, ids[b], None).logits[0] for b in range(len(NAMES))}
    for b, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[b], _alone(model, ids[b], name).logits[0], **FP32)
        if name is not None:  # each adapter really changes its rows
            assert (mixed[b] - base[b]).abs().max() > 1e-2
    # outside the context the model is back to its active adapter for every row
    torch.testing.assert_close(model(ids[:1]).logits[0], _alone(model, ids[0], "tenant_a").logits[0], **FP32)


def test_mixed_batch_training_gradients_come_from_own_sequences(served):
    model, _ = served
    model.train()
    ids = _ids(seed=1)
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    w = torch.randn(ids.shape[0], ids.shape[1], 128, generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    with lk.adapter_batch(model, NAMES):
        (model(ids).logits * w).sum().backward()
    mixed = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
    for name in ("tenant_a", "tenant_b", "tenant_c"):
        rows = [b for b, nm in enumerate(NAMES) if nm == name]
        model.zero_grad()
        for b in rows:
            (_alone(model, ids[b], name).logits[0] * w[b]).sum().backward()
        own = {n: p for n, p in params.items() if f".{name}" in n}
        assert own
        for n, p in own.items():
            err = ((mixed[n] - p.grad).norm() / p.grad.norm()).item()
            assert err < GRAD_REL_NORM, (n, err)
    model.eval()


def test_mixed_batch_generate(served):
    model, _ = served
    model.eval()
    ids = _ids(T=5, seed=3)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with lk.adapter_batch(model, NAMES):
        out = model.generate(ids, **kw)
    for b, name in enumerate(NAMES):
        layers = [m for m in model.modules() if isinstance(m, lk.LoRALinear)]
        for m in layers:
            m.set_adapter([name] if name in m.adapters else [])
        alone = model.generate(ids[b:b + 1], **kw)
        for m in layers:
            m.set_adapter(["tenant_a"])
        assert torch.equal(out[b], alone[0]), (b, name)


def test_cached_stack_follows_adapter_changes_and_layers_share_rows(served):
    """adapter_batch keeps each layer's stacked adapters while they are unchanged and one row index
    per distinct seq_index: an in-place change to an adapter (an optimizer step) must show in the
    next forward of the same context, as must a training step's gradients."""
    model, _ = served
    model.eval()
    ids = _ids(seed=5)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    A = q.lora_A["tenant_b"]
    with lk.adapter_batch(model, NAMES):
        plans = [m._lora_batch for m in model.modules() if isinstance(m, lk.LoRALinear)]
        seqs = {tuple(p.seq_index.tolist()) for p in plans}
        assert len({id(p.rows) for p in plans}) == len(seqs)  # shared per seq_index, not per layer
        first = model(ids).logits
        assert q._lora_batch.stack  # stacked once, kept
        kept = q._lora_batch.stack["A"]
        again = model(ids).logits
        assert q._lora_batch.stack["A"] is kept and torch.equal(first, again)
        with torch.no_grad():
            A.mul_(-1.5)
        try:
            changed = model(ids).logits
            assert q._lora_batch.stack["A"] is not kept
        except BaseException:
            with torch.no_grad():
                A.div_(-1.5)
            raise
    b = NAMES.index("tenant_b")
    try:
        torch.testing.assert_close(changed[b], _alone(model, ids[b], "tenant_b").logits[0], **FP32)
    finally:
        with torch.no_grad():
            A.div_(-1.5)
    assert (changed[b] - first[b]).abs().max() > 1e-3
    torch.testing.assert_close(changed[0], first[0], **FP32)  # tenant_a's rows unchanged


def test_bad_batches(served):
    model, _ = served
    ids = _ids()
    with pytest.raises(ValueError, match="3 adapter names were given but this layer sees a batch of 5"):
        with lk.adapter_batch(model, ["tenant_a", None, "tenant_b"]):
            model(ids)
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['tenant_x'\]"):
        with lk.adapter_batch(model, ["tenant_a", "tenant_x"]):
            pass
    with pytest.raises(ValueError, match="names is empty"):
        with lk.adapter_batch(model, []):
            pass
    with pytest.raises(TypeError, match="adapter names"):
        with lk.adapter_batch(model, ["tenant_a", 3]):
            pass
    with pytest.raises(ValueError, match="no lora_kernels LoRA layers"):
        with lk.adapter_batch(build("llama"), ["tenant_a"]):
            pass
    assert all(m._lora_batch is None for m in model.modules() if isinstance(m, lk.LoRALinear))


def test_merged_layer_refuses_mixed_batch(served):
    model, _ = served
    m = model.get_submodule("model.layers.0.self_attn.q_proj")
    m.merge()
    try:
        with pytest.raises(RuntimeError, match="merged"):
            with lk.adapter_batch(model, ["tenant_a"]):
                model(_ids(n=1))
    finally:
        m.unmerge()


def test_peft_model_mixed_batch(served):
    """Several adapters in a PEFT model, accelerated by patch(): adapter_batch and PEFT's own adapter_names."""
    from peft import PeftModel

    _, d = served
    pm = PeftModel.from_pretrained(build("llama"), d / "tenant_a", adapter_name="tenant_a")
    pm.load_adapter(d / "tenant_b", adapter_name="tenant_b")
    pm.load_adapter(d / "tenant_c", adapter_name="tenant_c")
    pm.eval()
    twin = copy.deepcopy(pm)
    lk.patch(pm)
    ids = _ids(seed=4)
    peft_names = [n if n is not None else "__base__" for n in NAMES]
    ref = twin(input_ids=ids, adapter_names=peft_names).logits  # PEFT's own mixed batch
    with lk.adapter_batch(pm, NAMES):
        torch.testing.assert_close(pm(input_ids=ids).logits, ref, **FP32)
    torch.testing.assert_close(pm(input_ids=ids, adapter_names=peft_names).logits, ref, **FP32)


def test_mixed_batch_benchmark_model_runs_on_cpu():
    """The patched-model mixed-batch benchmark (lora_kernels/_bench/multi.py) in a tiny configuration:
    every setting runs forward and a training step; mixed trains all 8 adapters, single only a0."""
    from lora_kernels._bench import multi as MB

    model, names = MB.adapter_model(MB.MODEL_TINY, dtype=torch.float32)
    contexts, steps = MB.adapter_model_steps(model, names, batch=8, seq=5)
    logits = {}
    for st in MB.MODEL_SETTINGS:
        with contexts[st]():
            logits[st] = steps["fwd"]()
    assert logits["mixed"].shape == (8, 5, MB.MODEL_TINY["vocab_size"])
    torch.testing.assert_close(logits["single (batch)"], logits["single"], **FP32)
    assert (logits["mixed"][1:] - logits["single"][1:]).abs().amax(dim=(1, 2)).min() > 1e-3  # a1..a7 differ
    torch.testing.assert_close(logits["mixed"][0], logits["single"][0], **FP32)  # sequence 0 is on a0
    for st, trained in (("single", {"a0"}), ("mixed", set(names))):
        model.zero_grad(set_to_none=True)
        with contexts[st]():
            model(input_ids=torch.randint(0, 128, (8, 5)), labels=torch.randint(0, 128, (8, 5))).loss.backward()
        got = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if ".lora_" in n and p.grad is not None}
        assert got == trained, st
        with contexts[st]():
            assert torch.isfinite(steps["train"]())


def test_mixed_batch_benchmark_times_settings_in_rotating_rounds(monkeypatch):
    """model_times: each round times every (setting, phase) once inside that setting's context, the
    setting order rotated per round; round_ratios divides within a round."""
    from lora_kernels._bench import e2e
    from lora_kernels._bench import multi as MB

    entered, calls = [], []
    current = [None]

    @contextlib.contextmanager
    def ctx(name):
        current[0] = name
        entered.append(name)
        yield
        current[0] = None

    fake_ms = {"single": 10.0, "single (batch)": 11.0, "mixed": 12.0}

    def fake_time_steps(step, warmup, iters):
        calls.append((current[0], step()))
        return fake_ms[current[0]] * (1 + len(entered)), 0.5  # drifts from round to round

    monkeypatch.setattr(e2e, "time_steps", fake_time_steps)
    contexts = {st: (lambda st=st: ctx(st)) for st in MB.MODEL_SETTINGS}
    ms, gib = MB.model_times(contexts, {"fwd": lambda: "fwd", "train": lambda: "train"}, rounds=4)
    s, b, m = MB.MODEL_SETTINGS
    assert entered == [s, b, m, b, m, s, m, s, b, s, b, m]
    assert calls == [(st, ph) for st in entered for ph in ("fwd", "train")]
    assert all(len(v) == 4 for v in ms.values()) and set(gib.values()) == {0.5}
    q = MB.round_ratios(ms, "mixed", "train")  # the k-th context entered times at (1 + k) x
    assert q[0] == pytest.approx(12 * 4 / (10 * 2))
    assert q[2] == pytest.approx(12 * 8 / (10 * 9))


@pytest.mark.parametrize("ranks,dtypes", [((3, 3, 3), (torch.float32,) * 3),  # one unbind per factor
                                          ((3, 1, 2), (torch.float32,) * 3),  # slices past each rank
                                          ((2, 2), (torch.float32, torch.float64))])  # one cast per dtype
def test_stacked_adapters_hand_each_adapter_its_slice_of_the_gradient(ranks, dtypes):
    """stacked_adapters: A [L, r_max, K], B [L, N, r_max] zero-padded in the requested dtype; each
    adapter's gradient is its own slice of the stack's, in its own dtype, equal to autograd through
    an explicit pad-and-stack."""
    from lora_kernels.layers import stacked_adapters

    K, N = 5, 4
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(r, K, generator=g, dtype=dt, requires_grad=True) for r, dt in zip(ranks, dtypes)]
    Bs = [torch.randn(N, r, generator=g, dtype=dt, requires_grad=True) for r, dt in zip(ranks, dtypes)]
    A, B = stacked_adapters(As, Bs, torch.float32, cache={})
    r_max = max(ranks)
    refA = torch.stack([F.pad(a.float(), (0, 0, 0, r_max - a.shape[0])) for a in As])
    refB = torch.stack([F.pad(b.float(), (0, r_max - b.shape[1])) for b in Bs])
    torch.testing.assert_close(A, refA, rtol=0, atol=0)
    torch.testing.assert_close(B, refB, rtol=0, atol=0)
    wA, wB = torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g)
    got = torch.autograd.grad((A * wA).sum() + (B * wB).sum(), As + Bs)
    want = torch.autograd.grad((refA * wA).sum() + (refB * wB).sum(), As + Bs)
    for p, a, b in zip(As + Bs, got, want):
        assert a.dtype == p.dtype and a.shape == p.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
