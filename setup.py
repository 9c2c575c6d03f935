"""Install lora_kernels.

`pip install .` installs the Python package together with the C++/CUDA sources of the multi-adapter
extension (csrc/, shipped as the package `lora_kernels._csrc`). The extension is compiled on first
use with torch.utils.cpp_extension (ninja) and cached, so a plain install needs no compiler.
"""
from setuptools import setup

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused LoRA kernels for PyTorch: one-pass forward/backward with in-kernel dropout, "
    "multi-adapter batches, and a drop-in patch for Hugging Face and PEFT models.",
    packages=["lora_kernels", "lora_kernels.ops", "lora_kernels._bench", "lora_kernels._csrc"],
    package_dir={"lora_kernels._csrc": "csrc"},
    package_data={"lora_kernels._csrc": ["*.cpp", "*.cu", "*.cuh", "*.h"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "gpu": ["triton>=3.2"],
        "hf": ["transformers>=4.45", "peft>=0.13", "safetensors"],
        "test": [
            "pytest",
            "pytest-benchmark",
            "triton>=3.2",
            "transformers>=4.45",
            "peft>=0.13",
            "safetensors",
            "ninja",
            "pybind11",
        ],
    },
    entry_points={"console_scripts": ["lora-kernels=lora_kernels.__main__:main"]},
)
