"""Adapters on disk in PEFT's format: save_adapter / load_adapter.

A directory holds adapter_config.json (PEFT LoraConfig fields) and adapter_model.safetensors with
    base_model.model.<module path>.lora_A.weight   [r, in]
    base_model.model.<module path>.lora_B.weight   [out, r]
where <module path> is the layer's name in the transformers model (for a PeftModel: below
model.base_model.model). PeftModel.from_pretrained and servers that read PEFT adapters load it;
load_adapter reads adapters PEFT saved. Scale = lora_alpha / r (or / sqrt(r) with use_rslora),
per module through rank_pattern / alpha_pattern when they differ.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .layers import LoRALinear, base_linear_reason, check_adapter_args, check_adapter_name
from .patch import (_REPORT, _STATE, _freeze_base, _inject_report, _lora_layers, _PatchState, _replace,
                    _suffix_match, _tuner_layers, layer_paths, logger, match_names, set_adapter)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")


@dataclass
class _Entry:
    """One layer's adapter as stored: A [r, in], B [out, r], alpha, dropout, rslora."""
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    dropout: float
    use_rslora: bool


def _root(model: nn.Module) -> nn.Module:
    """The transformers model whose module names follow `base_model.model.` in PEFT's keys."""
    if "peft" in sys.modules:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner

        if isinstance(model, PeftModel):
            return model.base_model.model
        if isinstance(model, BaseTuner):
            return model.model
    return model


def _gather(root: nn.Module, name: str) -> dict[str, _Entry]:
    """module path -> adapter `name` of every LoRA layer (LoRALinear or PEFT lora.Linear) holding it."""
    found: dict[str, _Entry] = {}
    peft_layers = dict(_tuner_layers(root))
    for path, m in root.named_modules():
        if isinstance(m, LoRALinear):
            if name in m.adapters:
                c = m.adapters[name]
                found[path] = _Entry(m.lora_A[name], m.lora_B[name], c.alpha, c.dropout, c.use_rslora)
        elif path in peft_layers and name in getattr(m, "lora_A", {}):
            from peft.tuners.lora import Linear as PeftLinear

            if not isinstance(m, PeftLinear) or m.lora_variant.get(name) is not None or m.lora_bias.get(name):
                raise ValueError(f"save_adapter: layer {path} ({type(m).__name__}) holds a LoRA variant or bias that "
                                 "this writer does not store; use the PEFT model's save_pretrained")
            drop = m.lora_dropout[name]
            found[path] = _Entry(m.lora_A[name].weight, m.lora_B[name].weight, m.lora_alpha[name],
                                 float(getattr(drop, "p", 0.0)), m.use_rslora.get(name, False))
    return found


def _targets_spec(root: nn.Module, paths: list[str]) -> list[str] | str:
    """target_modules for the config: the last names (["q_proj", ...]) when they select exactly these
    layers among the model's Linear layers, else a regex of the layer paths (digits generalised when
    that stays exact)."""
    linear = layer_paths(root)
    want = set(paths)
    last = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if {n for n in linear if any(_suffix_match(n, s) for s in last)} == want:
        return last
    generic = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(p)) for p in paths})
    regex = "(" + "|".join(generic) + ")"
    if {n for n in linear if re.fullmatch(regex, n)} == want:
        return regex
    return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def _task_type(root: nn.Module) -> str | None:
    return "CAUSAL_LM" if type(root).__name__.endswith("ForCausalLM") else None


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> None:
    """Write adapter `name` of a patched (or PEFT) model to directory `path` in PEFT's format.

    Files: adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout, target_modules,
    use_rslora, rank_pattern / alpha_pattern for layers that differ from the most common values,
    ...) and adapter_model.safetensors with base_model.model.<module>.lora_A.weight [r, in] and
    .lora_B.weight [out, r], in the adapters' own dtype.
    """
    from safetensors.torch import save_file

    root = _root(model)
    found = _gather(root, name)
    if not found:
        held = sorted({a for _, m in _lora_layers(root) for a in m.held_adapters()})
        raise ValueError(f"save_adapter: no layer holds adapter {name!r}; adapters in the model: {held or 'none'}")
    rslora = {e.use_rslora for e in found.values()}
    if len(rslora) > 1:
        raise ValueError(f"save_adapter: adapter {name!r} mixes use_rslora True and False across layers; PEFT's "
                         "config has one flag")
    ranks = {p: e.A.shape[0] for p, e in found.items()}
    alphas = {p: e.alpha for p, e in found.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropout = Counter(e.dropout for e in found.values()).most_common(1)[0][0]
    paths = sorted(found)
    alpha_json = int(alpha) if float(alpha).is_integer() else alpha
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(root),
        "base_model_name_or_path": getattr(getattr(root, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha_json,
        "lora_dropout": dropout,
        "target_modules": _targets_spec(root, paths),
        "exclude_modules": None,
        "use_rslora": rslora.pop(),
        "use_dora": False,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(p): k for p, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(p): (int(a) if float(a).is_integer() else a)
                          for p, a in alphas.items() if a != alpha},
        "inference_mode": True,
        "revision": None,
    }
    tensors = {}
    for p in paths:
        e = found[p]
        tensors[f"{PREFIX}{p}.lora_A.weight"] = e.A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{p}.lora_B.weight"] = e.B.detach().contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def _read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"load_adapter: {cfg_file} not found (expected a PEFT adapter directory)")
    with open(cfg_file) as f:
        config = json.load(f)
    st, bin_ = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_NAME_BIN)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        weights = load_file(st)
    elif os.path.isfile(bin_):
        weights = torch.load(bin_, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"load_adapter: neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN} in {path}")
    return config, weights


