"""LoRALinear: an nn.Linear with named LoRA adapters, computed by the fused op.

    y = x @ W.T + b + sum_{a in active} s_a * (drop_a(x) @ A_a.T) @ B_a.T
        x [..., K], W [N, K] and b [N] shared with the wrapped nn.Linear, A_a [r_a, K], B_a [N, r_a],
        s_a = alpha_a / r_a (rsLoRA: alpha_a / sqrt(r_a))

The wrapped layer's weight and bias are the same Parameter objects (never copied), registered here
under the same names, so a patched model's state_dict keeps the base keys (`...q_proj.weight`) and
adds `...q_proj.lora_A.<name>` [r, K] / `...q_proj.lora_B.<name>` [N, r].

The helpers `fused_lora_forward` and `mixed_lora_forward` are shared with the PEFT interop
(peft_interop.py), so a PEFT lora.Linear and a LoRALinear run exactly the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops.lora_linear import lora_linear
from .ops.multi_lora import RowIndex, multi_lora_linear_rows

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INITS = ("default", "gaussian")
_RESERVED_NAMES = frozenset(dir(nn.ParameterDict()))  # ParameterDict keys become attributes


# ================================================================================================
# shared forward paths
# ================================================================================================
@dataclass(frozen=True)
class LoraTerm:
    """One adapter's share of a forward: s * (drop(x) @ A.T) @ B.T with A [r, K], B [N, r]."""
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout_p: float  # already 0.0 outside training


def fused_lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       terms: Sequence[LoraTerm]) -> torch.Tensor:
    """y = x @ W.T + b + sum_i s_i * (drop_i(x) @ A_i.T) @ B_i.T    x [..., K], W [N, K] -> y [..., N]

    One adapter: one call of the fused op. Several adapters with one dropout rate: their factors are
    concatenated along r (A_cat [sum r, K], B_cat [N, sum r], scales folded into B_cat when they
    differ), still one fused call; they then share one dropout mask, each adapter still sees dropout
    of rate p. Several adapters with different rates: the first goes through the fused op, the others
    are added as plain PyTorch terms with their own masks.
    """
    if not terms:
        return F.linear(x, weight, bias)
    if len(terms) == 1:  # lora_linear applies autocast itself, as F.linear would
        t = terms[0]
        return lora_linear(x, weight, t.A, t.B, t.scale, bias, t.dropout_p)
    dtype = torch.float32 if any(t.A.dtype == torch.float32 for t in terms) else terms[0].A.dtype
    if len({t.dropout_p for t in terms}) == 1:
        same_scale = len({t.scale for t in terms}) == 1
        A = torch.cat([t.A.to(dtype) for t in terms], dim=0)
        B = torch.cat([t.B.to(dtype) if same_scale else t.B.to(dtype) * t.scale for t in terms], dim=1)
        return lora_linear(x, weight, A, B, terms[0].scale if same_scale else 1.0, bias, terms[0].dropout_p)
    first, rest = terms[0], terms[1:]
    y = lora_linear(x, weight, first.A, first.B, first.scale, bias, first.dropout_p)
    for t in rest:
        h = F.dropout(x.to(t.A.dtype), t.dropout_p) if t.dropout_p > 0 else x.to(t.A.dtype)
        y = y + (F.linear(F.linear(h, t.A), t.B) * t.scale).to(y.dtype)
    return y


