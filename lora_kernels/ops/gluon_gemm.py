"""The forward and dgrad LoRA GEMMs as warp-specialized Hopper kernels, written in Gluon (sm_90, 16-bit x).

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

The dgrad, dx = dy @ W + keep * (Gs @ A) (lora_dgrad_ws_kernel), has the same tiles and load warp,
and its two MMA warpgroups are partitions of their own (4 warps each, 64 rows of every tile): each
waits for and hands back the ring's slots by itself, so one's tile end (the store) and start (the
masked LoRA term) need not wait for the other's. H100, r16, graph us per training step against one
8-warp partition, same process, 8 interleaved rounds: 8192 x 1024 -> 1024 p0.05 94.4 vs 95.9, p0
82.9 vs 83.7; 8192 x 2048 -> 512 p0.05 111.5 vs 111.9, p0 94.1 vs 95.0 (6 rounds in an earlier call:
-0.5 and -1.2 us at p0.05); at 8192 x 4096 -> 4096 p0.05 within the rounds' spread of +-40 us
(medians +12.1 us over 8 rounds, -6.9 and +2.9 over 12). dx is bitwise the same.
The load warp brings each tile's dropout mask as bits (4 KB, drawn beforehand by
lora_linear._mask_bits_kernel) beside its LoRA operands; a tile starts with its LoRA term, masked
in registers, and the main loop accumulates onto it. The mask used to be drawn here, by two warps
of its own a tile ahead (the MMA warps drew the first): at short K the Philox work did not keep
up. H100, back-to-back k cycles (cuBLAS / p0 / p0.05 drawn here / p0.05 with no Philox, the bits'
cost): 8192 x 512 -> 2048 57 / 56 / 80 / 57; 8192 x 1024 -> 1024 46 / 49 / 58 / 50; 8192 x 4096 ->
4096 571 / 577 / 616 / 587. Nsight Compute at 512 -> 2048: the MMA warps waited for the mask warps
11% of the kernel and drew the first tile another 9%; a third mask warp took 80 k to 73 k.

The dA pass beside that dgrad, dA^T = (x keep)^T Gs (lora_da_kernel), takes x's tile by TMA, masks it
in place in shared memory with the dgrad's mask bits and feeds it to wgmma from there.

Gluon does not run under TRITON_INTERPRET: the CPU tests run the Triton kernels; the GPU tests run these.
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
    def _store_tile(y_desc, c_smem, out, m0, n0):
        """out [BM, BN] -> y[m0:, n0:] through TMA, via c_smem [BM, BN / EPI_SPLIT]: whole, or in column
        slices (a smaller buffer: the shared memory of a 4th stage). Waits for the previous store first."""
        BM: gl.constexpr = out.shape[0]
        BN: gl.constexpr = out.shape[1]
        EPI_SPLIT: gl.constexpr = BN // y_desc.block_type.shape[1]
        if EPI_SPLIT == 1:
            tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
            c_smem.store(out)
            fence_async_shared()
            tma.async_copy_shared_to_global(y_desc, [m0, n0], c_smem)
        else:
            parts = _halves(out, BM, BN)
            if EPI_SPLIT == 4:
                parts = _halves(parts[0], BM, BN // 2) + _halves(parts[1], BM, BN // 2)
            for h in gl.static_range(EPI_SPLIT):
                tma.store_wait(pendings=0)
                c_smem.store(parts[h])
                fence_async_shared()
                tma.async_copy_shared_to_global(y_desc, [m0, n0 + h * (BN // EPI_SPLIT)], c_smem)

    @gluon.jit
    def _load_lora(l_desc, r_desc, m_desc, l_buf, r_buf, m_buf, l_ready, l_empty, m0, n0, tile, t,
                   DGRAD: gl.constexpr, MASK_BITS: gl.constexpr):
        """The LoRA slot of tile number t: L [BM, BR] at rows m0 and the up-projection's tile at
        columns n0 (forward: B [BN, BR] rows; dgrad: A [BR, BN] columns), and with MASK_BITS the
        tile's dropout mask bits (persistent tile number `tile`), once the MMA warps freed it."""
        mbarrier.wait(l_empty, (t & 1) ^ 1)
        if MASK_BITS:
            mbarrier.expect(l_ready, l_desc.block_type.nbytes + r_desc.block_type.nbytes + m_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(m_desc, [tile * m_desc.block_type.shape[0], 0], l_ready, m_buf)
        else:
            mbarrier.expect(l_ready, l_desc.block_type.nbytes + r_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(l_desc, [m0, 0], l_ready, l_buf)
        tma.async_copy_global_to_shared(r_desc, [0, n0] if DGRAD else [n0, 0], l_ready, r_buf)

    @gluon.jit
    def _load_partition(a_desc, w_desc, l_desc, r_desc, m_desc, a_bufs, w_bufs, l_buf, r_buf, m_buf, ready, empty,
                        l_ready, l_empty, num_m, num_n, k_steps, GROUP_M: gl.constexpr, DGRAD: gl.constexpr,
                        MASK_BITS: gl.constexpr):
        """One warp: the TMA loads of every tile of this CTA, up to STAGES steps ahead of the MMAs,
        and each tile's LoRA operands (one slot): after its K steps in the forward (the epilogue adds
        them), before them in the dgrad (the MMA warps start the tile with them).
        W's tiles: [BN, BK] of W [N, K] (forward, y = x @ W.T) or [BK, BN] of W [N, K] (dgrad, dx = dy @ W)."""
        STAGES: gl.constexpr = a_bufs.shape[0]
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = w_desc.block_type.shape[1] if DGRAD else w_desc.block_type.shape[0]
        i = 0  # ring step over all tiles of this CTA
        t = 0  # tile count of this CTA: the LoRA slot's phase
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
            if DGRAD:
                _load_lora(l_desc, r_desc, m_desc, l_buf, r_buf, m_buf, l_ready, l_empty, pid_m * BM, pid_n * BN,
                           pid_m * num_n + pid_n, t, DGRAD, MASK_BITS)
            for kk in range(k_steps):
                s = i % STAGES
                # a slot is free once its MMA retired; a barrier starts in phase 0, so the first pass
                # over the ring waits on phase 1, which counts as complete
                mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM, kk * BK], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [kk * BK, pid_n * BN] if DGRAD else [pid_n * BN, kk * BK],
                                                ready.index(s), w_bufs.index(s))
                i += 1
            if not DGRAD:
                # after the tile's K loads: waiting here for the MMA warps to free the LoRA slot (they
                # do when the tile's main loop is over) never holds the ring back
                _load_lora(l_desc, r_desc, m_desc, l_buf, r_buf, m_buf, l_ready, l_empty, pid_m * BM, pid_n * BN,
                           tile, t, DGRAD, False)
            t += 1

    @gluon.jit
    def _mma_steps(acc, a_bufs, w_bufs, ready, empty, i, k_steps, W_KMAJOR: gl.constexpr = True,
                   ROW0: gl.constexpr = 0, ROWS: gl.constexpr = 0):
        """acc + the tile's k_steps ring slots, a [BM, BK] @ (W [BN, BK]^T or W [BK, BN]) each, as the
        MMA warps run them: one MMA in flight, each slot handed back to the load warp as its MMA retires.
        ROWS > 0: a's rows ROW0 .. ROW0 + ROWS - 1 only (one warpgroup's share of the tile).
        i: the ring step counter over the CTA's tiles; returns (acc, i advanced by k_steps)."""
        STAGES: gl.constexpr = a_bufs.shape[0]
        for kk in range(k_steps):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            w = w_bufs.index(s).permute((1, 0)) if W_KMAJOR else w_bufs.index(s)
            a = a_bufs.index(s).slice(ROW0, ROWS) if ROWS > 0 else a_bufs.index(s)
            acc = warpgroup_mma(a, w, acc, is_async=True)
            # the previous step's MMA has retired now: its slot goes back to the load warp
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=kk > 0)
            i += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES))
        return acc, i

    @gluon.jit
    def _tiles(a_desc, n_out, BN: gl.constexpr):
        """(row tiles, column tiles, K steps) of out [M, n_out] = a [M, K_RED] @ W in [BM, BN] tiles and
        BK steps, BM x BK a's block: the two Gluon kernels' persistent tile space."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        return gl.cdiv(a_desc.shape[0], BM), gl.cdiv(n_out, BN), gl.cdiv(a_desc.shape[1], BK)

    @gluon.jit
    def _ring(a_desc, w_desc, l_desc, r_desc, y_desc, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """Both kernels' shared memory: a STAGES-deep ring of x (dy) and W tiles, the LoRA slot (L, and
        B or A), an output buffer per consumer partition ([CONSUMERS] + y's block), and their barriers
        (ready / empty per stage, l_ready / l_empty; empty and l_empty count one arrival per consumer)."""
        dt: gl.constexpr = a_desc.dtype
        a_bufs = gl.allocate_shared_memory(dt, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        w_bufs = gl.allocate_shared_memory(dt, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        l_buf = gl.allocate_shared_memory(dt, l_desc.block_type.shape, l_desc.layout)
        r_buf = gl.allocate_shared_memory(dt, r_desc.block_type.shape, r_desc.layout)
        c_bufs = gl.allocate_shared_memory(dt, [CONSUMERS] + y_desc.block_type.shape, y_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        l_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        l_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=CONSUMERS)
        mbarrier.init(l_ready, count=1)
        mbarrier.init(l_empty, count=CONSUMERS)
        return a_bufs, w_bufs, l_buf, r_buf, c_bufs, ready, empty, l_ready, l_empty

    @gluon.jit
    def _mma_partition(y_desc, bias_ptr, a_bufs, w_bufs, l_buf, b_buf, c_smem, ready, empty, l_ready, l_empty,
                       N_OUT, num_m, num_n, k_steps, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr,
                       num_warps: gl.constexpr):
        """The default partition, 8 warps (two warpgroups of 64 rows): the wgmma chain, the LoRA term
        as one more MMA from shared memory (acc += L [BM, R] @ B [BN, R]^T, K = R: a quarter K step
        at r16), the bias, and y's store through TMA."""
        BM: gl.constexpr = a_bufs.shape[1]
        BN: gl.constexpr = w_bufs.shape[1]
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
            _store_tile(y_desc, c_smem, acc.to(dt), m0, n0)
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
        gl.static_assert(num_warps == 8, "two consumer warpgroups of 64 rows")
        num_m, num_n, k_steps = _tiles(a_desc, N_OUT, w_desc.block_type.shape[0])
        a_bufs, w_bufs, l_buf, b_buf, c_bufs, ready, empty, l_ready, l_empty = _ring(a_desc, w_desc, l_desc, b_desc,
                                                                                     y_desc, STAGES, 1)

        gl.warp_specialize([
            (_mma_partition, (y_desc, bias_ptr, a_bufs, w_bufs, l_buf, b_buf, c_bufs.index(0), ready, empty, l_ready,
                              l_empty, N_OUT, num_m, num_n, k_steps, HAS_BIAS, GROUP_M, num_warps)),
            (_load_partition, (a_desc, w_desc, l_desc, b_desc, l_desc, a_bufs, w_bufs, l_buf, b_buf, l_buf, ready,
                               empty, l_ready, l_empty, num_m, num_n, k_steps, GROUP_M, False, False)),
        ], [1], [40])

    # ------------------------------------------------------------------------------------------
    # The dgrad: dx = dy @ W + keep * (Gs @ A), the mask's bits loaded beside the LoRA operands
    # ------------------------------------------------------------------------------------------
    @gluon.jit
    def _dgrad_mma_partition(y_desc, a_bufs, w_bufs, l_buf, r_buf, m_buf, c_bufs, ready, empty, l_ready, l_empty,
                             num_m, num_n, k_steps, HALF: gl.constexpr, MASKED: gl.constexpr, GROUP_M: gl.constexpr,
                             num_warps: gl.constexpr):
        """One MMA warpgroup: rows HALF * BM / 2 .. of every tile. Each tile starts with its LoRA term,
        acc = Gs [BM / 2, BR] @ A [BR, BN] (one MMA from shared memory), masked in registers from
        m_buf's bits, and then accumulates the main loop's dy @ W onto it: the mask touches the LoRA
        term only, at no register cost beside the accumulator. m_buf [4, BM H] (H = BN / 128) holds
        word (q, r, h) at q BM H + r H + h, bit jj + 16 b = keep(row r, column 128 h + 8 jj + 2 q + b)
        of the tile (lora_linear._mask_bits_kernel): in the wgmma accumulator a thread with lane % 4 = q
        holds columns 8 J + 2 q + {0, 1}: its 64 columns of a row are in 2 words, one per 128-column
        half. The two warpgroups are partitions of their own and hand ring slots back on their own
        (the slots' barriers count both), so one's tile end (the store) and start (LoRA term, mask)
        can run while the other's MMAs keep the tensor cores busy."""
        BM: gl.constexpr = a_bufs.shape[1]
        HM: gl.constexpr = BM // 2
        BN: gl.constexpr = w_bufs.shape[2]
        H: gl.constexpr = BN // 128
        dt: gl.constexpr = y_desc.dtype
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BN, 16])
        zeros = gl.zeros([HM, BN], gl.float32, acc_layout)
        # the accumulator viewed as [q, r, h, jj, b] (column 128 h + 8 jj + 2 q + b): a renaming
        p5: gl.constexpr = zeros.reshape([HM, H, 16, 4, 2]).permute((3, 0, 1, 2, 4)).type.layout
        words_layout: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, p5))  # [4, HM, H]
        jj = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(4, p5)))))
        bb = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, p5)))))
        jj5 = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(jj, 0), 0), 0), 4)  # [1, 1, 1, 16, 1]
        bb5 = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(bb, 0), 0), 0), 0)  # [1, 1, 1, 1, 2]
        shift = jj5 + 16 * bb5  # [1, 1, 1, 16, 2]: the bit of column (jj, b) in its word
        l_half = l_buf.slice(HALF * HM, HM)
        words_half = m_buf._reinterpret(gl.int32, [4, BM, H], gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0])).slice(
            HALF * HM, HM, dim=1)
        i = 0
        t = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
            mbarrier.wait(l_ready, t & 1)
            acc = warpgroup_mma(l_half, r_buf, zeros)  # synchronous: the slot is read when it returns
            if MASKED:
                words = words_half.load(words_layout)
            mbarrier.arrive(l_empty)  # the slot (and the mask's bits) may take the next tile's
            if MASKED:
                keep = ((gl.expand_dims(gl.expand_dims(words, 3), 4) >> shift) & 1) != 0
                acc5 = gl.where(keep, acc.reshape([HM, H, 16, 4, 2]).permute((3, 0, 1, 2, 4)), 0.0)
                acc = gl.convert_layout(acc5.permute((1, 2, 3, 0, 4)).reshape([HM, BN]), acc_layout)
            t += 1
            acc, i = _mma_steps(acc, a_bufs, w_bufs, ready, empty, i, k_steps, False, HALF * HM, HM)
            _store_tile(y_desc, c_bufs.index(HALF), acc.to(dt), pid_m * BM + HALF * HM, pid_n * BN)
        tma.store_wait(pendings=0)

    @gluon.jit
    def lora_dgrad_ws_kernel(
        dy_desc, w_desc, l_desc, r_desc, y_desc, m_desc,  # TMA descriptors: dy [M, N] block [BM, BK]; W [N, K] block
                                                          # [BK, BN]; Gs [M, BR] block [BM, BR]; A [R, K] block [BR, BN];
                                                          # dx [M, K] block [BM / 2, BN / EPI_SPLIT]; MASKED: the mask's
                                                          # bits [tiles * 4, BM BN / 128] int32 block [4, BM BN / 128]
        K_OUT,
        MASKED: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, TRIGGER: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """dx = dy @ W + keep * (Gs @ A), Gs = s / (1 - p) * (dy @ B) rounded to dy's dtype (zeros past r),
        A in dy's dtype: persistent (one CTA per SM), two MMA warpgroups (each a partition of 4 warps,
        one the default) beside a warp that issues the TMA loads, which bring each tile's mask bits
        (4 KB, lora_linear._mask_bits) with its LoRA operands.
        TRIGGER: the next kernel, launched with programmatic dependent launch, may start now (its CTAs
        take SMs as this kernel's CTAs end; see lora_linear._pdl_ok)."""
        if TRIGGER:
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
        gl.static_assert(num_warps == 4, "the default partition is one of the two MMA warpgroups")
        num_m, num_n, k_steps = _tiles(dy_desc, K_OUT, w_desc.block_type.shape[1])
        a_bufs, w_bufs, l_buf, r_buf, c_bufs, ready, empty, l_ready, l_empty = _ring(dy_desc, w_desc, l_desc, r_desc,
                                                                                     y_desc, STAGES, 2)
        m_buf = gl.allocate_shared_memory(gl.int32, m_desc.block_type.shape, m_desc.layout)
        gl.warp_specialize([
            (_dgrad_mma_partition, (y_desc, a_bufs, w_bufs, l_buf, r_buf, m_buf, c_bufs, ready, empty, l_ready,
                                    l_empty, num_m, num_n, k_steps, 0, MASKED, GROUP_M, 4)),
            (_dgrad_mma_partition, (y_desc, a_bufs, w_bufs, l_buf, r_buf, m_buf, c_bufs, ready, empty, l_ready,
                                    l_empty, num_m, num_n, k_steps, 1, MASKED, GROUP_M, 4)),
            (_load_partition, (dy_desc, w_desc, l_desc, r_desc, m_desc, a_bufs, w_bufs, l_buf, r_buf, m_buf, ready,
                               empty, l_ready, l_empty, num_m, num_n, k_steps, GROUP_M, True, MASKED)),
        ], [4, 1], [232, 40])

    # ------------------------------------------------------------------------------------------
    # The dA pass: dA^T[strip] += (x[rows, strip] * keep)^T @ Gs[rows], x masked in place in shared memory
    # ------------------------------------------------------------------------------------------
    @gluon.jit
    def _bits_mask(m_buf, BM: gl.constexpr, BK: gl.constexpr, layout: gl.constexpr):
        """The int32 AND-mask [BM, BK / 2] of x's [BM, BK] tile viewed as 16-bit pairs (0xffff where kept), in
        `layout` (4 pairs, 16 bytes, a thread), from m_buf: the step's mask bits as lora_linear._mask_bits
        drew them, [4, BM 2] int32 = word (q, r, h), bit jj + 16 b = keep(row r, column 128 h + 8 jj + 2 q
        + b). Pair q of a thread's 8 columns (128 h + 8 jj + 2 q + {0, 1}) takes bits jj and 16 + jj of
        word q: both halves at once. The 16 threads of a row half load the same 4 words (a broadcast)."""
        nw: gl.constexpr = layout.warps_per_cta[0]
        p4: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 2, 16, 1], [nw, 1, 1, 1], [3, 2, 1, 0])  # [r, h, jj, q]
        words = m_buf._reinterpret(gl.int32, [4, BM, 2], gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0])).permute(
            (1, 2, 0)).load(gl.SliceLayout(2, p4))  # [BM, 2, 4]
        jj = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, p4))))
        sh = gl.expand_dims(gl.expand_dims(gl.expand_dims(jj, 0), 1), 3)  # [1, 1, 16, 1]
        m = ((gl.expand_dims(words, 2) >> sh) & 0x10001) * 0xFFFF  # [BM, 2, 16, 4]
        return gl.convert_layout(m.reshape([BM, BK // 2]), layout)

    @gluon.jit
    def _load_da_step(x_desc, g_desc, m_desc, x_buf, g_buf, m_buf, bar, m0, pid_k, bits_n, nbytes: gl.constexpr,
                      MASKED: gl.constexpr):
        """TMA loads of one step of lora_da_kernel onto barrier `bar`: x's [BM, 256] tile at rows m0 of
        strip pid_k, Gs's rows, and with MASKED the step's words of the bits' tile (pid_m, pid_k)."""
        BM: gl.constexpr = x_desc.block_type.shape[0]
        mbarrier.expect(bar, nbytes)
        tma.async_copy_global_to_shared(x_desc, [m0, pid_k * x_desc.block_type.shape[1]], bar, x_buf)
        tma.async_copy_global_to_shared(g_desc, [m0, 0], bar, g_buf)
        if MASKED:
            tma.async_copy_global_to_shared(m_desc, [((m0 // 128) * bits_n + pid_k) * 4, (m0 % 128) * 2], bar, m_buf)
        gl.static_assert(128 % BM == 0, "steps inside the bits' 128-row tiles")

    @gluon.jit
    def lora_da_kernel(
        x_desc, g_desc, m_desc, da_ptr,  # TMA descriptors x [M, K] block [BM, 256], Gs [M, BLOCK_R] block [BM, BLOCK_R]
                                         # (x's dtype, s / (1 - p) folded in, zeros past r), the mask's bits
                                         # [tiles * 4, 256] int32 block [4, 2 BM] (MASKED); dA [R, K] fp32, zeroed
        M_PER_SPLIT, R, bits_n,  # bits_n: the bits' tile columns, cdiv(K, 256)
        MASKED: gl.constexpr, STAGES: gl.constexpr, WAIT_END: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """dA[:, strip] += Gs[rows].T @ (x[rows, strip] * keep) over this program's rows (fp32 atomics), one
        256-column strip a program (a column of the bits' [128, 256] tiles), BM rows a step, written as
        dA^T = (x keep)^T Gs so that one wgmma takes the masked tile straight from shared memory (M = 256,
        N = BLOCK_R, K = BM; A is x's tile read column-major, which wgmma does for 16-bit types).
        The mask (MASKED) is read from the bits the dgrad's was drawn as (lora_linear._mask_bits), which
        TMA brings beside x, and applied where TMA left the tile: each thread reads 16 bytes of a row as
        4 pairs of x, ANDs them with 0xffff per kept half and writes them back to the same swizzled
        address, so the tile never changes layout. About 2 integer instructions an element, against ~10
        for drawing the mask here with Philox, which made the pass integer-bound (H100, graph us,
        8192 rows, K = 4096 / 1024 / 2048: 31.4 / 10.5 / 16.7 drawn, 30.2 / 8.7 / 11.7 read; p0 27.6 /
        7.2 / 9.1). Triton's dA pass masks in x's load layout and converts the tile to the MMA operand's
        through a second shared-memory buffer: 34.4 / 11.6 / 18.7.
        WAIT_END: launched beside the kernel before it (programmatic dependent launch), touching nothing
        it writes; this kernel ends after it (its last program waits for it)."""
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BK: gl.constexpr = x_desc.block_type.shape[1]
        BR: gl.constexpr = g_desc.block_type.shape[1]
        dt: gl.constexpr = x_desc.dtype
        K = x_desc.shape[1]
        M = x_desc.shape[0]
        pid_k = gl.program_id(0)
        k0 = pid_k * BK
        m_first = gl.program_id(1) * M_PER_SPLIT
        n_steps = gl.cdiv(gl.minimum(M - m_first, M_PER_SPLIT), BM)
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BR, 16])
        x_bufs = gl.allocate_shared_memory(dt, [STAGES, BM, BK], x_desc.layout)
        g_bufs = gl.allocate_shared_memory(dt, [STAGES, BM, BR], g_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
        gl.static_assert(BK == 256, "one strip per column of the bits' [128, 256] tiles")
        if MASKED:
            m_bufs = gl.allocate_shared_memory(gl.int32, [STAGES] + m_desc.block_type.shape, m_desc.layout)
            nbytes: gl.constexpr = x_desc.block_type.nbytes + g_desc.block_type.nbytes + m_desc.block_type.nbytes
            x32_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=x_desc.layout.swizzle_byte_width,
                                                            element_bitwidth=32, rank=2)
            # a warp a row, a thread 16 bytes (4 pairs of x; the 8 columns of one bit position jj)
            blk32: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
        else:
            m_bufs = x_bufs  # (not loaded)
            nbytes: gl.constexpr = x_desc.block_type.nbytes + g_desc.block_type.nbytes
        for st in gl.static_range(STAGES - 1):
            if st < n_steps:
                _load_da_step(x_desc, g_desc, m_desc, x_bufs.index(st), g_bufs.index(st), m_bufs.index(st),
                              ready.index(st), m_first + st * BM, pid_k, bits_n, nbytes, MASKED)
        acc = gl.zeros([BK, BR], gl.float32, acc_l)
        for i in range(n_steps):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            if MASKED:
                x32 = x_bufs.index(s)._reinterpret(gl.int32, [BM, BK // 2], x32_layout)
                x32.store(x32.load(blk32) & _bits_mask(m_bufs.index(s), BM, BK, blk32))
                fence_async_shared()
                gl.thread_barrier()  # the whole tile is masked before the warpgroup's MMA reads it
            acc = warpgroup_mma(x_bufs.index(s).permute((1, 0)), g_bufs.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))  # step i - 1's MMA retired: its slot may be refilled
            nxt = i + STAGES - 1
            if nxt < n_steps:
                sn = nxt % STAGES
                _load_da_step(x_desc, g_desc, m_desc, x_bufs.index(sn), g_bufs.index(sn), m_bufs.index(sn),
                              ready.index(sn), m_first + nxt * BM, pid_k, bits_n, nbytes, MASKED)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        cols = k0 + gl.arange(0, BK, layout=gl.SliceLayout(1, acc_l))
        rr = gl.arange(0, BR, layout=gl.SliceLayout(0, acc_l))
        gl.atomic_add(da_ptr + rr[None, :] * K + cols[:, None], acc, mask=(rr < R)[None, :] & (cols < K)[:, None],
                      sem="relaxed")
        if WAIT_END:  # the last program only (see lora_linear._wait_end_program)
            if (gl.program_id(0) == gl.num_programs(0) - 1) & (gl.program_id(1) == gl.num_programs(1) - 1):
                gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                                          is_pure=False, pack=1)

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
