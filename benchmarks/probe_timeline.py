"""Kernel timeline of one fused LoRA training step, replayed from a CUDA graph (GPU).

    python benchmarks/probe_timeline.py [MxKxNxr ...] [--p 0.05] [--before MODULE[,MODULE...]] [--replays 20] [--eager]

For each shape: the step (forward + torch.autograd.grad of x, A, B) captured in a CUDA graph and
replayed under the profiler. Prints each kernel of the step with its start and end relative to
the step's first kernel, its duration and its overlap with the kernel before it (negative gap =
the two ran side by side, e.g. under programmatic dependent launch), as medians over the replays,
then the step's span. The breakdown script sums kernel times; this shows where they overlap and
where the GPU waits between them.
"""
import argparse
import importlib
import statistics

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import lora_kernels as lk
from lora_kernels._bench import training_inputs
from lora_kernels.ops import replay


def step_fn(mod, x, W, A, B, dy, p):
    if mod is None:
        return lambda: torch.autograd.grad(F.linear(x, W), [x], dy)
    return lambda: torch.autograd.grad(mod.lora_linear(x, W, A, B, 2.0, None, p), [x, A, B], dy)


def timeline(fn, replays: int, eager: bool = False):
    """[(name, start, end)] per replay, us relative to the replay's first kernel."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if eager:
        return _profiled(fn, replays)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        with torch.cuda.graph(g, stream=s):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    return _profiled(g.replay, replays)


def _profiled(fn, replays: int):
    runs = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            fn()
            torch.cuda.synchronize()  # steps apart, so each starts after the last one's end
    kernels = sorted(((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                      if ev.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    per = len(kernels) // replays
    if per == 0:
        return []
    for i in range(replays):
        ks = kernels[i * per:(i + 1) * per]
        t0 = ks[0][0]
        runs.append([(n, s - t0, e - t0) for s, e, n in ks])
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*", default=["8192x4096x4096x16"])
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--before", default=None)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="profile eager steps instead of graph replays")
    args = ap.parse_args()
    mods = {"fused": lk, "base": None}
    if args.before:
        replay._MODE = "0"
        replay._state["ok"] = False
        for name in args.before.split(","):
            mods[name] = importlib.import_module(f"lora_kernels.ops.{name}")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}; us, medians over {args.replays} graph replays")
    for shape in args.shapes:
        x, W, A, B, dy = training_inputs(shape)
        for name, mod in mods.items():
            runs = timeline(step_fn(mod, x, W, A, B, dy, args.p), args.replays, args.eager)
            if len({len(r_) for r_ in runs}) != 1:
                print(f"  {name}: no kernels recorded, or replays differ in kernel count; skipped")
                continue
            print(f"== {shape} p{args.p} {name}")
            print(f"  {'start':>7} {'end':>7} {'dur':>6} {'gap':>6}  kernel")
            prev_end = None
            for j, (kname, _, _) in enumerate(runs[0]):
                s = statistics.median(r_[j][1] for r_ in runs)
                e = statistics.median(r_[j][2] for r_ in runs)
                gap = "" if prev_end is None else f"{s - prev_end:6.1f}"
                print(f"  {s:7.1f} {e:7.1f} {e - s:6.1f} {gap:>6}  {kname[:70]}")
                prev_end = e
            span = statistics.median(max(k[2] for k in r_) for r_ in runs)
            print(f"  span {span:.1f} us")


if __name__ == "__main__":
    main()