def stack_adapters(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad each adapter to r_max with zeros and stack: A [L, r_max, K], B [L, N, r_max] in `dtype`.

    No autograd graph (see stacked_adapters for the differentiable, cached form). Equal ranks: one
    stack and one cast per factor; else one zero fill and one copy per adapter.
    """
    ranks = [a.shape[0] for a in As]
    r_max = max(ranks)
    with torch.no_grad():
        if all(r == r_max for r in ranks):
            return torch.stack(list(As)).to(dtype), torch.stack(list(Bs)).to(dtype)
        A = As[0].new_zeros((len(As), r_max, As[0].shape[1]), dtype=dtype)
        B = Bs[0].new_zeros((len(Bs), Bs[0].shape[0], r_max), dtype=dtype)
        for l, (a, b) in enumerate(zip(As, Bs)):
            A[l, : a.shape[0]].copy_(a)
            B[l, :, : b.shape[1]].copy_(b)
        return A, B


class _StackedGrad(torch.autograd.Function):
    """Identity on the stacked (A, B); backward hands adapter l its slice dA[l, :r_l], dB[l, :, :r_l],
    cast once per dtype (not once per adapter) to the adapters' own dtype."""

    @staticmethod
    def forward(ctx, A, B, n, *params):
        ctx.n = n
        ctx.shapes = [p.shape for p in params]
        ctx.dtypes = [p.dtype for p in params]
        # equal ranks in one dtype (the usual batch): dA.unbind(0) gives every adapter's slice in one
        # call. The per-adapter slicing below costs two indexing calls per adapter in every layer's
        # backward: 28 layers x 8 adapters in the benchmark's mixed training step, whose host time,
        # not its GPU time, sets the step's length
        ctx.uniform = len(set(ctx.dtypes)) == 1 and all(s[0] == A.shape[1] for s in ctx.shapes[:n])
        return A.view_as(A), B.view_as(B)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dA, dB):
        n = ctx.n
        if ctx.uniform:
            dt = ctx.dtypes[0]
            return (None, None, None, *(dA.to(dt).unbind(0) if dA is not None else (None,) * n),
                    *(dB.to(dt).unbind(0) if dB is not None else (None,) * n))
        grads = []
        for g, shapes, dtypes, is_a in ((dA, ctx.shapes[:n], ctx.dtypes[:n], True),
                                        (dB, ctx.shapes[n:], ctx.dtypes[n:], False)):
            cast = {dt: g.to(dt) for dt in set(dtypes)} if g is not None else {}
            for l, (shape, dt) in enumerate(zip(shapes, dtypes)):
                if g is None:
                    grads.append(None)
                else:
                    grads.append(cast[dt][l, : shape[0]] if is_a else cast[dt][l, :, : shape[1]])
        return (None, None, None, *grads)


def stacked_adapters(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], dtype: torch.dtype,
                     cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """stack_adapters, differentiable: each A_l / B_l receives the gradient of its own slice.

    With `cache` (a dict the caller keeps, e.g. one per layer for one adapter_batch), the stacked
    copy is kept and reused while no adapter changed: the key holds each adapter's storage and
    version counter, which every in-place write (an optimizer step, load_adapter) bumps. A serving
    batch then stacks once, not on every forward; a training step, whose optimizer changes the
    adapters, restacks once per step. Memory: the used adapters once more, in `dtype`.
    """
    params = (*As, *Bs)
    key = (dtype,) + tuple((p.data_ptr(), p._version, tuple(p.shape)) for p in params)
    if cache is not None and cache.get("key") == key:
        A, B = cache["A"], cache["B"]
    else:
        A, B = stack_adapters(As, Bs, dtype)
        if cache is not None:
            cache.update(key=key, A=A, B=B)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return _StackedGrad.apply(A, B, len(As), *params)
    return A, B


class PlanRows:
    """A batch's row indices per tokens-per-sequence count, shared by the layers whose plans have the
    same seq_index: built, value-checked and sorted (see RowIndex) once per batch, not per layer."""

    MAX_KEPT = 8  # distinct T kept at once: generate's prefill and its one-token steps, with room

    def __init__(self, seq_index: torch.Tensor):
        self.seq_index = seq_index
        self._by_t: dict[int, RowIndex] = {}

    def get(self, t: int) -> RowIndex:
        """The RowIndex of x [n_seq, t, K] (flattened: sequence b's rows all carry seq_index[b])."""
        rows = self._by_t.get(t)
        if rows is None:
            if len(self._by_t) >= self.MAX_KEPT:
                self._by_t.clear()
            rows = self._by_t[t] = RowIndex(self.seq_index.repeat_interleave(t))
        return rows


@dataclass(frozen=True)
class BatchPlan:
    """What adapter_batch tells one layer, built once on entry (no host-to-device copies per step).

    adapters: the names this layer holds that the batch uses, in stacking order (L of them);
    seq_index [n_seq] int64: each sequence's position in `adapters`, -1 for none;
    scales [L] float32 and ranks [L] int64: on the layer's device;
    rows: the row indices (shared with the other layers of the batch with this seq_index);
    stack: this layer's cache of stacked adapters (see stacked_adapters).
    """
    adapters: tuple[str, ...]
    seq_index: torch.Tensor
    scales: torch.Tensor
    ranks: torch.Tensor
    rows: PlanRows
    stack: dict = field(default_factory=dict, compare=False, repr=False)


