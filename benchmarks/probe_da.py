"""The dA pass alone: Triton's against the Gluon pass (lora_da_kernel), checked and timed (GPU).

    python benchmarks/probe_da.py [MxK ...] [--variants] [--rounds 3]

For each shape (r16): both passes against a float64 reference with the mask from `dropout_mask`
(relative error of dA), then CUDA-graph us (median of the rounds; each replay zeroes dA and runs the
pass, as the backward does) at p0 and p0.05. Triton's pass (the TMA one with dropout, the pointer one
at p0, as the op dispatched them before the Gluon pass) reads G (fp32) and draws the mask; the Gluon
pass reads Gs = s / (1 - p) G rounded to x's dtype and the mask's bits, the dgrad's operands, so the
reference for each is computed from what it reads. --variants: Gluon tiles, stages, warps and row
splits (x N: N CTAs an SM) other than the dispatcher's.
"""
import argparse
import math

import torch
import triton.testing

from lora_kernels.ops import lora_linear as L
from lora_kernels.ops.dropout import dropout_mask, keep_scale

R = 16
SCALE = 2.0


def _with_split(per_sm: int | None, fn):
    """fn with _split cutting the rows for per_sm CTAs an SM (None: the dispatcher's rule)."""
    if per_sm is None:
        return fn
    real = L._split

    def split(other, streamed, device):
        return max(1, min(streamed, math.ceil(per_sm * L._sm_count_of(device) / max(1, other))))

    def run():
        L._split = split
        try:
            return fn()
        finally:
            L._split = real
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*", default=["8192x4096", "8192x1024", "8192x2048", "2048x4096", "333x264"])
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    torch.manual_seed(0)
    with L._raw_launches():
        for shape in args.shapes:
            M, K = (int(v) for v in shape.split("x"))
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            G = torch.randn(M, R, device="cuda")
            seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
            row = [f"{M}x{K}"]
            for p in (0.0, 0.05):
                coef = SCALE * keep_scale(p)
                Gs = torch.zeros(M, 16, device="cuda", dtype=torch.bfloat16)
                Gs[:, :R] = (G * coef).to(torch.bfloat16)
                keep = dropout_mask(seed, M, K, p, device="cuda") if p > 0 else torch.ones(M, K, dtype=torch.bool,
                                                                                          device="cuda")
                xm = x.double() * keep
                ref_t = coef * G.to(torch.bfloat16).double().T @ xm  # Triton's dot takes G rounded to x's dtype
                ref_g = Gs[:, :R].double().T @ xm
                A = torch.randn(R, K, device="cuda")
                bits = L._mask_bits(M, K, p, seed, x.device) if p > 0 else None
                zeros = lambda: torch.zeros(R, K, device="cuda")  # noqa: E731
                cases = {}
                if p > 0:
                    cases["triton"] = (lambda p=p: L._bwd_xa_tma(x, G, seed, SCALE, p, L._XPASS_TMA_CFG, da=zeros()),
                                       ref_t)
                else:  # the op's p0 dA pass: the pointer kernel
                    cases["triton"] = (lambda: L._bwd_x(x, A, G, None, SCALE, 0.0, False, da=zeros())[0], ref_t)
                variants = [(L._XPASS_GLUON_CFG, None)]
                if args.variants:
                    variants += [(L._Cfg(32, 256, 8, 4), None), (L._Cfg(64, 256, 4, 3), None),
                                 (L._Cfg(32, 256, 4, 4), None), (L._Cfg(64, 256, 8, 3), 3), (L._Cfg(64, 256, 8, 3), 1)]
                for cfg, per_sm in variants:
                    name = "gluon" + ("" if per_sm is None and cfg == L._XPASS_GLUON_CFG else
                                      f" {cfg.block_a}x{cfg.block_b} w{cfg.num_warps} s{cfg.num_stages}"
                                      + (f" x{per_sm}" if per_sm else ""))
                    cases[name] = (_with_split(per_sm, lambda cfg=cfg, b=bits: L._bwd_xa_gluon(
                        x, Gs, R, zeros(), b, cfg=cfg)), ref_g)
                errs = {}
                for name, (fn, ref) in cases.items():
                    out = fn().double()
                    errs[name] = ((out - ref).norm() / ref.norm()).item()
                    assert errs[name] < 1e-4, f"{shape} p{p} {name}: rel err {errs[name]:.2e}"
                times = {n: [] for n in cases}
                if M * K >= 2**22:
                    for _ in range(args.rounds):
                        for name, (fn, _) in cases.items():
                            times[name].append(triton.testing.do_bench_cudagraph(fn, rep=40) * 1e3)
                row.append(f"p{p}: " + "  ".join(
                    f"{n} {sorted(v)[len(v) // 2]:.1f}" if v else f"{n} ok" for n, v in times.items())
                    + f"  (max rel err {max(errs.values()):.1e})")
            print("  |  ".join(row), flush=True)


if __name__ == "__main__":
    main()
