"""The forward LoRA GEMM as a warp-specialized Hopper kernel, written in Gluon (sm_90, 16-bit x).

    y = x @ W.T + L @ B.T + bias     x [M, K], W [N, K], L [M, BLOCK_R] = s S (S = drop(x) @ A.T),
                                     B [N, r], bias [N]; all in x's dtype but the bias

Why a second GEMM kernel: `_lora_gemm_kernel` (Triton, one partition of 8 warps) runs each tile's
epilogue between its main loop and the next tile's first TMA loads, so every tile pays a pipeline
fill. Triton's own warp specialization ran 9-32% slower (benchmarks/probe_ws_gemm.py). Gluon states
the schedule: one load warp keeps a STAGES-deep ring of x and W tiles full through TMA and runs into
the next tile while the two consumer warpgroups (64 rows each) finish this one's epilogue. Same
tiles as the Triton kernel ([128, 256] x 64, GROUP_M-grouped persistent order).

The LoRA operands come in through TMA too, by the load warp, one slot per tile after the tile's
K steps: L = s S rounded to x's dtype (the TMA shrink writes it beside S, zeros past r) and B [N, r]
in x's dtype. An earlier version loaded S (fp32) and B.T by pointer in the MMA warps, scaled and
rounded them in registers and copied B.T to shared memory per tile: 1.018x / 1.114x / 1.052x
cuBLAS at the three shapes below, and not faster than the Triton kernel inside the op.

H100, graph us, ratio to cuBLAS F.linear in the same rounds (benchmarks/probe_gluon_gemm.py, r16):
8192 x 4096 -> 4096 0.998x (Triton kernel 1.076x), 8192 x 1024 -> 1024 1.033x (1.115x), 8192 x
2048 -> 512 1.011x (1.096x).

Gluon does not run under TRITON_INTERPRET: the CPU tests run the Triton kernel; the GPU tests run this.
"""
from __future__ import annotations

import functools

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    HAS_GLUON = True
except Exception:  # an older Triton: the Triton GEMM kernel serves every call
    HAS_GLUON = False


