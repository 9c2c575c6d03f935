"""Compile every fused-LoRA kernel for sm_90 at the configs the dispatcher picks, without a GPU.

    python tests/sm90_compile.py            -> one JSON line per kernel build
Triton ships ptxas and cuobjdump, so this catches on a CPU machine what otherwise fails only on
the GPU: kernels that do not compile (the interpreter accepts more), configs over the 227 KB of
shared memory a block may use on an H100, and register spills. Must run without TRITON_INTERPRET.
"""
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lora_kernels.ops import lora_linear as L  # noqa: E402

if L.HAS_GLUON:
    from triton.experimental.gluon import language as gl  # noqa: E402
    from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90
FLOAT_ARGS = {"inv_keep", "scale", "coef", "lb_scale", "gs_scale"}
M_BIG = 8192


def _signature(kernel, ptrs: dict, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_desc"):
            sig[name] = ptrs[name]  # e.g. "tensordesc<bf16[128,64]>"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptrs.get(name, "fp32")
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _gluon_descs(blocks: dict, xdt: str) -> dict:
    """{name: block shape} -> {name: the Gluon tensordesc signature type, with its default NVMMA layout}."""
    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16, "i32": gl.int32}[xdt]
    return {k: f"tensordesc<{xdt}[{v[0]},{v[1]}],{gl.NVMMASharedLayout.get_default_for(v, gdt)!r}>"
            for k, v in blocks.items()}


