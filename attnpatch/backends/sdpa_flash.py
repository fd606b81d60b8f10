"""`sdpa_flash`: SDPA pinned to its FlashAttention-2 kernel (CUDA) or its flash CPU kernel."""

from __future__ import annotations

from typing import List

import torch

from ..call import Call
from ._sdpa_common import SdpaFamily


class SdpaFlashBackend(SdpaFamily):
    NAME = "sdpa_flash"
    DESCRIPTION = "torch SDPA pinned to flash attention (FA2 on CUDA, the flash CPU kernel on CPU)"
    KERNEL = "FLASH_ATTENTION"
    NATIVE_GQA = True
    SUPPORTS_V_HEAD_DIM_DIFFERENT = False
    SUPPORTS_LSE = True
    LSE_WITH_MASKS = False  # the CPU kernel gives 0, not -inf, for fully masked rows (CUDA takes no masks)
    AUTO_PRIORITY = {"cpu": 20, "cuda_sm90": 20, "cuda": 20}
    TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    def extra_reasons(self, call: Call) -> List[str]:
        if call.device_type == "cpu":
            # torch's CPU flash kernel: masks yes, dropout no (checked against torch 2.13/2.14).
            return [f"dropout_p={call.dropout_p} (the CPU flash kernel has no dropout)"] if call.dropout_p > 0 else []
        return super().extra_reasons(call)
