"""Host time of one eager training step of the fused op, next to naive PyTorch and the base (GPU).

    python benchmarks/host_step.py [MxKxNxr ...] [--p 0.05] [--adapters bf16|fp32] [--before MODULE[,MODULE...]]

At small shapes an eager step is bound by the host: the GPU waits for launches. For each shape this
times, in interleaved rounds (order rotated per round, see lora_kernels._bench.interleaved_ms):
forward alone and forward + torch.autograd.grad of (x, A, B), for `lora_kernels.lora_linear`, for
copies of the op module given by --before (lora_kernels.ops.MODULE with its torch.library
namespace renamed, as in breakdown_lora_linear.py: the code before a change, in the same process),
for naive PyTorch and for the frozen base F.linear. It prints the median host microseconds per call
and the rounds' range. A call is timed as n back-to-back calls then one synchronize, so where the
GPU work is longer than the host's, the figure is the GPU's. "fused" replays its launches from C++
after the first call (lora_kernels/ops/replay.py); "fused, Python path" is the same op with replay off.
"""
import argparse
import importlib
import statistics

import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels._bench import interleaved_ms

from benchmarks.profile_host import host_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="*", default=["8192x1024x1024x16", "8192x2048x512x16"])
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--adapters", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--before", default="")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: nothing to measure")
        return
    from lora_kernels.ops import replay

    ops = {"fused": lk.lora_linear}
    if replay.enable(build=True):  # the eager calls replayed from C++, and the Python path beside them
        def python_path(*a):
            replay._state["ok"] = False
            try:
                return lk.lora_linear(*a)
            finally:
                replay._state["ok"] = True

        ops["fused, Python path"] = python_path
    else:
        print("replay: unavailable (the CUDA extension did not build or load): 'fused' is the Python path")
    for name in filter(None, args.before.split(",")):
        ops[name] = importlib.import_module(f"lora_kernels.ops.{name}").lora_linear
    dt, p = torch.bfloat16, args.p
    adt = torch.float32 if args.adapters == "fp32" else dt
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  p {p}  adapters {args.adapters}  "
          f"host us per call, median of {args.rounds} interleaved rounds (range)")
    for shape in args.shapes:
        M, K, N, r = (int(v) for v in shape.split("x"))
        x = torch.randn(M, K, device="cuda", dtype=dt, requires_grad=True)
        W = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
        A = (torch.randn(r, K, device="cuda", dtype=adt) / K**0.5).requires_grad_(True)
        B = (torch.randn(N, r, device="cuda", dtype=adt) / r**0.5).requires_grad_(True)
        dy = torch.randn(M, N, device="cuda", dtype=dt)
        fns = {}
        for name, op in ops.items():
            fns[f"{name} fwd"] = lambda op=op: op(x, W, A, B, 2.0, None, p)
            fns[f"{name} fwd+bwd"] = lambda op=op: torch.autograd.grad(op(x, W, A, B, 2.0, None, p), [x, A, B], dy)

        def naive():
            h = F.linear(F.dropout(x, p), A.to(dt))
            return F.linear(x, W) + 2.0 * F.linear(h, B.to(dt))

        fns["naive fwd"] = naive
        fns["naive fwd+bwd"] = lambda: torch.autograd.grad(naive(), [x, A, B], dy)
        fns["base fwd+bwd"] = lambda: torch.autograd.grad(F.linear(x, W), [x], dy)
        times = interleaved_ms(fns, host_us, args.rounds)
        print(f"{M} x {K} -> {N}, r{r}")
        for name, ts in times.items():
            print(f"  {name:<28} {statistics.median(ts):8.1f}  ({min(ts):.1f}-{max(ts):.1f})")
    print(f"replay: {replay.stats}" + (f"; declined because: {replay.last_declined}" if replay.last_declined else ""))


if __name__ == "__main__":
    main()
