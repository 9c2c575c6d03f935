"""Multi-adapter LoRA benchmark: the extension's kernels against gather+bmm, a per-adapter loop and
PEFT's mixed-batch forward, each timed in the same run.

Cases (H100 targets in the issue, bf16, H = K = N = 4096):
  decode   T in {1, 16, 64, 256, 1024, 4096} rows, L in {1, 8, 32, 128} adapters, r in {16, 64}, every
           adapter popularity; one row = one token with its own adapter.
  prefill  8 sequences of 512-2048 tokens over 4 or 8 adapters (tokens of a sequence share one);
           forward, and forward + backward (training).

Effective bandwidth of a decode case counts what has to move at least once:
    bytes = (T * K + T * N) * 2            x read, y written (bf16)
          + U * (r * K + N * r) * 2        each of the U adapters the batch uses, read once
    GB/s  = bytes / ms / 1e6
and is reported beside the device-to-device copy bandwidth measured in the same run (a
`torch.Tensor.copy_` of 256 MiB), which is the ceiling the 60% target refers to.

Implementations per case ("x gather" = ratio to gather+bmm in the same run):
  gather+bmm  As = A[idx] [T, r, K], Bs = B[idx] [T, N, r], two bmm (what PyTorch users write)
  loop        multi_lora_reference: a Python loop over the adapters in use
  peft        peft LoRA Linear with L adapters, forward(x, adapter_names=[...]) (a loop over sub-batches)
  ext:auto    lora_kernels.multi_lora (the regime multi_lora_regime picks)
  ext:decode / ext:segment   the same with the regime forced, to check the regime rule
  ext:sorted  the segment regime on rows sorted beforehand (a model sorts once per batch)
  ext:tile    ext:segment on the shared-memory tile kernels instead of the register kernels

Mixed batch through a patched model (the issue's two 1.3x targets, end to end): a Llama built from
a config (4 layers, hidden 2048, intermediate 8192, 32 / 8 heads, vocab 32000, bf16, random weights)
patched with 8 named adapters (r = 16, alpha = 32, dropout 0 on q, k, v, o, gate, up, down), a batch
of 8 sequences x 1024 tokens:
  single          every sequence on adapter a0 the ordinary way (set_adapter: the fused lora_linear op)
  single (batch)  adapter_batch(model, ["a0"] * 8): the multi-adapter op with one adapter
  mixed           adapter_batch(model, ["a0", ..., "a7"]): each sequence its own adapter
timed for (a) the inference forward (logits of every position, no_grad) and (b) one training step
(forward + causal-LM loss + backward + AdamW over the adapters that got gradients); ratio = ms /
single ms of the same round, the median over interleaved rounds (model_times; targets: mixed <= 1.3
in both).

Each implementation is timed twice: eager (triton.testing.do_bench: what a Python caller sees,
launch overheads included) and inside a CUDA graph (do_bench_cudagraph: the GPU time alone, what a
serving engine that captures its decode step sees). Rows give both; the ratio uses the eager times
(note gives the graph ratio).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from . import Row, gpu_time_ms, interleaved_ms, lm_train_step
from . import round_ratios as _round_ratios

POPULARITIES = ("distinct", "identical", "uniform", "zipf", "skewed")
SEG_KERNELS_ENV = "LORA_KERNELS_MULTI_SEG_KERNELS"  # "tile": the extension's segment forward on its tile kernels
DECODE_T = (1, 16, 64, 256, 1024, 4096)
DECODE_L = (1, 8, 32, 128)
DECODE_R = (16, 64)
HIDDEN = 4096


# ================================================================================================
# case generation (shared with the tests and benchmarks/test_bench_multi_lora.py)
# ================================================================================================
def adapter_indices(M: int, L: int, popularity: str, none_frac: float = 0.0, seed: int = 0,
                    device="cpu") -> torch.Tensor:
    """Per-row adapter indices [M] int64 in [-1, L) following an adapter popularity pattern.

    distinct   row i uses adapter i % L (every adapter used, neighbours differ)
    identical  every row uses one adapter
    uniform    independent uniform draws
    zipf       P(adapter k) proportional to 1 / (k + 1)^1.5
    skewed     90% of rows on adapter 0, the rest uniform
    sequences  runs of 1..64 consecutive rows share an adapter (tokens of a sequence, prefill)
    none_frac of the rows (at random positions) get -1, no adapter.
    """
    g = torch.Generator().manual_seed(seed)
    if L == 0:
        return torch.full((M,), -1, dtype=torch.int64, device=device)
    if popularity == "distinct":
        idx = torch.arange(M) % L
    elif popularity == "identical":
        idx = torch.full((M,), int(torch.randint(L, (1,), generator=g)), dtype=torch.int64)
    elif popularity == "uniform":
        idx = torch.randint(L, (M,), generator=g)
    elif popularity == "zipf":
        p = 1.0 / torch.arange(1, L + 1, dtype=torch.float64) ** 1.5
        idx = torch.multinomial(p / p.sum(), M, replacement=True, generator=g) if M else torch.zeros(0, dtype=torch.int64)
    elif popularity == "skewed":
        idx = torch.where(torch.rand(M, generator=g) < 0.9, torch.zeros(M, dtype=torch.int64),
                          torch.randint(L, (M,), generator=g))
    elif popularity == "sequences":
        parts, n = [], 0
        while n < M:
            run = min(M - n, int(torch.randint(1, 65, (1,), generator=g)))
            parts.append(torch.full((run,), int(torch.randint(L, (1,), generator=g)), dtype=torch.int64))
            n += run
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    else:
        raise ValueError(f"unknown adapter popularity {popularity!r}; expected one of "
                         f"{POPULARITIES + ('sequences',)}")
    if none_frac > 0 and M:
        idx = torch.where(torch.rand(M, generator=g) < none_frac, torch.full_like(idx, -1), idx)
    return idx.to(torch.int64).to(device)


def make_adapters(L: int, r: int, K: int, N: int, dtype=torch.bfloat16, device="cpu", seed: int = 0,
                  requires_grad: bool = False):
    """(A [L, r, K], B [L, N, r], scales [L] fp32) with LoRA-like magnitudes (outputs of order 1e-1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = (torch.randn(L, r, K, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype)
    B = (torch.randn(L, N, r, generator=g) / math.sqrt(max(r, 1))).to(device=device, dtype=dtype)
    scales = (0.5 + torch.rand(L, generator=g)).to(device)
    if requires_grad:
        A.requires_grad_(True)
        B.requires_grad_(True)
    return A, B, scales


def prefill_indices(n_seq: int, L: int, seed: int = 0, lengths=(512, 2048), device="cpu") -> torch.Tensor:
    """Indices for n_seq sequences of random lengths in [lengths] tokens, each on one of L adapters."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for s in range(n_seq):
        n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        parts.append(torch.full((n,), s % L, dtype=torch.int64))
    return torch.cat(parts).to(device)


def decode_case(spec: str, device="cuda", dtype=torch.bfloat16):
    """The tensors of a decode case named "T,L,r,popularity" at H = HIDDEN (the GPU scripts' argument):
    (x [T, H], A, B, scales, idx, bytes that must move)."""
    T, L, r, pop = spec.split(",")
    T, L, r = int(T), int(L), int(r)
    A, B, s = make_adapters(L, r, HIDDEN, HIDDEN, dtype=dtype, device=device)
    idx = adapter_indices(T, L, pop, device=device)
    x = torch.randn(T, HIDDEN, device=device, dtype=dtype)
    return x, A, B, s, idx, decode_bytes(T, HIDDEN, HIDDEN, r, int(torch.unique(idx).numel()))


def decode_bytes(T: int, K: int, N: int, r: int, used: int, elem: int = 2) -> int:
    """Bytes that must move at least once: x, y, and each used adapter (see the module docstring)."""
    return (T * K + T * N) * elem + used * (r * K + N * r) * elem


# ================================================================================================
# implementations under test (shared with benchmarks/test_bench_multi_lora.py)
# ================================================================================================
def gather_bmm(x, A, B, idx, scales):
    """What a PyTorch user writes: gather each row's adapter, two batched matmuls. x [T, K] -> [T, N]."""
    valid = idx >= 0
    safe = idx.clamp(min=0)
    As = A[safe]  # [T, r, K]
    Bs = B[safe]  # [T, N, r]
    s = (scales[safe] * valid).to(x.dtype)
    h = torch.bmm(As, x.unsqueeze(2))  # [T, r, 1]
    return torch.bmm(Bs, h).squeeze(2) * s[:, None]


def peft_model(A, B, scales, dtype, device):
    """A PEFT model around one Linear holding L adapters 'a0'..'a{L-1}' with our weights, in eval mode
    (PEFT takes `adapter_names=` at inference only). None when peft is not installed."""
    try:
        from peft import LoraConfig, get_peft_model
    except Exception:
        return None
    L, r, K = A.shape
    N = B.shape[1]

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(K, N, bias=False)

        def forward(self, x):
            return self.proj(x)

    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=0.0)
    model = get_peft_model(One(), cfg, adapter_name="a0")
    for i in range(1, L):
        model.add_adapter(f"a{i}", cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for i in range(L):
            layer.lora_A[f"a{i}"].weight.copy_(A[i])
            layer.lora_B[f"a{i}"].weight.copy_(B[i])
            layer.scaling[f"a{i}"] = float(scales[i])
    return model.to(device=device, dtype=dtype).eval()


def decode_impls(x, A, B, idx, scales, with_slow: bool = True) -> dict:
    """Named callables computing the LoRA term of one decode case (shared with the pytest-benchmark file).

    ext:decode / ext:segment call the op with the regime forced (no Python wrapper); ext:auto is the
    public multi_lora (wrapper, checks and dispatch included). ext:segment sorts the rows itself;
    ext:sorted is the segment regime on segments sorted once beforehand (`RowIndex`: what every
    layer of a model after the first sees in one batch); ext:tile is ext:segment forced onto the
    shared-memory tile kernels (the register kernels' predecessor, for comparison). The loop and
    PEFT only when with_slow.
    """
    import lora_kernels
    from lora_kernels.ops.multi_lora import RowIndex, _ext_ops

    impls = {
        "gather+bmm": lambda: gather_bmm(x, A, B, idx, scales),
        "ext:auto": lambda: lora_kernels.multi_lora(x, A, B, idx, scales),
    }
    ops = _ext_ops()  # builds the extension on first use; None where it cannot be built
    if ops is not None:
        op = ops.multi_lora_fwd
        impls["ext:decode"] = lambda: op(x, A, B, idx, scales, None, "decode", False)
        impls["ext:segment"] = lambda: op(x, A, B, idx, scales, None, "segment", False)
        seg = RowIndex(idx).segments(A.shape[0])
        if seg[0] is not None:
            impls["ext:sorted"] = lambda: op(x, A, B, idx, scales, None, "segment", False, *seg)

        def tile():
            os.environ[SEG_KERNELS_ENV] = "tile"
            try:
                return op(x, A, B, idx, scales, None, "segment", False)
            finally:
                del os.environ[SEG_KERNELS_ENV]

        impls["ext:tile"] = tile
    if with_slow:
        impls["loop"] = lambda: lora_kernels.multi_lora_reference(x, A, B, idx, scales)
        model = peft_model(A, B, scales, x.dtype, x.device)
        if model is not None:
            names = [f"a{int(i)}" if i >= 0 else "__base__" for i in idx.tolist()]
            base = model.base_model.model.proj.base_layer
            impls["peft"] = lambda: model(x, adapter_names=names)  # base linear + LoRA sub-batch loop
            impls["peft base"] = lambda: base(x)  # the base linear alone, subtracted in the report
    return impls


# ================================================================================================
# the report
# ================================================================================================
def _time(fn, graph: bool, quick_reps: bool = True):
    """(eager ms, CUDA-graph ms or None). Short repetitions: the decode grid has ~100 cases."""
    import triton.testing

    eager = gpu_time_ms(fn, warmup_ms=10, rep_ms=40 if quick_reps else 100)
    if not graph:
        return eager, None
    try:  # on a side stream, n calls unrolled in one graph
        g = float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))
    except Exception:  # e.g. an implementation that reads indices on the host cannot be captured
        g = None
    return eager, g


def _copy_bandwidth_gbs(device) -> float:
    """Device-to-device copy bandwidth: (read + written bytes) / time for a 256 MiB tensor."""
    src = torch.empty(128 * 2**20, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _decode_cases(quick: bool):
    """(T, L, r, popularity): every T, L, r with distinct adapters; the other patterns at T = 256
    and 4096 with r = 16 (~80 cases, ~1 s each)."""
    if quick:
        return [(64, 8, 16, "zipf"), (256, 32, 16, "uniform"), (1024, 128, 16, "distinct"),
                (1024, 64, 64, "distinct"), (4096, 128, 16, "distinct")]
    cases = []
    for T in DECODE_T:
        for L in DECODE_L:
            for r in DECODE_R:
                for pop in POPULARITIES:
                    if pop == "distinct" or (T in (256, 4096) and r == 16):
                        cases.append((T, L, r, pop))
    return cases


# ================================================================================================
# mixed batch through a patched model
# ================================================================================================
MODEL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=32000)
MODEL_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128)
MODEL_BATCH, MODEL_SEQ, MODEL_ADAPTERS, MODEL_R = 8, 1024, 8, 16
MODEL_SETTINGS = ("single", "single (batch)", "mixed")


