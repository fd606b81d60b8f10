"""`sdpa_cudnn`: SDPA pinned to the cuDNN attention kernel (the fastest exact kernel on Hopper)."""

from __future__ import annotations

import torch

from ._sdpa_common import SdpaFamily


class SdpaCudnnBackend(SdpaFamily):
    NAME = "sdpa_cudnn"
    DESCRIPTION = "torch SDPA pinned to cuDNN attention"
    KERNEL = "CUDNN_ATTENTION"
    NATIVE_GQA = False
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    CUDA_MIN_CAPABILITY = (8, 0)
    SUPPORTS_LSE = True
    LSE_WITH_MASKS = False  # not checked for fully masked rows: the LSE is used without masks only
    CUDA_BOOL_MASK_AS_ADDITIVE = True  # cuDNN gives non-zero fully masked rows for bool masks (see _sdpa_common)
    AUTO_PRIORITY = {"cuda_sm90": 10, "cuda": 40}
    TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
