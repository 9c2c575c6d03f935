"""Adapter-gradient error of one training step of a tiny patched Llama vs PEFT, per backend and dtype.

    python scripts/diag_model_precision.py
Both models hold the same weights; the error of each half-precision run is measured against the
fp32 run of the same model (relative Frobenius norm over every adapter gradient), as in
tests/test_patch.py::test_bf16_training_step_on_gpu_within_2x_of_peft, plus the per-module worst.
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora_kernels as lk  # noqa: E402
from tests._models import R, build, peft_twin, randomize_adapters  # noqa: E402
from tests.test_patch import _err, _train_grads  # noqa: E402


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for backend in ("torch", "triton") if dev == "cuda" else ("torch",):  # Triton kernels need CUDA
        os.environ["LORA_KERNELS_BACKEND"] = backend
        for dt in (torch.bfloat16, torch.float16):
            base = build("llama").to(dev)
            model = lk.patch(copy.deepcopy(base), r=R, dropout=0.0)
            randomize_adapters(model)
            names = sorted(model.lora_kernels_report.patched)
            twin = peft_twin(base, model, names)
            pn = [f"base_model.model.{n}" for n in names]
            ids = torch.randint(0, 120, (2, 32), generator=torch.Generator().manual_seed(0)).to(dev)
            model.train(), twin.train()
            l32, ref = _train_grads(model, ids, names)
            lo, ours = _train_grads(model.to(dt), ids, names)
            lt, theirs = _train_grads(twin.to(dt), ids, pn, peft_layout=True)
            print(f"{backend:<7} {str(dt):<15} adapter grads err ours {_err(ours, ref):.4f} peft {_err(theirs, ref):.4f}"
                  f"   logits err ours {_err(lo, l32):.4f} peft {_err(lt, l32):.4f}")


if __name__ == "__main__":
    main()
