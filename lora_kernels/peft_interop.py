"""Run PEFT's LoRA layers through the fused op, keeping PEFT's own module objects.

    y = x @ W.T + b + sum_{a active} scaling[a] * (lora_dropout[a](x) @ lora_A[a].weight.T) @ lora_B[a].weight.T
        x [..., in], W [out, in] = base_layer.weight, lora_A[a].weight [r, in], lora_B[a].weight [out, r]

A `peft.tuners.lora.Linear` is accelerated by switching its class to `FusedPeftLinear`, a subclass
that only overrides `forward`: the object, its parameters, adapters, scalings, active set and every
PEFT method (save_pretrained, merge_and_unload, set_adapter, disable_adapter, ...) stay the same.
`restore` switches the class back.

Which layers take the fused path is a visible decision: `unsupported_reason(layer)` says why a
layer keeps PEFT's path (DoRA and other LoRA variants, lora_bias, fan_in_fan_out, quantized or
non-Linear base layers, hooked base layers); patch() reports it. Adapters added later with such a
feature are caught again at run time, per call, and go through PEFT's forward.
"""
from __future__ import annotations

import torch
from peft.tuners.lora import Linear as PeftLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layers import LoraTerm, base_linear_reason, batch_plan, fused_lora_forward, mixed_lora_forward, plan_names

PEFT_BASE_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names


def _variant_reason(layer: PeftLinear, names) -> str | None:
    for a in names:
        if a in layer.lora_variant:
            kind = "DoRA" if layer.use_dora.get(a, False) else type(layer.lora_variant[a]).__name__
            return f"adapter {a!r} uses {kind}"
        if layer.lora_bias.get(a, False):
            return f"adapter {a!r} has lora_bias=True"
        drop = layer.lora_dropout[a] if a in layer.lora_dropout else None
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            return f"adapter {a!r} has dropout module {type(drop).__name__}"
    return None


def unsupported_reason(layer: nn.Module) -> str | None:
    """None when this PEFT LoRA layer can run the fused path, else the reason it keeps PEFT's."""
    if not isinstance(layer, LoraLayer):
        return f"{type(layer).__name__} is not a PEFT LoRA layer"
    if not isinstance(layer, PeftLinear):
        return (f"{type(layer).__module__}.{type(layer).__name__}: the fused path takes peft lora.Linear only "
                "(this base layer is quantized or not a Linear)")
    if isinstance(layer.base_layer, BaseTunerLayer):
        return "nested PEFT layers (a tuner layer inside another)"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out=True (Conv1D-style weight)"
    reason = base_linear_reason(layer.base_layer)
    if reason is not None:
        return reason
    return _variant_reason(layer, list(layer.lora_A.keys()))


def _dropout_p(drop: nn.Module) -> float:
    return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0


class FusedPeftLinear(PeftLinear):
    """PEFT's lora.Linear whose forward runs lora_kernels' fused op (same object, same parameters).

    Mirrors PEFT's forward: disabled adapters -> base layer (unmerging first), merged -> base layer,
    else the active adapters with their scaling and dropout (only in training mode, as nn.Dropout).
    `adapter_names=[...]` (PEFT's mixed batch, "__base__" = none) and lora_kernels.adapter_batch run
    lora_kernels.multi_lora_linear, without dropout. Anything else goes to PEFT's own forward.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.get("adapter_names")
        if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, **kwargs)
        base = self.base_layer
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x)
        plan = self.__dict__.get("_lora_batch")
        if plan is None and adapter_names is not None:
            plan = batch_plan(self, [None if n == PEFT_BASE_NAME else n for n in adapter_names])
        if plan is not None:
            if self.merged:
                raise RuntimeError("adapter_batch cannot run on a layer with merged adapters; unmerge first")
            if _variant_reason(self, plan.adapters) is not None:
                return super().forward(x, adapter_names=[a if a is not None else PEFT_BASE_NAME
                                                         for a in plan_names(plan)])
            return mixed_lora_forward(x, base.weight, base.bias, [self.lora_A[a].weight for a in plan.adapters],
                                      [self.lora_B[a].weight for a in plan.adapters], plan)
        if self.merged:
            return base(x)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if _variant_reason(self, active) is not None:
            return super().forward(x)
        terms = [LoraTerm(self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a],
                          _dropout_p(self.lora_dropout[a])) for a in active]
        return fused_lora_forward(x, base.weight, base.bias, terms)

    def adapter_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]

    def held_adapters(self) -> list[str]:
        return list(self.lora_A.keys())


def accelerate(layer: PeftLinear) -> None:
    """Switch one supported PEFT lora.Linear to the fused forward (in place)."""
    if type(layer) is not PeftLinear:
        raise TypeError(f"expected a peft.tuners.lora.Linear, got {type(layer).__name__}")
    layer.__class__ = FusedPeftLinear


def restore(layer: FusedPeftLinear) -> None:
    """Give the layer PEFT's own forward back."""
    layer.__dict__.pop("_lora_batch", None)
    layer.__class__ = PeftLinear
