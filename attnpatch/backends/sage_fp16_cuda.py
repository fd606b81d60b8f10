"""`sage_fp16_cuda`: SageAttention 2's explicit kernel ``sageattention.sageattn_qk_int8_pv_fp16_cuda`` — CUDA int8 QK, fp16 PV (fp32 accumulation).

Lossy, forward only, no masks; HND layout; head dims up to 128 (SageAttention pads smaller ones).
Arch rule: the sm80 CUDA kernel (mma.sync int8/fp16) runs on Ampere and newer. Accuracy floor and shared behaviour: see `_sage_common`.
"""

from __future__ import annotations

from ._sage_common import SageFamily, make_sage_kernel
from ._third_party import register_op


class SageFp16CudaBackend(SageFamily):
    NAME = "sage_fp16_cuda"
    DESCRIPTION = "SageAttention 2 sageattn_qk_int8_pv_fp16_cuda (CUDA int8 QK, fp16 PV (fp32 accumulation); lossy, forward only)"
    MIN_VERSION = "2.0.0"
    REQUIRED_ATTRS = ("sageattn_qk_int8_pv_fp16_cuda",)
    BUILT_FLAG = "SM80_ENABLED"
    MIN_HEAD_DIM = 8
    MAX_HEAD_DIM = 128
    HEAD_DIM_MULTIPLE = 8
    CUDA_MIN_CAPABILITY = (8, 0)
    CUDA_MAX_CAPABILITY = None
    CUDA_CAPABILITIES = None
    ARCH_NOTE = "the sm80 CUDA kernel (mma.sync int8/fp16) runs on Ampere and newer"
    # Opt-in only (lossy): ranked before the exact kernels on the GPUs upstream's own sageattn picks it for.
    # Estimate from upstream's dispatch (sm80); no sm90 entry: measured at 1.9x cuDNN's time on an H200.
    AUTO_PRIORITY = {"cuda_sm80": 5}

    kernel = staticmethod(make_sage_kernel("sageattn_qk_int8_pv_fp16_cuda", presmooth_k=False, **{"pv_accum_dtype": "fp32"}))


register_op(SageFp16CudaBackend)