def mixed_lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], plan: BatchPlan) -> torch.Tensor:
    """y[b] = x[b] @ W.T + bias + s_l * (x[b] @ A_l.T) @ B_l.T with l = plan.seq_index[b] (-1: none)

    x [n_seq, ..., K] (one adapter per leading index, e.g. [B, T, K]), W [N, K], A_l [r_l, K],
    B_l [N, r_l] (the layer's adapters named in plan.adapters) -> y [n_seq, ..., N]. No dropout.
    Runs lora_kernels.multi_lora_linear on the zero-padded stack (see stacked_adapters, kept in the
    plan while the adapters are unchanged), rows of sequence b all with index seq_index[b].
    """
    n_seq = plan.seq_index.shape[0]
    if x.dim() < 2 or x.shape[0] != n_seq:
        raise ValueError(f"adapter_batch: {n_seq} adapter names were given but this layer sees a batch of "
                         f"{x.shape[0] if x.dim() >= 2 else 'no'} sequences (x {tuple(x.shape)}); expected "
                         "x [n_seq, ..., K] with one name per sequence")
    if not As:
        return F.linear(x, weight, bias)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # cast here so every implementation behind the API sees one dtype
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return mixed_lora_forward(x, weight, bias, As, Bs, plan)
    traced = torch.compiler.is_compiling()  # no Python-side caches inside a traced graph
    A, B = stacked_adapters(As, Bs, x.dtype, None if traced else plan.stack)
    t = math.prod(x.shape[1:-1])
    rows = RowIndex(plan.seq_index.repeat_interleave(t)) if traced else plan.rows.get(t)
    return multi_lora_linear_rows(x, weight, A, B, rows, plan.scales, bias, plan.ranks)


def batch_plan(layer: nn.Module, names: Sequence[str | None], shared: dict | None = None) -> BatchPlan:
    """The BatchPlan of one layer (LoRALinear or FusedPeftLinear) for per-sequence adapter `names`.

    A name this layer does not hold maps to -1 there (that adapter does not target this layer), as
    does None; adapter_batch rejects names that no layer of the model holds. `shared` (a dict the
    caller keeps for one batch) lets layers with the same seq_index share one PlanRows.
    """
    held = set(layer.held_adapters())
    used = [n for n in dict.fromkeys(names) if n is not None and n in held]
    pos = {n: i for i, n in enumerate(used)}
    dev = layer.weight.device
    tensors = [layer.adapter_tensors(n) for n in used]
    seq = [pos.get(n, -1) if n is not None else -1 for n in names]
    shared = {} if shared is None else shared
    rows = shared.get((tuple(seq), dev))
    if rows is None:
        rows = shared[(tuple(seq), dev)] = PlanRows(torch.tensor(seq, dtype=torch.int64, device=dev))
    return BatchPlan(
        adapters=tuple(used),
        seq_index=rows.seq_index,
        scales=torch.tensor([t[2] for t in tensors], dtype=torch.float32, device=dev),
        ranks=torch.tensor([t[0].shape[0] for t in tensors], dtype=torch.int64, device=dev),
        rows=rows,
    )


def plan_names(plan: BatchPlan) -> list[str | None]:
    """The per-sequence adapter names a plan encodes (None = no adapter)."""
    return [plan.adapters[i] if i >= 0 else None for i in plan.seq_index.tolist()]


def base_linear_reason(base: nn.Module) -> str | None:
    """None when `base` is a plain nn.Linear the fused op can read W / b from, else why not."""
    if not isinstance(base, nn.Linear):
        return f"base layer is {type(base).__name__}, not an nn.Linear"
    w = base.weight
    if type(w.data) is not torch.Tensor:
        return f"base weight is a {type(w.data).__name__} (tensor subclass: quantized or sharded)"
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"base weight dtype is {w.dtype} (quantized?); the fused op takes float16/bfloat16/float32"
    if hasattr(base, "_hf_hook") or "forward" in base.__dict__:
        return "base layer has its forward replaced (accelerate offload / device-map hook)"
    if base._forward_hooks or base._forward_pre_hooks:
        return "base layer has forward hooks, which the fused op would skip"
    return None


