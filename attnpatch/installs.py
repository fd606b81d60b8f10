"""How to get each backend's kernel: what each ``pip install 'attnpatch[EXTRA]'`` gives, and the exact
steps for what no extra can give (source builds, wheels that must match your torch).

Data only; `attnpatch info` shows it (for every backend that is not available here, and the extras).
Keep it in step with ``[project.optional-dependencies]`` in pyproject.toml (tests/test_installs.py
checks that every extra named here exists there and that ``[all]`` pulls no source build and no
package that pins torch).
"""

from __future__ import annotations

from typing import Dict, Optional

#: extra -> what it installs and what that serves.
EXTRAS: Dict[str, str] = {
    "diffusers": "diffusers, transformers and accelerate: the diffusers adapter, pipelines, `attnpatch demo`",
    "transformers": "transformers: the transformers adapter",
    "diffsynth": ("DiffSynth-Studio (the DiffSynth adapter). Its torchvision dependency can replace your torch "
                  "with another version: install the torchvision built for your torch first"),
    "sage": ("sageattention 1.0.6, the newest on PyPI (Triton kernels, pure Python): it serves the `sage` "
             "backend only. The SageAttention 2 backends (sage_fp16_triton, sage_fp16_cuda, sage_fp8_cuda, "
             "sage_fp8_cuda_sm90) need 2.x built from source (see their rows), or use `sage_hub` for a prebuilt "
             "SageAttention 2"),
    "flash": ("flash-attn (FlashAttention 2). It builds against the torch already installed, so pip needs "
              "--no-build-isolation: pip install 'attnpatch[flash]' --no-build-isolation (a prebuilt wheel is "
              "fetched when one matches your torch, CUDA and Python; otherwise it compiles with nvcc, which "
              "takes long)"),
    "flash4": "flash-attn-4 (FlashAttention 4, a pre-release CuTe DSL package; Hopper and Blackwell GPUs)",
    "xformers": ("xformers. Each xformers wheel requires one torch version, and pip installs the newest "
                 "xformers, which can replace your torch: prefer the wheel built for your torch (see the "
                 "xformers row)"),
    "hub": "kernels: the flash_attn3_hub and sage_hub backends (prebuilt FlashAttention 3 / SageAttention 2)",
    "plot": "matplotlib: `attnpatch bench --plot`",
    "test": "pytest and the libraries the test suite uses",
    "all": ("everything that installs from prebuilt wheels without changing torch: diffusers, transformers, "
            "accelerate, sageattention 1.0.6, kernels, matplotlib, tqdm. Not included: flash-attn (a source "
            "build), xformers (pins its own torch), flash-attn-4 (a pre-release), DiffSynth-Studio (its "
            "torchvision can replace torch)"),
}

_SAGE2 = ("SageAttention 2 is not on PyPI (the `sage` extra gives 1.0.6): build it for your GPU with "
          "git clone https://github.com/thu-ml/SageAttention && cd SageAttention && "
          "pip install . --no-build-isolation (needs nvcc and torch with CUDA; only the kernels of the GPUs "
          "present are built). Prebuilt alternative: sage_hub")

#: backend -> how to get its kernel on this machine.
HOW_TO_GET: Dict[str, str] = {
    "sdpa": "ships with torch",
    "sdpa_cudnn": "ships with CUDA builds of torch; needs an NVIDIA GPU of sm80 or newer",
    "sdpa_flash": "ships with torch",
    "sdpa_efficient": "ships with CUDA builds of torch",
    "sdpa_math": "ships with torch",
    "flex": "ships with torch 2.6 or newer (compiled with torch.compile: triton on GPU, a C++ compiler on CPU)",
    "eager": "ships with attnpatch",
    "fp8": "ships with attnpatch; needs triton (bundled with CUDA builds of torch) and a Hopper (sm90) GPU",
    "flash_attn": "pip install flash-attn --no-build-isolation (or pip install 'attnpatch[flash]' --no-build-isolation)",
    "flash_attn3": ("FlashAttention 3 is not on PyPI: git clone https://github.com/Dao-AILab/flash-attention && "
                    "cd flash-attention/hopper && python setup.py install (Hopper, CUDA 12.3 or newer). "
                    "Prebuilt alternative: flash_attn3_hub"),
    "flash_attn3_fp8": ("FlashAttention 3 built with its fp8 kernels (not on PyPI): as flash_attn3, without "
                        "FLASH_ATTENTION_DISABLE_FP8 set (benchmarks/build_kernels.sh fa3 keeps them; Hopper)"),
    "flash_attn4": "pip install 'attnpatch[flash4]' (Hopper or Blackwell)",
    "xformers": ("the xformers wheel built for your torch, from PyTorch's index: pip install xformers "
                 "--index-url https://download.pytorch.org/whl/cu128 (use your torch's CUDA tag; check with "
                 "`pip install xformers --dry-run` that it keeps your torch)"),
    "sage": "pip install 'attnpatch[sage]' (sageattention 1.0.6; NVIDIA sm80 or newer, triton)",
    "sage_fp16_triton": _SAGE2,
    "sage_fp16_cuda": _SAGE2,
    "sage_fp8_cuda": _SAGE2,
    "sage_fp8_cuda_sm90": _SAGE2,
    "sage3": ("SageAttention 3 is not on PyPI: git clone https://github.com/thu-ml/SageAttention && "
              "cd SageAttention/sageattention3_blackwell && pip install . --no-build-isolation (Blackwell GPUs)"),
    "flash_attn3_hub": ("pip install 'attnpatch[hub]', then put the kernel on this machine once: "
                        "ATTNPATCH_HUB_DOWNLOAD=1 (downloads kernels-community/flash-attn3 at the first probe) or "
                        "LOCAL_KERNELS=kernels-community/flash-attn3=/path/to/build (README: prebuilt kernels)"),
    "sage_hub": ("pip install 'attnpatch[hub]', then put the kernel on this machine once: "
                 "ATTNPATCH_HUB_DOWNLOAD=1 (downloads SageAttention/sage-attention at the first probe) or "
                 "LOCAL_KERNELS=SageAttention/sage-attention=/path/to/build (README: prebuilt kernels)"),
}


def how_to_get(backend) -> Optional[str]:
    """How to get ``backend``'s kernel (a `Backend` or a `BackendInfo`): from the table, else from its
    declared extra or install hint, else None."""
    name = getattr(backend, "NAME", None) or getattr(backend, "name", "")
    if name in HOW_TO_GET:
        return HOW_TO_GET[name]
    hint = getattr(backend, "INSTALL_HINT", None)
    if hint:
        return hint
    extra = getattr(backend, "EXTRA", None)
    if extra:
        return f"pip install 'attnpatch[{extra}]'"
    package = getattr(backend, "PACKAGE", None) or getattr(backend, "package", None)
    if package and package != "torch":
        return f"pip install {package}"
    return None
