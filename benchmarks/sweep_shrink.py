"""The shrink pass S = drop(x) @ A.T alone: the pointer-load kernel at its tuned config against the
TMA-load kernel at several tile configs (GPU, sm_90), CUDA-graph time and read bandwidth of x.

    python benchmarks/sweep_shrink.py [--xpass] [--dropout-only] [--cfgs BMxBKxWARPSxSTAGES,...] [--shapes MxKxR,...]
--xpass: the backward's dA pass instead; --dropout-only: p = 0.05 only (default also p = 0); --cfgs / --shapes: other TMA
tiles / shapes than the lists below.
"""
import argparse
import torch
import triton.testing

from lora_kernels.ops import lora_linear as L

SHAPES = [(8192, 4096, 16), (8192, 2048, 16), (8192, 1024, 16), (2048, 4096, 16), (8192, 14336, 16), (8192, 4096, 64)]
TMA_CFGS = [(64, 256, 4, 4), (64, 128, 4, 6), (64, 256, 8, 4), (128, 128, 8, 4), (32, 256, 4, 4), (64, 512, 8, 3),
            (128, 256, 8, 3)]


def main(shapes=SHAPES, cfgs=TMA_CFGS, ps=(0.05, 0.0)):
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    for M, K, R in shapes:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(R, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
        for p in ps:
            ref = L._shrink(x, A, p, seed)
            t0 = triton.testing.do_bench_cudagraph(lambda: L._shrink(x, A, p, seed), rep=40)
            line = [f"M{M} K{K} r{R} p{p:g}: pointer {t0 * 1e3:6.1f} us ({M * K * 2 / t0 / 1e9:4.2f} TB/s)"]
            if p == ps[0]:  # what reading x alone costs here: torch's row sums (fp32 accumulation)
                tr = triton.testing.do_bench_cudagraph(lambda: torch.sum(x, 1, dtype=torch.float32), rep=40)
                line.append(f"read roofline: torch.sum(x, 1) {tr * 1e3:6.1f} us ({M * K * 2 / tr / 1e9:4.2f})")
            for cfg in cfgs:
                c = L._Cfg(*cfg)
                try:
                    out = L._shrink_tma(x, A, p, seed, c)
                    err = ((out - ref).norm() / ref.norm()).item()
                    t = triton.testing.do_bench_cudagraph(lambda: L._shrink_tma(x, A, p, seed, c), rep=40)
                    line.append(f"tma{cfg} {t * 1e3:6.1f} us ({M * K * 2 / t / 1e9:4.2f}) err {err:.0e}")
                except Exception as e:
                    line.append(f"tma{cfg} failed: {type(e).__name__} {str(e)[:80]}")
            print("\n   ".join(line), flush=True)




XPASS_CFGS = [(64, 128, 4, 4), (32, 128, 4, 6), (64, 64, 4, 6), (128, 128, 8, 3), (32, 256, 4, 4), (64, 256, 8, 3)]


def xpass(shapes=SHAPES[:5], cfgs=XPASS_CFGS, ps=(0.05, 0.0)):
    """The backward's dA pass (dA = s/(1-p) G.T @ drop(x)) alone: pointer kernel vs TMA tiles."""
    for M, K, R in shapes:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(R, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        G = torch.randn(M, R, device="cuda")
        seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
        for p in ps:
            saved = L._TMA_SHRINK
            L._TMA_SHRINK = False
            ref = L._bwd_x(x, A, G, seed, 2.0, p, False)[0]
            t0 = triton.testing.do_bench_cudagraph(lambda: L._bwd_x(x, A, G, seed, 2.0, p, False), rep=40)
            L._TMA_SHRINK = saved
            line = [f"dA pass M{M} K{K} r{R} p{p:g}: pointer {t0 * 1e3:6.1f} us ({M * K * 2 / t0 / 1e9:4.2f} TB/s)"]
            for cfg in cfgs:
                c = L._Cfg(*cfg)
                try:
                    out = L._bwd_xa_tma(x, G, seed, 2.0, p, c)
                    err = ((out - ref).norm() / ref.norm()).item()
                    t = triton.testing.do_bench_cudagraph(lambda: L._bwd_xa_tma(x, G, seed, 2.0, p, c), rep=40)
                    line.append(f"tma{cfg} {t * 1e3:6.1f} us ({M * K * 2 / t / 1e9:4.2f}) err {err:.0e}")
                except Exception as e:
                    line.append(f"tma{cfg} failed: {type(e).__name__} {str(e)[:80]}")
            print("\n   ".join(line), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--xpass", action="store_true")
    ap.add_argument("--dropout-only", action="store_true")
    ap.add_argument("--cfgs", default="")
    ap.add_argument("--shapes", default="")
    args = ap.parse_args()
    kw = {"ps": (0.05,) if args.dropout_only else (0.05, 0.0)}
    if args.shapes:
        kw["shapes"] = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.cfgs:
        kw["cfgs"] = [tuple(int(v) for v in c.split("x")) for c in args.cfgs.split(",")]
    xpass(**kw) if args.xpass else main(**kw)
