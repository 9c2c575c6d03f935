"""Put LoRA into a model by swapping modules: patch / unpatch / merge / set_adapter / adapter_batch.

One generic path, at the nn.Linear / PEFT-layer level:
  * a plain model: every selected nn.Linear is replaced by LoRALinear.from_linear(linear, ...)
    (same weight and bias Parameters), base parameters are frozen;
  * a model PEFT already wrapped with LoRA: each peft.tuners.lora.Linear keeps its object and
    parameters and runs the fused op (peft_interop.py); layers that cannot are reported.
Architecture knowledge is only the table of target-name suffixes below plus the names of vision
towers and multimodal projectors; `filter_fn(module, name)` and `exclude_modules` narrow the choice.
"""
from __future__ import annotations

import logging
import re
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .layers import LoRALinear, base_linear_reason, batch_plan, check_adapter_args, check_adapter_name

logger = logging.getLogger("lora_kernels")

# ------------------------------------------------------------------------------------------------
# the table: default target suffixes per architecture family (a module matches a suffix when its
# dotted name equals it or ends with "." + it)
# ------------------------------------------------------------------------------------------------
FAMILIES: dict[str, tuple[str, ...]] = {
    "llama/mistral/qwen2/qwen3": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "internlm2": ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "internvit": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    "clip/siglip vision": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                           "mlp.fc1", "mlp.fc2"),
    "internvl vision (transformers)": ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                                       "attention.projection_layer", "mlp.fc1", "mlp.fc2"),
}
# A module whose dotted name has one of these components belongs to ...
VISION_TOWERS = ("vision_tower", "vision_model", "visual", "vision_encoder")  # ... a vision encoder
PROJECTORS = ("mm_projector", "multi_modal_projector", "mlp1", "vision_resampler")  # ... never patched
LANGUAGE_MODELS = ("language_model", "text_model", "llm")  # ... the LLM of a vision-language model
OUTPUT_HEADS = ("lm_head",)  # never patched (nor model.get_output_embeddings())
ALL_LINEAR = "all-linear"

