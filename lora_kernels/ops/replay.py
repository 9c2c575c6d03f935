"""Replay of the fused op's eager launch sequences from C++ (csrc/launch_replay.cpp).

An eager call of `lora_linear` at small shapes costs more host time than GPU time: the Python that
allocates buffers, builds TMA descriptors and launches the Triton kernels, and autograd runs the
backward's Python on its device thread, ~1.8x slower than the calling thread. So the first call for
each *key* (every tensor's dtype, sizes, strides, 16-byte alignment and device, the op's scalars and
flags, the deterministic-algorithms flag) runs the Python path as usual, and the second writes down
what it did (so shapes that never repeat cost one lookup, not a recording):

    ALLOC slot zero dtype sizes     torch.empty / torch.zeros of an intermediate
    LAUNCH function grid threads shared pdl params    one Triton launch, each parameter a tensor
                                    slot's pointer, a TMA descriptor over a slot, or raw bits
    SUM0 slot src / CAST slot src dtype               t.sum(0) / t.to(dtype)
    ADDMM out a b transpose alpha beta   out.addmm_(a, b or b.T, beta=beta, alpha=alpha): cuBLAS
                                    accumulating into a kernel's output (beta = 1) or writing (beta = 0)
    MM slot a ta b tb dtype alpha   alpha * (a or a.T) @ (b or b.T), in dtype (-1: the operands'): cuBLAS
    OUTPUTS slots

From the third call on, that key's program runs in C++: the same kernels with the same arguments in the
same order on the current stream, so the results are the Python path's (bitwise, but for the order
of fp32 atomic additions, which varies from run to run on either path). Every
decision the Python path takes (tiles, splits, kernels, their integer arguments) is a function of the
key; the recording is checked against every ATen op the Python path ran (a dispatch mode), and a call
that did anything the program cannot say (an ATen op without a step, such as deterministic mode's
torch.mm, or a launch through Triton's own launcher) registers its key as declined, which then
always takes the Python path.

Used for eager CUDA calls when the CUDA extension is loaded, or can be without compiling (a prebuilt
or cached build; `python -m lora_kernels bench` and `lora_kernels.ops.replay.enable(build=True)` build
it). LORA_KERNELS_REPLAY=0 turns it off, =1 builds the extension on first use if needed.
"""
from __future__ import annotations

import contextlib
import os
import struct
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _ext

FWD, BWD = 0, 1  # plan kinds: lora_linear forward, backward

_ALLOC, _LAUNCH, _SUM0, _CAST, _OUTPUTS, _ADDMM, _MM = 1, 2, 3, 4, 5, 6, 7
_PTR, _RAW, _TMA = 1, 2, 3
_DECLINED = [-1]

ACTIVE = 0  # calls being recorded in any thread (a plain global: the hooks' fast check, traceable)
_MODE = os.environ.get("LORA_KERNELS_REPLAY", "auto").strip().lower()
_state: dict = {}  # "ok": bool once decided
_local = threading.local()
_active_lock = threading.Lock()

# TMA element types as the kernel metadata writes them -> the driver's enum (triton's driver.py)
_TMA_DTYPE_DEVICE_TO_HOST = {**{i: i for i in range(16)}, 8: 10, 9: 8, 10: 9}
# ATen ops the recorded Python path may run: allocations, the recorded reductions and casts, views
_ALLOWED_ATEN = {"addmm_", "empty", "zeros", "zero_", "fill_", "new_empty", "sum", "_to_copy", "to", "t", "transpose",
                 "view", "reshape", "alias", "detach", "as_strided", "empty_strided", "permute", "expand",
                 "unsqueeze", "select", "slice"}


def enable(build: bool = False) -> bool:
    """Whether replay can run: the CUDA extension with the replay ops loaded (building it first if
    `build`, which takes ~1 min once). Turned off by LORA_KERNELS_REPLAY=0."""
    if _MODE == "0":
        return False
    if _state.get("ok"):
        return True
    if not (torch.cuda.is_available() and torch.version.cuda) or _ext.disabled_by_env():
        return False
    if not (build or _MODE == "1" or _ext.loaded() or _ext.can_load_without_compiling()):
        return False
    if _ext.load() is None or not _ext.has_cuda_kernels():
        return False
    _state["ok"] = hasattr(torch.ops.lora_kernels_ext, "replay_run")
    return _state["ok"]


def available() -> bool:
    """Cheap per-call check (decided once, then a dict lookup; enable(build=True) can still turn it on)."""
    ok = _state.get("ok")
    if ok is None:
        ok = _state["ok"] = enable()
    return ok


def clear() -> int:
    """Forget every recorded plan (e.g. after Triton's kernel cache was cleared); returns how many."""
    if not _state.get("ok"):
        return 0
    return int(torch.ops.lora_kernels_ext.replay_clear())