def _builds(ranks=(16, 64, 128, 256), dtypes=(("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32"))):
    for R, (xdt, adt), drop in itertools.product(ranks, dtypes, (False, True)):
        prec = "ieee" if xdt == "fp32" else "tf32"
        BR = L._block_r(R)
        c = L._shrink_cfg(M_BIG, R, drop)
        yield ("shrink", R, xdt, adt, drop, c, {"x_ptr": xdt, "a_ptr": adt, "seed_ptr": "i64"},
               {"HAS_DROPOUT": drop, "DOT_PRECISION": prec, "BLOCK_M": c.block_a, "BLOCK_K": c.block_b, "BLOCK_R": BR})
        c = L._x_cfg(M_BIG, R, drop)
        yield ("x", R, xdt, adt, drop, c, {"x_ptr": xdt, "a_ptr": adt, "seed_ptr": "i64", "dx_ptr": xdt},
               {"HAS_DROPOUT": drop, "WRITE_DX": True, "ATOMIC": True, "DOT_PRECISION": prec, "BLOCK_M": c.block_a,
                "BLOCK_K": c.block_b, "BLOCK_R": BR, "WAIT_END": False})
        c = L._expand_cfg(M_BIG, R)  # forward: y with bias; backward with dropout: dx_lora masked
        yield ("expand", R, xdt, adt, drop, c, {"b_ptr": adt, "bias_ptr": xdt, "y_ptr": xdt, "seed_ptr": "i64"},
               {"HAS_BIAS": not drop, "HAS_DROPOUT": drop, "DOT_PRECISION": prec, "BLOCK_M": c.block_a,
                "BLOCK_N": c.block_b, "BLOCK_R": BR})
        if drop:
            continue
        c = L._dy_cfg(M_BIG, R, adt == "fp32" and xdt != "fp32")
        yield ("dy", R, xdt, adt, drop, c, {"dy_ptr": xdt, "b_ptr": adt, "gs_ptr": xdt},
               {"COMPUTE_DB": True, "WRITE_GS": True, "DOT_PRECISION": prec, "BLOCK_M": c.block_a, "BLOCK_N": c.block_b, "BLOCK_R": BR})


    for R, (xdt, adt), masked in itertools.product(ranks, dtypes, (False, True)):
        if xdt == "fp32" or R > L._GEMM_MAX_RANK:
            continue  # the GEMM-epilogue kernel runs for 16-bit activations and r <= 64 only
        c, split = L._gemm_cfg(masked)
        BM, BN, BK = c.block_a, c.block_b, 64
        ptrs = {"a_desc": f"tensordesc<{xdt}[{BM},{BK}]>",
                "w_desc": f"tensordesc<{xdt}[{BK},{BN}]>" if masked else f"tensordesc<{xdt}[{BN},{BK}]>",
                "y_desc": f"tensordesc<{xdt}[{BM},{BN // split}]>",
                "l_ptr": "fp32", "r_ptr": adt, "bias_ptr": xdt, "seed_ptr": "i64"}
        yield ("gemm", R, xdt, adt, masked, c, ptrs,
               {"W_KMAJOR": not masked, "HAS_BIAS": not masked, "EPI_MASK": masked, "BM": BM, "BN": BN, "BK": BK,
                "BLOCK_R": L._block_r(R), "GROUP_M": L._GEMM_GROUP_M, "NUM_SMS": 132, "EPI_SPLIT": split,
                "HOIST_RT": L._block_r(R) == 16, "TRIGGER": masked})


    if L.HAS_GLUON:  # the forward's warp-specialized Gluon GEMM at r <= 32, both of its configs
        for R, (xdt, adt), one_wave in itertools.product(sorted({min(R, 32) for R in ranks}), dtypes, (False, True)):
            if xdt == "fp32":
                continue  # (L and B come in x's dtype whatever the adapters')
            BR = L._block_r(R)
            stages, split = L._gluon_gemm_cfg(BR, one_wave)
            c = L._Cfg(128, 256, 8, stages)
            blocks = {"a_desc": [128, 64], "w_desc": [256, 64], "l_desc": [128, BR], "b_desc": [256, BR],
                      "y_desc": [128, 256 // split]}
            ptrs = _gluon_descs(blocks, xdt)
            ptrs["bias_ptr"] = xdt
            yield ("gemm_ws", R, xdt, adt, one_wave, c, ptrs,
                   {"HAS_BIAS": True, "GROUP_M": L._GEMM_GROUP_M, "STAGES": stages, "num_warps": 8})
            # the dgrad (masked: the mask bits loaded beside the LoRA slot), in the same two configs
            blocks = {"dy_desc": [128, 64], "w_desc": [64, 256], "l_desc": [128, BR], "r_desc": [BR, 256],
                      "y_desc": [64, 256 // split]}  # (one MMA warpgroup's half of a tile)
            ptrs = {**_gluon_descs(blocks, xdt), **_gluon_descs({"m_desc": [4, 256]}, "i32")}
            yield ("dgrad_ws", R, xdt, adt, one_wave, c, ptrs,
                   {"MASKED": True, "GROUP_M": L._GEMM_GROUP_M, "STAGES": stages, "TRIGGER": True, "num_warps": 4})

    tma_ranks = sorted({R for R in ranks if R <= L._TMA_SHRINK_MAX_RANK} | {L._TMA_SHRINK_MAX_RANK})
    for R, (xdt, adt), drop in itertools.product(tma_ranks, dtypes, (False, True)):
        if xdt == "fp32":
            continue  # the TMA shrink runs for 16-bit activations only
        for c in (L._TMA_SHRINK_DROPOUT_CFG, L._TMA_SHRINK_DROPOUT_SMALL_A_CFG, L._TMA_SHRINK_CFG):
            ptrs = {"x_desc": f"tensordesc<{xdt}[{c.block_a},{c.block_b}]>", "a_ptr": adt, "s_ptr": "fp32",
                    "seed_ptr": "i64", "lb_ptr": xdt}
            yield ("shrink_tma", R, xdt, adt, drop, c, ptrs,  # with the Gluon GEMM's L operand: the larger build
                   {"HAS_DROPOUT": drop, "WRITE_LB": True, "BLOCK_M": c.block_a, "BLOCK_K": c.block_b,
                    "BLOCK_R": L._block_r(R)})


    if L.HAS_GLUON:  # the Gluon dA pass beside the Gluon dgrad (r <= 32), with the mask's bits and without
        for R, xdt, masked in itertools.product(sorted({min(R, 32) for R in ranks}), ("bf16", "fp16"), (False, True)):
            c, BR = L._XPASS_GLUON_CFG, L._block_r(min(R, 32))
            blocks = {"x_desc": [c.block_a, c.block_b], "g_desc": [c.block_a, BR]}
            ptrs = {**_gluon_descs(blocks, xdt), **_gluon_descs({"m_desc": [4, 2 * c.block_a]}, "i32"), "da_ptr": "fp32"}
            yield ("da_gluon", R, xdt, xdt, masked, c, ptrs,
                   {"MASKED": masked, "STAGES": c.num_stages, "WAIT_END": True, "num_warps": c.num_warps})

    for R, (xdt, adt) in itertools.product(tma_ranks, dtypes):
        if xdt == "fp32":
            continue
        c = L._XPASS_TMA_CFG
        ptrs = {"x_desc": f"tensordesc<{xdt}[{c.block_a},{c.block_b}]>", "g_ptr": "fp32", "seed_ptr": "i64",
                "da_ptr": "fp32"}
        yield ("xa_tma", R, xdt, adt, True, c, ptrs,
               {"HAS_DROPOUT": True, "ATOMIC": True, "BLOCK_M": c.block_a, "BLOCK_K": c.block_b, "BLOCK_R": L._block_r(R),
                "WAIT_END": True})


KERNELS = {"gemm": "_lora_gemm_kernel", "gemm_ws": "lora_gemm_ws_kernel", "dgrad_ws": "lora_dgrad_ws_kernel",
           "da_gluon": "lora_da_kernel", "xa_tma": "_lora_bwd_xa_tma_kernel", "shrink_tma": "_lora_shrink_tma_kernel", "shrink": "_lora_shrink_kernel", "x": "_lora_bwd_x_kernel", "expand": "_lora_expand_kernel",
           "dy": "_lora_bwd_dy_kernel"}


# The innermost stride of each tensor a pointer kernel walks: 1 at the launches (contiguous rows), which
# Triton turns into a constexpr. For the GEMM-epilogue kernel's rt operand it is rt's columns for A (the
# dgrad, masked) and its rows for B.T (the forward).
UNIT_STRIDES = {"stride_dyn", "stride_br", "stride_xk", "stride_ak", "stride_dxk", "stride_yn"}


def _specialized(kernel, name, drop, sig, consts):
    """(signature, constexprs, attrs) as a launch specializes them (triton/runtime/jit.py): ints equal to 1
    become constexprs, ints divisible by 16 and 16-byte-aligned pointers get tt.divisibility 16. Here:
    unit inner strides, every other int and every pointer divisible. Without this the compiler cannot
    prove loads contiguous, keeps them scalar and does not pipeline them, and the build's registers and
    shared memory are not the launch's (the dy pass: 22 KB unpipelined against 72 KB at 3 stages)."""
    units = UNIT_STRIDES | ({("stride_rc" if drop else "stride_rr")} if name == "gemm" else set())
    consts = {**consts, **{n: 1 for n in kernel.arg_names if n in units}}
    sig = {n: ("constexpr" if n in consts else t) for n, t in sig.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if (sig[n] == "i32" and n != "keep_thr") or sig[n].startswith("*")}
    return sig, consts, attrs


def _compile(build):
    name, R, xdt, adt, drop, cfg, ptrs, consts = build
    kernel = getattr(L, KERNELS[name])
    if name in ("gemm_ws", "dgrad_ws", "da_gluon"):  # Gluon: its own source type
        src = GluonASTSource(kernel, _signature(kernel, ptrs, consts), constexprs=consts)
        # the GEMMs as launched: 12 warps at 168 registers (the dgrad's default partition: 4 of them)
        options = ({"num_warps": cfg.num_warps} if name == "da_gluon" else
                   {"num_warps": 4 if name == "dgrad_ws" else 8, "maxnreg": 168})
    else:
        sig, consts, attrs = _specialized(kernel, name, drop, _signature(kernel, ptrs, consts), consts)
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    regs, stack, local = (int(v) for v in m.groups())
    return {"kernel": name, "R": R, "x": xdt, "adapter": adt, "dropout": drop, "cfg": list(cfg.__dict__.values()),
            "shared": k.metadata.shared, "regs": regs, "stack": stack, "local": local}


# For CI: rank 256 with fp32 adapters on bf16 activations, the pairing with the largest tiles, and
# ranks 16 (Rt loaded before the GEMM's main loop) and 64 (the most registers) for the GEMM-epilogue kernel.
QUICK = dict(ranks=(16, 64, 256), dtypes=(("bf16", "fp32"),))  # the largest shared-memory footprints

if __name__ == "__main__":
    quick = "--quick" in sys.argv
    builds = list(_builds(**QUICK) if quick else _builds())
    with ProcessPoolExecutor(2) as pool:
        for row in pool.map(_compile, builds):
            print(json.dumps(row), flush=True)
