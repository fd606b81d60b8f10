"""`sdpa`: torch.nn.functional.scaled_dot_product_attention with torch's own kernel choice."""

from __future__ import annotations

import torch

from ._sdpa_common import SdpaFamily


class SdpaBackend(SdpaFamily):
    NAME = "sdpa"
    DESCRIPTION = "torch SDPA, torch picks the kernel (cuDNN / flash / efficient / math)"
    KERNEL = None
    # On CUDA a GQA call with a mask would drop torch to the math kernel: the runner repeats the k/v
    # heads instead unless the call is flash-eligible (see NATIVE_GQA handling in _expand_gqa).
    CUDA_BOOL_MASK_AS_ADDITIVE = True  # cuDNN gives non-zero fully masked rows for bool masks (see _sdpa_common)
    AUTO_PRIORITY = {"cpu": 10, "cuda": 10, "cuda_sm90": 40}
    TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    def _expand_gqa(self, call):
        if not call.gqa:
            return False
        if call.device_type != "cuda":
            return super()._expand_gqa(call)
        flash_like = (call.mask_kind == "none" and call.dtype in (torch.float16, torch.bfloat16)
                      and call.head_dim <= 256 and call.head_dim == call.head_dim_v)
        return not flash_like or super()._expand_gqa(call)
