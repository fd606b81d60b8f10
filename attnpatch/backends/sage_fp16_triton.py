"""`sage_fp16_triton`: SageAttention 2's explicit kernel ``sageattention.sageattn_qk_int8_pv_fp16_triton`` — Triton int8 QK, fp16 PV.

Lossy, forward only, no masks; HND layout; head dims up to 128 (SageAttention pads smaller ones).
Arch rule: upstream marks this Triton kernel unusable on sm120; tested range Ampere to Hopper. Accuracy floor and shared behaviour: see `_sage_common`.
"""

from __future__ import annotations

from ._sage_common import SageFamily, make_sage_kernel
from ._third_party import register_op


class SageFp16TritonBackend(SageFamily):
    NAME = "sage_fp16_triton"
    DESCRIPTION = "SageAttention 2 sageattn_qk_int8_pv_fp16_triton (Triton int8 QK, fp16 PV; lossy, forward only)"
    MIN_VERSION = "2.0.0"
    REQUIRED_ATTRS = ("sageattn_qk_int8_pv_fp16_triton",)
    BUILT_FLAG = ""
    MIN_HEAD_DIM = 8
    MAX_HEAD_DIM = 128
    HEAD_DIM_MULTIPLE = 8
    CUDA_MIN_CAPABILITY = (8, 0)
    CUDA_MAX_CAPABILITY = (9, 0)
    CUDA_CAPABILITIES = None
    ARCH_NOTE = "upstream marks this Triton kernel unusable on sm120; tested range Ampere to Hopper"
    # Opt-in only (lossy): ranked before the exact kernels on the GPUs upstream's own sageattn picks it for.
    # Estimate from upstream's dispatch (sm86); no sm90 entry: measured at 1.9x cuDNN's time on an H200.
    AUTO_PRIORITY = {"cuda_sm86": 5}

    kernel = staticmethod(make_sage_kernel("sageattn_qk_int8_pv_fp16_triton", presmooth_k=False, **{}))


register_op(SageFp16TritonBackend)