TargetSpec = str | Sequence[str] | None


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
@dataclass
class PatchReport:
    """What patch() did; str() gives a readable summary, also logged on logger "lora_kernels"."""
    mode: str  # "inject" (plain model -> LoRALinear) or "peft" (PEFT lora.Linear -> fused forward)
    architecture: str
    adapter: str  # adapter name ("inject") or the PEFT model's active adapters
    settings: str  # r / alpha / dropout, or where PEFT's come from
    patched: list[str] = field(default_factory=list)  # module names
    kinds: dict[str, int] = field(default_factory=dict)  # kind (target suffix) -> count
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> reason
    trainable_params: int = 0
    all_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(1, self.all_params)

    def __str__(self) -> str:
        verb = "LoRALinear in place of nn.Linear" if self.mode == "inject" else "PEFT lora.Linear on the fused op"
        lines = [f"lora_kernels.patch: {self.architecture}",
                 f"  adapter {self.adapter}: {self.settings}",
                 f"  patched {len(self.patched)} ({verb}): "
                 + ", ".join(f"{k} x{n}" for k, n in self.kinds.items())]
        if self.skipped:
            by_reason: dict[str, list[str]] = {}
            for name, why in self.skipped.items():
                by_reason.setdefault(why, []).append(name)
            lines.append(f"  skipped {len(self.skipped)}:")
            for why, names in by_reason.items():
                shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
                lines.append(f"    {len(names)} x {why}: {shown}")
        lines.append(f"  trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} || "
                     f"trainable%: {self.trainable_percent:.4f}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class _PatchState:
    """Private undo record kept on the model as `_lora_kernels_state`."""
    mode: str
    frozen: list[nn.Parameter] = field(default_factory=list)  # set requires_grad=False by patch()


_STATE = "_lora_kernels_state"
_REPORT = "lora_kernels_report"


# ------------------------------------------------------------------------------------------------
# matching
# ------------------------------------------------------------------------------------------------
def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def match_names(name: str, spec: str | Sequence[str]) -> str | None:
    """PEFT's rule: a str is a regex that must fullmatch the name; a list holds names or suffixes.

    Returns what matched (the suffix, or the last name component for a regex), or None.
    """
    if isinstance(spec, str):
        return name.rsplit(".", 1)[-1] if re.fullmatch(spec, name) else None
    for s in spec:
        if _suffix_match(name, s):
            return s
    return None


def _check_spec(spec, what: str) -> None:
    if spec is None or isinstance(spec, str):
        return
    if not isinstance(spec, (list, tuple, set, frozenset)) or not all(isinstance(s, str) for s in spec):
        raise TypeError(f"{what} must be None, a regex string, \"{ALL_LINEAR}\" or a list of module names / "
                        f"suffixes, got {spec!r}")
    if not spec:
        raise ValueError(f"{what} is an empty list; pass None for the defaults")


def _default_kind(name: str) -> str | None:
    for suffixes in FAMILIES.values():
        for s in suffixes:
            if _suffix_match(name, s):
                return s
    return None


def _components(name: str) -> list[str]:
    return name.split(".")


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        out = get()
    except (NotImplementedError, AttributeError):
        return None
    return out if isinstance(out, nn.Module) else None


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    return f"{type(model).__name__} ({model_type})" if model_type else type(model).__name__


def _families_matched(kinds: Iterable[str]) -> list[str]:
    kinds = set(kinds)
    full = [f for f, s in FAMILIES.items() if set(s) <= kinds]
    return full or [f for f, s in FAMILIES.items() if set(s) & kinds]


@dataclass
class _Candidate:
    name: str
    module: nn.Linear
    kind: str
    vision: bool


def _select(model: nn.Module, target_modules: TargetSpec, exclude_modules, filter_fn, vision: bool
            ) -> tuple[list[_Candidate], dict[str, str], list[str]]:
    """(modules to patch, skipped name -> reason, notes) for a plain model; modifies nothing."""
    head = _output_head(model)
    chosen: list[_Candidate] = []
    skipped: dict[str, str] = {}
    notes: list[str] = []
    has_lm = False
    for name, module in model.named_modules():
        if not name:
            continue
        comps = _components(name)
        has_lm = has_lm or any(c in LANGUAGE_MODELS for c in comps)
        if target_modules is None:
            kind = _default_kind(name)
        elif isinstance(target_modules, str) and target_modules == ALL_LINEAR:
            kind = comps[-1] if isinstance(module, nn.Linear) else None
        else:
            kind = match_names(name, target_modules)
        if kind is None:
            continue
        if any(c in PROJECTORS for c in comps):
            skipped[name] = "multimodal projector / resampler (never patched)"
        elif module is head or comps[-1] in OUTPUT_HEADS:
            skipped[name] = "output head (never patched)"
        elif not isinstance(module, nn.Linear):
            skipped[name] = f"{type(module).__name__} is not an nn.Linear"
        elif (why := base_linear_reason(module)) is not None:
            skipped[name] = why
        elif exclude_modules is not None and match_names(name, exclude_modules) is not None:
            skipped[name] = "exclude_modules"
        elif filter_fn is not None and not filter_fn(module, name):
            skipped[name] = "filter_fn returned False"
        else:
            chosen.append(_Candidate(name, module, kind, any(c in VISION_TOWERS for c in comps)))
    if not vision and any(c.vision for c in chosen):
        if has_lm or any(not c.vision for c in chosen):
            for c in chosen:
                if c.vision:
                    skipped[c.name] = "vision tower (pass vision=True to include it)"
            chosen = [c for c in chosen if not c.vision]
        else:
            notes.append("no language-model targets: the model is treated as a vision encoder and its "
                         "layers are patched")
    return chosen, skipped, notes


def _nothing_matched(model: nn.Module, target_modules: TargetSpec, skipped: dict[str, str]) -> ValueError:
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    what = ("the built-in table (" + "; ".join(FAMILIES) + ")") if target_modules is None else repr(target_modules)
    shown = ", ".join(linear[:40]) + (f", ... ({len(linear) - 40} more)" if len(linear) > 40 else "")
    kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
    msg = (f"lora_kernels.patch: no module of {_architecture(model)} was selected by target_modules={what}. "
           f"It has {len(linear)} nn.Linear modules (distinct names: {', '.join(kinds) or 'none'}): {shown or 'none'}. ")
    if skipped:
        msg += "Matched but skipped: " + "; ".join(f"{n}: {why}" for n, why in list(skipped.items())[:10]) + ". "
    msg += (f"Pass target_modules as a list of module names or suffixes (e.g. [\"q_proj\", \"v_proj\"]), a regex, "
            f"or \"{ALL_LINEAR}\".")
    return ValueError(msg)


# ------------------------------------------------------------------------------------------------
# finding what is patched
# ------------------------------------------------------------------------------------------------
def _peft_interop():
    """The PEFT interop module if PEFT is in use (imported), else None: no PEFT import otherwise."""
    if "peft" not in sys.modules:
        return None
    from . import peft_interop

    return peft_interop


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every LoRALinear and accelerated PEFT layer."""
    pi = _peft_interop()
    kinds = (LoRALinear,) if pi is None else (LoRALinear, pi.FusedPeftLinear)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def layer_paths(model: nn.Module) -> list[str]:
    """Names of the model's linear layers as PEFT names them: nn.Linear, LoRALinear and PEFT LoRA
    layers, not their insides (base_layer, lora_A, ...)."""
    tuner_types = ()
    if "peft" in sys.modules:
        from peft.tuners.tuners_utils import BaseTunerLayer

        tuner_types = (BaseTunerLayer,)
    out, wrappers = [], []
    for n, m in model.named_modules():
        if any(n.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(m, (LoRALinear,) + tuner_types):
            wrappers.append(n)
            out.append(n)
        elif isinstance(m, nn.Linear):
            out.append(n)
    return out


def is_patched(model: nn.Module) -> bool:
    return _STATE in model.__dict__ or bool(_lora_layers(model))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _count_params(model: nn.Module) -> tuple[int, int]:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _freeze_base(model: nn.Module, state: _PatchState) -> None:
    """requires_grad=False on every parameter that is not an adapter factor; remembered for undo."""
    adapter_ids = {id(p) for _, m in _lora_layers(model) if isinstance(m, LoRALinear)
                   for d in (m.lora_A, m.lora_B) for p in d.values()}
    known = {id(p) for p in state.frozen}
    for p in model.parameters():
        if id(p) not in adapter_ids and p.requires_grad and id(p) not in known:
            p.requires_grad_(False)
            state.frozen.append(p)
            known.add(id(p))


# ------------------------------------------------------------------------------------------------
# patch
# ------------------------------------------------------------------------------------------------
def patch(model: nn.Module, r: int = 16, alpha: float | None = None, dropout: float = 0.05,
          target_modules: TargetSpec = None, exclude_modules: str | Sequence[str] | None = None,
          filter_fn: Callable[[nn.Module, str], bool] | None = None, vision: bool = False, *,
          use_rslora: bool = False, init: str = "default", adapter_name: str = "default",
          verbose: bool = False) -> nn.Module:
    """Add fused LoRA to `model` in place and return it; the report is `model.lora_kernels_report`.

    Each patched layer computes  y = x @ W.T + b + s * (drop(x) @ A.T) @ B.T  (W [out, in] frozen,
    A [r, in], B [out, r], s = alpha / r, or alpha / sqrt(r) with use_rslora).

    Plain model: nn.Linear modules chosen by `target_modules` become LoRALinear (alpha None -> 2 * r):
      None          the built-in table by architecture (FAMILIES): LLaMA/Mistral/Qwen2/Qwen3, InternLM2,
                    Phi3, InternViT, CLIP/SigLIP and InternVL vision towers;
      "all-linear"  every nn.Linear;
      a str         a regex that must match the whole module name (as PEFT);
      a list        module names or suffixes (as PEFT).
    Never patched: output heads (lm_head), multimodal projectors and resamplers; vision towers only
    with vision=True (unless the model is a vision encoder alone). exclude_modules (same forms) and
    filter_fn(module, name) -> bool narrow the choice. Every parameter but the adapters is frozen.

    PEFT model (any peft.tuners.lora.Linear inside): those layers run the fused op with their own
    parameters, adapters, scalings and dropout; r/alpha/dropout/target_modules are not used,
    exclude_modules / filter_fn still narrow. Layers the fused op cannot take keep PEFT's path and
    are listed in the report.

    Raises: TypeError / ValueError on bad arguments (r <= 0, r above a layer's min(in, out), ...),
    ValueError when nothing matches (listing the nn.Linear names seen), RuntimeError when the model
    is already patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects an nn.Module, got {type(model).__name__}")
    if is_patched(model):
        raise RuntimeError("lora_kernels.patch: this model is already patched; call lora_kernels.unpatch(model) "
                           "first (or lora_kernels.load_adapter / LoRALinear.add_adapter to add adapters)")
    _check_spec(target_modules, "target_modules")
    _check_spec(exclude_modules, "exclude_modules")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (module, name) -> bool, got {filter_fn!r}")
    tuners = _tuner_layers(model)
    if tuners:
        report = _patch_peft(model, tuners, target_modules, exclude_modules, filter_fn)
    else:
        check_adapter_name(adapter_name)
        check_adapter_args(r, alpha, dropout, 1 << 62, 1 << 62)  # the per-layer bound is checked below
        chosen, skipped, notes = _select(model, target_modules, exclude_modules, filter_fn, vision)
        if not chosen:
            raise _nothing_matched(model, target_modules, skipped)
        for c in chosen:
            check_adapter_args(r, alpha, dropout, c.module.in_features, c.module.out_features, where=c.name)
        report = _inject(model, chosen, skipped, notes, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                         init=init, adapter_name=adapter_name)
    model.__dict__[_REPORT] = report
    logger.info("%s", report)
    if verbose:
        print(report)
    return model


def _inject(model: nn.Module, chosen: list[_Candidate], skipped: dict[str, str], notes: list[str], *,
            r: int, alpha: float | None, dropout: float, use_rslora: bool, init: str, adapter_name: str
            ) -> PatchReport:
    state = _PatchState(mode="inject")
    for c in chosen:
        _replace(model, c.name, LoRALinear.from_linear(c.module, r=r, alpha=alpha, dropout=dropout,
                                                       use_rslora=use_rslora, init=init, adapter_name=adapter_name))
    model.__dict__[_STATE] = state
    _freeze_base(model, state)
    return _inject_report(model, [(c.name, c.kind, c.vision) for c in chosen], skipped, notes, adapter=adapter_name,
                          settings=f"r={r}, alpha={2 * r if alpha is None else alpha:g}, dropout={dropout:g}"
                          + (", rslora" if use_rslora else ""))


def _inject_report(model: nn.Module, patched: list[tuple[str, str, bool]], skipped: dict[str, str],
                   notes: list[str], *, adapter: str, settings: str) -> PatchReport:
    """patched: (module name, kind, in a vision tower)."""
    kinds = Counter(("vision " if vis else "") + kind for _, kind, vis in patched)
    fams = _families_matched(kind for _, kind, _ in patched)
    trainable, total = _count_params(model)
    return PatchReport(
        mode="inject", architecture=_architecture(model) + (f" [targets: {', '.join(fams)} table]" if fams else ""),
        adapter=repr(adapter), settings=settings, patched=[n for n, _, _ in patched], kinds=dict(kinds),
        skipped=skipped, trainable_params=trainable, all_params=total, notes=notes)


def _patch_peft(model: nn.Module, tuners, target_modules, exclude_modules, filter_fn) -> PatchReport:
    from peft.tuners.lora import LoraLayer

    from . import peft_interop as pi

    if not any(isinstance(m, LoraLayer) for _, m in tuners):
        kinds = sorted({type(m).__module__ + "." + type(m).__name__ for _, m in tuners})
        raise ValueError(f"lora_kernels.patch: the model holds PEFT tuner layers but none is LoRA ({', '.join(kinds)});"
                         " only PEFT LoRA is supported")
    notes = []
    if target_modules is not None:
        notes.append(f"target_modules={target_modules!r} not used: a PEFT model keeps the layers PEFT targeted")
        logger.warning("lora_kernels.patch: %s", notes[-1])
    chosen, skipped = [], {}
    for name, layer in tuners:
        why = pi.unsupported_reason(layer)
        if why is None and exclude_modules is not None and match_names(name, exclude_modules) is not None:
            why = "exclude_modules"
        if why is None and filter_fn is not None and not filter_fn(layer, name):
            why = "filter_fn returned False"
        if why is None:
            chosen.append((name, layer))
        else:
            skipped[name] = f"kept on PEFT's path: {why}"
    for _, layer in chosen:
        pi.accelerate(layer)
    model.__dict__[_STATE] = _PatchState(mode="peft")
    if not chosen:
        notes.append("no PEFT layer could take the fused path; the model runs as before")
        logger.warning("lora_kernels.patch: %s", notes[-1])
    active = sorted({a for _, m in tuners if isinstance(m, LoraLayer) for a in m.active_adapters})
    trainable, total = _count_params(model)
    return PatchReport(
        mode="peft", architecture="PEFT model of " + _architecture(getattr(getattr(model, "base_model", model),
                                                                           "model", model)),
        adapter=", ".join(map(repr, active)), settings="r, alpha, dropout from its LoraConfig",
        patched=[n for n, _ in chosen], kinds=dict(Counter(n.rsplit(".", 1)[-1] for n, _ in chosen)),
        skipped=skipped, trainable_params=trainable, all_params=total, notes=notes)


# ------------------------------------------------------------------------------------------------
# undo, merge, adapters
# ------------------------------------------------------------------------------------------------
def _forget(model: nn.Module) -> _PatchState | None:
    model.__dict__.pop(_REPORT, None)
    state = model.__dict__.pop(_STATE, None)
    if state is not None:
        for p in state.frozen:
            p.requires_grad_(True)
    return state


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): the original nn.Linear modules (adapters dropped, merged ones taken out of W first),
    PEFT layers back on PEFT's forward, requires_grad restored. Returns the model."""
    layers = _lora_layers(model)
    if not layers and _STATE not in model.__dict__:
        raise ValueError("lora_kernels.unpatch: this model is not patched")
    _unwrap_all(model, layers, merge=False)
    return model


def _unwrap_all(model: nn.Module, layers, merge: bool) -> None:
    """Put the original modules back (LoRALinear -> nn.Linear, merged first if `merge`) and PEFT
    layers back on PEFT's forward; forget the patch state."""
    pi = _peft_interop()
    for name, m in layers:
        if isinstance(m, LoRALinear):
            _replace(model, name, m.unwrap(merge=merge))
        else:
            pi.restore(m)
    _forget(model)


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into W and return the model with plain modules (merge_and_unload).

    LoRALinear: W <- W + s * B @ A summed in float32, then the original nn.Linear is put back and
    requires_grad restored. PEFT model: its layers go back to PEFT and PEFT's merge_and_unload()
    runs; as with PEFT, what comes back is the underlying transformers model.
    """
    layers = _lora_layers(model)
    tuners = _tuner_layers(model)
    if not layers and not tuners:
        raise ValueError("lora_kernels.merge: the model has no LoRA layers (not patched)")
    _unwrap_all(model, layers, merge=True)
    if tuners:
        if callable(getattr(model, "merge_and_unload", None)):
            return model.merge_and_unload()
        for name, layer in tuners:  # PEFT layers inside a model PEFT did not wrap at the top
            layer.merge()
            _replace(model, name, layer.get_base_layer())
    return model


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters of every LoRALinear that holds them (others: none active).

    For a PEFT model use PEFT's own model.set_adapter (the fused layers follow it).
    """
    names = [names] if isinstance(names, str) else list(names)
    layers = [m for _, m in _lora_layers(model) if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("lora_kernels.set_adapter: the model has no LoRALinear layers (patch it first; for "
                         "PEFT models use model.set_adapter)")
    known = {a for m in layers for a in m.adapters}
    for n in names:
        if n not in known:
            raise KeyError(f"lora_kernels.set_adapter: unknown adapter {n!r}; the model has {sorted(known)}")
    for m in layers:
        m.set_adapter([n for n in names if n in m.adapters])


@contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str | None]):
    """Inside the context, sequence b of every batch uses adapter names[b] (None: base model only).

        y[b] = x[b] @ W.T + bias + s_l * (x[b] @ A_l.T) @ B_l.T,   l = names[b]
            x [n_seq, ..., in] (e.g. [B, T, in]; T may change between calls, as in generate)

    Every LoRALinear and every PEFT layer accelerated by patch() stacks the adapters the batch uses
    (zero-padded to the largest rank; kept for the context while they are unchanged) and runs
    lora_kernels.multi_lora_linear: one base GEMM, each row its own adapter. The row index is
    built, checked and sorted once per context and shared by every layer. Works for inference (model.generate: the batch size must stay len(names))
    and training: each adapter gets gradients only from its own sequences. No dropout is applied
    in a mixed batch. A layer that an adapter does not target uses the base weight for its rows.

    Raises ValueError / KeyError for unknown names, names of the wrong type, a model without fused
    LoRA layers (or with PEFT LoRA layers on PEFT's path, which would ignore the batch), and, at the
    forward, a batch whose size differs from len(names).
    """
    names = list(names)
    if not names:
        raise ValueError("adapter_batch: names is empty; give one adapter name (or None) per sequence")
    for n in names:
        if n is not None and not isinstance(n, str):
            raise TypeError(f"adapter_batch: names must be adapter names (str) or None, got {n!r}")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("adapter_batch: the model has no lora_kernels LoRA layers; patch() or load_adapter() "
                         "it first")
    pi = _peft_interop()
    if pi is not None:
        slow = [n for n, m in _tuner_layers(model) if not isinstance(m, pi.FusedPeftLinear)]
        if slow:
            raise ValueError(f"adapter_batch: {len(slow)} PEFT layers run PEFT's own forward and would ignore the "
                             f"batch (e.g. {slow[0]}); see model.lora_kernels_report for why")
    known = {a for _, m in layers for a in m.held_adapters()}
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise KeyError(f"adapter_batch: unknown adapter(s) {unknown}; the model has {sorted(known)}")
    previous = [(m, m.__dict__.get("_lora_batch")) for _, m in layers]
    shared: dict = {}  # one PlanRows per distinct seq_index: its rows are checked and sorted once
    try:
        for _, m in layers:
            m._lora_batch = batch_plan(m, names, shared)
        yield model
    finally:
        for m, p in previous:
            m._lora_batch = p
