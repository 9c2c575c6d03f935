"""Fused LoRA linear: forward and backward with the dropout mask regenerated, never stored.

    y = x @ W.T + b + s * (drop(x) @ A.T) @ B.T
        x [M, K] (leading dims flattened), W [N, K] frozen, b [N] or None, A [r, K], B [N, r], s = scale

Forward (one pass over x, no [M, K] intermediate):
    S = drop(x) @ A.T                 [M, r] fp32    shrink kernel: reads x once, dropout in registers
    y = x @ W.T + s * S @ B.T + b     [M, N]         on sm_90 with 16-bit x: one persistent Triton GEMM
                                                     with the LoRA expansion in its epilogue
                                                     (_lora_gemm_kernel); elsewhere the expand kernel
                                                     writes s * S @ B.T + b and cuBLAS accumulates
                                                     x @ W.T into it (beta = 1)
Forward keeps for backward: x (a reference, no copy), S [M, r] fp32 and the seed: M * r * 4 bytes.

Backward, with mask = keep / (1 - p) regenerated from the seed (dropout.py has the exact p):
    G  = dy @ B                                       [M, r]  fp32   \\ one pass over dy (dy-pass kernel)
    dB = s * dy.T @ S                                 [N, r]         /
    dA = s * G.T @ drop(x)                            [r, K]            one pass over x  (x-pass kernel)
    dx = dy @ W + s * (G @ A) * mask                  [M, K]         on sm_90 with 16-bit dy: the same
                                                                     GEMM kernel, the masked LoRA term
                                                                     in its epilogue; elsewhere the
                                                                     x pass (or, with dropout, the
                                                                     expand kernel with the mask on its
                                                                     output) writes the LoRA term and
                                                                     cuBLAS adds dy @ W (beta = 1)
    dW = dy.T @ x (cuBLAS, only if W requires grad)   db = dy.sum(0) (only if b requires grad)
Past r = 64 (past r = 32 with at most 4096 rows while a CUDA graph is captured) with 16-bit
activations G, dB and (without dropout) dA, G @ A and the forward's S are cuBLAS products instead,
each scale in cuBLAS's epilogue; with dropout dA and the masked G @ A come from one x pass that
writes both (_bwd_cublas, _CUBLAS_MIN_RANK, _ONE_XPASS_MAX_BLOCK_R).

The base GEMM is ~98% of the FLOPs (r / K = 0.4% extra at r = 16, K = 4096). A persistent Triton
GEMM (TMA loads, 128 x 256 x 64 tiles, 3 stages) ran it at 97-100% of cuBLAS on an H100 at most
training shapes measured (82-90% at 4096 -> 14336 and 1024 -> 1024; benchmarks/probe_triton_gemm.py),
so the LoRA expansion rides in its epilogue instead of costing one more write and one more read of
y [M, N]; the op came out faster than with cuBLAS at every shape measured. Where that kernel does not
run (fp32, other GPUs, unaligned rows, r > 64, ragged N or K: see _GEMM_MIN_TILE_USE, fewer tiles
than half the SMs: _GEMM_MIN_WAVE, under torch.compile) cuBLAS keeps the GEMM. The forward's GEMM
runs as a warp-specialized Gluon kernel (gluon_gemm.py) at r <= 32, r % 8 == 0, where the TMA shrink
writes its L operand (see _gluon_gemm_b; LORA_KERNELS_GLUON_GEMM=0: the Triton kernel), and the
backward's dgrad as another one at r <= 32, fed Gs = s/(1-p) G in x's dtype by the dy pass (see
_gluon_dgrad_a; LORA_KERNELS_GLUON_DGRAD=0: the Triton kernel). Beside that dgrad the x pass is a Gluon
kernel too (lora_da_kernel), which reads the dgrad's Gs and mask bits instead of drawing the mask
(_bwd_xa_gluon; LORA_KERNELS_GLUON_DA=0: the Triton pass).

Precision: the LoRA products run on tensor cores with operands in the activations' dtype and fp32
accumulation. With 16-bit activations and fp32 adapters (PEFT's default), A, B, S and G are rounded
to the activations' dtype as dot operands, as torch.autocast runs PEFT's fp32 adapters in a bf16
model; the adapters themselves, S, G and the gradients dA, dB stay fp32. (As TF32 dots on fp32 tiles
the x and dy passes took 8-16% longer on an H100.) fp32 activations run full fp32 dots
(`input_precision="ieee"`). The base GEMM follows torch's own matmul settings (TF32 for fp32 only
if torch.backends.cuda.matmul allows it).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _backend
from . import replay
from .dropout import PHILOX_ROUNDS, draw_seed, dropout_mask, keep_scale, keep_threshold
from .gluon_gemm import HAS_GLUON

if HAS_GLUON:
    from .gluon_gemm import (GluonTensorDescriptor, gl, lora_da_kernel, lora_dgrad_ws_kernel, lora_gemm_ws_kernel,
                             nvmma_desc)

try:
    import triton
    import triton.language as tl
    from torch._library.triton import is_wrap_triton_enabled
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TRITON = True
except Exception:  # no triton: the PyTorch path serves every call
    HAS_TRITON = False

MAX_TRITON_RANK = 256  # BLOCK_R = 256 keeps the [BLOCK_M, BLOCK_R] fp32 accumulators in registers
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ================================================================================================
# configs
# ================================================================================================
@dataclass(frozen=True)
class _Cfg:
    block_a: int  # rows (M) of a tile
    block_b: int  # the streamed dimension's tile (K or N)
    num_warps: int
    num_stages: int


def _cdiv(a: int, b: int) -> int:
    # not triton.cdiv: that is a constexpr_function whose host-side call costs ~10-30 us, and a
    # training step made 17 of them (profiled)
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _block_r(r: int) -> int:
    return max(16, _next_pow2(r))  # tl.dot needs every dimension >= 16


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count_of(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: small, but small-M cases still take the split paths (tested on CPU)
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _split(n_blocks_other: int, n_blocks_streamed: int, device: torch.device) -> int:
    """Pieces to cut the streamed dimension into (each writes a partial that a sum then adds).

    Only when the other dimension leaves the GPU half idle (decode-sized M, narrow K): at M = 8192
    the row blocks already fill 132 SMs, and a split there cost a 12 us reduction kernel plus
    ~15 us of host time per step for nothing (profiled, H100).
    """
    sms = _sm_count_of(device)
    if n_blocks_other >= sms // 2:
        return 1
    return max(1, min(n_blocks_streamed, math.ceil(2 * sms / max(1, n_blocks_other))))


def _rows_block(M: int) -> int:
    return 16 if M <= 16 else (32 if M <= 32 else 64)


# Measured on an H100 (bf16, M = 8192, K = N = 4096; benchmarks/tune_lora_linear.py, 2026-11-22):
# the fastest of 6-9 candidates per kernel at r = 16 and r = 128. Rank 256 takes smaller tiles and
# 2 stages: the r = 128 tiles need 233 KB of shared memory there (limit 227 KB).
def _shrink_cfg(M: int, R: int, dropout: bool = False) -> _Cfg:
    if R <= 32:  # 41 us (1.65 TB/s) at r16; 4 warps beat 8 by 3%
        return _Cfg(_rows_block(M), 128, 4, 3)
    if R <= 128:  # 57 us at r128 vs 59-85 us for the others
        return _Cfg(_rows_block(M), 64, 4, 4)
    return _Cfg(min(_rows_block(M), 32), 64, 4, 2)


def _expand_cfg(M: int, R: int) -> _Cfg:
    if R <= 32:  # 28 us = 2.4 TB/s written (82% of copy) at r16
        return _Cfg(min(_rows_block(M), 32), 128, 4, 2)
    if R <= 128:  # 52 us at r128
        return _Cfg(_rows_block(M), 256, 4, 2)
    return _Cfg(_rows_block(M), 128, 4, 2)


def _dy_cfg(M: int, R: int, wide: bool = False) -> _Cfg:
    if R <= 32:  # 68 us at r16: 8 warps, BN = 128
        return _Cfg(_rows_block(M), 128, 8, 3)
    if R <= 128:  # 108 us at r128 with 128-row tiles
        return _Cfg(128 if M > 64 and not wide else _rows_block(M), 64, 8, 3)
    # rank 256 with fp32 adapters ("wide"): a [64, 256] fp32 B tile per stage needs 262 KB at BN = 64
    return _Cfg(_rows_block(M), 32 if wide else 64, 8, 2)


def _x_cfg(M: int, R: int, dropout: bool = False) -> _Cfg:
    if R <= 32:  # 65 us without dropout (64 rows); with it, 32-row tiles: 105 us vs 123
        return _Cfg(min(_rows_block(M), 32) if dropout else _rows_block(M), 128, 4, 3)
    if R <= 128:  # 139 / 191 us at r128
        return _Cfg(_rows_block(M), 128, 8, 3)
    return _Cfg(_rows_block(M), 64, 8, 2)


def _dot_precision(x_dtype: torch.dtype) -> str:
    # Dot operands are in the activations' dtype. fp32 activations (so fp32 adapters): full fp32
    # FMA dots, what an fp32 user expects; 16-bit activations: the precision flag does not apply.
    return "ieee" if x_dtype == torch.float32 else "tf32"


# ================================================================================================
# kernels
# ================================================================================================
if HAS_TRITON:
    _ROUNDS = tl.constexpr(PHILOX_ROUNDS)  # kernels may only read constexpr globals

    @triton.jit
    def _keep_mask(seed, rows, k0, keep_thr, BLOCK_K: tl.constexpr):
        """keep[BM, BLOCK_K] for int64 `rows` and columns k0 .. k0 + BLOCK_K - 1 (k0 % 8 == 0)."""
        groups = (k0 // 8 + tl.arange(0, BLOCK_K // 8)).to(tl.uint32)  # [BK/8]
        c0 = groups[None, :] + tl.zeros_like(rows)[:, None].to(tl.uint32)  # [BM, BK/8]
        c1 = (rows & 0xFFFFFFFF).to(tl.uint32)[:, None]  # [BM, 1]: broadcast by Philox's rounds
        c2 = (rows >> 32).to(tl.uint32)[:, None]
        c3 = tl.zeros_like(c1)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3, _ROUNDS)
        # column 8 g + j <- 16-bit half (j % 2) of word j // 2: interleave by the bits of j
        lo0, hi0, lo1, hi1 = r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16
        lo2, hi2, lo3, hi3 = r2 & 0xFFFF, r2 >> 16, r3 & 0xFFFF, r3 >> 16
        even = tl.interleave(tl.interleave(lo0, lo2), tl.interleave(lo1, lo3))  # j = 0, 2, 4, 6
        odd = tl.interleave(tl.interleave(hi0, hi2), tl.interleave(hi1, hi3))  # j = 1, 3, 5, 7
        return tl.interleave(even, odd).to(tl.int32) >= keep_thr

    @triton.jit(do_not_specialize=["keep_thr"])  # (1 at p = 2^-16: an int32 all the same)
    def _mask_bits_kernel(
        seed_ptr, bits_ptr,  # seed [1] int64; bits [tiles, 4, BM, BN / 128] int32
        num_n, n_items, keep_thr,
        BM: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr, WAIT_END: tl.constexpr,
    ):
        """The dropout mask of an [M, K] output as bits in the Gluon dgrad's tile order: word (t, q, r, h),
        t = pid_m num_n + pid_n a [BM, BN] tile, holds keep(pid_m BM + r, pid_n BN + 128 h + 8 jj + 2 q + b)
        in bit jj + 16 b (jj < 16: b = 0 the low 16-bit half of Philox word q of group pid_n BN / 8 + 16 h
        + jj, 1 its high half). One item: ROWS rows of one tile column, ROWS * BN / 8 Philox calls, a
        thread's 16 groups (jj) unrolled, so its 4 words fill in registers. Rows and columns past M and
        K are drawn too (the buffer holds whole tiles; the dgrad's stores clip them). Persistent: the
        programs take items n_items / grid apart (see _MASK_BITS_CTAS_PER_SM).

        Both halves of a word compare with keep_thr in one subtraction (SWAR, Hacker's Delight 2-19):
        with H = 0x80008000, d = (w | H) - (T & ~H) (T = keep_thr in both halves) cannot borrow
        across halves, and a half's top bit of (w & ~T) | (~(w ^ T) & d) is (half >= keep_thr).
        WAIT_END: launched while the kernel before it runs (programmatic dependent launch) and
        touching nothing it writes; this kernel ends after it (see _pdl_ok)."""
        H: tl.constexpr = BN // 128
        seed = tl.load(seed_ptr)
        thr = keep_thr.to(tl.uint32)
        T = thr | (thr << 16)
        TL = T & 0x7FFF7FFF
        nT = T ^ 0xFFFFFFFF  # (not ~T: the interpreter's ~ on uint32 overflows)
        for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
            r0 = (item // num_n) * ROWS  # the chunk's first row; ROWS divides BM
            pid_n = item % num_n
            rows = (r0.to(tl.int64) + tl.arange(0, ROWS))[:, None]  # [ROWS, 1]
            g0 = (pid_n * (BN // 8) + 16 * tl.arange(0, H)).to(tl.uint32)[None, :]  # [1, H]: group of jj = 0
            c1 = (rows & 0xFFFFFFFF).to(tl.uint32) + tl.zeros_like(g0)  # [ROWS, H]
            c2 = (rows >> 32).to(tl.uint32) + tl.zeros_like(g0)
            c3 = tl.zeros_like(c1)
            q0 = tl.zeros_like(c1)
            q1 = tl.zeros_like(c1)
            q2 = tl.zeros_like(c1)
            q3 = tl.zeros_like(c1)
            for jj in tl.static_range(16):
                w0, w1, w2, w3 = tl.philox(seed, g0 + jj + c3, c1, c2, c3, _ROUNDS)
                q0 |= _keep_bits(w0, nT, TL, jj)
                q1 |= _keep_bits(w1, nT, TL, jj)
                q2 |= _keep_bits(w2, nT, TL, jj)
                q3 |= _keep_bits(w3, nT, TL, jj)
            tile = (r0 // BM) * num_n + pid_n
            offs = (tile.to(tl.int64) * (4 * BM * H) + (r0 % BM + tl.arange(0, ROWS))[:, None] * H
                    + tl.arange(0, H)[None, :])  # [ROWS, H] at q = 0
            tl.store(bits_ptr + offs, q0.to(tl.int32, bitcast=True))
            tl.store(bits_ptr + offs + BM * H, q1.to(tl.int32, bitcast=True))
            tl.store(bits_ptr + offs + 2 * BM * H, q2.to(tl.int32, bitcast=True))
            tl.store(bits_ptr + offs + 3 * BM * H, q3.to(tl.int32, bitcast=True))
        if WAIT_END:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _wait_end_program():
        """The end of a dA pass launched beside the dgrad with programmatic dependent launch: its
        last program waits for the dgrad's end (griddepcontrol.wait), so the pass ends after it and
        the kernels after both see dx; the other programs exit at once. Each waiting at its end (as
        before) held its SM until the dgrad ended, so only the programs that fit beside the dgrad
        ran there. (The last program in launch order: it takes an SM last.) With the dgrad's balanced
        grid, H100 bf16 r16 p0.05, graph us per fwd+bwd step, 8 interleaved rounds: 8192x4096->4096
        925 vs 934, p0 897 vs 908, 8192x1024->1024 95.2 vs 96.3, 8192x2048->512 112.1 vs 113.0."""
        last = (tl.program_id(0) == tl.num_programs(0) - 1) & (tl.program_id(1) == tl.num_programs(1) - 1)
        if last:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _keep_bits(w, nT, TL, jj: tl.constexpr):
        """uint32 Philox words w -> keep of the low 16-bit half in bit jj, of the high half in bit 16 + jj
        (T = keep_thr in both halves, nT = ~T, TL = T & 0x7fff7fff; see _mask_bits_kernel)."""
        d = (w | 0x80008000) - TL
        ge = (w & nT) | ((w ^ nT) & d)  # bits 15 and 31: low half >= thr, high half >= thr
        return (ge >> (15 - jj)) & ((1 << jj) | (1 << (16 + jj)))

    @triton.jit
    def _lora_shrink_kernel(
        x_ptr, a_ptr, s_ptr, seed_ptr,  # x [M, K], A [R, K], S partials [SPLIT, M, R] fp32, seed [1]
        M, K, R, K_PER_SPLIT,
        stride_xm, stride_xk, stride_ar, stride_ak,
        keep_thr, inv_keep,
        HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """S[split] = drop(x[:, k-range]) @ A[:, k-range].T; one [BLOCK_M, R] tile per program."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        row_ok = rows < M
        r_ok = offs_r < R
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        # K_PER_SPLIT is a multiple of BLOCK_K; only the last split's blocks run past K (masked)
        for i in range(0, K_PER_SPLIT // BLOCK_K):
            k0 = pid_s * K_PER_SPLIT + i * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                x = tl.where(_keep_mask(seed, rows, k0, keep_thr, BLOCK_K), x, 0.0)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(a.to(x.dtype)), acc, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            acc = acc * inv_keep
        s_ptrs = s_ptr + pid_s.to(tl.int64) * M * R + rows[:, None] * R + offs_r[None, :]
        tl.store(s_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _lora_shrink_tma_kernel(
        x_desc, a_ptr, s_ptr, seed_ptr, lb_ptr,  # x TMA descriptor [M, K] (block [BLOCK_M, BLOCK_K]), A [R, K],
                                                 # S [M, R] fp32, seed [1], Lb [M, BLOCK_R] in x's dtype
        M, K, R, stride_ar, stride_ak,
        keep_thr, inv_keep, lb_scale,
        HAS_DROPOUT: tl.constexpr, WRITE_LB: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """S[rows] = drop(x[rows]) @ A.T with x's tiles brought in by TMA (zero-filled past M and K):
        one bulk copy per [BLOCK_M, BLOCK_K] tile instead of per-thread loads, so a CTA keeps
        num_stages whole tiles in flight. WRITE_LB: also Lb = lb_scale * S rounded to x's dtype,
        zeros past R: the operand the forward's Gluon GEMM loads through TMA (256 KB at 8192 rows, r16)."""
        m0 = tl.program_id(0) * BLOCK_M
        rows = m0.to(tl.int64) + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([m0, k0])
            if HAS_DROPOUT:
                x = tl.where(_keep_mask(seed, rows, k0, keep_thr, BLOCK_K), x, 0.0)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak,
                        mask=r_ok[:, None] & (offs_k < K)[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(a.to(x.dtype)), acc)
        if HAS_DROPOUT:
            acc = acc * inv_keep
        tl.store(s_ptr + rows[:, None] * R + offs_r[None, :], acc, mask=(rows < M)[:, None] & r_ok[None, :])
        if WRITE_LB:  # A's rows past R were loaded as zeros: so are acc's columns past R
            tl.store(lb_ptr + rows[:, None] * BLOCK_R + offs_r[None, :], (acc * lb_scale).to(x_desc.dtype),
                     mask=(rows < M)[:, None])

    @triton.jit
    def _store_da(da_ptr, da, offs_r, cols, pid_s, R, K, ATOMIC: tl.constexpr):
        """One program's dA [R, BLOCK_K] strip: added into a zeroed dA [R, K] (ATOMIC: one fp32 add
        per element per row split, no partials to sum), or stored as split pid_s of [SPLIT, R, K]
        partials (deterministic mode: summed afterwards in a fixed order)."""
        ok = (offs_r < R)[:, None] & (cols < K)[None, :]
        if ATOMIC:
            tl.atomic_add(da_ptr + offs_r[:, None] * K + cols[None, :], da, mask=ok, sem="relaxed")
        else:
            tl.store(da_ptr + pid_s.to(tl.int64) * R * K + offs_r[:, None] * K + cols[None, :], da, mask=ok)

    @triton.jit
    def _lora_bwd_xa_tma_kernel(
        x_desc, g_ptr, seed_ptr, da_ptr,  # x TMA descriptor [M, K] (block [BLOCK_M, BLOCK_K]), G [M, R] fp32, seed [1],
                                          # dA [R, K] fp32 (ATOMIC) or parts [SPLIT, R, K]
        M, K, R, M_PER_SPLIT,
        keep_thr, coef,  # coef = s * keep_scale(p)
        HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, WAIT_END: tl.constexpr,
    ):
        """dA[:, cols] (+)= coef * G[rows].T @ (x[rows, cols] * keep) for one BLOCK_K strip of columns
        over this split's rows, x's tiles brought in by TMA (zero-filled past M and K). WAIT_END:
        launched while the kernel before it runs (programmatic dependent launch) and touching nothing
        it writes; this kernel ends after it (see _pdl_ok)."""
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        k0 = pid_k * BLOCK_K
        cols = k0 + tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        dt = x_desc.dtype
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for i in range(0, M_PER_SPLIT // BLOCK_M):
            m0 = pid_s * M_PER_SPLIT + i * BLOCK_M
            rows = m0.to(tl.int64) + tl.arange(0, BLOCK_M)
            g = tl.load(g_ptr + rows[:, None] * R + offs_r[None, :], mask=(rows < M)[:, None] & r_ok[None, :], other=0.0)
            x = x_desc.load([m0, k0])
            if HAS_DROPOUT:
                x = tl.where(_keep_mask(seed, rows, k0, keep_thr, BLOCK_K), x, 0.0)
            da = tl.dot(tl.trans(g.to(dt)), x, da)
        _store_da(da_ptr, da * coef, offs_r, cols, pid_s, R, K, ATOMIC)
        if WAIT_END:
            _wait_end_program()

    @triton.jit
    def _lora_expand_kernel(
        s_ptr, b_ptr, bias_ptr, y_ptr, seed_ptr,  # S [M, R] fp32, B [N, R], bias [N], y [M, N], seed [1]
        M, N, R,
        stride_bn, stride_br, stride_ym, stride_yn,
        scale, keep_thr,
        HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """y[tile] = scale * S[rows] @ B[cols].T + bias[cols], written once in y's dtype; with
        HAS_DROPOUT, times keep(rows, cols) (backward: dx_lora = coef * (G @ A) * keep with B = A.T)."""
        n0 = tl.program_id(1) * BLOCK_N
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = n0.to(tl.int64) + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        row_ok = rows < M
        col_ok = cols < N
        r_ok = offs_r < R
        s = tl.load(s_ptr + rows[:, None] * R + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        dt = y_ptr.dtype.element_ty  # dot operands in the activations' dtype (module docstring)
        acc = tl.dot(s.to(dt), tl.trans(b.to(dt)), input_precision=DOT_PRECISION) * scale
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_DROPOUT:
            acc = tl.where(_keep_mask(tl.load(seed_ptr), rows, n0, keep_thr, BLOCK_N), acc, 0.0)
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _lora_bwd_dy_kernel(
        dy_ptr, b_ptr, s_ptr, g_ptr, db_ptr, gs_ptr,  # dy [M, N], B [N, R], S [M, R] f32, G parts [SPLIT, M, R] f32,
                                                      # dB [N, R] f32, Gs [M, BLOCK_R] in dy's dtype
        M, N, R, N_PER_SPLIT,
        stride_dym, stride_dyn, stride_bn, stride_br,
        scale, gs_scale,
        COMPUTE_DB: tl.constexpr, WRITE_GS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, TRIGGER: tl.constexpr = False,
    ):
        """One pass over dy: G[split] = dy[:, n-range] @ B[n-range]; dB[n-range] += s * dy.T @ S.
        WRITE_GS (one split): also Gs = gs_scale * G rounded to dy's dtype, zeros past R: the Gluon
        dgrad's LoRA operand, rounded as the Triton GEMM rounds G in its epilogue.

        dB is a sum over every row block, so programs add into it atomically (fp32); each program
        starts its sweep over N at a different block so that concurrent adds land on different rows.
        TRIGGER: the next kernel, launched with programmatic dependent launch, may start now (see _pdl_ok).
        """
        if TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        row_ok = rows < M
        r_ok = offs_r < R
        if COMPUTE_DB:
            s = tl.load(s_ptr + rows[:, None] * R + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            s = s.to(dy_ptr.dtype.element_ty)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        n_begin = pid_s * N_PER_SPLIT  # N_PER_SPLIT is a multiple of BLOCK_N; only the last split runs past N
        n_blocks = N_PER_SPLIT // BLOCK_N
        for i in range(0, n_blocks):
            cols = n_begin + ((i + pid_m) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = cols.to(tl.int64)
            col_ok = cols < N
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=col_ok[:, None] & r_ok[None, :], other=0.0).to(dy.dtype)
            acc = tl.dot(dy, b, acc, input_precision=DOT_PRECISION)
            if COMPUTE_DB:
                db = tl.dot(tl.trans(dy), s, input_precision=DOT_PRECISION) * scale  # [BN, BR]
                tl.atomic_add(db_ptr + cols[:, None] * R + offs_r[None, :], db,
                              mask=col_ok[:, None] & r_ok[None, :], sem="relaxed")
        g_ptrs = g_ptr + pid_s.to(tl.int64) * M * R + rows[:, None] * R + offs_r[None, :]
        tl.store(g_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :])
        if WRITE_GS:  # (acc is 0 past R: B's columns there load as zeros)
            tl.store(gs_ptr + rows[:, None] * BLOCK_R + offs_r[None, :], (acc * gs_scale).to(gs_ptr.dtype.element_ty),
                     mask=row_ok[:, None])

    @triton.jit
    def _zero2_kernel(a_ptr, n_a, b_ptr, n_b, BLOCK: tl.constexpr):
        """a[:n_a] = 0 and b[:n_b] = 0 in one launch: the first cdiv(n_a, BLOCK) programs take a, the rest b."""
        pid = tl.program_id(0)
        blocks_a = tl.cdiv(n_a, BLOCK)
        if pid < blocks_a:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            tl.store(a_ptr + offs, tl.zeros((BLOCK,), a_ptr.dtype.element_ty), mask=offs < n_a)
        else:
            offs = (pid - blocks_a).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            tl.store(b_ptr + offs, tl.zeros((BLOCK,), b_ptr.dtype.element_ty), mask=offs < n_b)

    @triton.jit
    def _cast2_kernel(a_ptr, a_out_ptr, n_a, b_ptr, b_out_ptr, n_b, BLOCK: tl.constexpr):
        """a_out = a and b_out = b converted to the outputs' dtypes (round to nearest even), in one
        launch: the first cdiv(n_a, BLOCK) programs take a, the rest b."""
        pid = tl.program_id(0)
        blocks_a = tl.cdiv(n_a, BLOCK)
        if pid < blocks_a:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(a_ptr + offs, mask=offs < n_a)
            tl.store(a_out_ptr + offs, v.to(a_out_ptr.dtype.element_ty), mask=offs < n_a)
        else:
            offs = (pid - blocks_a).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(b_ptr + offs, mask=offs < n_b)
            tl.store(b_out_ptr + offs, v.to(b_out_ptr.dtype.element_ty), mask=offs < n_b)

    @triton.jit
    def _lora_g_sum_kernel(
        parts_ptr, g_ptr, gs_ptr,  # G parts [SPLIT, M, R] f32, G [M, R] f32, Gs [M, BLOCK_R] in dy's dtype
        M, R, SPLIT, gs_scale,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """The dy pass's partial products summed where it split N: G = sum over s of parts[s], and Gs =
        gs_scale * G rounded to Gs's dtype, zeros past R (what the pass writes itself as one split).
        One launch for what took a sum, a fill and a multiply (and eager replay records a launch)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        row_ok = rows < M
        ok = row_ok[:, None] & (offs_r < R)[None, :]
        offs = rows[:, None] * R + offs_r[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        part = parts_ptr + offs
        for _ in range(SPLIT):
            acc += tl.load(part, mask=ok, other=0.0)
            part += M * R  # (64-bit pointer arithmetic: no int32 product of the split and the sizes)
        tl.store(g_ptr + offs, acc, mask=ok)
        tl.store(gs_ptr + rows[:, None] * BLOCK_R + offs_r[None, :], (acc * gs_scale).to(gs_ptr.dtype.element_ty),
                 mask=row_ok[:, None])

    @triton.jit
    def _lora_bwd_x_kernel(
        x_ptr, a_ptr, g_ptr, seed_ptr, dx_ptr, da_ptr,  # x [M, K], A [R, K], G [M, R] f32, dx [M, K],
                                                        # dA [R, K] f32 (ATOMIC) or parts [SPLIT, R, K]
        M, K, R, M_PER_SPLIT,
        stride_xm, stride_xk, stride_ar, stride_ak, stride_dxm, stride_dxk,
        keep_thr, coef,  # coef = s * keep_scale(p) = s / (1 - p)
        HAS_DROPOUT: tl.constexpr, WRITE_DX: tl.constexpr, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, WAIT_END: tl.constexpr,
    ):
        """One pass over x for a [M-range, BLOCK_K] strip:
        dA[:, cols] (+)= coef * G.T @ (x * keep);   dx[:, cols] = coef * (G @ A[:, cols]) * keep.
        """
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        k0 = pid_k * BLOCK_K
        cols = k0 + tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        col_ok = cols < K
        r_ok = offs_r < R
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :].to(tl.int64) * stride_ak,
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
        da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        # M_PER_SPLIT is a multiple of BLOCK_M; only the last split's blocks run past M (masked)
        for i in range(0, M_PER_SPLIT // BLOCK_M):
            rows = pid_s.to(tl.int64) * M_PER_SPLIT + i * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            g = tl.load(g_ptr + rows[:, None] * R + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            g = g.to(a.dtype)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :].to(tl.int64) * stride_xk,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = _keep_mask(seed, rows, k0, keep_thr, BLOCK_K)
                x = tl.where(keep, x, 0.0)
            da = tl.dot(tl.trans(g), x, da, input_precision=DOT_PRECISION)
            if WRITE_DX:
                dx = tl.dot(g, a, input_precision=DOT_PRECISION) * coef
                if HAS_DROPOUT:
                    dx = tl.where(keep, dx, 0.0)
                tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :].to(tl.int64) * stride_dxk,
                         dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        _store_da(da_ptr, da * coef, offs_r, cols, pid_s, R, K, ATOMIC)
        if WAIT_END:  # as in _lora_bwd_xa_tma_kernel (dA only: WRITE_DX is off when it is set)
            _wait_end_program()

    @triton.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """(row tile, column tile) of persistent tile number `tile`, in groups of GROUP_M row tiles:
        the CTAs working at one time share a few W column tiles, which stay in L2."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % rows, (tile % per_group) // rows

    @triton.jit
    def _column_halves(t, ROWS: tl.constexpr, COLS: tl.constexpr):
        """t [ROWS, COLS] -> (left, right) halves [ROWS, COLS / 2]: a register renaming, no data movement."""
        return tl.split(tl.permute(tl.reshape(t, (ROWS, 2, COLS // 2)), (0, 2, 1)))

    @triton.jit
    def _column_slices(t, ROWS: tl.constexpr, COLS: tl.constexpr, SPLIT: tl.constexpr):
        """t [ROWS, COLS] -> a tuple of SPLIT (1, 2 or 4) column slices [ROWS, COLS / SPLIT], left to right."""
        if SPLIT == 1:
            slices = (t,)
        else:
            slices = _column_halves(t, ROWS, COLS)
            if SPLIT == 4:
                slices = _column_halves(slices[0], ROWS, COLS // 2) + _column_halves(slices[1], ROWS, COLS // 2)
        return slices

    @triton.jit
    def _lora_gemm_kernel(
        a_desc, w_desc, y_desc,  # TMA descriptors: a [M, K_RED]; W [N_OUT, K_RED] (W_KMAJOR) or [K_RED, N_OUT]; y [M, N_OUT]
        l_ptr, r_ptr, bias_ptr, seed_ptr,  # L [M, R] fp32 contiguous; Rt[r, c] at r_ptr + r*stride_rr + c*stride_rc; bias [N_OUT]; seed [1]
        M, N_OUT, K_RED, R, stride_rr, stride_rc,
        coef, keep_thr,
        W_KMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, EPI_MASK: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, EPI_SPLIT: tl.constexpr, HOIST_RT: tl.constexpr,
        TRIGGER: tl.constexpr,
    ):
        """y = a @ op(W) + coef * (L @ Rt) [* keep(rows, cols)] + bias: the base GEMM with the LoRA
        expansion in its epilogue, one persistent CTA per SM walking [BM, BN] tiles.
          forward: a = x, op(W) = W.T, L = S, Rt = B.T, coef = s                  -> y
          dgrad:   a = dy, op(W) = W,  L = G, Rt = A,   coef = s / (1 - p), keep  -> dx
        TMA loads zero-fill past the edges and TMA stores clip, so ragged M / N / K need no masks.
        The epilogue runs on EPI_SPLIT column slices of the tile (y_desc's block is [BM, BN / EPI_SPLIT]):
        with the mask, a whole [BM, BN] LoRA product beside the accumulator would spill.
        TRIGGER: the next kernel, launched with programmatic dependent launch, may start now (see _pdl_ok)."""
        if TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N_OUT, BN)
        dt = y_desc.dtype
        SUB: tl.constexpr = BN // EPI_SPLIT
        if EPI_MASK:
            seed = tl.load(seed_ptr)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            m0 = pid_m * BM
            n0 = pid_n * BN
            rows = m0.to(tl.int64) + tl.arange(0, BM)
            # the epilogue's small operands L [BM, R] and (HOIST_RT) Rt [R, BN] are loaded before the
            # main loop: their latency hides there
            l = tl.load(l_ptr + rows[:, None] * R + offs_r[None, :], mask=(rows < M)[:, None] & r_ok[None, :], other=0.0)
            l = (l * coef).to(dt)  # operands in the activations' dtype, as in the expand kernel
            if HOIST_RT:
                cols = n0 + tl.arange(0, BN)
                rt = tl.load(r_ptr + offs_r[:, None] * stride_rr + cols[None, :].to(tl.int64) * stride_rc,
                             mask=r_ok[:, None] & (cols < N_OUT)[None, :], other=0.0).to(dt)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(tl.cdiv(K_RED, BK)):
                a = a_desc.load([m0, kk * BK])
                if W_KMAJOR:
                    acc = tl.dot(a, w_desc.load([n0, kk * BK]).T, acc)
                else:
                    acc = tl.dot(a, w_desc.load([kk * BK, n0]), acc)
            parts = _column_slices(acc, BM, BN, EPI_SPLIT)
            if HOIST_RT:
                rts = _column_slices(rt, BLOCK_R, BN, EPI_SPLIT)
            for h in tl.static_range(EPI_SPLIT):
                c0 = n0 + h * SUB
                cols = c0 + tl.arange(0, SUB)
                if HOIST_RT:
                    rt_h = rts[h]
                else:
                    rt_h = tl.load(r_ptr + offs_r[:, None] * stride_rr + cols[None, :].to(tl.int64) * stride_rc,
                                   mask=r_ok[:, None] & (cols < N_OUT)[None, :], other=0.0).to(dt)
                part = parts[h]
                if EPI_MASK:
                    lora = tl.dot(l, rt_h)
                    part += tl.where(_keep_mask(seed, rows, c0, keep_thr, SUB), lora, 0.0)
                else:
                    part = tl.dot(l, rt_h, part)
                if HAS_BIAS:
                    part += tl.load(bias_ptr + cols, mask=cols < N_OUT, other=0.0).to(tl.float32)[None, :]
                y_desc.store([m0, c0], part.to(dt))


# ================================================================================================
# buffers: allocations, sums and casts of the Triton path, written down when a call is recorded for
# replay from C++ (see ops/replay.py)
# ================================================================================================
def _new(shape, dtype: torch.dtype, device, zero: bool = False) -> torch.Tensor:
    t = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
    rec = replay.recording()
    if rec is not None:
        rec.alloc(t, zero)
    return t


def _sum0(t: torch.Tensor) -> torch.Tensor:
    out = t.sum(0)
    rec = replay.recording()
    if rec is not None:
        rec.sum0(out, t)
    return out


def _addmm_(out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, transpose: bool, alpha: float = 1.0,
            beta: float = 1.0) -> None:
    """out = beta * out + alpha * a @ (w.T if transpose else w) through cuBLAS. beta = 0 only writes
    out (cuBLAS does not read it: out may be uninitialized), with alpha applied in the epilogue."""
    out.addmm_(a, w.t() if transpose else w, beta=beta, alpha=alpha)
    rec = replay.recording()
    if rec is not None:
        rec.addmm(out, a, w, transpose, alpha, beta)


def _mm(a: torch.Tensor, b: torch.Tensor, ta: bool = False, tb: bool = False, alpha: float = 1.0,
        out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """alpha * op(a) @ op(b) through cuBLAS, op(t) = t.T where its flag is set. out_dtype=fp32 with
    16-bit operands returns cuBLAS's fp32 accumulator unrounded (aten::mm.dtype); else a's dtype.
    In a's dtype alpha is applied in cuBLAS's epilogue (addmm_ with beta = 0 into a fresh buffer) in
    place of a mul_ kernel after the product: one launch less, on the GPU and on the host."""
    if out_dtype == a.dtype:
        out_dtype = None
    rec = replay.recording()
    op_a, op_b = (a.t() if ta else a), (b.t() if tb else b)
    if out_dtype is None and alpha != 1.0:  # (empty and addmm_ pass the recorder's ATen watch)
        out = torch.empty((op_a.shape[0], op_b.shape[1]), dtype=a.dtype, device=a.device)
        out.addmm_(op_a, op_b, beta=0.0, alpha=alpha)
        if rec is not None:
            rec.mm(out, a, ta, b, tb, alpha, out_dtype)
        return out
    if rec is not None:
        rec.expect("mm", *(("mul_",) if alpha != 1.0 else ()))
    if out_dtype is None:
        out = torch.mm(op_a, op_b)
    elif a.is_cuda:
        out = torch.mm(op_a, op_b, out_dtype=out_dtype)
    else:  # no aten::mm.dtype on the CPU (the interpreter's runs): the same products, upcast first
        out = torch.mm(op_a.to(out_dtype), op_b.to(out_dtype))
    if alpha != 1.0:
        out.mul_(alpha)
    if rec is not None:
        rec.mm(out, a, ta, b, tb, alpha, out_dtype)
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = t.to(dtype)
    rec = replay.recording()
    if rec is not None and out is not t:
        rec.cast(out, t)
    return out


# The backward's fp32 accumulators of dA and dB (fp32 atomics) are zeroed by one launch and, with
# 16-bit adapters, rounded by one more, in place of two fills and two casts through ATen. On the H100's
# host a `zeros` takes ~19 us and a cast ~38, against ~7 for a replayed launch, and in a CUDA graph
# each was a kernel of its own: H100, r16 p0.05, graph us per training step, old -> new in the same
# process (4 interleaved rounds): 8192 x 1024 -> 1024 97.6 -> 95.2, 8192 x 2048 -> 512 114.3 -> 111.1,
# 8192 x 4096 -> 4096 920.2 -> 923.5 (within its rounds' 911-947).
_PAIR_BLOCK = 4096  # elements a program of _zero2_kernel / _cast2_kernel


def _zeros2(shape_a, shape_b, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two zeroed fp32 buffers of these shapes, zeroed by one launch."""
    a, b = _new(shape_a, torch.float32, device), _new(shape_b, torch.float32, device)
    na, nb = a.numel(), b.numel()
    _launch(_zero2_kernel, (_cdiv(na, _PAIR_BLOCK) + _cdiv(nb, _PAIR_BLOCK), 1), a, na, b, nb,
            BLOCK=_PAIR_BLOCK, num_warps=4)
    return a, b


def _cast2(a: torch.Tensor, dtype_a: torch.dtype, b: torch.Tensor, dtype_b: torch.dtype):
    """(a.to(dtype_a), b.to(dtype_b)): one launch where both change dtype (contiguous a and b)."""
    if a.dtype == dtype_a or b.dtype == dtype_b or not (a.is_contiguous() and b.is_contiguous()):
        return _cast(a, dtype_a), _cast(b, dtype_b)
    out_a, out_b = _new(a.shape, dtype_a, a.device), _new(b.shape, dtype_b, b.device)
    na, nb = a.numel(), b.numel()
    _launch(_cast2_kernel, (_cdiv(na, _PAIR_BLOCK) + _cdiv(nb, _PAIR_BLOCK), 1), a, out_a, na, b, out_b, nb,
            BLOCK=_PAIR_BLOCK, num_warps=4)
    return out_a, out_b


# ================================================================================================
# launchers
# ================================================================================================
def _launch(kernel, grid, *args, **meta):
    """Launch through torch.library.wrap_triton so torch.compile sees the kernel; in eager mode
    (wrap_triton disabled, see `_raw_launches`) through `_launch_direct`."""
    if grid[0] == 0 or grid[1] == 0:
        return
    if _FAST_LAUNCH and not is_wrap_triton_enabled() and getattr(args[0], "base", args[0]).is_cuda \
            and not _launch_hooks():  # (a TMA descriptor's .base)
        _launch_direct(kernel, grid, args, meta)
        return
    rec = replay.recording()
    if rec is not None:
        rec.decline("a launch that does not go through _launch_direct")
    if is_wrap_triton_enabled():
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


# Compiled kernels (launcher, handle, metadata, constexprs, the CompiledKernel for replay.py) by
# (kernel, device, meta, what Triton specializes each argument on). Triton's own launch path (argument binding, specialization, cache
# key) costs ~40 us of host time per launch on the H100's host, more than many of these kernels
# run; with the compiled kernel in hand a launch is one call into Triton's C launcher.
_FAST_LAUNCH = os.environ.get("LORA_KERNELS_FAST_LAUNCH", "1") != "0"
_SPLIT_DX = os.environ.get("LORA_KERNELS_SPLIT_DX", "1") != "0"  # see _bwd_x; read once, like _FAST_LAUNCH
_COMPILED: dict = {}


def _launch_hooks() -> bool:
    """Whether a profiler registered Triton launch hooks (then Triton's own launch path runs them)."""
    rt = triton.knobs.runtime
    return any(getattr(h, "calls", h) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _launch_key(args) -> tuple:
    """What Triton specializes each launch argument on (runtime/jit.py, specialize_impl): ints by
    == 1, % 16 == 0 and 32- vs 64-bit; tensors by dtype and 16-byte alignment; TMA descriptors by
    element type and block shape (the kernel's boxes); bools by value; floats not at all. One loop,
    no call per argument: a launch has 15-20 arguments, and a helper called per argument cost ~9 us
    of host time per launch on the H100's host (this: about half)."""
    key = []
    for a in args:
        t = type(a)
        if t is bool:
            key.append(a)
        elif isinstance(a, int):
            key.append((a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, TensorDescriptor) or HAS_GLUON and isinstance(a, GluonTensorDescriptor):
            key.append((t, a.base.dtype, tuple(a.block_shape)))  # (a Gluon one's layout follows from these)
        else:
            key.append(t)
    return tuple(key)


@functools.lru_cache(maxsize=None)
def _driver_calls():
    """(get_current_device, get_current_stream) of Triton's active driver, looked up once."""
    driver = triton.runtime.driver.active
    return driver.get_current_device, driver.get_current_stream


def _launch_direct(kernel, grid, args, meta):
    current_device, current_stream = _driver_calls()
    device = current_device()
    key = (kernel, device, tuple(meta.items()), _launch_key(args))
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **meta)  # compiles (or finds) and launches through Triton
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        if hasattr(compiled, "run") and hasattr(compiled, "packed_metadata"):
            hit = _COMPILED[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                                    tuple(meta[name] for name in kernel.arg_names[len(args):]), compiled)
    else:
        run, function, packed_metadata, constexprs, _ = hit
        run(grid[0], grid[1], 1, current_stream(device), function, packed_metadata, None, None, None, *args, *constexprs)
    rec = replay.recording()
    if rec is not None:
        if hit is None:
            rec.decline("a kernel Triton did not hand back compiled")
        else:
            rec.launch(hit[4], grid, args + hit[3])


def _desc(t: torch.Tensor, block_shape: list) -> "TensorDescriptor":
    """TensorDescriptor.from_tensor(t, block_shape) without its checks, which cost ~4 us of host
    time per descriptor (up to 8 a training step): every caller has passed `_tma_ok(t)` (or made t
    itself, contiguous and fresh), and the block shapes are the tables' powers of two."""
    d = object.__new__(TensorDescriptor)
    d.base, d.shape, d.strides, d.block_shape, d.padding = t, t.shape, t.stride(), block_shape, "zero"
    return d


def _shrink_tma(x, A, p, seed, cfg: _Cfg, lb: torch.Tensor | None = None, lb_scale: float = 1.0) -> torch.Tensor:
    """S = drop(x) @ A.T -> [M, R] fp32 through _lora_shrink_tma_kernel.   x [M, K] (TMA-readable), A [R, K]
    lb: also written, lb = lb_scale * S in x's dtype, [M, BLOCK_R] contiguous (zeros past R)"""
    M, K = x.shape
    R = A.shape[0]
    S = _new((M, R), torch.float32, x.device)
    _launch(_lora_shrink_tma_kernel, (_cdiv(M, cfg.block_a), 1),
            _desc(x, [cfg.block_a, cfg.block_b]), A, S, seed if seed is not None else S, lb if lb is not None else x,
            M, K, R, A.stride(0), A.stride(1),
            keep_threshold(p), keep_scale(p), lb_scale,
            HAS_DROPOUT=p > 0, WRITE_LB=lb is not None, BLOCK_M=cfg.block_a, BLOCK_K=cfg.block_b, BLOCK_R=_block_r(R),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return S


# The shrink with x's tiles brought in by TMA (_lora_shrink_tma_kernel) on sm_90, 16-bit x, once the
# row blocks fill half the GPU. benchmarks/sweep_shrink.py on an H100 (graph us, pointer kernel at
# its tuned config -> TMA kernel), r16: 8192 x 4096 p0.05 38.1 -> 33.9 (32-row tiles: 2 CTAs per SM
# hide more of the mask's Philox work, which is what separates p0.05 from p0's 26 us), 8192 x 14336
# p0.05 123.9 -> 102.8, 8192 x 2048 22.0 -> 17.2, 8192 x 1024 11.9 -> 10.1; p0 26.7 -> 25.4. At 2048
# rows the pointer kernel's K split wins (12.7 vs 21.8 us): not taken.
# With dropout, [16, 128] tiles of 2 warps and 6 stages (eleventh session, same sweep, graph us,
# [32, 256] x 4 warps x 4 stages -> this): 8192 x 4096 33.8 -> 29.0, 8192 x 2048 17.1 -> 15.2,
# 8192 x 1024 9.9 -> 8.9, 8192 x 14336 103.9 -> 90.3. The masked shrink is bound by the SMs' issue of
# the Philox work, not by DRAM (~12 GB/s per SM whatever the number of SMs it runs on,
# benchmarks/sweep_shrink.py and the side-pass experiment in RESULTS): more, smaller CTAs keep more
# independent Philox chains in flight per SM. Others of that sweep: [32, 128] x 4 x 6 30.1,
# [32, 128] x 4 x 8 30.5, [16, 128] x 4 x 6 36.4, [16, 128] x 2 x 8 40.6, [16, 256] x 2 x 4 42.6.
# Only where a step's A tile is no larger than its x tile (16-bit adapters, r <= 16): half the rows
# per CTA doubles A's bytes per byte of x, and with fp32 adapters at r16 (44.1 vs 35.4 us at 8192 x
# 4096, 13.3 vs 10.4 at 8192 x 1024) or bf16 at r32 (50.6 vs 36.1) the [32, 256] tiles stay faster.
_TMA_SHRINK = os.environ.get("LORA_KERNELS_TMA_SHRINK", "1") != "0"
_TMA_SHRINK_CFG = _Cfg(64, 128, 4, 6)  # without dropout
_TMA_SHRINK_DROPOUT_CFG = _Cfg(32, 256, 4, 4)
_TMA_SHRINK_DROPOUT_SMALL_A_CFG = _Cfg(16, 128, 2, 6)  # 16-bit adapters, r <= 16
# r = 64 with fp32 adapters needs 278 KB of shared memory at 64 x 128 x 6 stages (limit 227 KB)
_TMA_SHRINK_MAX_RANK = 32


def _tma_shrink_cfg(x: torch.Tensor, A: torch.Tensor, p: float) -> _Cfg | None:
    """The TMA shrink's tiles for x [M, K] and A [R, K], or None for the pointer kernel."""
    R = A.shape[0]
    if not (_TMA_SHRINK and R <= _TMA_SHRINK_MAX_RANK):
        return None
    # the row threshold counts 32-row blocks whatever the tile: at 2048 rows (64 blocks on 132 SMs)
    # the pointer kernel wins against either tile (12.2 us vs 18.8 with [16, 128] tiles)
    if _cdiv(x.shape[0], 32) < _sm_count_of(x.device) // 2:
        return None
    if p == 0:
        cfg = _TMA_SHRINK_CFG
    elif R <= 16 and A.element_size() == 2:
        cfg = _TMA_SHRINK_DROPOUT_SMALL_A_CFG
    else:
        cfg = _TMA_SHRINK_DROPOUT_CFG
    return cfg if _sm90_tma_ok(x) else None


def _shrink(x, A, p, seed, cfg: _Cfg | None = None) -> torch.Tensor:
    """S = drop(x) @ A.T -> [M, R] fp32.   x [M, K], A [R, K]"""
    M, K = x.shape
    R = A.shape[0]
    if cfg is None:
        tma_cfg = _tma_shrink_cfg(x, A, p)
        if tma_cfg is not None:
            return _shrink_tma(x, A, p, seed, tma_cfg)
    cfg = cfg or _shrink_cfg(M, R, p > 0)
    n_m = _cdiv(M, cfg.block_a)
    split = _split(n_m, _cdiv(K, cfg.block_b), x.device)  # decode: few rows, cut K instead
    k_per_split = _cdiv(_cdiv(K, split), cfg.block_b) * cfg.block_b
    split = _cdiv(K, k_per_split)
    parts = _new((split, M, R) if split > 1 else (M, R), torch.float32, x.device)
    _launch(_lora_shrink_kernel, (n_m, split),
            x, A, parts, seed if seed is not None else parts,
            M, K, R, k_per_split,
            x.stride(0), x.stride(1), A.stride(0), A.stride(1),
            keep_threshold(p), keep_scale(p),
            HAS_DROPOUT=p > 0, DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_M=cfg.block_a, BLOCK_K=cfg.block_b, BLOCK_R=_block_r(R),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _sum0(parts) if split > 1 else parts


def _expand(S, B, scale, bias, y, cfg: _Cfg | None = None, p: float = 0.0, seed=None) -> None:
    """y = scale * S @ B.T + bias (times keep(rows, cols) when p > 0), written into y.
    S [M, R] fp32, B [N, R] (any strides), y [M, N]"""
    M, N = y.shape
    R = B.shape[1]
    cfg = cfg or _expand_cfg(M, R)
    _launch(_lora_expand_kernel, (_cdiv(M, cfg.block_a), _cdiv(N, cfg.block_b)),
            S, B, bias if bias is not None else y, y, seed if seed is not None else S,
            M, N, R,
            B.stride(0), B.stride(1), y.stride(0), y.stride(1),
            scale, keep_threshold(p),
            HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, DOT_PRECISION=_dot_precision(y.dtype),
            BLOCK_M=cfg.block_a, BLOCK_N=cfg.block_b, BLOCK_R=_block_r(R),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


_G_SUM_ROWS = 64  # rows a program of _lora_g_sum_kernel (split passes have few row blocks: M <= ~4200)


def _bwd_dy(dy, B, S, scale, x_dtype, deterministic, cfg: _Cfg | None = None, gs: torch.Tensor | None = None,
            gs_scale: float = 1.0, trigger: bool = False, db: torch.Tensor | None = None):
    """One pass over dy -> (G = dy @ B [M, R] fp32, dB = scale * dy.T @ S [N, R] fp32).
    gs: a [M, BLOCK_R] tensor in dy's dtype to fill with gs_scale * G rounded, zeros past R (the
    pass writes it where it runs as one split; else it comes from the summed G).
    db: the zeroed fp32 [N, R] for dB's atomic adds (not deterministic); made here when not given."""
    M, N = dy.shape
    R = B.shape[1]
    cfg = cfg or _dy_cfg(M, R, B.element_size() > dy.element_size())
    n_m = _cdiv(M, cfg.block_a)
    split = _split(n_m, _cdiv(N, cfg.block_b), dy.device)
    n_per_split = _cdiv(_cdiv(N, split), cfg.block_b) * cfg.block_b
    split = _cdiv(N, n_per_split)
    g_parts = _new((split, M, R) if split > 1 else (M, R), torch.float32, dy.device)
    if deterministic:
        db = g_parts  # (not written: COMPUTE_DB is off)
    elif db is None:
        db = _new((N, R), torch.float32, dy.device, zero=True)
    write_gs = gs is not None and split == 1
    _launch(_lora_bwd_dy_kernel, (n_m, split),
            dy, B, S, g_parts, db, gs if write_gs else g_parts,
            M, N, R, n_per_split,
            dy.stride(0), dy.stride(1), B.stride(0), B.stride(1),
            scale, gs_scale,
            COMPUTE_DB=not deterministic, WRITE_GS=write_gs, DOT_PRECISION=_dot_precision(x_dtype),
            BLOCK_M=cfg.block_a, BLOCK_N=cfg.block_b, BLOCK_R=_block_r(R), TRIGGER=trigger,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split == 1:
        G = g_parts
    elif gs is None:
        G = _sum0(g_parts)
    else:  # G and Gs from the parts in one kernel
        G = _new((M, R), torch.float32, dy.device)
        _launch(_lora_g_sum_kernel, (_cdiv(M, _G_SUM_ROWS), 1), g_parts, G, gs, M, R, split, gs_scale,
                BLOCK_M=_G_SUM_ROWS, BLOCK_R=_block_r(R), num_warps=4)
    if deterministic:  # no atomics: dB by one more (cuBLAS) read of dy
        db = torch.mm(dy.t().to(torch.float32), S).mul_(scale)
    return G, db


# The dA pass with TMA loads of x, 32-row tiles (two CTAs an SM hide more of the mask's Philox work,
# as in the shrink). benchmarks/sweep_shrink.py --xpass on an H100, graph us, pointer kernel -> this,
# r16 p0.05: 8192 x 4096 55.3 -> 40.0, 8192 x 1024 16.8 -> 14.9, 2048 x 4096 15.4 -> 14.7, 8192 x 14336
# 164.1 -> 159.0; without dropout within +-0.7 us either way, so only with dropout.
# 8 warps instead of 4 (eleventh session, same sweep, graph us, 4 -> 8 warps): 8192 x 4096 40.1 ->
# 36.9, 8192 x 2048 23.9 -> 22.4, 8192 x 1024 14.9 -> 14.0, 2048 x 4096 14.5 -> 13.8, 8192 x 14336
# 157.8 -> 155.7 (more warps for the Philox work, as in the shrink; [16, 128] tiles lost here:
# the dA strips are summed per row step). 3 stages instead of 4: within 0.5 us.
_XPASS_TMA_CFG = _Cfg(32, 256, 8, 4)


def _tma_xpass_cfg(x: torch.Tensor, R: int, p: float) -> _Cfg | None:
    """The dA pass with TMA loads of x (sm_90, 16-bit x, r <= 32, dropout; see _bwd_xa_tma), or None."""
    if not (_TMA_SHRINK and p > 0 and R <= _TMA_SHRINK_MAX_RANK and x.shape[0] >= FUSED_GEMM_MIN_ROWS):
        return None
    return _XPASS_TMA_CFG if _sm90_tma_ok(x) else None


def _da_split(M: int, K: int, R: int, cfg: _Cfg, device, da: torch.Tensor | None):
    """(split, rows per split, where the dA programs write) for a dA pass over x [M, K].
    Few column strips (small K) leave the GPU idle, so the rows are cut into splits whose dA
    strips are added into `da` (a zeroed fp32 [R, K] buffer) with fp32 atomics: one add per element
    per split, in place of [SPLIT, R, K] partials and a reduction kernel (5.1 us at 8192 x 4096, r16,
    H100). Without `da` (deterministic mode) the partials are kept and summed in a fixed order."""
    split = _split(_cdiv(K, cfg.block_b), _cdiv(M, cfg.block_a), device)
    m_per_split = _cdiv(_cdiv(max(M, 1), split), cfg.block_a) * cfg.block_a
    split = max(1, _cdiv(M, m_per_split))
    if da is None:
        da = _new((split, R, K) if split > 1 else (R, K), torch.float32, device, zero=M == 0)
    return split, m_per_split, da


def _da_result(da: torch.Tensor) -> torch.Tensor:
    return _sum0(da) if da.dim() == 3 else da


def _bwd_xa_tma(x, G, seed, scale, p, cfg: _Cfg, da: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """dA = s/(1-p) * G.T @ (x*keep) [R, K] fp32 through _lora_bwd_xa_tma_kernel.
    x [M, K] (TMA-readable), G [M, R] fp32; da: a zeroed fp32 [R, K] buffer to add into (see _da_split)
    pdl: launched with programmatic dependent launch after a kernel it shares nothing written with"""
    M, K = x.shape
    R = G.shape[1]
    split, m_per_split, out = _da_split(M, K, R, cfg, x.device, da)
    _launch(_lora_bwd_xa_tma_kernel, (_cdiv(K, cfg.block_b), split),
            _desc(x, [cfg.block_a, cfg.block_b]), G, seed if seed is not None else G, out,
            M, K, R, m_per_split,
            keep_threshold(p), scale * keep_scale(p),
            HAS_DROPOUT=p > 0, ATOMIC=da is not None, BLOCK_M=cfg.block_a, BLOCK_K=cfg.block_b, BLOCK_R=_block_r(R),
            WAIT_END=pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_pdl_meta(pdl))
    return _da_result(out)


# The dA pass in Gluon (lora_da_kernel): 64 rows x 256 columns a step, 8 warps, 3 stages (108 KB of
# shared memory, two CTAs an SM). It reads Gs and the mask's bits, the dgrad's operands, so it runs
# beside the Gluon dgrad. H100, graph us alone (benchmarks/probe_da.py), 8192 rows, r16, p0.05,
# K = 4096 / 1024 / 2048, against Triton's TMA pass: 30.2 / 8.7 / 11.7 vs 34.4 / 11.6 / 18.7; other
# tiles: [32, 256] 29.5-29.7 / 8.8-9.4 / 12.3, 4 warps at 64 rows 30.4 / 9.6 / 12.3, 3 CTAs an SM
# 31.8-31.9 / 9.5-10.4 / 13.1-13.6, [128, 256] at 2 stages 36.8 / 10.2 / 16.1.
_XPASS_GLUON_CFG = _Cfg(64, 256, 8, 3)


_GLUON_XPASS = os.environ.get("LORA_KERNELS_GLUON_DA", "1") != "0"


def _gluon_xpass_ok(x: torch.Tensor) -> bool:
    """Whether lora_da_kernel takes the dA pass (beside the Gluon dgrad, whose Gs it reads): TMA-readable
    16-bit x of fewer than 2^31 rows (the kernel's row counter is 32-bit)."""
    return _GLUON_XPASS and x.shape[0] < 2**31 and _sm90_tma_ok(x)


def _bwd_xa_gluon(x, Gs, R: int, da: torch.Tensor, bits: torch.Tensor | None, cfg: _Cfg = _XPASS_GLUON_CFG,
                  pdl: bool = False) -> torch.Tensor:
    """dA += Gs.T @ (x * keep) [R, K] fp32 into `da` (zeroed, fp32 atomics) through lora_da_kernel (sm_90).
    x [M, K] (TMA-readable, 16-bit), Gs [M, BLOCK_R] = s / (1 - p) * G in x's dtype (zeros past r),
    keep: the dropout mask as _mask_bits drew it for the dgrad, `bits` (None at p = 0: no mask).
    pdl: launched with programmatic dependent launch after a kernel it shares nothing written with"""
    M, K = x.shape
    split, m_per_split, out = _da_split(M, K, R, cfg, x.device, da)
    gdt = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    _launch(lora_da_kernel, (_cdiv(K, cfg.block_b), split),
            nvmma_desc(x, [cfg.block_a, cfg.block_b], gdt), nvmma_desc(Gs, [cfg.block_a, Gs.shape[1]], gdt),
            nvmma_desc(bits if bits is not None else _no_mask_bits(x.device), [4, 2 * cfg.block_a], gl.int32),
            out, m_per_split, R, _cdiv(K, _GEMM_TILE.block_b),
            MASKED=bits is not None, STAGES=cfg.num_stages, WAIT_END=pdl, num_warps=cfg.num_warps, **_pdl_meta(pdl))
    return out


def _bwd_x(x, A, G, seed, scale, p, need_dx, cfg: _Cfg | None = None, split_dx: bool | None = None,
           da: torch.Tensor | None = None, pdl: bool = False):
    """One pass over x -> (dA = s/(1-p) * G.T @ (x*keep) [R, K] fp32,
    dx_lora = s/(1-p) * (G @ A) * keep [M, K] in x's dtype, or None when not need_dx).
    da: a zeroed fp32 [R, K] buffer to add dA into (see _da_split).
    pdl (dA only): launched with programmatic dependent launch beside the kernel before it, which
    writes nothing this pass reads or writes (see _pdl_ok).

    With dropout, dx_lora comes from a second kernel (the expand kernel with the mask on its
    output) instead of the same pass (split_dx, default: p > 0): the one-pass kernel needs the mask
    in two register layouts (x's for dA, the dot output's for dx), and Triton's shuffles between
    them made it take 118 us at 8192 x 4096, r16, p0.05 on an H100 against 60 us without dropout;
    two passes each need the mask in one layout."""
    if split_dx is None:
        split_dx = p > 0 and _SPLIT_DX
    if need_dx and split_dx:
        da, _ = _bwd_x(x, A, G, seed, scale, p, False, cfg, split_dx=False, da=da)
        dx = _new(x.shape, x.dtype, x.device)
        _expand(G, A.t(), scale * keep_scale(p), None, dx, p=p, seed=seed)  # A.t(): [K, R] view
        return da, dx
    M, K = x.shape
    R = A.shape[0]
    pdl = pdl and not need_dx
    if cfg is None and not need_dx:
        tma_cfg = _tma_xpass_cfg(x, R, p)
        if tma_cfg is not None:
            return _bwd_xa_tma(x, G, seed, scale, p, tma_cfg, da=da, pdl=pdl), None
    cfg = cfg or _x_cfg(M, R, p > 0 and need_dx)
    split, m_per_split, out = _da_split(M, K, R, cfg, x.device, da)
    dx = _new((M, K), x.dtype, x.device) if need_dx else None
    _launch(_lora_bwd_x_kernel, (_cdiv(K, cfg.block_b), split if M > 0 else 0),
            x, A, G, seed if seed is not None else G, dx if need_dx else out, out,
            M, K, R, m_per_split,
            x.stride(0), x.stride(1), A.stride(0), A.stride(1),
            dx.stride(0) if need_dx else 0, dx.stride(1) if need_dx else 0,
            keep_threshold(p), scale * keep_scale(p),
            HAS_DROPOUT=p > 0, WRITE_DX=need_dx, ATOMIC=da is not None, DOT_PRECISION=_dot_precision(x.dtype),
            BLOCK_M=cfg.block_a, BLOCK_K=cfg.block_b, BLOCK_R=_block_r(R), WAIT_END=pdl,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_pdl_meta(pdl))
    return _da_result(out), dx


# The base GEMM with the LoRA expansion in its epilogue (_lora_gemm_kernel) replaces "expand kernel
# writes y, cuBLAS accumulates x @ W.T into it (beta = 1)", which costs one more write and one more
# read of y [M, N] (and the same for dx in backward). Measured on an H100 (bf16, r16, CUDA-graph
# time over the base F.linear, benchmarks/sweep_fused_gemm.py, same run): 8192 x 4096 -> 4096 p0.05
# fwd 1.228x -> 1.184x, fwd+bwd 1.285x -> 1.266x; p0 fwd 1.146x -> 1.110x, fwd+bwd 1.232x -> 1.166x;
# 8192 x 1024 -> 1024 p0.05 fwd+bwd 2.43x -> 2.31x; 8192 x 2048 -> 512 2.79x -> 2.54x. Taken on sm_90
# for 16-bit activations whose rows TMA can read (16-byte aligned); fp32 keeps cuBLAS (its TF32
# choice follows torch's settings). LORA_KERNELS_FUSED_GEMM=0 turns it off.
_FUSED_GEMM = os.environ.get("LORA_KERNELS_FUSED_GEMM", "1") != "0"

# Programmatic dependent launch (sm_90) in the fused backward, LORA_KERNELS_PDL=0 turns it off: the
# dgrad GEMM runs first and lets the dA pass start at once, whose CTAs take the SMs of the GEMM's
# last, partly empty wave as its CTAs end (1024 tiles on 132 SMs at 8192 x 4096 -> 4096). The two
# share no written memory; the dA pass waits for the GEMM's end only before it exits. H100, graph us
# per training step against the code before (benchmarks/breakdown_lora_linear.py --before, r16
# p0.05): 8192 x 4096 -> 4096 933.2 vs 948.3, 8192 x 2048 -> 512 133.1 vs 139.1, 8192 x 1024 -> 1024
# 115.1 vs 115.4. The same in the forward (the shrink lets the GEMM start, whose CTAs wait for S
# after their first main loop) was slower at the headline (954.5 vs 936.7) and is not done. Only on
# direct launches: torch.compile's launcher (wrap_triton) does not take the launch option, and the
# kernels are then correct without it (the wait returns at once).
_PDL = os.environ.get("LORA_KERNELS_PDL", "1") != "0"


def _pdl_ok() -> bool:
    return _PDL and not is_wrap_triton_enabled()


def _pdl_meta(on: bool) -> dict:
    return {"launch_pdl": True} if on else {}


FUSED_GEMM_MIN_ROWS = 256  # fewer rows than two 128-row tiles: decode-sized calls keep the split kernels
# Rt [r, BN] loaded before the main loop too: its shared-memory copy for the epilogue's MMA then stays
# allocated through the loop (offline sm_90 compile at r16: 225 KB; r32 with fp32 adapters 238 KB,
# over the 227 KB limit), so only at r <= 16. H100, 14 r16 cases of benchmarks/sweep_fused_gemm.py in
# one run: 1% faster on average (0.97-1.03x per case, the run's noise)
_GEMM_HOIST_RT = True
_GEMM_MAX_RANK = 64  # the epilogue's [BM, r] and [r, BN] operands: r = 64 uses 255 registers at BN = 256


@functools.lru_cache(maxsize=None)
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def _tma_ok(t: torch.Tensor) -> bool:
    """A row-major 2-D tensor TMA can read: unit inner stride, 16-byte aligned base and row pitch."""
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0 and t.shape[1] * t.element_size() >= 16)


def _sm90_tma_ok(t: torch.Tensor) -> bool:
    """Whether the sm_90 TMA kernels (GEMM epilogue, TMA shrink and dA pass) may read t: a 16-bit
    CUDA tensor TMA can read, on an sm_90 device, outside torch.compile's tracing (which sees the
    cuBLAS composition: no host-side TMA descriptors there)."""
    if not (t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)) or is_wrap_triton_enabled():
        return False
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _is_sm90(idx) and _tma_ok(t)


_GEMM_TILE = _Cfg(128, 256, 8, 3)  # BM = block_a, BN = block_b; see _gemm_cfg
_GEMM_BK = 64  # the main loop's step over K_RED
_GEMM_GROUP_M = 8  # row tiles per group of the persistent tile order (see _tile_coords)


# Share of the GEMM kernel's tiles that must be real work along the feature dims: [128, 256] output
# tiles and 64-deep steps over K_RED, against cuBLAS, which picks its tiles per shape. H100, graph us
# against the cuBLAS path (expand + addmm, benchmarks/sweep_gemm_tiles.py): 8192 x 1032 -> 2056
# (0.89 of N's tiles and 0.95 of K's steps used) fwd 96.1 vs 89.8, masked dgrad 114.0 vs 84.4;
# 4100 x 1032 -> 2056 fwd 55.8 vs 43.3, masked dgrad 74.2 vs 43.5; with N and K multiples of the
# tiles the kernel wins, ragged M included (4100 x 4096 -> 4096 fwd 188.1 vs 199.0, 3000 rows 136.8
# vs 144.7). So ragged N / K of more than 5% go the cuBLAS way.
_GEMM_MIN_TILE_USE = 0.95
# Fewer output tiles than half the SMs go the cuBLAS way too: the persistent kernel's [128, 256]
# tiles then leave most SMs idle where cuBLAS picks smaller tiles. H100, graph us, training forward,
# p0 (torch profiler): 2048 x 2048 -> 512 (32 tiles) GEMM kernel 22.7 against cuBLAS's 9.8; 256 x
# 4096 -> 4096 (32 tiles) 43.3 against 18.8; while 8192 x 2048 -> 512 (128 tiles) fused 41.5 us
# beat naive PyTorch's 59.0.
_GEMM_MIN_WAVE = 0.5


def _tile_use(n: int, tile: int) -> float:
    return n / (_cdiv(n, tile) * tile)


def _fused_gemm_ok(a: torch.Tensor, weight: torch.Tensor, R: int, n_out: int) -> bool:
    """Whether out [M, n_out] = a @ op(weight) + LoRA can run as _lora_gemm_kernel."""
    if not _FUSED_GEMM or a.shape[0] < FUSED_GEMM_MIN_ROWS or R > _GEMM_MAX_RANK:
        return False
    if _tile_use(n_out, _GEMM_TILE.block_b) * _tile_use(a.shape[1], _GEMM_BK) < _GEMM_MIN_TILE_USE:
        return False
    if (n_out * a.element_size()) % 16:  # the output's rows are stored by TMA too
        return False
    if not (_sm90_tma_ok(a) and _tma_ok(weight)):
        return False
    tiles = _cdiv(a.shape[0], _GEMM_TILE.block_a) * _cdiv(n_out, _GEMM_TILE.block_b)
    return tiles >= _GEMM_MIN_WAVE * _sm_count_of(a.device)


def _gemm_cfg(masked: bool, tile: _Cfg | None = None) -> tuple[_Cfg, int]:
    """(tile config: block_a = BM, block_b = BN, BK = 64; the epilogue's column slices) for the table's
    tile or `tile`. The masked dgrad runs its epilogue on 64-column slices: with the mask and a whole
    [128, 256] LoRA product beside the accumulator it spilled (offline sm_90 compile: 255 registers +
    1.2 KB of stack; 320 bytes with 128-column slices; none with 64)."""
    tile = tile or _GEMM_TILE
    return tile, (max(1, tile.block_b // 64) if masked else 1)


# The forward GEMM as the warp-specialized Gluon kernel (gluon_gemm.py) at r <= 32 (past that its
# operands do not fit beside 3 stages) with r % 8 == 0 (B's rows, r * 2 bytes, must be 16-byte
# multiples for TMA), where the TMA shrink runs: it writes the kernel's L operand, s S in x's dtype,
# beside S. H100, bf16, r16, p0.05, training forward, graph us (benchmarks/breakdown_lora_linear.py,
# Triton GEMM -> this, same run): 8192 x 4096 -> 4096 453.0 -> 438.7 (base 392.9), 8192 x 1024 ->
# 1024 42.5 -> 40.3 (27.6), 8192 x 2048 -> 512 47.7 -> 47.4 (27.6). LORA_KERNELS_GLUON_GEMM=0: off.
_GLUON_GEMM = os.environ.get("LORA_KERNELS_GLUON_GEMM", "1") != "0"
_GLUON_GEMM_MAX_BLOCK_R = 32


def _gluon_gemm_b(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor | None:
    """B [N, r] as lora_gemm_ws_kernel loads it (x's dtype, TMA-readable), or None where the forward
    GEMM stays the Triton kernel. The caller has checked _fused_gemm_ok and the TMA shrink's tiles."""
    R = B.shape[1]
    if not (_GLUON_GEMM and HAS_GLUON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and _block_r(R) <= _GLUON_GEMM_MAX_BLOCK_R and R % 8 == 0 and B.stride(1) == 1 and B.stride(0) == R
            and not is_wrap_triton_enabled()):
        return None
    Bq = _cast(B, x.dtype)  # fp32 adapters: a [N, r] copy (128 KB at N = 4096, r16)
    return Bq if _tma_ok(Bq) else None


def _gluon_gemm_cfg(block_r: int, one_wave: bool) -> tuple[int, int]:
    """(stages, epilogue column slices) of lora_gemm_ws_kernel. One tile per CTA (a single wave):
    nothing follows the epilogue, so its output buffer can shrink to a quarter for a 4th stage; H100,
    8192 x 2048 -> 512 (128 tiles): 27.1 us against 30.4 at 3 stages, cuBLAS 27.5. Several tiles per
    CTA: 3 stages beside a whole-tile output buffer (8192 x 4096 -> 14336: 1423 against 1479 us at 4
    stages). Shared memory (offline sm_90 compile): 220 KB at r16 either way (3 x 48 KB stages + 64 KB
    output buffer or 4 stages + 16 KB, and 12 KB of L and B tiles); at r32, 24 KB of L and B tiles
    leave half the output buffer beside 3 stages."""
    if block_r == 16:
        return (4, 4) if one_wave else (3, 1)
    return 3, 2


def _lora_gemm_ws(a, weight, Lb, Bq, bias, cfg: tuple[int, int] | None = None) -> torch.Tensor:
    """out = a @ W.T + Lb @ Bq.T + bias -> [M, N] in a's dtype through lora_gemm_ws_kernel (sm_90).
    a [M, K], weight [N, K] (TMA-readable), Lb [M, BLOCK_R] = (s S) in a's dtype (zeros past r),
    Bq [N, r] in a's dtype (_gluon_gemm_b), bias [N] or None
    cfg: (stages, epilogue column slices) other than _gluon_gemm_cfg's, for sweeps"""
    M, N_OUT = a.shape[0], weight.shape[0]
    BR = _block_r(Bq.shape[1])
    BM, BN, BK = _GEMM_TILE.block_a, _GEMM_TILE.block_b, _GEMM_BK
    out = _new((M, N_OUT), a.dtype, a.device)
    tiles = _cdiv(M, BM) * _cdiv(N_OUT, BN)
    grid = min(tiles, _sm_count_of(a.device))
    stages, epi = cfg or _gluon_gemm_cfg(BR, tiles <= grid)
    gdt = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16
    _launch(lora_gemm_ws_kernel, (grid, 1),
            nvmma_desc(a, [BM, BK], gdt), nvmma_desc(weight, [BN, BK], gdt), nvmma_desc(Lb, [BM, BR], gdt),
            nvmma_desc(Bq, [BN, BR], gdt), nvmma_desc(out, [BM, BN // epi], gdt),
            bias if bias is not None else out, N_OUT,
            HAS_BIAS=bias is not None, GROUP_M=_GEMM_GROUP_M, STAGES=stages,
            num_warps=8, maxnreg=168)  # 12 warps x 168 registers fill the SM's 64 K; the MMA warps take 232
    return out


# The dgrad as the warp-specialized Gluon kernel (gluon_gemm.lora_dgrad_ws_kernel) at r <= 32 wherever
# the fused dgrad runs on 16-bit activations: dx = dy @ W + keep * (Gs @ A), the dy pass writing Gs =
# s / (1 - p) * G in dy's dtype. The mask comes in as bits that _mask_bits drew beforehand (the
# Triton kernel draws it in its epilogue while the tensor cores wait).
# LORA_KERNELS_GLUON_DGRAD=0: the Triton kernel.
_GLUON_DGRAD = os.environ.get("LORA_KERNELS_GLUON_DGRAD", "1") != "0"


def _gluon_dgrad_a(dy: torch.Tensor, A: torch.Tensor) -> torch.Tensor | None:
    """A [r, K] as lora_dgrad_ws_kernel loads it (dy's dtype, TMA-readable), or None where the dgrad
    stays the Triton kernel. The caller has checked _fused_gemm_ok(dy, weight, r, K)."""
    if not (_GLUON_DGRAD and HAS_GLUON and dy.is_cuda and dy.dtype in (torch.float16, torch.bfloat16)
            and _block_r(A.shape[0]) <= _GLUON_GEMM_MAX_BLOCK_R and not is_wrap_triton_enabled()):
        return None
    Aq = _cast(A, dy.dtype).contiguous()  # fp32 adapters: a [r, K] copy (128 KB at K = 4096, r16)
    return Aq if _tma_ok(Aq) else None


# The dropout mask of the backward's dgrad as bits (M K / 8 bytes, freed with the backward), drawn
# by _mask_bits_kernel after the dy pass (programmatic dependent launch: it may start beside the
# pass's last CTAs) and loaded by the Gluon dgrad beside each tile's LoRA operands. Drawn in the
# dgrad by two warps of its own instead, the Philox work did not keep up at short K (gluon_gemm's
# docstring). H100, r16, p0.05, graph us per training step against the mask-warp dgrad in the same
# call (benchmarks/breakdown_lora_linear.py --before, three calls): 8192 x 4096 -> 4096 929.5 vs
# 935.2, 920.2 vs 926.6, 923.8 vs 927.1; 8192 x 1024 -> 1024 107.0 vs 110.6, 108.1 vs 109.8, 104.7
# vs 105.9; 8192 x 2048 -> 512 128.6 vs 129.6, 125.0 vs 127.5, 122.2 vs 127.8. The bits kernel alone
# (eager): 7.8 us at 8192 x 2048 (12.4 with its words packed by warp shuffles), 5.3 at 8192 x 1024.
# The TMA dA pass reading the bits too was no faster (-6.4 / -1.7 / -2.5 us against -3.3 / -1.2 /
# -5.6 without, same call): it draws its own.
_MASK_BITS_ROWS = 64  # rows an item of _mask_bits_kernel: 2048 Philox calls, 16 a thread at 4 warps
# The bits kernel beside the dy pass (PDL): each of its programs waits for the pass's end before it
# exits (its results are the dgrad's as much as the pass's), holding its SM's registers. With one
# program an item, only the first resident wave ran beside the pass and the rest after it. So where
# the items are more than two such waves, the kernel runs persistent: 4 programs an SM (70
# registers at 4 warps, 9 K of the SM's 64 K, beside the pass's 14 K), the fewest rounds of items
# each. H100, graph us, median of 3 (benchmarks/probe_dy.py, r16 p0.05, dy [M, N], bits [M, K]), the
# pass then the bits kernel, one program an item -> persistent: M N K = 8192 4096 4096 (2048 items)
# 43.9 -> 36.5 (3 or 6 programs an SM: 36.3, 40.0); 8192 4096 14336 (7168) 78.1 -> 70.7. At two
# rounds it lost: 8192 512 2048 (1024 items) 12.2 -> 12.8 (the kernel alone 8.1 -> 8.3: fewer warps
# to hide its integer chains); at one (8192 1024 1024, 2048 4096 4096: 512 items) the launch is the
# same. LORA_KERNELS_BITS_CTAS: programs an SM (0: one program an item everywhere).
_MASK_BITS_CTAS_PER_SM = int(os.environ.get("LORA_KERNELS_BITS_CTAS", "4"))


def _no_mask_bits(device: torch.device) -> torch.Tensor:
    """One tile's worth of mask bits, the unmasked kernels' (unread) mask operand: not filled. A fresh
    4 KB buffer each call, not a cached one: eager replay names a launch's arguments as the call's
    inputs or the buffers it made, so with a cached operand every p0 backward through the Gluon
    dgrad was declined and took the Python path at every call."""
    return _new((4, _GEMM_TILE.block_a * _GEMM_TILE.block_b // 128), torch.int32, device)


def _mask_bits(M: int, K: int, p: float, seed, device, pdl: bool = False,
               persistent: bool | None = None) -> torch.Tensor:
    """The dropout mask of (p, seed) over an [M, K] output as bits in lora_dgrad_ws_kernel's tile
    order (_mask_bits_kernel): int32 [tiles * 4, BM * BN / 128], tiles = cdiv(M, BM) * cdiv(K, BN).
    pdl: launched with programmatic dependent launch beside the kernel before it (see _pdl_ok).
    persistent: _MASK_BITS_CTAS_PER_SM programs an SM, each taking several items, or one program an
    item; None: persistent where the items are more than two rounds of the resident programs."""
    BM, BN = _GEMM_TILE.block_a, _GEMM_TILE.block_b
    num_m, num_n = _cdiv(M, BM), _cdiv(K, BN)
    bits = _new((num_m * num_n * 4, BM * BN // 128), torch.int32, device)
    items = num_m * BM // _MASK_BITS_ROWS * num_n
    grid = items
    resident = _MASK_BITS_CTAS_PER_SM * _sm_count_of(bits.device)
    if resident and (persistent or (persistent is None and items > 2 * resident)):
        grid = _cdiv(items, _cdiv(items, resident))  # as many items each: the fewest rounds
    _launch(_mask_bits_kernel, (grid, 1), seed, bits, num_n, items, keep_threshold(p),
            BM=BM, BN=BN, ROWS=_MASK_BITS_ROWS, WAIT_END=pdl, num_warps=4, **_pdl_meta(pdl))
    return bits


_DGRAD_BALANCED = os.environ.get("LORA_KERNELS_DGRAD_BALANCED", "1") != "0"


def _balanced_grid(tiles: int, sms: int) -> int:
    """Persistent CTAs for `tiles` tiles: as few as keep the busiest CTA at cdiv(tiles, sms) tiles,
    so that the SMs left over are free for the whole kernel rather than for its last round only
    (512 tiles on 132 SMs: 128 CTAs of 4 tiles, 4 SMs free for the dA pass beside it; alone it did
    not move the step time, with the dA pass's last-program wait it takes ~1% off)."""
    return _cdiv(tiles, _cdiv(tiles, sms)) if tiles > 0 else 0  # (no tiles: no CTAs, as min(tiles, sms))


def _lora_dgrad_ws(dy, weight, Gs, Aq, p: float, seed, cfg: tuple[int, int] | None = None,
                   trigger: bool = False, bits: torch.Tensor | None = None) -> torch.Tensor:
    """dx = dy @ W + keep * (Gs @ Aq) -> [M, K] in dy's dtype through lora_dgrad_ws_kernel (sm_90).
    dy [M, N], weight [N, K] (TMA-readable), Gs [M, BLOCK_R] = s / (1 - p) * (dy @ B) in dy's dtype
    (zeros past r), Aq [r, K] in dy's dtype (_gluon_dgrad_a); keep: the dropout mask of (p, seed),
    none at p = 0. cfg: (stages, epilogue column slices) other than _gluon_gemm_cfg's, for sweeps
    trigger: the next launch may start at once (programmatic dependent launch, see _pdl_ok)
    bits: the mask as _mask_bits drew it (p > 0; drawn here when not given), loaded beside each
    tile's LoRA operands"""
    M, K_OUT = dy.shape[0], weight.shape[1]
    BR = Gs.shape[1]
    BM, BN, BK = _GEMM_TILE.block_a, _GEMM_TILE.block_b, _GEMM_BK
    if bits is None:
        bits = _mask_bits(M, K_OUT, p, seed, dy.device) if p > 0 else _no_mask_bits(dy.device)
    out = _new((M, K_OUT), dy.dtype, dy.device)
    tiles = _cdiv(M, BM) * _cdiv(K_OUT, BN)
    sms = _sm_count_of(dy.device)
    grid = _balanced_grid(tiles, sms) if _DGRAD_BALANCED else min(tiles, sms)
    stages, epi = cfg or _gluon_gemm_cfg(BR, tiles <= sms)  # (+4 KB of mask bits: 229.7 KB at r16)
    gdt = gl.bfloat16 if dy.dtype == torch.bfloat16 else gl.float16
    _launch(lora_dgrad_ws_kernel, (grid, 1),
            nvmma_desc(dy, [BM, BK], gdt), nvmma_desc(weight, [BK, BN], gdt), nvmma_desc(Gs, [BM, BR], gdt),
            nvmma_desc(Aq, [BR, BN], gdt), nvmma_desc(out, [BM // 2, BN // epi], gdt),
            nvmma_desc(bits, [4, bits.shape[1]], gl.int32), K_OUT,
            MASKED=p > 0, GROUP_M=_GEMM_GROUP_M, STAGES=stages, TRIGGER=trigger,
            num_warps=4, maxnreg=168)  # 12 warps x 168 registers fill the SM's 64 K; the MMA warpgroups take 232
    return out


def _lora_gemm(a, weight, L, rt, coef, bias, w_kmajor: bool, p: float = 0.0, seed=None,
               cfg: _Cfg | None = None, bk: int | None = None, epi_split: int | None = None,
               group_m: int | None = None, trigger: bool = False) -> torch.Tensor:
    """out = a @ (W.T if w_kmajor else W) + coef * (L @ rt) [* keep when p > 0] + bias -> [M, N_OUT]
    in a's dtype.   a [M, K_RED], weight [N, K], L [M, R] fp32 contiguous, rt [R, N_OUT] (any strides)
    cfg, bk, epi_split, group_m: other than the table's tiles (BM = block_a, BN = block_b), K step,
    epilogue slices and tile grouping, for sweeps
    trigger: the next launch may start at once (programmatic dependent launch, see _pdl_ok)"""
    M, K_RED = a.shape
    R, N_OUT = rt.shape
    cfg, split = _gemm_cfg(p > 0, cfg)
    epi_split = epi_split or split
    BM, BN, BK = cfg.block_a, cfg.block_b, bk or _GEMM_BK
    out = _new((M, N_OUT), a.dtype, a.device)
    tiles = _cdiv(M, BM) * _cdiv(N_OUT, BN)
    grid = min(tiles, _sm_count_of(a.device))
    a_desc = _desc(a, [BM, BK])
    w_desc = _desc(weight, [BN, BK] if w_kmajor else [BK, BN])
    y_desc = _desc(out, [BM, BN // epi_split])
    _launch(_lora_gemm_kernel, (grid, 1),
            a_desc, w_desc, y_desc, L, rt, bias if bias is not None else out, seed if seed is not None else out,
            M, N_OUT, K_RED, R, rt.stride(0), rt.stride(1),
            coef, keep_threshold(p),
            W_KMAJOR=w_kmajor, HAS_BIAS=bias is not None, EPI_MASK=p > 0,
            BM=BM, BN=BN, BK=BK, BLOCK_R=_block_r(R), GROUP_M=group_m or _GEMM_GROUP_M, NUM_SMS=grid, EPI_SPLIT=epi_split,
            HOIST_RT=_GEMM_HOIST_RT and _block_r(R) == 16, TRIGGER=trigger,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _fwd_triton(x, weight, A, B, scale, bias, p, seed):
    fused = _fused_gemm_ok(x, weight, A.shape[0], weight.shape[0])
    # r > 64 (few rows, captured: r > 32) without a mask: cuBLAS (see _CUBLAS_MIN_RANK)
    if p == 0 and _cublas_products_ok(x, A.shape[0]):
        S = _mm(x, _cast(A, x.dtype), tb=True, out_dtype=torch.float32)  # [M, r] fp32
    else:
        tma_cfg = _tma_shrink_cfg(x, A, p)  # (what _shrink would look up: once here)
        if tma_cfg is None:
            S = _shrink(x, A, p, seed, _shrink_cfg(x.shape[0], A.shape[0], p > 0))
        else:
            Bq = _gluon_gemm_b(x, B) if fused else None
            # the Gluon GEMM: its L operand (s S in x's dtype) written by the shrink beside S
            Lb = _new((x.shape[0], _block_r(A.shape[0])), x.dtype, x.device) if Bq is not None else None
            S = _shrink_tma(x, A, p, seed, tma_cfg, lb=Lb, lb_scale=scale)
            if Lb is not None:
                return _lora_gemm_ws(x, weight, Lb, Bq, bias), S
    if fused:
        return _lora_gemm(x, weight, S, B.t(), scale, bias, w_kmajor=True), S
    y = _new((x.shape[0], weight.shape[0]), x.dtype, x.device)
    _expand(S, B, scale, bias, y)
    _addmm_(y, x, weight, transpose=True)  # cuBLAS with beta = 1: y = x @ W.T + (s * S @ B.T + b)
    return y, S


# Past the GEMM epilogue's ranks (r > 64) the backward's rank-r products go through cuBLAS, and so
# does the forward's shrink where there is no mask to apply (p = 0). The Triton dy and x passes keep
# [BLOCK_M, r] / [r, BLOCK_K] fp32 accumulators beside their tiles and are no longer memory-bound
# there: H100, r128 p0, 8192 x 4096 -> 4096, per training step (torch profiler): dy pass 92.9 us +
# its split sum 12.3, x pass (dA and dx_lora) 140.4, where a cuBLAS product of these sizes reads its
# 64 MB operand in ~30 us; the fused step was slower than naive PyTorch (graph) at 15 of the grid's
# 36 r128 fwd+bwd cases at p0 and p0.05. With the products in cuBLAS (benchmarks/sweep_dispatch.py,
# graph, ratio to base, before -> after, naive in the same run): 8192 x 4096 -> 4096 r128 p0
# 1.467x -> 1.407x (naive 1.464x), p0.05 1.534x -> 1.435x (1.577x); 2048 x 4096 -> 4096 p0.05 1.744x
# -> 1.565x (1.690x); 8192 x 2048 -> 512 p0.05 4.377x -> 3.588x (4.282x).
_CUBLAS_MIN_RANK = 65
# With few rows, while a CUDA graph is captured, the rank rule starts at r33 (BLOCK_R = 64): there
# the Triton passes and GEMM have few row blocks to spread over 132 SMs (the dy pass splits N and
# sums partials; the masked dgrad GEMM has 16 row tiles at 2048 rows) where cuBLAS picks its tiles
# and split-K per shape, and the r64 dA pass is far from memory-bound (8192 x 14336 -> 4096 p0,
# torch profiler: 288 us against cuBLAS's 86 us for G.T @ x). H100, benchmarks/sweep_dispatch.py,
# graph, r64 fwd+bwd ratio to base, r65 -> r33 rule at 2048 rows (naive): 4096 -> 4096 p0 1.319x ->
# 1.286x (1.540x), p0.05 1.355x -> 1.312x; 14336 -> 4096 p0 1.186x -> 1.121x, p0.05 1.226x ->
# 1.173x; 4096 -> 14336 p0.05 1.166x -> 1.102x (p0 1.108x -> 1.129x, the one loss); 5120 -> 5120
# p0 1.350x -> 1.216x (1.329x), p0.05 1.393x -> 1.331x (1.421x); 8192 -> 8192 p0 1.131x -> 1.077x;
# 2048 -> 512 p0 3.111x -> 2.680x (3.245x), p0.05 3.887x -> 3.544x (4.074x); at 4096 rows 4096 ->
# 4096 p0.05 1.308x -> 1.240x, 2048 -> 512 p0 2.761x -> 2.315x. At 8192-16384 rows the same switch
# won and lost by up to 7% each way (8192 x 5120 -> 5120 p0.05 1.273x -> 1.357x, 8192 x 2048 -> 512
# p0 2.246x -> 2.407x; 8192 x 4096 -> 14336 p0.05 1.205x -> 1.140x), so there r64 keeps the Triton
# path. Only under capture: each cuBLAS call through ATen costs far more host time than a kernel
# launch, and an eager step at these sizes is bound by the host (benchmarks/host_step.py, H100
# host, us per eager step, Triton path -> cuBLAS products, naive: 2048 x 5120 -> 5120 r64 p0 590 ->
# 936 (811); 2048 x 4096 -> 4096 p0 684 -> 947 (754); p0.05 525 -> 756 (629)). A replayed graph
# pays no host time, so there GPU time decides.
_CUBLAS_MIN_RANK_FEW_ROWS = 33
_FEW_ROWS = 4096
# With dropout past r64, dA and the masked dx_lora come from one x pass (see _bwd_x's split_dx):
# the mask's two register layouts that made the one pass slow at r16 cost little beside r128's
# dots. H100, graph, fwd+bwd ratio to base, two passes -> one (benchmarks/sweep_dispatch.py, same
# run, naive beside): 2048 x 2048 -> 512 r128 p0.05 4.419x -> 4.140x (naive 4.216x), p0.1 4.472x ->
# 4.166x (4.280x); 8192 x 2048 -> 512 p0.05 3.472x -> 3.257x (4.236x); 2048 x 4096 -> 4096 p0.05
# 1.510x -> 1.484x (1.655x).
# r256 ([64, 256] G and [256, 64] A tiles beside the mask) keeps the two passes, the path measured
# and tested there before: the one pass was not measured at r256. (0: two passes at every rank.)
_ONE_XPASS_MAX_BLOCK_R = 128


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _few_rows_captured(x: torch.Tensor, R: int) -> bool:
    """r33-64 at <= 4096 rows while a CUDA graph is captured (see _CUBLAS_MIN_RANK_FEW_ROWS): the one
    case where the path depends on capture, so it is also part of the eager calls' replay key."""
    return _CUBLAS_MIN_RANK_FEW_ROWS <= R < _CUBLAS_MIN_RANK and x.shape[0] <= _FEW_ROWS and _capturing(x)


def _cublas_products_ok(x: torch.Tensor, R: int) -> bool:
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return R >= _CUBLAS_MIN_RANK or _few_rows_captured(x, R)


def _da_buffer(R: int, K: int, device) -> torch.Tensor | None:
    """The zeroed fp32 [R, K] dA that the dA pass adds into with atomics (dB gets its own: the op's
    outputs may not be views of one buffer); None in deterministic mode, where the pass keeps
    partial sums and adds them in a fixed order."""
    if torch.are_deterministic_algorithms_enabled():
        return None
    return _new((R, K), torch.float32, device, zero=True)


def _bwd_cublas(dy, x, weight, A, B, S, seed, scale, p, need_dx):
    """The backward with its rank-r products in cuBLAS, operands in the activations' dtype dt as
    the kernels' dots take them, gradients in the adapters' dtype (see _CUBLAS_MIN_RANK):
        dB = s * dy.T @ S [N, r]
        p = 0:  Gs = s * dy @ B [M, r] in dt    dA = Gs.T @ x [r, K]    dx = dy @ W + Gs @ A [M, K]
        p > 0:  G = dy @ B, then dA = s/(1-p) * G.T @ drop(x) and dx_lora = s/(1-p) * (G @ A) * keep
                from one Triton x pass, which regenerates the mask (see _ONE_XPASS_MAX_BLOCK_R);
                dx = dy @ W + dx_lora
    Every scale rides in a cuBLAS epilogue (alpha) or a kernel's, and each result is written in its
    final dtype: no mul_ or cast kernels (each ~20-30 us of host time in an eager step)."""
    dt = x.dtype
    R, K = A.shape
    db = _mm(dy, _cast(S, dt), ta=True, alpha=scale, out_dtype=B.dtype)  # [N, r]
    if p == 0:
        Gs = _mm(dy, _cast(B, dt), alpha=scale)  # [M, r] in dt, scaled once for dA and dx
        da = _mm(Gs, x, ta=True, out_dtype=A.dtype)  # [r, K]
        if not need_dx:
            return _new((0,), dt, x.device), da, db
        # the rank-r product writes dx, and the big GEMM adds into it as its C operand (beta = 1):
        # the other order (dx = dy @ W, then dx += Gs @ A) reads and writes dx once more in a
        # memory-bound product, +0.28 ms at 16384 x 8192 -> 8192 (graph, H100: 7.35 vs 7.08 ms)
        dx = _new(x.shape, dt, x.device)
        _addmm_(dx, Gs, _cast(A, dt), transpose=False, beta=0.0)  # dx = Gs @ A, dx not read
        _addmm_(dx, dy, weight, transpose=False)  # cuBLAS with beta = 1: dx += dy @ W
        return dx, da, db
    G = _mm(dy, _cast(B, dt))  # [M, r] in dt
    one_pass = _block_r(R) <= _ONE_XPASS_MAX_BLOCK_R  # else _bwd_x's default (LORA_KERNELS_SPLIT_DX)
    da, dx = _bwd_x(x, A, G, seed, scale, p, need_dx, split_dx=False if one_pass else None,
                    da=_da_buffer(R, K, x.device))
    if need_dx:
        _addmm_(dx, dy, weight, transpose=False)  # cuBLAS with beta = 1: dx = dy @ W + dx_lora
    else:
        dx = _new((0,), dt, x.device)
    return dx, _cast(da, A.dtype), db


def _bwd_triton(dy, x, weight, A, B, S, seed, scale, p, need_dx):
    R, K = A.shape
    if _cublas_products_ok(x, R):
        return _bwd_cublas(dy, x, weight, A, B, S, seed, scale, p, need_dx)
    # the zeroed fp32 dA and dB that the passes add into with atomics (see _da_buffer), by one launch
    da = db = None
    if not torch.are_deterministic_algorithms_enabled():
        da, db = _zeros2((R, K), (dy.shape[1], R), x.device)
    fused = need_dx and _fused_gemm_ok(dy, weight, R, K)
    Aq = _gluon_dgrad_a(dy, A) if fused else None
    Gs = _new((dy.shape[0], _block_r(R)), dy.dtype, dy.device) if Aq is not None else None
    draw_bits = Aq is not None and p > 0  # the Gluon dgrad reads the mask as bits (see _mask_bits)
    G, db = _bwd_dy(dy, B, S, scale, x.dtype, deterministic=da is None, gs=Gs, gs_scale=scale * keep_scale(p),
                    trigger=draw_bits and _pdl_ok(), db=db)
    bits = _mask_bits(dy.shape[0], K, p, seed, dy.device, pdl=_pdl_ok()) if draw_bits else None
    if fused:
        # the GEMM first, then the dA pass, which (with programmatic dependent launch) takes the SMs
        # of the GEMM's partly empty last wave as its CTAs end: the two share no written memory
        pdl = _pdl_ok()
        if Aq is not None:
            dx = _lora_dgrad_ws(dy, weight, Gs, Aq, p, seed, trigger=pdl, bits=bits)
        else:
            dx = _lora_gemm(dy, weight, G, A, scale * keep_scale(p), None, w_kmajor=False, p=p, seed=seed, trigger=pdl)
        if Gs is not None and da is not None and _gluon_xpass_ok(x):
            da = _bwd_xa_gluon(x, Gs, R, da, bits, pdl=pdl)
        else:
            da, _ = _bwd_x(x, A, G, seed, scale, p, False, da=da, pdl=pdl)
    else:
        da, dx = _bwd_x(x, A, G, seed, scale, p, need_dx, da=da)
        if need_dx:
            _addmm_(dx, dy, weight, transpose=False)  # cuBLAS with beta = 1: dx = dy @ W + dx_lora
        else:
            dx = _new((0,), x.dtype, x.device)
    return (dx, *_cast2(da, A.dtype, db, B.dtype))


def _masked_x(x, p, seed):
    """drop(x) in fp32, with the kernels' mask (PyTorch path)."""
    xf = x.to(torch.float32)
    if p > 0:
        xf = xf * dropout_mask(seed, x.shape[0], x.shape[1], p, device=x.device) * keep_scale(p)
    return xf


def _fwd_torch(x, weight, A, B, scale, bias, p, seed):
    S = _masked_x(x, p, seed) @ A.to(torch.float32).t()  # [M, r] fp32
    lora = (S @ B.to(torch.float32).t()) * scale
    y = torch.nn.functional.linear(x, weight, bias) + lora.to(x.dtype)
    return y, S


def _bwd_torch(dy, x, weight, A, B, S, seed, scale, p, need_dx):
    dyf = dy.to(torch.float32)
    G = dyf @ B.to(torch.float32)  # [M, r]
    dB = (dyf.t() @ S) * scale
    dA = (G.t() @ _masked_x(x, p, seed)) * scale
    if need_dx:
        lora = (G @ A.to(torch.float32)) * scale
        if p > 0:
            lora = lora * dropout_mask(seed, x.shape[0], x.shape[1], p, device=x.device) * keep_scale(p)
        dx = (dy @ weight + lora.to(dy.dtype)).to(x.dtype)
    else:
        dx = x.new_empty(0)
    return dx, dA.to(A.dtype), dB.to(B.dtype)


# Eager inference calls (no gradient, no dropout) of at most DECODE_ROWS rows run as three cuBLAS
# calls, y = F.linear(x, W, b); y += s * (x @ A.T) @ B.T, instead of the Triton shrink and expand.
# At these sizes an eager call is host-bound, and a Triton launch costs more host time than a cuBLAS
# one. Measured on an H100 (K = N = 4096, r16, bf16, benchmarks/sweep_decode.py, two runs; eager
# time over the base F.linear at M = 1 / 64 / 512): kernels 6.4-16.6x / 5.6-9.7x / 2.4-9.1x, this
# path 1.5-5.0x / 1.5-3.2x / 1.5-2.5x, naive PyTorch 1.6-4.0x / 1.8-2.4x / 1.8-2.0x. Replayed from a
# CUDA graph the kernels are a little faster (1.79-1.86x against 1.79-1.93x at M = 1, 1.35-1.37x
# against 1.37-1.38x at 512), so a call being captured keeps them.
# LORA_KERNELS_DECODE_ROWS overrides the bound (read at import; 0 turns the path off).
DECODE_ROWS = int(os.environ.get("LORA_KERNELS_DECODE_ROWS", "512"))


def _decode_path(x2d, weight, lora_A, lora_B, bias, dropout_p) -> bool:
    """Whether this call takes the cuBLAS inference path (see DECODE_ROWS)."""
    if x2d.shape[0] > DECODE_ROWS or dropout_p != 0 or not x2d.is_cuda:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2d, weight, lora_A, lora_B, bias)):
        return False
    return (_backend.requested() == "auto" and not torch.cuda.is_current_stream_capturing()
            and _use_eager_path(x2d, weight, lora_A, lora_B, bias))


def _decode_cublas(x, weight, A, B, scale, bias):
    """y = x @ W.T + b + scale * (x @ A.T) @ B.T: x [M, K], W [N, K], A [r, K], B [N, r] -> [M, N].
    The products take their operands in x's dtype (fp32 adapters rounded, x @ A.T rounded before
    the second product), as the kernels' dots do and as autocast runs PEFT's fp32 adapters."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y.addmm_(torch.mm(x, A.t().to(x.dtype)), B.t().to(x.dtype), alpha=scale)


def _use_triton(x: torch.Tensor, K: int, N: int, R: int) -> bool:
    backend, _ = _backend.choose(x.device)
    return backend == "triton" and R <= MAX_TRITON_RANK and K > 0 and N > 0


# ================================================================================================
# op registration and autograd
# ================================================================================================
_register_op = torch.library.triton_op if HAS_TRITON else torch.library.custom_op


def _forward_impl(x, weight, lora_A, lora_B, scale, bias, dropout_p, seed):
    if _use_triton(x, x.shape[1], weight.shape[0], lora_A.shape[0]):
        return _fwd_triton(x, weight, lora_A, lora_B, scale, bias, dropout_p, seed)
    return _fwd_torch(x, weight, lora_A, lora_B, scale, bias, dropout_p, seed)


def _backward_impl(dy, x, weight, lora_A, lora_B, s_lora, seed, scale, dropout_p, need_dx):
    if _use_triton(x, x.shape[1], weight.shape[0], lora_A.shape[0]):
        return _bwd_triton(dy, x, weight, lora_A, lora_B, s_lora, seed, scale, dropout_p, need_dx)
    return _bwd_torch(dy, x, weight, lora_A, lora_B, s_lora, seed, scale, dropout_p, need_dx)


@_register_op("lora_kernels::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
    bias: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], S = drop(x) @ A.T [M, r] fp32) for 2-D x; see the module docstring."""
    return _forward_impl(x, weight, lora_A, lora_B, scale, bias, dropout_p, seed)


@_register_op("lora_kernels::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s_lora: torch.Tensor, seed: torch.Tensor | None, scale: float, dropout_p: float, need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [M, K] or empty when not need_dx, dA [r, K], dB [N, r]) of the LoRA linear."""
    return _backward_impl(dy, x, weight, lora_A, lora_B, s_lora, seed, scale, dropout_p, need_dx)


if not HAS_TRITON:  # custom_op needs its fake kernels spelled out; triton_op traces the function
    @_lora_linear_op.register_fake
    def _(x, weight, lora_A, lora_B, scale, bias, dropout_p, seed):
        return (x.new_empty((x.shape[0], weight.shape[0])),
                x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))

    @_lora_linear_backward_op.register_fake
    def _(dy, x, weight, lora_A, lora_B, s_lora, seed, scale, dropout_p, need_dx):
        return (x.new_empty(x.shape if need_dx else (0,)), torch.empty_like(lora_A), torch.empty_like(lora_B))


def _save(ctx, inputs, s_lora):
    """What backward needs: x, W, A, B (references), S [M, r] fp32 and the seed."""
    x, weight, lora_A, lora_B, scale, bias, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, s_lora, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _setup_context(ctx, inputs, output):
    _, s_lora = output
    ctx.mark_non_differentiable(s_lora)  # the op returns S for backward's use, not for gradients
    _save(ctx, inputs, s_lora)


def _grads(ctx, dy, lora_backward):
    x, weight, lora_A, lora_B, s_lora, seed = ctx.saved_tensors
    need_x, need_w, need_a, need_b, _, need_bias, _, _ = ctx.needs_input_grad
    dx = d_a = d_b = d_w = d_bias = None
    if need_x or need_a or need_b:
        dx, d_a, d_b = lora_backward(dy, x, weight, lora_A, lora_B, s_lora, seed, ctx.scale, ctx.dropout_p, need_x)
        dx = dx if need_x else None
    if need_w:
        d_w = dy.t().mm(x.to(dy.dtype))  # [N, K]
    if need_bias:
        d_bias = dy.sum(0)
    return dx, d_w, d_a if need_a else None, d_b if need_b else None, None, d_bias, None, None


def _backward(ctx, dy, _ds_lora):
    return _grads(ctx, dy, _lora_linear_backward_op)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoRALinear(torch.autograd.Function):
    """The same forward and backward as the registered op, minus the custom-op dispatch layers.

    Eager calls take this path: the op's dispatch (custom_op -> autograd wrapper -> redispatch)
    costs ~50 us of host time per call, twice per training step, which is the whole GPU time of a
    1024 x 1024 projection. torch.compile, export, fake tensors and tensor subclasses see the
    registered op (see `_use_eager_path`), so both run the same `_forward_impl` / `_backward_impl`.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scale, bias, dropout_p, seed):
        with _raw_launches():
            y, s_lora = _eager_forward(x, weight, lora_A, lora_B, scale, bias, dropout_p, seed)
        _save(ctx, (x, weight, lora_A, lora_B, scale, bias, dropout_p, seed), s_lora)
        return y

    @staticmethod
    def backward(ctx, dy):
        with _raw_launches():
            return _grads(ctx, dy, _eager_backward)


# Eager CUDA calls go through ops/replay.py: the second call of each key runs the Python path and
# writes down its launches, later ones replay them from C++ (same kernels, same arguments, same
# results). H100 host, 8192 x 1024 -> 1024 r16 p0.05: see benchmarks/RESULTS.md (twentieth session).
def _replay_ok(t: torch.Tensor) -> bool:
    """Replay for this call: CUDA, the extension loaded, no profiler's launch hooks, and the backend
    not forced to PyTorch (LORA_KERNELS_BACKEND is read per call; a recorded plan is Triton's)."""
    return t.is_cuda and replay.available() and not _launch_hooks() and _backend.requested() != "torch"


def _eager_forward(x, weight, lora_A, lora_B, scale, bias, dropout_p, seed):
    if _replay_ok(x):
        return replay.run(replay.FWD, [x, weight, lora_A, lora_B, bias, seed], [scale, dropout_p],
                          [int(_few_rows_captured(x, lora_A.shape[0]))],  # a captured call: its own plan
                          _forward_impl, x, weight, lora_A, lora_B, scale, bias, dropout_p, seed)
    return _forward_impl(x, weight, lora_A, lora_B, scale, bias, dropout_p, seed)


def _eager_backward(dy, x, weight, lora_A, lora_B, s_lora, seed, scale, dropout_p, need_dx):
    if _replay_ok(dy):
        return replay.run(replay.BWD, [dy, x, weight, lora_A, lora_B, s_lora, seed], [scale, dropout_p],
                          [int(need_dx), int(_few_rows_captured(x, lora_A.shape[0]))], _backward_impl,
                          dy, x, weight, lora_A, lora_B, s_lora, seed, scale, dropout_p, need_dx)
    return _backward_impl(dy, x, weight, lora_A, lora_B, s_lora, seed, scale, dropout_p, need_dx)


def _raw_launches():
    """Launch kernels directly, as triton_op's own eager body does: wrap_triton's tracing wrapper
    costs ~200 us per launch on the H100 host (measured), and there is nothing to trace here."""
    if HAS_TRITON:
        from torch._library.triton import set_wrap_triton_enabled

        return set_wrap_triton_enabled(False)
    return contextlib.nullcontext()


def _use_eager_path(*tensors) -> bool:
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


# ================================================================================================
# functional API
# ================================================================================================
def _check_inputs(x, weight, lora_A, lora_B, scale, bias, dropout_p, dtypes: bool = True) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"lora_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"lora_linear: scale must be a finite Python number, got {scale!r}")
    if isinstance(dropout_p, torch.Tensor) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have at least one dimension [..., K], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features (last dim) but weight is [N, K] = "
                         f"{tuple(weight.shape)}; expected x.shape[-1] == {K}")
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"lora_linear: lora_A must be 2-D [r, K] and lora_B 2-D [N, r], got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError("lora_linear: rank r = lora_A.shape[0] is 0; LoRA needs r >= 1")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_linear: lora_A is {tuple(lora_A.shape)} but must be [r, K] with K = {K} "
                         "(the in_features of weight)")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_linear: lora_B is {tuple(lora_B.shape)} but must be [N, r] = ({N}, {r}) "
                         f"(N = out_features of weight, r = lora_A.shape[0])")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"lora_linear: bias is {tuple(bias.shape)} but must be [N] = ({N},)")
    devices = {t.device for t in (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"lora_linear: all tensors must be on one device, got {sorted(map(str, devices))}")
    if dtypes:
        _check_dtypes(x, weight, lora_A, lora_B, bias)


def _check_dtypes(x, weight, lora_A, lora_B, bias) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"lora_linear: x must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"lora_linear: weight{' and bias' if bias is not None else ''} must have x's dtype "
                        f"{x.dtype}, got {weight.dtype}{'' if bias is None else ' and ' + str(bias.dtype)}")
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_linear: lora_A and lora_B must share one dtype, either x's ({x.dtype}) or "
                        f"float32, got {lora_A.dtype} and {lora_B.dtype}")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias + scale * (dropout(x, dropout_p) @ lora_A.T) @ lora_B.T

    x [..., K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] or None -> y [..., N].
    `scale` is alpha / r (or alpha / sqrt(r) for rsLoRA). Dropout touches the LoRA path only, is
    applied whenever dropout_p > 0 (the caller decides training vs eval), and draws its seed from
    `generator` or torch's default generator for x's device. Gradients flow to x, lora_A, lora_B,
    and to weight and bias when they require grad.

    dtypes: x, weight and bias share float16, bfloat16 or float32; lora_A and lora_B are x's dtype or
    float32 (PEFT's default keeps adapters in float32). Under torch.autocast, x, weight and bias
    are cast to the autocast dtype first, as F.linear would be.
    """
    autocast = torch.is_autocast_enabled(x.device.type) if isinstance(x, torch.Tensor) else False
    _check_inputs(x, weight, lora_A, lora_B, scale, bias, dropout_p, dtypes=not autocast)
    if autocast:  # cast as autocast casts F.linear's inputs; fp32 adapters stay fp32 (PEFT's default)
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        if lora_A.dtype != torch.float32 or lora_B.dtype != torch.float32:
            lora_A, lora_B = lora_A.to(dt), lora_B.to(dt)
        _check_dtypes(x, weight, lora_A, lora_B, bias)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, lora_A, lora_B, scale, bias, dropout_p, generator=generator)
    flat = x.dim() == 2  # no reshapes (~2 us of host time each) for the common 2-D call
    x2d = x if flat else x.reshape(-1, x.shape[-1])
    seed = draw_seed(x.device, generator) if dropout_p > 0 else None
    if _decode_path(x2d, weight, lora_A, lora_B, bias, dropout_p):
        y = _decode_cublas(x2d, weight, lora_A, lora_B, float(scale), bias)
    elif _use_eager_path(x2d, weight, lora_A, lora_B, bias):
        y = _EagerLoRALinear.apply(x2d, weight, lora_A, lora_B, float(scale), bias, float(dropout_p), seed)
    else:
        y, _ = _lora_linear_op(x2d, weight, lora_A, lora_B, float(scale), bias, float(dropout_p), seed)
    return y if flat else y.reshape(*x.shape[:-1], weight.shape[0])


def dispatch_reason(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float = 0.0) -> tuple[str, str]:
    """(backend, reason) that `lora_linear` would use for these tensors, called here and now (grad
    mode, CUDA-graph capture; weight and bias taken as frozen): "triton", "torch", or "cublas" for
    the eager inference path of few rows (see DECODE_ROWS)."""
    backend, reason = _backend.choose(x.device)
    rows = x.reshape(-1, x.shape[-1])
    if backend == "triton" and _decode_path(rows, None, lora_A, None, None, dropout_p):
        return "cublas", (f"eager inference (no gradient, no dropout) of {rows.shape[0]} <= {DECODE_ROWS} rows: "
                          "three cuBLAS calls cost less host time than the kernels' launches")
    if backend == "triton" and lora_A.shape[0] > MAX_TRITON_RANK:
        return "torch", f"rank {lora_A.shape[0]} > {MAX_TRITON_RANK}, the largest the Triton kernels take"
    return backend, reason
