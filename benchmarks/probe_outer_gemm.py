"""The multi-adapter backward's per-adapter reductions as one dense GEMM each (GPU probe).

    python benchmarks/probe_outer_gemm.py

dA[l] = s_l G_l.T @ x_l and dB[l] = s_l dy_l.T @ S_l over each adapter's own rows equal one GEMM
each when G and S are first spread into [M, L * R] (row i's values in the column block of its
adapter, scaled, zeros elsewhere): dA = Gx.T @ x viewed [L, R, K], dB = dy.T @ Sx viewed [N, L, R].
That reads x and dy once, like the segment kernel, with L * R FLOPs per byte. Times both (graph us)
against the extension's backward at 8 sequences of 512-2048 tokens over L adapters.
"""
import torch

from lora_kernels._bench import graph_time_ms
from lora_kernels._bench import multi as MB


def spread(U, idx, s, L):
    M, R = U.shape
    out = torch.zeros(M, L, R, device=U.device, dtype=U.dtype)
    ok = idx >= 0
    c = idx.clamp(min=0)
    out.scatter_(1, c.view(M, 1, 1).expand(M, 1, R), (U * (s[c] * ok).unsqueeze(1)).to(U.dtype).view(M, 1, R))
    return out.view(M, L * R)


def main():
    dev, dt = torch.device("cuda"), torch.bfloat16
    for K, N, L, r in ((4096, 4096, 8, 16), (2048, 8192, 8, 16), (8192, 2048, 8, 16), (4096, 4096, 4, 64),
                       (4096, 4096, 16, 16), (4096, 4096, 32, 16)):
        idx = MB.prefill_indices(8, L, device=dev)
        M = idx.numel()
        x = torch.randn(M, K, device=dev, dtype=dt)
        dy = torch.randn(M, N, device=dev, dtype=dt)
        G = torch.randn(M, r, device=dev, dtype=torch.float32)
        S = torch.randn(M, r, device=dev, dtype=torch.float32)
        s = torch.rand(L, device=dev) + 0.5
        Gx, Sx = spread(G.to(dt), idx, s, L), spread(S.to(dt), idx, s, L)
        t_spread = graph_time_ms(lambda: spread(G.to(dt), idx, s, L))
        t_da = graph_time_ms(lambda: torch.mm(Gx.t(), x))
        t_db = graph_time_ms(lambda: torch.mm(dy.t(), Sx).view(N, L, r).transpose(0, 1).contiguous())
        A, B, sc = MB.make_adapters(L, r, K, N, dtype=dt, device=dev)
        A.requires_grad_(True)
        B.requires_grad_(True)
        xg = x.clone().requires_grad_(True)
        import lora_kernels

        def bwd_ext():
            for t in (xg, A, B):
                t.grad = None
            lora_kernels.multi_lora(xg, A, B, idx, sc).backward(dy)
        t_ext = graph_time_ms(bwd_ext)
        print(f"M {M} K {K} N {N} L {L} r {r}: spread {t_spread * 1e3:.1f} us, dA GEMM {t_da * 1e3:.1f}, "
              f"dB GEMM + permute {t_db * 1e3:.1f} us; the ext's whole fwd + bwd {t_ext * 1e3:.1f} us; "
              f"x + dy at 3 TB/s {(M * K + M * N) * 2 / 3e6:.1f} us")


if __name__ == "__main__":
    main()
