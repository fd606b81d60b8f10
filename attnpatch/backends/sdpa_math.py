"""`sdpa_math`: SDPA pinned to its math kernel: every feature, every dtype, slow. The yardstick for
the error of the other exact kernels."""

from __future__ import annotations

import torch

from ._sdpa_common import SdpaFamily


class SdpaMathBackend(SdpaFamily):
    NAME = "sdpa_math"
    DESCRIPTION = "torch SDPA pinned to the math kernel (reference speed, every feature)"
    KERNEL = "MATH"
    NATIVE_GQA = True
    AUTOTUNE_TIMED = False  # never worth measuring: the slow reference kernel
    AUTO_PRIORITY = {"cpu": 30, "cuda_sm90": 80, "cuda": 80}
    TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
