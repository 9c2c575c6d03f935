"""The end-to-end benchmark's CPU path: nothing timed, the correctness probe reported."""
import re

import pytest
import torch

from lora_kernels._bench import e2e


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the report")
def test_e2e_report_on_cpu_probes_instead_of_timing(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    rows = e2e.run(quick=True)
    assert [r.impl for r in rows] == list(e2e.IMPLS)
    assert all(r.ms is None and r.note.startswith("not measured (no CUDA)") for r in rows)
    assert "4L" in rows[0].case
    d_logits, d_grad = map(float, re.findall(r"= ([0-9.e+-]+)", rows[0].note))
    assert d_logits < 1e-5 and d_grad < 1e-5


@pytest.mark.gpu
def test_e2e_quick_on_gpu():
    rows = e2e.run(quick=True)
    assert [r.impl for r in rows] == list(e2e.IMPLS)
    assert all(r.ms is not None and r.ms > 0 and r.extra["peak_gib"] > 0 for r in rows)
    assert rows[0].ratio == 1.0