def recording() -> "_Recorder | None":
    """This thread's recorder, or None. Called on the Python path's hot spots: while nothing records
    anywhere it reads one global and returns (and under torch.compile's tracing it stays that)."""
    return getattr(_local, "recorder", None) if ACTIVE else None


stats = {"replayed": 0, "recorded": 0, "declined": 0}  # calls, since import (tests and reports read it)
last_declined: list = []  # why the latest keys were declined (at most 8, newest last)


def run(kind: int, tensors: list, scalars: list, flags: list, impl, *args):
    """impl(*args) through a recorded plan for this key when there is one; else run it, recording."""
    status, outs = torch.ops.lora_kernels_ext.replay_run.default(kind, tensors, scalars, flags)
    if status == 1:
        stats["replayed"] += 1
        return tuple(outs)
    if status != 3 or recording() is not None:  # first sight, or a declined key: the Python path
        return impl(*args)
    with record(tensors) as rec:
        result = impl(*args)
    program = rec.program(result)
    torch.ops.lora_kernels_ext.replay_register.default(kind, tensors, scalars, flags, program)
    if rec.why is None:
        stats["recorded"] += 1
    else:
        stats["declined"] += 1
        last_declined[:] = (last_declined + [rec.why])[-8:]
    return result


@contextlib.contextmanager
def record(inputs: list):
    """Record what runs in this thread inside the block (the Python path of one call) into the
    yielded _Recorder, whose program(outputs) is then the plan, or [-1] with its .why."""
    global ACTIVE
    rec = _Recorder(inputs)
    _local.recorder = rec
    with _active_lock:  # += on a global is not atomic across threads; a lost update could hide hooks
        ACTIVE += 1
    try:
        with _AtenWatch(rec):
            yield rec
    finally:
        with _active_lock:
            ACTIVE -= 1
        _local.recorder = None


class _AtenWatch(TorchDispatchMode):
    """Sees every ATen op of the recorded call: anything the program cannot replay declines it."""

    def __init__(self, rec: "_Recorder"):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _ALLOWED_ATEN and not self.rec.take_expected(name):
            self.rec.decline(f"ATen op {name}")
        return func(*args, **(kwargs or {}))


