"""The backward's dy pass alone, and beside the Gluon dgrad's dropout mask bits (GPU).

    python benchmarks/probe_dy.py [MxNxK ...] [--p 0.05] [--rank 16] [--rounds 3] [--variants]

One pass over dy [M, N] computes G = dy @ B [M, r] and adds dB = s * dy.T @ S [N, r] with fp32
atomics, and writes Gs, the dgrad's LoRA operand. With dropout the dgrad also needs its mask over
[M, K] as bits, which a kernel after the pass draws (_mask_bits, launched beside the pass's last
CTAs). For each shape, CUDA-graph us (median of --rounds rounds taken in turn, so drift hits all
alike) of the pass as dispatched, the bits kernel, and the two one after the other (the bits kernel
launched beside the pass's CTAs, as the backward launches it, and after the pass ends), with dy's
read bandwidth (the bits kernel persistent or not as _mask_bits chooses); --variants adds the pass
at other tiles and stages, and the bits kernel on a second stream beside the pass.
"""
import argparse

import torch
import triton.testing

from lora_kernels.ops import lora_linear as L

SHAPES = [(8192, 4096, 4096), (8192, 1024, 1024), (8192, 512, 2048), (8192, 4096, 14336), (2048, 4096, 4096)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="*")
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", action="store_true",
                    help="also: the pass at other tiles and stages, and the bits kernel on a second stream beside it")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in a.split("x")) for a in args.shapes] or SHAPES
    p, R, dev, dt = args.p, args.rank, torch.device("cuda"), torch.bfloat16
    pdl = L._pdl_ok()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}; r{R} p{p}; graph us (dy's TB/s)")
    for M, N, K in shapes:
        dy = torch.randn(M, N, device=dev, dtype=dt)
        B = torch.randn(N, R, device=dev, dtype=dt)
        S = torch.randn(M, R, device=dev)
        gs = torch.empty(M, L._block_r(R), device=dev, dtype=dt)
        seed = torch.tensor([1234], device=dev, dtype=torch.int64)

        def dy_pass(trigger=False, cfg=None):
            return L._bwd_dy(dy, B, S, 2.0, dt, False, cfg=cfg, gs=gs, gs_scale=1.0, trigger=trigger)

        side = torch.cuda.Stream()

        def beside():  # the bits kernel on a second stream, joined after the pass
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                L._mask_bits(M, K, p, seed, dev)
            dy_pass()
            main.wait_stream(side)

        cases = {
            "dy pass": lambda: dy_pass(),
            "bits kernel": lambda: L._mask_bits(M, K, p, seed, dev),
            "pass, then bits": lambda: (dy_pass(trigger=pdl), L._mask_bits(M, K, p, seed, dev, pdl=pdl)),
        }
        if pdl:  # (as the backward launches them: the bits kernel beside the pass's CTAs; here without that)
            cases["pass, then bits, no PDL"] = lambda: (dy_pass(), L._mask_bits(M, K, p, seed, dev))
        if args.variants:
            c = L._dy_cfg(M, R)
            for bn, stages in ((c.block_b, 4), (c.block_b, 6), (2 * c.block_b, 3), (2 * c.block_b, 4)):
                cfg = L._Cfg(c.block_a, bn, c.num_warps, stages)
                cases[f"pass {c.block_a}x{bn} {stages} st"] = lambda cfg=cfg: dy_pass(cfg=cfg)
            cases["bits on a side stream"] = beside
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                times[name].append(triton.testing.do_bench_cudagraph(fn, rep=40) * 1e3)
        cells = []
        for name, ts in times.items():
            t = sorted(ts)[len(ts) // 2]
            bw = "" if name.startswith("bits") and "side" not in name else f" ({M * N * 2 / t / 1e6:4.2f})"
            cells.append(f"{name} {t:6.1f}{bw}")
        print(f"{M}x{N} -> {K}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    with L._raw_launches():  # direct launches, as the op makes them (programmatic dependent launch needs them)
        main()