if HAS_GLUON:
    @gluon.jit
    def _tile_of(tile, num_m, num_n, GROUP_M: gl.constexpr):
        """(row tile, column tile) of persistent tile number `tile`, in groups of GROUP_M row tiles (as
        lora_linear._tile_coords: the CTAs working at one time share a few W column tiles in L2)."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        rows = gl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % rows, (tile % per_group) // rows

    @gluon.jit
    def _halves(t, ROWS: gl.constexpr, COLS: gl.constexpr):
        """t [ROWS, COLS] -> (left, right) [ROWS, COLS / 2]: a register renaming, no data movement."""
        return t.reshape([ROWS, 2, COLS // 2]).permute((0, 2, 1)).split()

    @gluon.jit
    def _load_partition(a_desc, w_desc, l_desc, b_desc, a_bufs, w_bufs, l_buf, b_buf, ready, empty, l_ready, l_empty,
                        num_m, num_n, k_steps, GROUP_M: gl.constexpr):
        """One warp: the TMA loads of every tile of this CTA, up to STAGES steps ahead of the MMAs,
        and after each tile's K steps its LoRA operands L [BM, R] and B [BN, R] (one slot)."""
        STAGES: gl.constexpr = a_bufs.shape[0]
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        i = 0  # ring step over all tiles of this CTA
        t = 0  # tile count of this CTA: the LoRA slot's phase
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
            for kk in range(k_steps):
                s = i % STAGES
                # a slot is free once its MMA retired; a barrier starts in phase 0, so the first pass
                # over the ring waits on phase 1, which counts as complete
                mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM, kk * BK], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [pid_n * BN, kk * BK], ready.index(s), w_bufs.index(s))
                i += 1
            # after the tile's K loads: waiting here for the MMA warps to free the LoRA slot (they
            # do when the tile's main loop is over) never holds the ring back
            mbarrier.wait(l_empty, (t & 1) ^ 1)
            mbarrier.expect(l_ready, l_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(l_desc, [pid_m * BM, 0], l_ready, l_buf)
            tma.async_copy_global_to_shared(b_desc, [pid_n * BN, 0], l_ready, b_buf)
            t += 1

    @gluon.jit
    def _mma_steps(acc, a_bufs, w_bufs, ready, empty, i, k_steps):
        """acc + the tile's k_steps ring slots, x [BM, BK] @ W [BN, BK]^T each, as the MMA warps run
        them: one MMA in flight, each slot handed back to the load warp as its MMA retires.
        i: the ring step counter over the CTA's tiles; returns (acc, i advanced by k_steps)."""
        STAGES: gl.constexpr = a_bufs.shape[0]
        for kk in range(k_steps):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, is_async=True)
            # the previous step's MMA has retired now: its slot goes back to the load warp
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=kk > 0)
            i += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES))
        return acc, i

    @gluon.jit
    def _mma_partition(y_desc, bias_ptr, a_bufs, w_bufs, l_buf, b_buf, c_smem, ready, empty, l_ready, l_empty,
                       N_OUT, num_m, num_n, k_steps, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr,
                       num_warps: gl.constexpr):
        """The default partition, 8 warps (two warpgroups of 64 rows): the wgmma chain, the LoRA term
        as one more MMA from shared memory (acc += L [BM, R] @ B [BN, R]^T, K = R: a quarter K step
        at r16), the bias, and y's store through TMA."""
        BM: gl.constexpr = a_bufs.shape[1]
        BN: gl.constexpr = w_bufs.shape[1]
        EPI_SPLIT: gl.constexpr = BN // y_desc.block_type.shape[1]
        dt: gl.constexpr = y_desc.dtype
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BN, 16])
        i = 0
        t = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
            m0 = pid_m * BM
            n0 = pid_n * BN
            acc, i = _mma_steps(gl.zeros([BM, BN], gl.float32, acc_layout), a_bufs, w_bufs, ready, empty, i, k_steps)
            mbarrier.wait(l_ready, t & 1)
            acc = warpgroup_mma(l_buf, b_buf.permute((1, 0)), acc)  # synchronous: the slot is read when it returns
            mbarrier.arrive(l_empty)
            t += 1
            if HAS_BIAS:
                bcols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
                acc += gl.load(bias_ptr + bcols, mask=bcols < N_OUT, other=0.0).to(gl.float32)[None, :]
            out = acc.to(dt)
            if EPI_SPLIT == 1:
                tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
                c_smem.store(out)
                fence_async_shared()
                tma.async_copy_shared_to_global(y_desc, [m0, n0], c_smem)
            else:  # column slices through a [BM, BN / EPI_SPLIT] buffer: the shared memory of a 4th stage
                parts = _halves(out, BM, BN)
                if EPI_SPLIT == 4:
                    parts = _halves(parts[0], BM, BN // 2) + _halves(parts[1], BM, BN // 2)
                for h in gl.static_range(EPI_SPLIT):
                    tma.store_wait(pendings=0)
                    c_smem.store(parts[h])
                    fence_async_shared()
                    tma.async_copy_shared_to_global(y_desc, [m0, n0 + h * (BN // EPI_SPLIT)], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def lora_gemm_ws_kernel(
        a_desc, w_desc, l_desc, b_desc, y_desc,  # TMA descriptors: x [M, K] block [BM, BK]; W [N, K] block [BN, BK];
                                                 # L [M, R] block [BM, BLOCK_R]; B [N, R] block [BN, BLOCK_R];
                                                 # y [M, N] block [BM, BN / EPI_SPLIT]
        bias_ptr, N_OUT,  # bias [N]
        HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
    ):
        """y = x @ W.T + L @ B.T + bias: persistent (one CTA per SM), a load warp beside 8 MMA warps.
        L and B are in x's dtype (L = the shrink's s S, rounded); R past the data reads as zeros."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        dt: gl.constexpr = a_desc.dtype
        gl.static_assert(num_warps == 8, "two consumer warpgroups of 64 rows")
        num_m = gl.cdiv(a_desc.shape[0], BM)
        num_n = gl.cdiv(N_OUT, BN)
        k_steps = gl.cdiv(a_desc.shape[1], BK)

        a_bufs = gl.allocate_shared_memory(dt, [STAGES, BM, BK], a_desc.layout)
        w_bufs = gl.allocate_shared_memory(dt, [STAGES, BN, BK], w_desc.layout)
        l_buf = gl.allocate_shared_memory(dt, l_desc.block_type.shape, l_desc.layout)
        b_buf = gl.allocate_shared_memory(dt, b_desc.block_type.shape, b_desc.layout)
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
            (_mma_partition, (y_desc, bias_ptr, a_bufs, w_bufs, l_buf, b_buf, c_smem, ready, empty, l_ready, l_empty,
                              N_OUT, num_m, num_n, k_steps, HAS_BIAS, GROUP_M, num_warps)),
            (_load_partition, (a_desc, w_desc, l_desc, b_desc, a_bufs, w_bufs, l_buf, b_buf, ready, empty,
                               l_ready, l_empty, num_m, num_n, k_steps, GROUP_M)),
        ], [1], [40])

    @functools.lru_cache(maxsize=None)
    def _nvmma_layout(block_shape: tuple, gl_dtype):
        return gl.NVMMASharedLayout.get_default_for(list(block_shape), gl_dtype)

    def nvmma_desc(t, block_shape: list, gl_dtype) -> "GluonTensorDescriptor":
        """A Gluon TMA descriptor over t (contiguous rows, 16-byte aligned: the caller checked) without
        the dataclass's checks, as lora_linear._desc does for Triton's (host time: 5 a forward)."""
        d = object.__new__(GluonTensorDescriptor)
        d.base, d.shape, d.strides, d.block_shape, d.padding = t, t.shape, t.stride(), block_shape, "zero"
        d.layout = _nvmma_layout(tuple(block_shape), gl_dtype)
        return d
