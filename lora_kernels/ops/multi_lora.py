"""Multi-adapter LoRA: every row of a batch uses its own adapter (or none).

    y[i] = s[idx[i]] * (x[i] @ A[idx[i], :r].T) @ B[idx[i], :, :r].T,  r = ranks[idx[i]];  0 where idx[i] = -1
        x [M, K] (or [..., K], one index per row of the flattened x), A [L, r_max, K], B [L, N, r_max],
        idx [M] int in [-1, L), s [L] float, ranks [L] int or None (= r_max for every adapter)

This file holds the public API and a PyTorch reference implementation (a loop over the adapters in
use). The C++/CUDA extension (csrc/) provides the fast kernels behind the same API.
"""
from __future__ import annotations

import torch


def _check(x, lora_A, lora_B, indices, scales, ranks):
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("indices", indices), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"multi_lora: {name} must be a torch.Tensor, got {type(t).__name__}")
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"multi_lora: lora_A must be [L, r_max, K] and lora_B [L, N, r_max], got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    L, r_max, K = lora_A.shape
    if x.shape[-1] != K:
        raise ValueError(f"multi_lora: x has {x.shape[-1]} features but lora_A is [L, r_max, K] = {tuple(lora_A.shape)}")
    if lora_B.shape[0] != L or lora_B.shape[2] != r_max:
        raise ValueError(f"multi_lora: lora_B is {tuple(lora_B.shape)}, expected [L, N, r_max] with L = {L}, r_max = {r_max}")
    M = x.numel() // K if K else 0
    if indices.dim() != 1 or indices.shape[0] != M or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"multi_lora: indices must be a 1-D int32/int64 tensor with one entry per row ({M}), "
                         f"got {tuple(indices.shape)} {indices.dtype}")
    if scales.shape != (L,):
        raise ValueError(f"multi_lora: scales must be [L] = ({L},), got {tuple(scales.shape)}")
    if M and (int(indices.min()) < -1 or int(indices.max()) >= L):
        raise IndexError(f"multi_lora: indices must lie in [-1, {L}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    if ranks is not None:
        if ranks.shape != (L,):
            raise ValueError(f"multi_lora: ranks must be [L] = ({L},), got {tuple(ranks.shape)}")
        if L and (int(ranks.min()) < 1 or int(ranks.max()) > r_max):
            raise ValueError(f"multi_lora: ranks must lie in [1, r_max = {r_max}]")


def multi_lora_reference(x, lora_A, lora_B, indices, scales, ranks=None):
    """PyTorch reference: a loop over the adapters in use (differentiable through autograd)."""
    K = x.shape[-1]
    N = lora_B.shape[1]
    x2d = x.reshape(-1, K)
    out = x2d.new_zeros((x2d.shape[0], N))
    for l in torch.unique(indices).tolist():
        if l < 0:
            continue
        r = int(ranks[l]) if ranks is not None else lora_A.shape[1]
        rows = (indices == l).nonzero().squeeze(1)
        delta = (x2d[rows] @ lora_A[l, :r].t()) @ lora_B[l, :, :r].t() * scales[l].to(x.dtype)
        out = out.index_add(0, rows, delta.to(out.dtype))
    return out.reshape(*x.shape[:-1], N)


def multi_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, indices: torch.Tensor,
               scales: torch.Tensor, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """The LoRA term alone, each row with its own adapter: see the module docstring. [..., N]"""
    _check(x, lora_A, lora_B, indices, scales, ranks)
    return multi_lora_reference(x, lora_A, lora_B, indices, scales, ranks)


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      indices: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                      ranks: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias + multi_lora(x, ...): the base linear with each row's adapter. [..., N]"""
    return torch.nn.functional.linear(x, weight, bias) + multi_lora(x, lora_A, lora_B, indices, scales, ranks)
