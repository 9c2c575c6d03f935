"""Which implementation runs an op, the Triton kernels or plain PyTorch, and why.

`LORA_KERNELS_BACKEND=torch|triton|auto` (default auto) forces one path:
  auto    Triton on CUDA tensors when Triton imports, PyTorch otherwise (CPU, no Triton).
  triton  Triton always; on CPU tensors this needs TRITON_INTERPRET=1 set before lora_kernels is
          imported (the interpreter runs the same kernels with NumPy, slowly: small sizes only).
  torch   the plain PyTorch implementation everywhere (same maths, same dropout mask).
"""
from __future__ import annotations

import functools
import os

import torch

BACKEND_ENV = "LORA_KERNELS_BACKEND"
_CHOICES = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when Triton imports, else the reason it does not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not understood; expected one of {', '.join(_CHOICES)}")
    return value


def choose(device: torch.device) -> tuple[str, str]:
    """Return (backend, reason) for tensors on `device`: backend is "triton" or "torch"."""
    want = requested()
    if want == "torch":
        return "torch", f"{BACKEND_ENV}=torch"
    err = triton_import_error()
    if err is not None:
        if want == "triton":
            raise RuntimeError(f"{BACKEND_ENV}=triton but {err}")
        return "torch", err
    if device.type == "cuda":
        return "triton", "CUDA tensors and Triton available"
    if interpreting():
        return "triton", "TRITON_INTERPRET=1: Triton kernels run on the CPU interpreter"
    if want == "triton":
        raise RuntimeError(
            f"{BACKEND_ENV}=triton with {device.type} tensors needs TRITON_INTERPRET=1 set before "
            "lora_kernels is imported (or CUDA tensors)"
        )
    return "torch", f"{device.type} tensors: Triton kernels need CUDA (or TRITON_INTERPRET=1)"
