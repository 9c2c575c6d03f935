"""Install lora_kernels.

`pip install .` installs the Python package together with the C++/CUDA sources of the multi-adapter
extension (csrc/, shipped as the package `lora_kernels._csrc`). The extension is compiled on first
use with torch.utils.cpp_extension (ninja) and cached, so a plain install needs no compiler.

To compile it at install time instead (torch must already be installed, hence no build isolation):

    LORA_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .

builds `lora_kernels/_multi_lora_ext_cuda*.so` when torch has CUDA and nvcc is found (CUDA_HOME),
else `_multi_lora_ext_cpu*.so`; TORCH_CUDA_ARCH_LIST picks the GPU architectures (e.g. "9.0").
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("LORA_KERNELS_BUILD_EXT", "0").strip() not in ("", "0"):
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext_modules.append(CUDAExtension(
            "lora_kernels._multi_lora_ext_cuda",
            ["csrc/multi_lora.cpp", "csrc/multi_lora_cuda.cpp", "csrc/multi_lora_kernels.cu",
             "csrc/launch_replay.cpp"],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            libraries=["dl"],
        ))
    else:
        ext_modules.append(CppExtension("lora_kernels._multi_lora_ext_cpu", ["csrc/multi_lora.cpp"],
                                        extra_compile_args={"cxx": ["-O3"]}))
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused LoRA kernels for PyTorch: one-pass forward/backward with in-kernel dropout, "
    "multi-adapter batches, and a drop-in patch for Hugging Face and PEFT models.",
    packages=["lora_kernels", "lora_kernels.ops", "lora_kernels._bench", "lora_kernels._csrc"],
    package_dir={"lora_kernels._csrc": "csrc"},
    package_data={"lora_kernels._csrc": ["*.cpp", "*.cu", "*.cuh", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
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
