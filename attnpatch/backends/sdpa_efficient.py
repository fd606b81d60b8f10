"""`sdpa_efficient`: SDPA pinned to the memory-efficient (xformers-derived) CUDA kernel."""

from __future__ import annotations

import torch

from ._sdpa_common import SdpaFamily


class SdpaEfficientBackend(SdpaFamily):
    NAME = "sdpa_efficient"
    DESCRIPTION = "torch SDPA pinned to the memory-efficient kernel"
    KERNEL = "EFFICIENT_ATTENTION"
    NATIVE_GQA = False
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
    CUDA_MIN_CAPABILITY = (5, 0)
    SUPPORTS_LSE = True
    LSE_WITH_MASKS = False  # not checked for fully masked rows: the LSE is used without masks only
    AUTO_PRIORITY = {"cuda_sm90": 30, "cuda": 30}
    TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
