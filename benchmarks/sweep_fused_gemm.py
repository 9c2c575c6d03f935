"""The fused LoRA linear with the LoRA expansion inside a Triton GEMM's epilogue, against the
composition it replaces (expand kernel + cuBLAS with beta = 1), in the same run (GPU).

    python benchmarks/sweep_fused_gemm.py

One line per case and mode: ms of the frozen base F.linear (graph), then each path's ratio to it,
graph and eager, and the relative difference between the two paths' outputs / input gradients.
"""
import traceback

import torch
import triton.testing

from lora_kernels._bench import gpu_time_ms, graph_time_ms
from lora_kernels._bench.linear import QUICK, Case, build, step_fn
from lora_kernels.ops import lora_linear as op_mod

VARIANTS = (("expand+cuBLAS", False, True), ("gemm, Rt late", True, False), ("gemm-epilogue", True, True))
CASES = [(8192, 4096, 4096, 16, 0.05), (8192, 4096, 4096, 16, 0.0), (8192, 1024, 1024, 16, 0.05),
         (8192, 1024, 1024, 16, 0.0), (8192, 2048, 512, 16, 0.05), (8192, 4096, 14336, 16, 0.0),
         (2048, 4096, 4096, 16, 0.05), (8192, 4096, 4096, 64, 0.05)]


def main():
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}; ratio to base, graph / eager")
    for M, K, N, r, p in CASES:
        case = Case(M, K, N, r, p)
        x, dy, fns = build(case, impls=("base", "fused"))
        for mode in ("fwd", "fwd+bwd"):
            base = step_fn(*fns["base"], x, dy, mode)
            bg, be = graph_time_ms(base), gpu_time_ms(base, 10, 40)
            cells, outs = [], {}
            for name, fused, hoist in VARIANTS:
                op_mod._FUSED_GEMM, op_mod._GEMM_HOIST_RT = fused, hoist
                fn = step_fn(*fns["fused"], x, dy, mode)
                torch.manual_seed(0)
                out = fn()
                outs[name] = (out if mode == "fwd" else out[0]).detach()  # no autograd graph kept alive
                del out
                try:
                    g = triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
                except Exception:  # say why (a failed capture leaves the CUDA generator unusable)
                    traceback.print_exc()
                    print(f"{case.name} {mode} {name}: capture failed", flush=True)
                    raise
                e = gpu_time_ms(fn, 10, 40)
                cells.append(f"{name} {g / bg:5.3f}x / {e / be:5.3f}x")
            ref = outs[VARIANTS[0][0]].float()
            diffs = " ".join(f"{((outs[n].float() - ref).norm() / ref.norm()).item():.1e}" for n, _, _ in VARIANTS[1:])
            print(f"{case.name:32s} {mode:8s} base {bg:.4f} ms   " + "   ".join(cells) + f"   rel diff {diffs}",
                  flush=True)
        del x, dy, fns
        torch.cuda.empty_cache()
    op_mod._FUSED_GEMM, op_mod._GEMM_HOIST_RT = True, True


if __name__ == "__main__":
    main()