def adapter_model(config: dict, n_adapters: int = MODEL_ADAPTERS, r: int = MODEL_R, device="cpu",
                  dtype=torch.bfloat16, seed: int = 0):
    """(Llama from `config` patched with adapters "a0".."a{n-1}" on every projection, their names).

    r and alpha = 2r alike, dropout 0 (a mixed batch applies none: the single-adapter runs must not
    either), A and B random (B is zero at init, which would make every adapter the same function).
    """
    import lora_kernels
    from lora_kernels.layers import LoRALinear

    from .e2e import TARGETS, build_llama

    names = [f"a{i}" for i in range(n_adapters)]
    model = build_llama(config, device, dtype, seed=seed)
    lora_kernels.patch(model, r=r, alpha=2 * r, dropout=0.0, target_modules=TARGETS, adapter_name=names[0])
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        for n in names[1:]:
            m.add_adapter(n, r=r, alpha=2 * r, dropout=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in layers:
            for n in names:
                for p in (m.lora_A[n], m.lora_B[n]):
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model, names


def adapter_model_steps(model, names, batch: int, seq: int, seed: int = 1):
    """(contexts, steps) for one batch of token ids: contexts[setting]() is the context manager of one
    of MODEL_SETTINGS, steps[phase] the callable to time inside it (phase "fwd" or "train").

    fwd: logits of every position under no_grad; train: forward + loss + backward + AdamW step (one
    optimizer over every adapter, fused on CUDA as in transformers' Trainer; in the single settings
    only a0's parameters get gradients). The
    context is entered once around the timed calls, as a server or trainer enters adapter_batch
    once per batch: it builds each layer's plan (small host-to-device copies) on entry.
    """
    import lora_kernels

    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(dev)
    lora_kernels.set_adapter(model, names[0])
    # fused on CUDA: transformers' Trainer default (optim "adamw_torch_fused" with torch >= 2.8). With
    # the default foreach AdamW the step's AdamW.step range took 11.3 ms of a 64 ms mixed step once all
    # 8 adapters train (448 tensors with gradients; 1.9 ms with one adapter), and the step was host-bound.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=dev.type == "cuda")
    per_seq = {"single": None, "single (batch)": [names[0]] * batch,
               "mixed": [names[i % len(names)] for i in range(batch)]}
    contexts = {st: (lambda n=n: lora_kernels.adapter_batch(model, n) if n else contextlib.nullcontext())
                for st, n in per_seq.items()}

    def fwd():
        with torch.no_grad():
            return model(input_ids=ids).logits

    return contexts, {"fwd": fwd, "train": lambda: lm_train_step(model, ids, opt)}


def model_times(contexts, steps, rounds: int, warmup: int = 2, iters: int = 5):
    """{(setting, phase): [ms of round 0, 1, ...]}, {(setting, phase): peak GiB} for the settings of
    adapter_model_steps, measured in interleaved rounds.

    Each round times every setting once (the median of `iters` steps after `warmup`), the order
    rotated from round to round, so that a setting is never the one that always runs first after
    the model is built or always last. Why rounds: in one call per setting the training step's
    single-adapter baseline moved between 37 and 51 ms across calls of the same code on the H100
    (this host's launch times drift), while the mixed setting measured right after it did not move
    with it: a ratio of two separate medians then reads 1.1-1.4x. A ratio taken within each round and
    its median over the rounds compares the settings under the same conditions.
    """
    from .e2e import time_steps

    def time_setting(context):
        with context():
            return {ph: time_steps(step, warmup=warmup, iters=iters) for ph, step in steps.items()}

    per_round = interleaved_ms(contexts, time_setting, rounds)  # {setting: [{phase: (ms, GiB)}, ...]}
    ms = {(st, ph): [r[ph][0] for r in per_round[st]] for st in contexts for ph in steps}
    gib = {(st, ph): max(r[ph][1] for r in per_round[st]) for st in contexts for ph in steps}
    return ms, gib


def round_ratios(ms: dict, setting: str, phase: str, base: str = "single") -> list[float]:
    """Per-round ratios ms[setting, phase][k] / ms[base, phase][k] (see model_times)."""
    return _round_ratios(ms[setting, phase], ms[base, phase])


def _model_rows(quick: bool, dev) -> list[Row]:
    """The mixed-batch targets through the patched Llama (see the module docstring)."""
    import statistics

    model, names = adapter_model(MODEL, device=dev)
    contexts, steps = adapter_model_steps(model, names, MODEL_BATCH, MODEL_SEQ)
    case = (f"llama {MODEL['num_hidden_layers']}L h{MODEL['hidden_size']} i{MODEL['intermediate_size']}, "
            f"{MODEL_BATCH} seq x {MODEL_SEQ} tok, bf16, {len(names)} adapters r{MODEL_R}")
    rounds = 5 if quick else 9
    ms, gib = model_times(contexts, steps, rounds, warmup=2 if quick else 3, iters=5 if quick else 10)
    rows = []
    for phase, what in (("fwd", "inference forward"), ("train", "training step")):
        for setting in MODEL_SETTINGS:
            t = statistics.median(ms[setting, phase])
            q = round_ratios(ms, setting, phase)
            rows.append(Row("multi", f"{case} {phase}", setting, t, statistics.median(q),
                            note=f"{what}; peak {gib[setting, phase]:.1f} GiB; median of {rounds} interleaved "
                                 f"rounds (ms {min(ms[setting, phase]):.1f}-{max(ms[setting, phase]):.1f}, "
                                 f"ratio {min(q):.2f}-{max(q):.2f}); ratio = to single in the same round "
                                 "(target: mixed <= 1.3)",
                            extra={"peak_gib": gib[setting, phase], "rounds_ms": ms[setting, phase],
                                   "round_ratios": q}))
    del model, contexts, steps
    torch.cuda.empty_cache()
    return rows


def _cpu_probe() -> list[Row]:
    import lora_kernels

    x = torch.randn(7, 33)
    A, B, s = make_adapters(3, 4, 33, 20, dtype=torch.float32)
    idx = torch.tensor([0, 2, -1, 1, 1, 0, 2])
    d = lora_kernels.multi_lora_dispatch(x, A)
    err = (lora_kernels.multi_lora(x, A, B, idx, s) - lora_kernels.multi_lora_reference(x, A, B, idx, s)).abs().max()
    rows = [Row("multi", "cpu probe 7x33->20 L3 r4", f"{d.backend}:{d.regime}", None,
                note=f"max |ext - reference| = {float(err):.2e}; GPU timings need CUDA")]
    model, names = adapter_model(MODEL_TINY, dtype=torch.float32)
    contexts, steps = adapter_model_steps(model, names, MODEL_BATCH, 8)
    logits, losses = {}, {}
    for st in MODEL_SETTINGS:  # every forward before the first optimizer step changes a0
        with contexts[st]():
            logits[st] = steps["fwd"]()
    for st in MODEL_SETTINGS:
        with contexts[st]():
            losses[st] = float(steps["train"]())
    for st in MODEL_SETTINGS:
        loss = losses[st]
        rows.append(Row("multi", "cpu probe: tiny llama, 8 seq x 8 tok, 8 adapters", st, None,
                        note=f"loss {loss:.4f}; max |logits - single| = "
                             f"{float((logits[st] - logits['single']).abs().max()):.2e}; GPU timings need CUDA"))
    return rows


def run(quick: bool) -> list[Row]:
    if not torch.cuda.is_available():
        return _cpu_probe()
    import lora_kernels

    dev = torch.device("cuda")
    dt = torch.bfloat16
    H = HIDDEN
    rows: list[Row] = []
    copy_gbs = _copy_bandwidth_gbs(dev)
    rows.append(Row("multi", "device-to-device copy 256 MiB", "copy", None, note=f"{copy_gbs:.0f} GB/s",
                    extra={"gbs": copy_gbs}))
    adapters = {}
    for T, L, r, pop in _decode_cases(quick):
        if (L, r) not in adapters:
            adapters[(L, r)] = make_adapters(L, r, H, H, dtype=dt, device=dev)
        A, B, s = adapters[(L, r)]
        idx = adapter_indices(T, L, pop, device=dev)
        x = torch.randn(T, H, device=dev, dtype=dt)
        used = int(torch.unique(idx).numel())
        nbytes = decode_bytes(T, H, H, r, used)
        case = f"decode T{T} L{L} r{r} {pop}"
        slow = pop == "distinct" and T in (16, 256, 1024) and (quick or L <= 32)
        impls = decode_impls(x, A, B, idx, s, with_slow=slow)
        picked = lora_kernels.multi_lora_dispatch(x, A).regime
        times = {}
        with torch.no_grad():  # inference: PEFT's LoRA weights would otherwise record a graph
            for name, fn in impls.items():
                times[name] = _time(fn, graph=name == "gather+bmm" or name.startswith("ext:"))
        base_e, base_g = times["gather+bmm"]
        for name, (e, g) in times.items():
            if name == "peft base":
                continue
            note, extra = "", {"graph_ms": g}
            if name == "peft":
                e = e - times["peft base"][0]
                note = f"mixed-batch forward minus its base linear ({times['peft base'][0]:.4f} ms)"
            if name.startswith("ext"):
                gbs_e = nbytes / e / 1e6
                note = (f"{picked if name == 'ext:auto' else name[4:]}: {gbs_e:.0f} GB/s eager"
                        + (f"; graph {g:.4f} ms = {nbytes / g / 1e6:.0f} GB/s "
                           f"({nbytes / g / 1e6 / copy_gbs:.0%} of copy), x gather(graph) {g / base_g:.3f}"
                           if g and base_g else ""))
                extra.update(gbs=gbs_e, gbs_graph=nbytes / g / 1e6 if g else None, regime=picked)
            elif name == "gather+bmm" and g:
                note = f"graph {g:.4f} ms"
            rows.append(Row("multi", case, name, e, e / base_e, note=note, extra=extra))
    rows.extend(_prefill_rows(quick, dev, dt))
    rows.extend(_model_rows(quick, dev))
    return rows


def prefill_impls(x, W, A, B, idx, scales, dy) -> dict:
    """Named callables of one prefill/training case (shared with the pytest-benchmark file)."""
    import lora_kernels

    one = torch.zeros_like(idx)

    def train(fn):
        def step():
            for t in (x, A, B):
                t.grad = None
            fn().backward(dy)
        return step

    impls = {
        "fwd gather+bmm": lambda: gather_bmm(x, A, B, idx, scales),
        "fwd ext": lambda: lora_kernels.multi_lora(x, A, B, idx, scales),
        "fwd loop": lambda: lora_kernels.multi_lora_reference(x, A, B, idx, scales),
        "fwd linear base": lambda: torch.nn.functional.linear(x, W),
        "fwd linear ext mixed": lambda: lora_kernels.multi_lora_linear(x, W, A, B, idx, scales),
        "fwd linear ext single": lambda: lora_kernels.multi_lora_linear(x, W, A, B, one, scales),
        "fwd lora_linear single": lambda: lora_kernels.lora_linear(x, W, A[0], B[0], float(scales[0])),
        "train gather+bmm": train(lambda: gather_bmm(x, A, B, idx, scales)),
        "train ext": train(lambda: lora_kernels.multi_lora(x, A, B, idx, scales)),
        "train loop": train(lambda: lora_kernels.multi_lora_reference(x, A, B, idx, scales)),
        "train linear base": train(lambda: torch.nn.functional.linear(x, W)),
        "train linear ext mixed": train(lambda: lora_kernels.multi_lora_linear(x, W, A, B, idx, scales)),
        "train linear ext single": train(lambda: lora_kernels.multi_lora_linear(x, W, A, B, one, scales)),
        "train lora_linear single": train(lambda: lora_kernels.lora_linear(x, W, A[0], B[0], float(scales[0]))),
    }
    model = peft_model(A.detach(), B.detach(), scales, x.dtype, x.device)
    if model is not None:  # PEFT's mixed batch is inference-only: forward of the whole layer
        with torch.no_grad():
            model.base_model.model.proj.base_layer.weight.copy_(W)
        names = [f"a{int(i)}" if i >= 0 else "__base__" for i in idx.tolist()]
        impls["fwd linear peft mixed"] = lambda: model(x, adapter_names=names)
    return impls


def _prefill_rows(quick: bool, dev, dt) -> list[Row]:
    """8 sequences of 512-2048 tokens over L adapters: the LoRA term against gather+bmm and the loop,
    and the whole layer (base + LoRA) mixed vs one adapter for the 1.3x targets."""
    H = HIDDEN
    rows = []
    for L in ((8,) if quick else (4, 8)):
        r = 16
        idx = prefill_indices(8, L, device=dev)
        T = idx.numel()
        x = torch.randn(T, H, device=dev, dtype=dt, requires_grad=True)
        A, B, s = make_adapters(L, r, H, H, dtype=dt, device=dev, requires_grad=True)
        W = torch.randn(H, H, device=dev, dtype=dt) / math.sqrt(H)
        dy = torch.randn(T, H, device=dev, dtype=dt)
        impls = prefill_impls(x, W, A, B, idx, s, dy)
        case = f"prefill 8 seq {T} tok L{L} r{r}"
        ms = {}
        for name, fn in impls.items():
            if name.startswith("fwd"):
                with torch.no_grad():
                    ms[name] = gpu_time_ms(fn)
            else:
                ms[name] = gpu_time_ms(fn)
        for phase in ("fwd", "train"):
            base = ms[f"{phase} gather+bmm"]
            for impl in ("gather+bmm", "ext", "loop"):
                rows.append(Row("multi", f"{case} {phase}", impl, ms[f"{phase} {impl}"], ms[f"{phase} {impl}"] / base))
            lin = ms[f"{phase} linear base"]
            single = ms[f"{phase} lora_linear single"]
            for impl in ("linear base", "lora_linear single", "linear ext single", "linear ext mixed",
                         "linear peft mixed"):
                if f"{phase} {impl}" not in ms:
                    continue
                rows.append(Row("multi", f"{case} {phase} layer", impl, ms[f"{phase} {impl}"],
                                ms[f"{phase} {impl}"] / single,
                                note=f"x base {ms[f'{phase} {impl}'] / lin:.2f}; ratio = to lora_linear on one adapter "
                                     "(target: mixed <= 1.3)"))
        del x, A, B, W, dy, impls
    return rows
