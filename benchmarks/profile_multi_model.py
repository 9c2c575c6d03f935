"""Where a mixed batch's time goes through the patched model: single adapter vs adapter_batch (GPU).

    python benchmarks/profile_multi_model.py [--layers 4] [--top 12]

The multi benchmark's Llama (lora_kernels/_bench/multi.py: hidden 2048, 8 adapters r16 on every
projection, 8 sequences x 1024 tokens, bf16). For each setting (single = set_adapter, single (batch)
= adapter_batch of one name, mixed = 8 names) and phase (fwd, train) it prints: host ms until the
step returns vs wall ms until the GPU is done (host ~ wall: the GPU waits on the host), host-to-
device synchronisations per step, CUDA ms per step by kernel kind, the top kernels of the mixed setting,
and the host / wall ms of a training step's forward, backward and optimizer step apart.
"""
import argparse
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lora_kernels._bench import multi
from profile_e2e import KINDS, host_and_wall_ms

MULTI_KINDS = [("multi shrink", r"sgmv_shrink|bgmv_shrink|rows_shrink"),
               ("multi expand", r"sgmv_expand|bgmv_expand|rows_expand"),
               ("multi dA/dB", r"seg_outer"), ("segments+sort", r"make_keys|build_segments|sort|radix|cub")]
ALL_KINDS = MULTI_KINDS + KINDS
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def kind_of(name: str) -> str:
    for kind, pat in ALL_KINDS:
        if re.search(pat, name, re.IGNORECASE):
            return kind
    return "other"


def profile_step(step, n: int = 2):
    """(kernel name -> [us per step, launches per step], host synchronisations per step)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    by_name = defaultdict(lambda: [0.0, 0.0])
    syncs = 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            if ev.name.startswith("Optimizer."):  # the optimizer's range annotation, not a kernel
                continue
            t = by_name[ev.name]
            t[0] += ev.device_time / n
            t[1] += 1 / n
        elif ev.name in SYNC_OPS:
            syncs += 1
    return by_name, (syncs - 1) / n  # the profile's own final synchronize


def split_host_ms(model, ids, opt, n: int = 3) -> dict:
    """{part: (host ms, wall ms)} of a training step's parts, each started on an idle GPU: forward +
    loss, backward, optimizer step + zero_grad. Host ~ wall: that part waits on the host."""
    times = {"forward": [], "backward": [], "optimizer": []}

    def timed(part, fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        times[part].append((t1 - t0, time.perf_counter() - t0))
        return out

    def opt_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(n):
        loss = timed("forward", lambda: model(input_ids=ids, labels=ids).loss)
        timed("backward", loss.backward)
        timed("optimizer", opt_step)
    return {k: (1e3 * min(h for h, _ in v), 1e3 * min(w for _, w in v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    model, names = multi.adapter_model(dict(multi.MODEL, num_hidden_layers=args.layers), device="cuda")
    contexts, steps = multi.adapter_model_steps(model, names, multi.MODEL_BATCH, multi.MODEL_SEQ)
    res, split = {}, {}
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (multi.MODEL_BATCH, multi.MODEL_SEQ), device=dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    for setting in multi.MODEL_SETTINGS:
        with contexts[setting]():
            for phase, step in steps.items():
                for _ in range(3):
                    step()
                hw = host_and_wall_ms(step)
                res[setting, phase] = (hw,) + profile_step(step)
            split[setting] = split_host_ms(model, ids, opt)
    print("\n== training step by part: host / wall ms, each part started on an idle GPU")
    print(f"  {'':<16}" + "".join(f"{c:>24}" for c in multi.MODEL_SETTINGS))
    for part in ("forward", "backward", "optimizer"):
        print(f"  {part:<16}" + "".join(f"{f'{split[c][part][0]:.1f} / {split[c][part][1]:.1f}':>24}"
                                         for c in multi.MODEL_SETTINGS))
    kinds = [k for k, _ in ALL_KINDS] + ["other"]
    for phase in steps:
        cols = [s for s in multi.MODEL_SETTINGS]
        print(f"\n== {phase}: {args.layers} layers, {multi.MODEL_BATCH} x {multi.MODEL_SEQ} tokens, "
              f"{len(names)} adapters r{multi.MODEL_R}")
        print(f"  {'':<16}" + "".join(f"{c:>24}" for c in cols))
        print(f"  {'host / wall ms':<16}" + "".join(f"{f'{res[c, phase][0][0]:.1f} / {res[c, phase][0][1]:.1f}':>24}"
                                                  for c in cols))
        print(f"  {'host syncs':<16}" + "".join(f"{res[c, phase][2]:>24.0f}" for c in cols))
        for kind in kinds + ["TOTAL"]:
            cells = []
            for c in cols:
                by_name = res[c, phase][1]
                vals = [v for nm, v in by_name.items() if kind == "TOTAL" or kind_of(nm) == kind]
                cells.append(f"{sum(v[0] for v in vals) / 1e3:8.2f} ms /{sum(v[1] for v in vals):5.0f}")
            if kind == "TOTAL" or any(not c.strip().startswith("0.00 ms /    0") for c in cells):
                print(f"  {kind:<16}" + "".join(f"{c:>24}" for c in cells))
        by_name = res["mixed", phase][1]
        print(f"  -- mixed: top {args.top} kernels (us per step, launches per step)")
        for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {us:10.1f} us {n:6.0f}  [{kind_of(name)}] {name[:100]}")


if __name__ == "__main__":
    main()
