"""A warp-specialized Hopper GEMM written in Gluon, for the forward LoRA GEMM y = x W^T + s S B^T. (GPU, sm_90)

    python benchmarks/probe_gluon_gemm.py [--shapes MxKxN,...] [--rounds 3] [--r 16]

Why: `_lora_gemm_kernel` (Triton, 8 warps, persistent) trails cuBLAS by 1-4% at the headline and
~9% at 1024 -> 1024. Between two of its tiles nothing is loaded: the next tile's first TMA loads
wait for this tile's epilogue, so each tile pays one pipeline fill (7.8 tiles per CTA at the
headline). Triton's own warp specialization, which would overlap them, ran 9-32% slower
(`probe_ws_gemm.py`), and a flattened persistent loop did not compile well (ninth session).
Gluon (triton.experimental.gluon, Triton 3.6) states the schedule itself:

- a 1-warp load partition walks the CTA's tiles and keeps a STAGES-deep ring of [BM, BK] x tiles
  and [BN, BK] W tiles full through TMA, running into the next tile while the consumers run the
  epilogue; per tile it also loads the LoRA operands L = bf16(s S) [BM, r] and B [BN, r];
- the default partition (8 warps, two warpgroups of 64 rows) issues the wgmma chain, one MMA
  in flight, releases each stage as its MMA retires, adds the LoRA term as one more MMA
  (acc += L @ B^T: K = r, the cost of a quarter K step at r16), and stores y through TMA.

L is s S rounded to the activations' dtype, as the package kernel rounds it; here it is made by the
caller (a [M, r] cast, 256 KB at the headline), outside the timed kernel. Beside it: the package's
Triton kernel and its Gluon kernel (lora_kernels/ops/gluon_gemm.py, the same schedule with L fp32 and
B.T loaded by pointer in the MMA warps), as `_lora_gemm` dispatches them.
Prints CUDA-graph us per kernel, the median of interleaved rounds, its ratio to cuBLAS's F.linear
in the same rounds, and each kernel's largest difference from float64.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.testing
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from lora_kernels._bench import interleaved_ms
from lora_kernels.ops.gluon_gemm import _halves, _tile_of, mma_steps  # the package kernel's pieces

_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _load_partition(a_desc, w_desc, l_desc, b_desc, a_bufs, w_bufs, l_buf, b_buf,
                    ready, empty, l_ready, l_empty, num_m, num_n, k_steps, GROUP_M: gl.constexpr):
    """One warp: TMA loads for every tile of this CTA, STAGES ahead of the MMAs."""
    STAGES: gl.constexpr = a_bufs.shape[0]
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    i = 0  # ring slot counter over all tiles of this CTA
    t = 0  # tile counter of this CTA (the LoRA operands' slot phase)
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        m0 = pid_m * BM
        n0 = pid_n * BN
        for kk in range(k_steps):
            s = i % STAGES
            # a slot is free once its MMA retired; barriers start in phase 0, so the first pass
            # over the ring waits on phase 1, which counts as completed
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [m0, kk * BK], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [n0, kk * BK], ready.index(s), w_bufs.index(s))
            i += 1
        # after the tile's K loads: waiting here for the consumers to free the one LoRA slot
        # never holds back the ring
        mbarrier.wait(l_empty, (t & 1) ^ 1)
        mbarrier.expect(l_ready, l_desc.block_type.nbytes + b_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(l_desc, [m0, 0], l_ready, l_buf)
        tma.async_copy_global_to_shared(b_desc, [n0, 0], l_ready, b_buf)
        t += 1


@gluon.jit
def _mma_partition(y_desc, a_bufs, w_bufs, l_buf, b_buf, c_smem, ready, empty, l_ready, l_empty,
                   num_m, num_n, k_steps, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    """The default partition (num_warps = 8: two warpgroups of 64 rows): wgmma chain, LoRA MMA, store."""
    BM: gl.constexpr = y_desc.block_type.shape[0]
    BN: gl.constexpr = w_bufs.shape[1]
    EPI_SPLIT: gl.constexpr = BN // y_desc.block_type.shape[1]
    dt: gl.constexpr = y_desc.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BN, 16])
    i = 0
    t = 0
    for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
        acc, i = mma_steps(gl.zeros([BM, BN], gl.float32, acc_layout), a_bufs, w_bufs, ready, empty, i, k_steps)
        # the LoRA term: acc += L [BM, r] @ B[BN, r]^T, one more MMA of K = r
        mbarrier.wait(l_ready, t & 1)
        acc = warpgroup_mma(l_buf, b_buf.permute((1, 0)), acc)
        mbarrier.arrive(l_empty)
        t += 1
        out = acc.to(dt)
        if EPI_SPLIT == 1:
            tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
            c_smem.store(out)
            fence_async_shared()
            tma.async_copy_shared_to_global(y_desc, [pid_m * BM, pid_n * BN], c_smem)
        else:  # EPI_SPLIT column slices through a [BM, BN / EPI_SPLIT] buffer: shared memory for a 4th stage
            parts = _halves(out, BM, BN)
            if EPI_SPLIT == 4:
                parts = _halves(parts[0], BM, BN // 2) + _halves(parts[1], BM, BN // 2)
            for h in gl.static_range(EPI_SPLIT):
                tma.store_wait(pendings=0)
                c_smem.store(parts[h])
                fence_async_shared()
                tma.async_copy_shared_to_global(y_desc, [pid_m * BM, pid_n * BN + h * (BN // EPI_SPLIT)], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _gluon_lora_gemm(a_desc, w_desc, l_desc, b_desc, y_desc,  # x [M, K], W [N, K], L [M, r], B [N, r], y [M, N]
                     GROUP_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """y = x @ W^T + L @ B^T, persistent, one CTA per SM, warp-specialized (see the module docstring)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    dt: gl.constexpr = a_desc.dtype
    num_m = gl.cdiv(a_desc.shape[0], BM)
    num_n = gl.cdiv(w_desc.shape[0], BN)
    k_steps = gl.cdiv(a_desc.shape[1], BK)

    a_bufs = gl.allocate_shared_memory(dt, [STAGES, BM, BK], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(dt, [STAGES, BN, BK], w_desc.layout)
    l_buf = gl.allocate_shared_memory(dt, l_desc.block_type.shape, l_desc.layout)  # one slot: 3 x 48 KB ring
    b_buf = gl.allocate_shared_memory(dt, b_desc.block_type.shape, b_desc.layout)  # + 64 KB c_smem + 12 KB fit
    c_smem = gl.allocate_shared_memory(dt, y_desc.block_type.shape, y_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    l_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    l_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    mbarrier.init(l_ready, count=1)
    mbarrier.init(l_empty, count=1)

    gl.warp_specialize([
        (_mma_partition, (y_desc, a_bufs, w_bufs, l_buf, b_buf, c_smem, ready, empty, l_ready, l_empty,
                          num_m, num_n, k_steps, GROUP_M, num_warps)),
        (_load_partition, (a_desc, w_desc, l_desc, b_desc, a_bufs, w_bufs, l_buf, b_buf, ready, empty,
                           l_ready, l_empty, num_m, num_n, k_steps, GROUP_M)),
    ], [1], [40])


def _nvmma(block, dt):
    return gl.NVMMASharedLayout.get_default_for(block, dt)


def gluon_lora_gemm(x, W, Lb, B, BM=128, BN=256, BK=64, stages=3, group_m=8, epi_split=1, num_sms=None):
    """y = x @ W.T + Lb @ B.T in x's dtype. x [M, K], W [N, K], Lb [M, r] (= bf16(s S)), B [N, r], r in {16, 32, 64}."""
    M, K = x.shape
    N, R = B.shape
    dt = _GL_DTYPE[x.dtype]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    a_desc = TensorDescriptor.from_tensor(x, [BM, BK], _nvmma([BM, BK], dt))
    w_desc = TensorDescriptor.from_tensor(W, [BN, BK], _nvmma([BN, BK], dt))
    l_desc = TensorDescriptor.from_tensor(Lb, [BM, R], _nvmma([BM, R], dt))
    b_desc = TensorDescriptor.from_tensor(B, [BN, R], _nvmma([BN, R], dt))
    y_desc = TensorDescriptor.from_tensor(y, [BM, BN // epi_split], _nvmma([BM, BN // epi_split], dt))
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    sms = num_sms or torch.cuda.get_device_properties(x.device).multi_processor_count
    # 8 consumer warps + the load warp's warpgroup: 12 warps x 32 threads x 168 registers fit the
    # SM's 64 K; the default partition then gets what the 40-register load group leaves (~232)
    _gluon_lora_gemm[(min(tiles, sms),)](a_desc, w_desc, l_desc, b_desc, y_desc, GROUP_M=group_m, STAGES=stages,
                                         num_warps=8, maxnreg=168)
    return y


# (stages, epilogue column slices, GROUP_M): 3 x 48 KB stages fit beside a whole [128, 256] output
# buffer (64 KB), 4 stages beside a quarter of it
CONFIGS = [(3, 1, 8), (4, 4, 8)]


def main():
    from torch._library.triton import set_wrap_triton_enabled
    from lora_kernels.ops import lora_linear as LL

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x4096x4096,8192x1024x1024,8192x2048x512,8192x4096x14336,8192x14336x4096")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    for shape in args.shapes.split(","):
        M, K, N = (int(v) for v in shape.split("x"))
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
        S = torch.randn(M, args.r, device=dev, dtype=torch.float32)
        B = torch.randn(N, args.r, device=dev, dtype=torch.bfloat16) / args.r ** 0.5
        s = 2.0
        Lb = (S * s).to(torch.bfloat16)
        exact = (x.double() @ W.double().t() + Lb.double() @ B.double().t())

        def package(gluon: bool):
            # the package's dispatch: the Gluon kernel (L fp32 and Rt by pointer loads) or the Triton one
            LL._GLUON_GEMM = gluon
            try:
                return LL._lora_gemm(x, W, S, B.t(), s, None, w_kmajor=True)
            finally:
                LL._GLUON_GEMM = True

        cands = {"cuBLAS F.linear": lambda: F.linear(x, W),
                 "package Triton kernel": lambda: package(False),
                 "package Gluon kernel": lambda: package(True)}
        with set_wrap_triton_enabled(False):
            errs = {k: (cands[k]().double() - exact).abs().max().item() for k in list(cands)[1:]}
        for stages, split, gm in CONFIGS:
            name = f"gluon WS {stages}st split{split} G{gm}"
            try:
                y = gluon_lora_gemm(x, W, Lb, B, stages=stages, group_m=gm, epi_split=split)
                torch.cuda.synchronize()
                errs[name] = (y.double() - exact).abs().max().item()
            except Exception as e:  # a config that does not compile or launch: say so, go on
                print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            cands[name] = (lambda st=stages, g=gm, sp=split: gluon_lora_gemm(x, W, Lb, B, stages=st, group_m=g,
                                                                             epi_split=sp))
        with set_wrap_triton_enabled(False):
            times = interleaved_ms(cands, lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3, args.rounds)
        base = statistics.median(times["cuBLAS F.linear"])
        print(f"{M}x{K}->{N} r{args.r} (largest |y - float64| of the package kernel and the Gluon ones):")
        for k, t in times.items():
            med = statistics.median(t)
            err = f"  max err {errs[k]:.3g}" if k in errs else ""
            print(f"  {k:28s} {med:8.1f} us  {med / base:6.3f}x cuBLAS  (rounds {min(t):.1f}-{max(t):.1f}){err}")


if __name__ == "__main__":
    main()
