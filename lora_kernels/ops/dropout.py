"""The dropout mask of the LoRA path: defined by (seed, row, column), never stored.

Definition (the Triton kernels and the PyTorch path below compute the same bits):
    x viewed as [M, K]; element (m, k) with k = 8 g + j, j in 0..7
    (r0, r1, r2, r3) = Philox4x32-7(key = (seed & 0xffffffff, seed >> 32),
                                    counter = (g, m & 0xffffffff, m >> 32, 0))
    u(m, k) = (r_{j // 2} >> (16 * (j % 2))) & 0xffff          16 random bits per element
    keep(m, k) = u >= t,  t = round(p * 2^16)                  P(keep) = 1 - t / 2^16
    drop(x) = x * keep / (1 - t / 2^16)                        so E[drop(x)] = x exactly

16 bits per element, so one Philox call serves 8 neighbouring columns: a kernel pays 1/8 of a
Philox per element (FlashAttention's dropout uses 8 bits). The probability applied is p rounded to
a multiple of 2^-16 (|error| <= 7.7e-6, e.g. 0.05 -> 0.0500030518), and the rescale uses that same
value. 7 rounds, not Triton's default 10: Philox4x32-7 is the fewest rounds that Random123
(Salmon et al., SC'11) reports passing BigCrush, and the rounds are the kernels' integer work.

The seed is a 1-element int64 tensor drawn from torch's generator for the tensors' device
(`draw_seed`), so `torch.manual_seed` makes runs reproducible, and CUDA-graph replays and
torch.compile draw a fresh seed each call instead of baking one in.
"""
from __future__ import annotations

import functools

import torch

PHILOX_ROUNDS = 7
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_M32 = 0xFFFFFFFF
_SEED_HIGH = 2**62  # seeds in [0, 2^62): any 64-bit key works, this keeps them positive int64


@functools.lru_cache(maxsize=64)  # called several times per launch sequence; ~1 us each uncached
def keep_threshold(p: float) -> int:
    """Integer threshold t with keep = (16 random bits) >= t, so P(keep) = 1 - t / 2^16."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(round(p * 2**16)), 2**16 - 1)


@functools.lru_cache(maxsize=64)
def keep_scale(p: float) -> float:
    """1 / P(keep) for the probability actually applied (p rounded to a multiple of 2^-16)."""
    return 1.0 / (1.0 - keep_threshold(p) / 2**16)


def draw_seed(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw the 1-element int64 seed tensor exactly as `lora_linear` does, on `device`."""
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device, generator=generator)


# ----------------------------------------------------------------------------------------------
# PyTorch reference: uint32 arithmetic emulated in int64 (products split into 16-bit halves so
# nothing overflows). Slow but exact; it is the fallback path's mask and the tests' oracle.
# ----------------------------------------------------------------------------------------------
def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * b) >> 32 and (a * b) & 0xffffffff for a uint32 constant a and uint32 values b."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    t_lo = a * b_lo  # < 2^48
    t_hi = a * b_hi  # < 2^48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _M32
    return hi, lo


def _philox4x32(seed, c0, c1, c2, c3, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; `seed` an int or an int64 tensor."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def dropout_mask(seed: torch.Tensor | int, rows: int, cols: int, p: float,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The keep-mask [rows, cols] (bool) of the LoRA dropout for `seed`, as the kernels draw it.

    `seed` is the tensor from `draw_seed` (or its int value). Rows are x's leading dims flattened.
    """
    thr = keep_threshold(p)
    if isinstance(seed, torch.Tensor):  # stays a tensor: no host sync, traceable, graph-safe
        device = seed.device if device is None else torch.device(device)
        seed = seed.reshape(-1)[:1].to(device=device, dtype=torch.int64)
    device = torch.device("cpu") if device is None else torch.device(device)
    if rows == 0 or cols == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    groups = (cols + 7) // 8
    m = torch.arange(rows, dtype=torch.int64, device=device).view(rows, 1).expand(rows, groups)
    g = torch.arange(groups, dtype=torch.int64, device=device).view(1, groups).expand(rows, groups)
    zero = torch.zeros_like(m)
    r = _philox4x32(seed, g, m & _M32, m >> 32, zero)
    halves = [h for w in r for h in (w & 0xFFFF, w >> 16)]  # j = 2 i + half <- r_i's half
    bits = torch.stack(halves, dim=-1).reshape(rows, groups * 8)[:, :cols]  # column 8 g + j
    return bits >= thr
