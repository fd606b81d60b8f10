"""`sage3`: SageAttention 3 (``sageattn3.sageattn3_blackwell``): FP4 (NVFP4) attention for Blackwell.

Lossy (4-bit), forward only, no masks, no dropout. Translation:

* layout HND (bnsd); the entry point takes no scale and always uses 1/sqrt(head_dim), so another
  ``scale`` is applied by multiplying q by ``scale * sqrt(head_dim)`` first;
* it subtracts the key mean *in place*; the wrapper hands it an out-of-place smoothed copy;
* it ignores ``attn_mask`` and quietly falls back to SDPA for head dims >= 256: the backend declares no
  masks and head dims 64 and 128 only, so neither silent path is reachable;
* GQA: k/v heads are repeated (the kernel wants equal head counts); causal only with s_q == s_kv.

The accuracy floor (``MIN_SEQ_KV = 256``) follows the 8-bit kernels' (`_sage_common`); unmeasured here.
"""

from __future__ import annotations

from typing import List

import torch

from ..call import Call
from ._third_party import ThirdPartyBackend, first_output, register_op


def sage3_kernel(sage3, q, k, v, mask, is_causal, scale, dropout_p):
    if mask is not None or dropout_p:
        raise ValueError("sageattn3 takes no mask and no dropout; the router refuses such calls")
    d = q.shape[-1]
    if scale is not None and scale != d ** -0.5:
        q = q * (scale * d ** 0.5)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    k = k - k.mean(dim=2, keepdim=True)  # a fresh tensor: sageattn3 smooths its argument in place
    return first_output(sage3.sageattn3_blackwell(q, k, v, is_causal=is_causal))


class Sage3Backend(ThirdPartyBackend):
    NAME = "sage3"
    DESCRIPTION = "SageAttention 3 sageattn3_blackwell (FP4 on Blackwell; lossy, forward only)"
    PACKAGE = "sageattn3"
    MIN_VERSION = "1.0.0"
    EXTRA = None
    INSTALL_HINT = "build SageAttention3 from source (Blackwell GPUs; it is not on PyPI)"
    MODULE = "sageattn3"
    REQUIRED_ATTRS = ("sageattn3_blackwell",)
    LOSSY = True
    SUPPORTS_BACKWARD = False
    SUPPORTS_DROPOUT = False
    SUPPORTS_GQA = True
    SUPPORTS_CAUSAL = True
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    SUPPORTED_MASKS = frozenset({"none"})
    MIN_HEAD_DIM = 64
    MAX_HEAD_DIM = 128
    HEAD_DIM_MULTIPLE = 64
    MIN_SEQ_KV = 256
    CUDA_MIN_CAPABILITY = (10, 0)
    CUDA_CAPABILITIES = frozenset({(10, 0), (12, 0)})
    ARCH_NOTE = "SageAttention 3's FP4 kernels are built for Blackwell sm100 and sm120 only"
    NATIVE_LAYOUT = "bnsd"
    AUTO_PRIORITY = {"cuda_sm100": 4, "cuda_sm120": 4}
    TOLERANCE = {torch.float16: 1e-1, torch.bfloat16: 1e-1}

    kernel = staticmethod(sage3_kernel)

    def call_reasons(self, call: Call) -> List[str]:
        if call.is_causal and call.seq_q != call.seq_kv:
            return [f"causal with seq_q={call.seq_q} != seq_kv={call.seq_kv} (sageattn3's causal assumes equal lengths)"]
        return []


register_op(Sage3Backend)