def _check_config(config: dict, path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: {path} is a PEFT {config.get('peft_type')} adapter; only LORA is supported")
    unsupported = [k for k in ("use_dora", "lora_bias", "fan_in_fan_out") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if config.get("modules_to_save"):
        unsupported.append("modules_to_save")
    if config.get("trainable_token_indices"):
        unsupported.append("trainable_token_indices")
    if unsupported:
        raise ValueError(f"load_adapter: {path} uses {', '.join(unsupported)}, which LoRALinear does not support; "
                         "load it with PEFT (patch() then accelerates what it can)")


def _pattern_value(patterns: dict, path: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _parse(config: dict, weights: dict[str, torch.Tensor], path) -> dict[str, _Entry]:
    """module path -> entry; every key must be a lora_A / lora_B weight with its partner present."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _KEY.match(k)
        if m is None:
            raise ValueError(f"load_adapter: unexpected key {key!r} in {path} (expected "
                             f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        pairs.setdefault(m["module"], {})[m["which"]] = t
    out = {}
    for module, ab in pairs.items():
        for which in ("lora_A", "lora_B"):
            if which not in ab:
                raise ValueError(f"load_adapter: missing key '{PREFIX}{module}.{which}.weight' in {path} "
                                 f"(its partner is there)")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"load_adapter: '{PREFIX}{module}.lora_A.weight' {tuple(A.shape)} and "
                             f"'.lora_B.weight' {tuple(B.shape)} are not [r, in] and [out, r]")
        r = A.shape[0]
        cfg_r = _pattern_value(config.get("rank_pattern"), module, config.get("r", r))
        if cfg_r != r:
            raise ValueError(f"load_adapter: '{PREFIX}{module}.lora_A.weight' has rank {r} but the config says "
                             f"r = {cfg_r}")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        out[module] = _Entry(A, B, float(alpha), float(config.get("lora_dropout", 0.0)),
                             bool(config.get("use_rslora", False)))
    return out


def _config_targets(root: nn.Module, config: dict) -> set[str] | None:
    """Linear layers the config's target_modules selects in this model (None: cannot tell)."""
    spec = config.get("target_modules")
    if spec is None or spec == "all-linear" or config.get("layers_to_transform") is not None:
        return None
    if isinstance(spec, (list, tuple)) and not all(isinstance(s, str) for s in spec):
        return None
    exclude = config.get("exclude_modules")
    out = set()
    for n in layer_paths(root):
        if match_names(n, spec) is not None and (not exclude or match_names(n, exclude) is None):
            out.add(n)
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Read a PEFT-format adapter from directory `path` into `model` as adapter `name`; returns model.

    * name already on the model: the file must hold exactly the layers carrying it, with the same
      shapes; the weights (and alpha) are replaced in place.
    * a new name: it is added to every layer the file names (nn.Linear layers are wrapped in
      LoRALinear first, base parameters frozen, as patch() does). It becomes the active adapter
      when the model had none; otherwise the active adapters stay as they are: switch with
      lora_kernels.set_adapter(model, name), or mix per sequence with adapter_batch.
    * a PeftModel: validated the same way, then PEFT's own load_adapter(path, adapter_name=name).
    Every check runs before anything changes: a mismatched adapter (unexpected or missing keys,
    wrong shapes, another architecture, unsupported PEFT options) raises an error naming the key
    and leaves the model as it was.
    """
    check_adapter_name(name)
    config, weights = _read(path)
    _check_config(config, path)
    entries = _parse(config, weights, path)
    root = _root(model)
    modules = dict(root.named_modules())
    pi = sys.modules.get("lora_kernels.peft_interop")
    peft_layers = dict(_tuner_layers(root))
    holders = {p for p, m in modules.items()
               if (isinstance(m, LoRALinear) and name in m.adapters)
               or (p in peft_layers and name in getattr(m, "lora_A", {}))}
    for module, e in entries.items():
        key = f"{PREFIX}{module}.lora_A.weight"
        m = modules.get(module)
        if m is None:
            raise ValueError(f"load_adapter: unexpected key {key!r}: the model ({type(root).__name__}) has no module "
                             f"{module!r} (an adapter for another architecture?)")
        if isinstance(m, LoRALinear) or module in peft_layers:
            in_f, out_f = m.in_features, m.out_features
        elif isinstance(m, nn.Linear):
            if peft_layers:
                raise ValueError(f"load_adapter: {module!r} is not a PEFT LoRA layer of this PeftModel")
            why = base_linear_reason(m)
            if why is not None:
                raise ValueError(f"load_adapter: cannot put LoRA on {module!r}: {why}")
            in_f, out_f = m.in_features, m.out_features
        else:
            raise ValueError(f"load_adapter: unexpected key {key!r}: module {module!r} is a {type(m).__name__}, "
                             "not a Linear layer")
        r = e.A.shape[0]
        if tuple(e.A.shape) != (r, in_f) or tuple(e.B.shape) != (out_f, r):
            raise ValueError(f"load_adapter: shape mismatch at {key!r}: file has lora_A {tuple(e.A.shape)}, "
                             f"lora_B {tuple(e.B.shape)}; the layer ({in_f} -> {out_f}) needs [r, {in_f}] and "
                             f"[{out_f}, r]")
        if module in holders:
            held = m.lora_A[name] if isinstance(m, LoRALinear) else m.lora_A[name].weight
            if held.shape[0] != r:
                raise ValueError(f"load_adapter: shape mismatch at {key!r}: the model's adapter {name!r} has rank "
                                 f"{held.shape[0]}, the file {r}")
        check_adapter_args(r, e.alpha, e.dropout, in_f, out_f, where=module)
        if not e.A.is_floating_point() or not e.B.is_floating_point():
            raise ValueError(f"load_adapter: {key!r} is {e.A.dtype}, expected floating point")
    if holders:
        missing = sorted(holders - set(entries))
        if missing:
            raise ValueError(f"load_adapter: missing key '{PREFIX}{missing[0]}.lora_A.weight': the model's adapter "
                             f"{name!r} is on {len(missing)} layer(s) that {path} does not cover")
    else:
        targeted = _config_targets(root, config)
        if targeted is not None and (missing := sorted(targeted - set(entries))):
            raise ValueError(f"load_adapter: missing key '{PREFIX}{missing[0]}.lora_A.weight': adapter_config's "
                             f"target_modules selects {len(missing)} layer(s) of this model that {path} has no "
                             f"weights for (an adapter for another architecture?)")

    # ---- all checks passed: from here on the model changes ----
    if peft_layers:
        before = set(peft_layers)
        model.load_adapter(str(path), adapter_name=name)
        if pi is not None and _STATE in model.__dict__:  # keep new PEFT layers on the fused path
            for n, layer in _tuner_layers(root):
                if n not in before and pi.unsupported_reason(layer) is None:
                    pi.accelerate(layer)
        return model
    had_adapters = bool(_lora_layers(root))
    state = root.__dict__.setdefault(_STATE, _PatchState(mode="inject"))
    wrapped = [p for p in sorted(entries) if not isinstance(modules[p], LoRALinear)]
    for p in wrapped:
        _replace(root, p, LoRALinear(modules[p]))
    modules = dict(root.named_modules())
    with torch.no_grad():
        for module, e in entries.items():
            m: LoRALinear = modules[module]
            active = list(m.active_adapters)
            if name not in m.adapters:
                m.add_adapter(name, r=e.A.shape[0], alpha=e.alpha, dropout=e.dropout, use_rslora=e.use_rslora,
                              dtype=e.A.dtype if e.A.dtype in (torch.float32, m.weight.dtype) else None)
            m.active_adapters = active  # a new adapter is not switched on here (see set_adapter below)
            c = m.adapters[name]
            c.alpha, c.dropout, c.use_rslora = e.alpha, e.dropout, e.use_rslora
            m.lora_A[name].copy_(e.A)
            m.lora_B[name].copy_(e.B)
    _freeze_base(root, state)
    if not had_adapters:
        set_adapter(root, name)
    if _REPORT not in root.__dict__:
        report = _inject_report(root, [(p, p.rsplit(".", 1)[-1], False) for p in wrapped], {}, [],
                                adapter=name, settings=f"loaded from {os.fspath(path)}")
        root.__dict__[_REPORT] = report
        logger.info("%s", report)
    return model
