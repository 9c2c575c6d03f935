"""GPU time of each kernel in one fused LoRA training step, next to the frozen base's (GPU).

    python benchmarks/breakdown_lora_linear.py [MxKxNxr ...] [--p 0.05] [--steps 20] [--before MODULE[,MODULE...]] [--fwd]

For each shape: forward + torch.autograd.grad of (x, A, B) through `lora_kernels.lora_linear`, and
forward + grad of x through the base F.linear, each profiled over --steps steps after warm-up.
Prints the mean GPU microseconds per step of every kernel (name shortened), the sum, and the
difference to the base: where the LoRA overhead of a training step goes, kernel by kernel.
Then the CUDA-graph time of each (median, three rounds in turn, so drift hits all alike).
--before MODULE[,MODULE...]: also copies of the op module (lora_kernels.ops.MODULE, each with its
torch.library namespace renamed so all can load), to compare a change against the code before it,
or variants of it, in one run. Replay from C++ is then off: its plans are keyed by the call alone,
so one module's recorded plan would otherwise serve the others' calls too.
--fwd: the training forward alone (x, A, B require grad; no backward) instead of the step.
"""
import argparse
import importlib
from collections import defaultdict

import torch
import torch.nn.functional as F
import triton.testing
from torch.profiler import ProfilerActivity, profile

import lora_kernels as lk
from lora_kernels._bench import training_inputs
from lora_kernels.ops import replay


def kernel_us(fn, steps: int) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    total = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name[:60]] += ev.device_time / steps
    return dict(total)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*", default=["8192x4096x4096x16", "8192x1024x1024x16"])
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--before", default=None)
    ap.add_argument("--fwd", action="store_true", help="time the training forward alone")
    args = ap.parse_args()
    others = {name: importlib.import_module(f"lora_kernels.ops.{name}") for name in (args.before or "").split(",") if name}
    if others:
        # Eager calls replayed from C++ (ops/replay.py) look their plan up by the call's tensors and
        # scalars alone, in one table per process: a module copy's call would replay the plan the
        # first module recorded, and time that module's kernels twice. Each copy runs its own
        # Python path instead; the GPU work is the same kernels either way.
        replay._MODE = "0"
        replay._state["ok"] = False
        print("(--before: eager replay from C++ off, so that each module runs its own kernels)")
    for shape in args.shapes:
        x, W, A, B, dy = training_inputs(shape)
        mods = {"fused": lk, "base": None}
        mods.update(others)

        def case(mod):
            def fwd():
                return F.linear(x, W) if mod is None else mod.lora_linear(x, W, A, B, 2.0, None, args.p)
            if args.fwd:
                return lambda: fwd().detach()  # no autograd graph outlives the call (graph capture)
            return lambda: torch.autograd.grad(fwd(), [x] if mod is None else [x, A, B], dy)

        cases = {name: case(mod) for name, mod in mods.items()}
        res = {name: kernel_us(fn, args.steps) for name, fn in cases.items()}
        what = "training forward" if args.fwd else "training step (fwd + bwd)"
        print(f"== {shape} p{args.p}: GPU us per {what}, mean of {args.steps}")
        for name, table in res.items():
            for k, v in sorted(table.items(), key=lambda kv: -kv[1]):
                print(f"  {name:<6} {v:8.1f}  {k}")
            print(f"  {name:<6} {sum(table.values()):8.1f}  TOTAL")
        extra = sum(res["fused"].values()) - sum(res["base"].values())
        print(f"  fused - base: {extra:.1f} us ({sum(res['fused'].values()) / sum(res['base'].values()):.3f}x)")
        graph = defaultdict(list)
        for _ in range(3):
            for name, fn in cases.items():
                graph[name].append(triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3)
        base_g = sorted(graph["base"])[1]
        for name, ts in graph.items():
            print(f"  graph {name:<6} {sorted(ts)[1]:8.1f} us  ({sorted(ts)[1] / base_g:.3f}x base; rounds "
                  + " ".join(f"{t:.1f}" for t in ts) + ")")


if __name__ == "__main__":
    main()
