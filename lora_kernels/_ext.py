"""The multi-adapter C++/CUDA extension (csrc/): found prebuilt, or compiled on first use, and loaded once.

Where it comes from, in order:
  1. a prebuilt library installed with the package (`LORA_KERNELS_BUILD_EXT=1 pip install .`), when it
     has what this machine needs (the CUDA kernels if CUDA is available);
  2. a JIT build with torch.utils.cpp_extension (ninja) into
        $LORA_KERNELS_EXT_DIR/<name>     (default: torch's extensions dir, $TORCH_EXTENSIONS_DIR or
                                          ~/.cache/torch_extensions)
     where <name> carries the flavour (cpu / cuda), the torch version and the Python version, so a
     build is reused only by a matching torch. The first build takes ~30 s (CPU) to ~1 min (CUDA);
     later processes load the cached library in well under a second. Copy that directory to carry a
     build to another machine with the same torch.

The CUDA flavour is built when torch has CUDA, a device is visible and nvcc is found (CUDA_HOME or
PATH). If the extension cannot be built or loaded, `load()` returns None, `error()` says why, and the
callers fall back to the PyTorch path with one warning.

LORA_KERNELS_BACKEND=torch skips the extension altogether (the PyTorch reference serves every call).
"""
from __future__ import annotations

import glob
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from . import _backend

EXT_DIR_ENV = "LORA_KERNELS_EXT_DIR"
OP_NAMESPACE = "lora_kernels_ext"
_SOURCES_CPU = ("multi_lora.cpp",)
_SOURCES_CUDA = ("multi_lora.cpp", "multi_lora_cuda.cpp", "multi_lora_kernels.cu", "launch_replay.cpp")
_PREBUILT_STEM = "_multi_lora_ext"  # lora_kernels/_multi_lora_ext_{cpu,cuda}*.so from setup.py

_lock = threading.Lock()
_state: dict = {}  # "lib": path of the loaded library, or "error": why there is none; "flavour"


def sources_dir() -> Path:
    """csrc/ of a checkout, else the installed copy (package `lora_kernels._csrc`)."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "csrc"
    if (checkout / "multi_lora.cpp").is_file():
        return checkout
    import importlib.resources

    return Path(str(importlib.resources.files("lora_kernels._csrc")))


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    import shutil

    return shutil.which("nvcc")


def want_cuda() -> tuple[bool, str]:
    """(build the CUDA flavour?, why not)."""
    if torch.version.cuda is None:
        return False, "torch has no CUDA support"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible"
    if _nvcc() is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ""


def build_name(cuda: bool) -> str:
    tv = torch.__version__.split("+")[0].replace(".", "_")
    cu = ("cu" + torch.version.cuda.replace(".", "")) if (cuda and torch.version.cuda) else "cpu"
    return f"lora_kernels_multi_{cu}_torch{tv}_py{sys.version_info.major}{sys.version_info.minor}"


def build_dir(cuda: bool) -> Path:
    base = os.environ.get(EXT_DIR_ENV, "").strip()
    if not base:
        from torch.utils.cpp_extension import get_default_build_root

        base = get_default_build_root()
    return Path(base).expanduser() / build_name(cuda)


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA kernels (read once at load: a plain value that
    torch.compile can trace through)."""
    return bool(_state.get("cuda_kernels", False))


def _prebuilt(cuda: bool) -> str | None:
    pkg = Path(__file__).resolve().parent
    flavour = "cuda" if cuda else "cpu"
    found = sorted(glob.glob(str(pkg / f"{_PREBUILT_STEM}_{flavour}*.so")))
    return found[0] if found else None


def _needs_compile(directory: Path, name: str, deps: list[str]) -> bool:
    """Whether load() will compile (only to say so on stderr; cpp_extension decides by itself)."""
    lib = directory / f"{name}.so"
    if not lib.is_file():
        return True
    built = lib.stat().st_mtime
    return any(os.path.getmtime(d) > built for d in deps)


def can_load_without_compiling() -> bool:
    """Whether load() would find the CUDA flavour built already (prebuilt, or a current JIT build)."""
    if "lib" in _state or "error" in _state:
        return "lib" in _state
    cuda, _ = want_cuda()
    if not cuda:
        return False
    if _prebuilt(True) is not None:
        return True
    src = sources_dir()
    deps = [str(src / f) for f in _SOURCES_CUDA] + [str(p) for p in src.glob("*.cuh")]
    return not _needs_compile(build_dir(True), build_name(True), deps)


def _build(cuda: bool) -> str:
    from torch.utils import cpp_extension

    src = sources_dir()
    sources = [str(src / f) for f in (_SOURCES_CUDA if cuda else _SOURCES_CPU)]
    name = build_name(cuda)
    directory = build_dir(cuda)
    directory.mkdir(parents=True, exist_ok=True)
    deps = sources + ([str(p) for p in src.glob("*.cuh")] if cuda else [])
    if _needs_compile(directory, name, deps):
        kind = "CUDA" if cuda else "CPU"
        took = "~1 min" if cuda else "~30 s"
        print(f"lora_kernels: compiling the multi-adapter extension ({kind}) — first use only, {took}",
              file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=["-O3"] + (["-DWITH_CUDA"] if cuda else []),
        # -lineinfo: source lines in compute-sanitizer and Nsight reports, no run-time cost
        extra_cuda_cflags=["-O3", "-lineinfo"] if cuda else None,
        extra_include_paths=[str(src)],
        extra_ldflags=["-ldl"] if cuda else None,  # launch_replay.cpp opens libcuda itself
        build_directory=str(directory),
        with_cuda=cuda,
        is_python_module=False,
        verbose=False,
    )


def load() -> str | None:
    """Path of the loaded extension library (loading or building it once), or None (see error())."""
    if "lib" in _state or "error" in _state:
        return _state.get("lib")
    with _lock:
        if "lib" in _state or "error" in _state:
            return _state.get("lib")
        cuda, why_not = want_cuda()
        _state["flavour"] = "cuda" if cuda else "cpu"
        try:
            lib = _prebuilt(cuda)
            if lib is not None:
                torch.ops.load_library(lib)
            else:
                lib = _build(cuda)
            _state["cuda_kernels"] = torch._C._dispatch_has_kernel_for_dispatch_key(
                f"{OP_NAMESPACE}::multi_lora_fwd", "CUDA")
            _state["lib"] = lib
            if not cuda:
                _state["cpu_only_reason"] = why_not
        except Exception as e:  # a missing compiler, a failed build, an ABI mismatch: fall back
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _state["error"] = f"{type(e).__name__}: {first}"
            _state["detail"] = str(e)
    return _state.get("lib")


def loaded() -> bool:
    return "lib" in _state


def error() -> str | None:
    """Why the extension is not available (None when it is, or before the first load())."""
    return _state.get("error")


def cpu_only_reason() -> str | None:
    """Why the loaded extension has no CUDA kernels (None when it has them)."""
    return _state.get("cpu_only_reason")


_warned: set = set()


def warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def disabled_by_env() -> bool:
    return _backend.requested() == "torch"