# ================================================================================================
# the module
# ================================================================================================
@dataclass
class AdapterConfig:
    """Hyper-parameters of one adapter: scale = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r: int
    alpha: float
    dropout: float
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def check_adapter_args(r, alpha, dropout, in_features: int, out_features: int, where: str = "") -> float:
    """Validate LoRA hyper-parameters; returns alpha (2 * r when None). `where` names the layer."""
    at = f" for {where}" if where else ""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"LoRA rank r must be an int, got {r!r}{at}")
    if r <= 0:
        raise ValueError(f"LoRA rank r must be >= 1, got r = {r}{at}")
    if r > min(in_features, out_features):
        raise ValueError(f"LoRA rank r = {r} is larger than {f'layer {where}' if where else 'the layer'} "
                         f"({in_features} -> {out_features}); "
                         f"expected r <= min(in_features, out_features) = {min(in_features, out_features)}")
    alpha = 2 * r if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"lora alpha must be a finite number or None (= 2 * r), got {alpha!r}{at}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be a number in [0, 1), got {dropout!r}{at}")
    return alpha


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name or name in _RESERVED_NAMES:
        raise ValueError(f"adapter name must be a non-empty string without '.' that is not an attribute of "
                         f"nn.ParameterDict, got {name!r}")


class LoRALinear(nn.Module):
    """nn.Linear plus named LoRA adapters; forward runs the fused op (lora_kernels.lora_linear).

        y = x @ W.T + b + sum_{a active, not merged} s_a * (drop_a(x) @ A_a.T) @ B_a.T
            x [..., in_features], W [out, in], b [out], A_a [r_a, in], B_a [out, r_a]

    `weight` / `bias` are the wrapped layer's own Parameters. Dropout applies in training mode only.
    Adapters live in `lora_A` / `lora_B` (nn.ParameterDict), their settings in `adapters`; the active
    set is `active_adapters`. Inside `lora_kernels.adapter_batch(...)` each sequence of the batch uses
    its own adapter instead (no dropout then). disable_adapters() wins over both: base layer only.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.register_parameter("weight", base.weight)  # the same Parameters: shared, never copied
        self.register_parameter("bias", base.bias)
        object.__setattr__(self, "_base", base)  # kept for unwrap(), not registered: no duplicate keys
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.adapters: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_enabled = True
        self._lora_batch: BatchPlan | None = None
        self.train(base.training)

    # --------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, alpha: float | None = None, dropout: float = 0.05,
                    use_rslora: bool = False, init: str = "default", adapter_name: str = "default",
                    dtype: torch.dtype | None = None) -> "LoRALinear":
        """Wrap `linear` with one active adapter `adapter_name`.

        alpha None -> 2 * r (InternVL / LLaVA). init "default": A kaiming-uniform (a = sqrt(5)), B = 0;
        "gaussian": A ~ N(0, 1/r^2), B = 0 (both PEFT's), so a fresh adapter leaves the output unchanged.
        dtype None -> float32 when the layer is float16 / bfloat16 (PEFT's default), else the layer's.
        The shared weight's requires_grad is left as it is (patch() freezes the base).
        """
        m = cls(linear)
        m.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, dtype=dtype)
        m.set_adapter(adapter_name)
        return m

    def add_adapter(self, name: str, r: int = 16, alpha: float | None = None, dropout: float = 0.05,
                    use_rslora: bool = False, init: str = "default", dtype: torch.dtype | None = None) -> None:
        """Add adapter `name` (A [r, in], B [out, r]); it becomes active if no adapter is active yet."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete_adapter() it first")
        alpha = check_adapter_args(r, alpha, dropout, self.in_features, self.out_features)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if dtype is None:
            dtype = torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"adapter dtype must be float16, bfloat16 or float32, got {dtype}")
        dev = self.weight.device
        A = torch.empty(r, self.in_features, device=dev, dtype=dtype)
        B = torch.zeros(self.out_features, r, device=dev, dtype=dtype)
        if dev.type != "meta":
            if init == "default":
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            else:
                nn.init.normal_(A, std=1.0 / r)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.adapters[name] = AdapterConfig(r=r, alpha=float(alpha), dropout=float(dropout), use_rslora=use_rslora)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the weight; unmerge() before deleting it")
        del self.lora_A[name], self.lora_B[name], self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_adapter(self, names: str | Iterable[str]) -> None:
        """Make `names` (one name or several) the active adapters."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._require(n)
        if self.merged_adapters and set(names) != set(self.merged_adapters):
            raise RuntimeError(f"adapters {self.merged_adapters} are merged into the weight; unmerge() before "
                               "changing the active adapters")
        self.active_adapters = names

    def enable_adapters(self) -> None:
        self.adapters_enabled = True

    def disable_adapters(self) -> None:
        """Base layer only. Merged adapters are unmerged first, since W holds them."""
        if self.merged_adapters:
            self.unmerge()
        self.adapters_enabled = False

    def _require(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r} on this layer; it has {sorted(self.adapters)}")

    # --------------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B @ A in float32: [out, in]."""
        cfg = self.adapters[name]
        return (self.lora_B[name].detach().float() @ self.lora_A[name].detach().float()) * cfg.scale

    @torch.no_grad()
    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        """W <- W + s * B @ A for the active (or given) adapters, summed in float32, rounded once."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        for n in names:
            self._require(n)
        w = self.weight.float()
        for n in names:
            w += self.delta_weight(n).to(w.device)
        self.weight.copy_(w)  # in place: the Parameter and its storage stay shared
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s * B @ A for the merged adapters, in float32: W comes back up to one rounding of its dtype."""
        if not self.merged_adapters:
            return
        w = self.weight.float()
        for n in reversed(self.merged_adapters):
            w -= self.delta_weight(n).to(w.device)
        self.weight.copy_(w)
        self.merged_adapters = []

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def unwrap(self, merge: bool = False) -> nn.Linear:
        """The wrapped nn.Linear, with the active adapters merged into it (merge=True) or not.

        Without merge, merged adapters are unmerged first, so the layer is the original again.
        """
        if merge:
            if self.adapters_enabled:
                self.merge()
        else:
            self.unmerge()
        base = self._base
        if base.weight is not self.weight:  # someone replaced the Parameter: hand back the current one
            base.weight = self.weight
        if base.bias is not self.bias:
            base.bias = self.bias
        base.train(self.training)
        return base

    # --------------------------------------------------------------------------------------------
    def lora_terms(self) -> list[LoraTerm]:
        """The adapters this forward adds: active, not merged, adapters enabled."""
        if not self.adapters_enabled:
            return []
        return [LoraTerm(self.lora_A[a], self.lora_B[a], self.adapters[a].scale,
                         self.adapters[a].dropout if self.training else 0.0)
                for a in self.active_adapters if a not in self.merged_adapters]

    def adapter_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r, in], B [out, r], scale) of adapter `name` (used by adapter_batch)."""
        return self.lora_A[name], self.lora_B[name], self.adapters[name].scale

    def held_adapters(self) -> list[str]:
        return list(self.adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._lora_batch
        if plan is not None and self.adapters_enabled:
            if self.merged_adapters:
                raise RuntimeError("adapter_batch cannot run on a layer with merged adapters; unmerge() first")
            return mixed_lora_forward(x, self.weight, self.bias, [self.lora_A[a] for a in plan.adapters],
                                      [self.lora_B[a] for a in plan.adapters], plan)
        return fused_lora_forward(x, self.weight, self.bias, self.lora_terms())

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"]
        for name, c in self.adapters.items():
            state = []
            if name in self.active_adapters:
                state.append("active")
            if name in self.merged_adapters:
                state.append("merged")
            parts.append(f"{name}: r={c.r}, alpha={c.alpha:g}, scale={c.scale:.4g}, dropout={c.dropout:g}"
                         f"{', rslora' if c.use_rslora else ''}, {self.lora_A[name].dtype}"
                         f"{' (' + ', '.join(state) + ')' if state else ''}")
        if not self.adapters_enabled:
            parts.append("adapters disabled")
        return "\n".join(parts)
