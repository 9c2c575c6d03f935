"""End to end: one LoRA training step of a Llama-architecture model, fused vs PEFT vs the floor.

Model built from a config (random weights, nothing downloaded): 16 layers, hidden 2048,
intermediate 8192, 32 heads / 8 kv heads, vocab 32000, bf16, sdpa attention; batch 4 x 2048
tokens; LoRA r = 16, alpha = 32, dropout 0.05 on q, k, v, o, gate, up, down (adapters in float32,
PEFT's default). One step = forward + causal-LM loss + backward + AdamW step over the adapters.

    floor        the same model frozen, no adapters, no optimizer; the embedding output is a leaf
                 with requires_grad=True (inputs_embeds), so backward runs through every layer
                 (all dx GEMMs, no dW) - the least any LoRA step must do
    peft         PEFT LoRA (get_peft_model), its own nn.Dropout
    patch        lora_kernels.patch(plain model): LoRALinear on the fused op
    patch(peft)  the PEFT model above, then lora_kernels.patch(peft_model)

Time: CUDA events around each step after warm-up, median over the timed steps; ratio = ms / floor
ms of the same run. Memory: torch.cuda.max_memory_allocated over the timed steps (weights,
optimizer state and activations), reset after warm-up. Targets on an H100: patch <= 1.25x the
floor's step time (PEFT: 2.10x) and <= 1.3x its peak memory (PEFT: 1.84x).
On a machine without CUDA nothing is timed: a 2-layer model patched vs PEFT is checked instead.
"""
from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from . import Row, lm_train_step

FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
BATCH, SEQ = 4, 2048
R, ALPHA, DROPOUT = 16, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLS = ("floor", "peft", "patch", "patch(peft)")
QUICK_LAYERS = 4


def build_llama(config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """LlamaForCausalLM from a config, random weights, made directly on `device` (sdpa attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**config, attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        return LlamaForCausalLM._from_config(cfg, dtype=dtype)


def add_lora(model, impl: str, r: int = R, alpha: int = ALPHA, dropout: float = DROPOUT):
    """The model with `impl`'s adapters (see the module docstring); base parameters frozen."""
    import lora_kernels

    if impl == "floor":
        model.requires_grad_(False)
        return model
    if impl == "patch":
        return lora_kernels.patch(model, r=r, alpha=alpha, dropout=dropout, target_modules=TARGETS)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS))
    if impl == "patch(peft)":
        lora_kernels.patch(model)
    elif impl != "peft":
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    return model


@dataclass
class Setup:
    """One configuration ready to run: `step()` does forward + loss + backward (+ AdamW)."""
    impl: str
    model: torch.nn.Module
    step: Callable[[], torch.Tensor]
    optimizer: torch.optim.Optimizer | None


def make_setup(impl: str, config: dict = FULL, batch: int = BATCH, seq: int = SEQ, device: str = "cuda",
               dtype: torch.dtype = torch.bfloat16) -> Setup:
    model = add_lora(build_llama(config, device, dtype), impl)
    model.train()
    ids = torch.randint(0, config["vocab_size"], (batch, seq), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    if impl == "floor":
        embed = model.get_input_embeddings()

        def step():
            with torch.no_grad():
                h = embed(ids)
            h.requires_grad_(True)  # backward reaches the first layer: every layer's dx is computed
            loss = model(inputs_embeds=h, labels=ids).loss
            loss.backward()
            return loss.detach()

        return Setup(impl, model, step, None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    return Setup(impl, model, lambda: lm_train_step(model, ids, opt), opt)


def release(setup: Setup | None) -> None:
    """Free a configuration's GPU memory before the next one."""
    if setup is not None:
        setup.model, setup.step, setup.optimizer = None, None, None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_steps(step: Callable[[], torch.Tensor], warmup: int = 3, iters: int = 10) -> tuple[float, float]:
    """(median ms per step by CUDA events, peak GiB allocated over the timed steps)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in events)
    return ms, torch.cuda.max_memory_allocated() / 2**30


def probe_cpu() -> str:
    """Tiny check where nothing can be timed: 2-layer fp32 Llama, patch() vs PEFT on the same adapter
    weights (dropout 0): max |difference| of the logits and of the adapter gradients."""
    import copy

    from peft import LoraConfig, get_peft_model

    import lora_kernels

    base = build_llama(TINY, "cpu", torch.float32)
    ours = lora_kernels.patch(copy.deepcopy(base), r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    root = theirs.base_model.model
    with torch.no_grad():
        for name in ours.lora_kernels_report.patched:
            m, p = ours.get_submodule(name), root.get_submodule(name)
            for ours_t, theirs_t in ((m.lora_A["default"], p.lora_A["default"].weight),
                                     (m.lora_B["default"], p.lora_B["default"].weight)):
                ours_t.copy_(torch.randn(ours_t.shape, generator=g) * 0.2)
                theirs_t.copy_(ours_t)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=g)
    out_o, out_t = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    out_o.loss.backward()
    out_t.loss.backward()
    d_logits = (out_o.logits - out_t.logits).abs().max().item()
    d_grad = max((ours.get_submodule(n).lora_B["default"].grad - root.get_submodule(n).lora_B["default"].weight.grad)
                 .abs().max().item() for n in ours.lora_kernels_report.patched)
    return f"CPU probe, 2-layer fp32 patch vs PEFT: max|d logits| = {d_logits:.2e}, max|d grad B| = {d_grad:.2e}"


def run(quick: bool) -> list[Row]:
    layers = QUICK_LAYERS if quick else FULL["num_hidden_layers"]
    case = f"llama {layers}L h2048 i8192 32/8 heads, b{BATCH}x{SEQ}, bf16, r{R} a{ALPHA} p{DROPOUT}"
    if not torch.cuda.is_available():
        note = "not measured (no CUDA); " + probe_cpu()
        return [Row("e2e", case, impl, None, note=note) for impl in IMPLS]
    from ..ops import replay

    replay.enable(build=True)  # eager calls replayed from C++ (off with LORA_KERNELS_REPLAY=0)
    config = dict(FULL, num_hidden_layers=layers)
    rows: list[Row] = []
    base_ms = base_gib = None
    for impl in IMPLS:
        setup = None
        try:
            setup = make_setup(impl, config)
            ms, gib = time_steps(setup.step, warmup=2 if quick else 3, iters=5 if quick else 10)
        finally:
            release(setup)
        if impl == "floor":
            base_ms, base_gib = ms, gib
        ratio = ms / base_ms
        rows.append(Row("e2e", case, impl, ms, ratio=ratio,
                        note=f"peak {gib:.1f} GiB ({gib / base_gib:.2f}x floor)",
                        extra={"peak_gib": gib, "peak_ratio": gib / base_gib}))
    return rows
