"""The fused-LoRA kernels compile for sm_90 at the dispatcher's configs, within shared memory.

Runs on CPU (Triton's own ptxas), in a subprocess because the test process may run kernels under
TRITON_INTERPRET, which turns them into interpreted functions. Catches what otherwise first fails
on the GPU: code the interpreter accepts but the compiler rejects, and configs over the 227 KB of
shared memory a block gets on an H100 (rank 256 with fp32 adapters once needed 262 KB).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_kernels_compile_for_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sm90_compile.py"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    from lora_kernels.ops.gluon_gemm import HAS_GLUON

    assert {r["kernel"] for r in rows} == ({"shrink", "expand", "dy", "x", "gemm", "shrink_tma", "xa_tma"}
                                           | ({"gemm_ws", "dgrad_ws", "da_gluon"} if HAS_GLUON else set()))
    for r in rows:
        assert r["shared"] <= 232448, r
        if r["kernel"] in ("gemm", "gemm_ws", "dgrad_ws", "da_gluon"):  # a spill in a loop costs every step
            assert r["stack"] == 0 and r["local"] == 0, r