class _Recorder:
    def __init__(self, inputs: list):
        self.words: list[int] = []
        self.n_slots = len(inputs)
        self.by_ptr: dict[int, int] = {}
        self.tensors: list = list(inputs)
        self.why: str | None = None
        self.expected: dict[str, int] = {}  # ATen ops a recorded step is about to run (see expect)
        ptrs = [t.data_ptr() for t in inputs if t is not None]
        if len(set(ptrs)) != len(ptrs):
            self.decline("inputs share memory")
        for i, t in enumerate(inputs):
            if t is not None:
                self.by_ptr.setdefault(t.data_ptr(), i)

    def decline(self, why: str) -> None:
        if self.why is None:
            self.why = why

    def expect(self, *names: str) -> None:
        """The next ATen ops of these names belong to a step about to be recorded (e.g. the mm of
        `mm`): the watch lets exactly those through, so any other such op still declines."""
        for n in names:
            self.expected[n] = self.expected.get(n, 0) + 1

    def take_expected(self, name: str) -> bool:
        left = self.expected.get(name, 0)
        if left:
            self.expected[name] = left - 1
        return bool(left)

    def _new_slot(self, t: torch.Tensor) -> int:
        slot = self.n_slots
        self.n_slots += 1
        self.tensors.append(t)
        self.by_ptr[t.data_ptr()] = slot  # a freed buffer's memory may come back: latest wins
        return slot

    def _slot_of(self, t: torch.Tensor, what: str = "an operand") -> int | None:
        slot = self.by_ptr.get(t.data_ptr())
        if slot is None:
            self.decline(f"{what} ({tuple(t.shape)} {t.dtype}) is neither an input nor a recorded buffer")
        return slot

    # ---- steps ---------------------------------------------------------------------------------
    def alloc(self, t: torch.Tensor, zero: bool) -> None:
        if t.numel() and not t.is_contiguous():
            self.decline("a strided allocation")
        slot = self._new_slot(t)
        self.words += [_ALLOC, slot, int(zero), _dtype_code(t.dtype), t.dim(), *t.shape]

    def sum0(self, out: torch.Tensor, src: torch.Tensor) -> None:
        s = self._slot_of(src, "sum's input")
        if s is not None:
            self.words += [_SUM0, self._new_slot(out), s]

    def cast(self, out: torch.Tensor, src: torch.Tensor) -> None:
        s = self._slot_of(src, "cast's input")
        if s is not None:
            self.words += [_CAST, self._new_slot(out), s, _dtype_code(out.dtype)]

    def _slot_exact(self, t: torch.Tensor, what: str) -> int | None:
        """The slot holding t itself (same sizes and strides), not just its memory."""
        s = self._slot_of(t, what)
        if s is not None and self.tensors[s] is not t and not _same_view(self.tensors[s], t):
            self.decline(f"{what} is a view of a recorded buffer, not the buffer")
            return None
        return s

    def addmm(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, transpose: bool, alpha: float = 1.0,
              beta: float = 1.0) -> None:
        slots = [self._slot_exact(t, f"addmm_ operand {i}") for i, t in enumerate((out, a, b))]
        if None not in slots:
            self.words += [_ADDMM, *slots, int(transpose), _f64_bits(alpha), _f64_bits(beta)]

    def mm(self, out: torch.Tensor, a: torch.Tensor, ta: bool, b: torch.Tensor, tb: bool, alpha: float,
           out_dtype: torch.dtype | None) -> None:
        sa, sb = self._slot_exact(a, "mm operand 0"), self._slot_exact(b, "mm operand 1")
        if sa is not None and sb is not None:
            self.words += [_MM, self._new_slot(out), sa, int(ta), sb, int(tb),
                           -1 if out_dtype is None else _dtype_code(out_dtype), _f64_bits(alpha)]

    def launch(self, compiled, grid, args) -> None:
        """One launch of `compiled` (a triton CompiledKernel) with the launcher's arguments `args`
        (the kernel's arguments in order, constexprs included, TensorDescriptors unexpanded)."""
        md = compiled.metadata
        if (getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_cooperative_grid", False)
                or getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0)):
            self.decline("a launch with clusters, cooperative groups or scratch memory")
            return
        sig = list(compiled.src.signature.values())
        if len(sig) != len(args):
            self.decline("a launch whose arguments do not match the kernel's signature")
            return
        metas = list(getattr(md, "tensordesc_meta", None) or [])
        params: list[int] = []
        n = 0
        for i, (ty, a) in enumerate(zip(sig, args)):
            what = f"argument {i} of {getattr(compiled, 'name', '?')}"
            if ty == "constexpr":
                continue
            if isinstance(ty, str) and ty.startswith("tensordesc"):
                if not metas or metas[0] is None:
                    self.decline("a tensor descriptor not lowered to TMA")
                    return
                meta = metas.pop(0)
                words = self._tma(a, meta, what)
                if words is None:
                    return
                params += words
                params += [w for d in a.shape for w in (_RAW, int(d) & 0xFFFFFFFF)]  # i32 shape
                params += [w for s in a.strides for w in (_RAW, int(s))]  # i64 strides
                n += 1 + 2 * len(a.shape)
                continue
            word = self._param(ty, a, what)
            if word is None:
                return
            params += word
            n += 1
        grid = tuple(grid) + (1,) * (3 - len(grid))
        self.words += [_LAUNCH, int(compiled.function), *map(int, grid), 32 * md.num_warps, md.shared,
                       int(bool(getattr(md, "launch_pdl", False))), n, *params]

    def _param(self, ty: str, a, what: str) -> list[int] | None:
        if ty.startswith("*"):
            if a is None:
                return [_PTR, -1]
            s = self._slot_of(a, what)
            return None if s is None else [_PTR, s]
        if ty in ("i1", "i8", "u1", "u8", "i16", "u16", "i32", "u32", "i64") or (ty == "u64" and 0 <= a < 2**63):
            return [_RAW, int(a)]
        if ty in ("fp32", "f32"):
            return [_RAW, struct.unpack("<I", struct.pack("<f", float(a)))[0]]
        if ty == "fp64":
            return [_RAW, struct.unpack("<q", struct.pack("<d", float(a)))[0]]
        self.decline(f"a kernel argument of type {ty}")
        return None

    def _tma(self, desc, meta, what: str) -> list[int] | None:
        s = self._slot_of(desc.base, what)
        if s is None:
            return None
        base = self.tensors[s]
        if (tuple(desc.shape) != tuple(base.shape) or tuple(desc.strides) != tuple(base.stride())
                or meta.get("fp4_padded")):
            self.decline("a tensor descriptor that is not its tensor's own shape and strides")
            return None
        block = list(meta["block_size"])
        return [_TMA, s, int(meta["swizzle"]), int(meta["elem_size"]),
                _TMA_DTYPE_DEVICE_TO_HOST[int(meta["elem_type"])], len(block), *map(int, block),
                1 if desc.padding == "nan" else 0]

    def program(self, result) -> list[int]:
        outs = []
        for t in result:
            s = self.by_ptr.get(t.data_ptr()) if isinstance(t, torch.Tensor) else None
            if s is None or self.tensors[s] is not t and not _same_view(self.tensors[s], t):
                self.decline("an output that is not a recorded buffer")
                break
            outs.append(s)
        if self.why is not None:
            return list(_DECLINED)
        return self.words + [_OUTPUTS, len(outs), *outs]


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


# c10::ScalarType's numbering for the dtypes a plan allocates or casts to
_DTYPE_CODES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4, torch.float16: 5,
                torch.float32: 6, torch.float64: 7, torch.bool: 11, torch.bfloat16: 15}


def _f64_bits(v: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _dtype_code(dt: torch.dtype) -> int:
    return _DTYPE_CODES[dt]
