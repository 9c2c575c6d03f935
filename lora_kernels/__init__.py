"""lora_kernels: fused LoRA for PyTorch.

    y = x @ W.T + b + scale * (dropout(x) @ A.T) @ B.T    x [..., K], W [N, K], A [r, K], B [N, r]

`lora_linear` is the fused op (Triton on CUDA, PyTorch elsewhere; LORA_KERNELS_BACKEND=torch|triton
forces one). `dropout_mask` / `dropout_seed` reproduce the in-kernel dropout mask for checks.
"""
from .ops.dropout import dropout_mask
from .ops.dropout import draw_seed as dropout_seed
from .ops.lora_linear import dispatch_reason, lora_linear
from .ops.multi_lora import choose_regime as multi_lora_regime
from .ops.multi_lora import RowIndex, multi_lora, multi_lora_dispatch, multi_lora_linear, multi_lora_reference
from .layers import LoRALinear
from .patch import PatchReport, adapter_batch, merge, patch, set_adapter, unpatch
from .adapters import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "lora_linear", "dropout_mask", "dropout_seed", "dispatch_reason",
    "multi_lora", "multi_lora_linear", "multi_lora_reference", "multi_lora_dispatch", "multi_lora_regime",
    "RowIndex",
    "LoRALinear", "patch", "unpatch", "merge", "set_adapter", "adapter_batch", "PatchReport",
    "save_adapter", "load_adapter",
    "__version__",
]
