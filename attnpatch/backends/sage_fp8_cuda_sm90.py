"""`sage_fp8_cuda_sm90`: SageAttention 2's explicit kernel ``sageattention.sageattn_qk_int8_pv_fp8_cuda_sm90`` — CUDA int8 QK, fp8 PV with Hopper wgmma.

Lossy, forward only, no masks; HND layout; head dims up to 128 (SageAttention pads smaller ones).
Arch rule: the wgmma kernel exists for Hopper (sm90) only. Accuracy floor and shared behaviour: see `_sage_common`.
"""

from __future__ import annotations

from ._sage_common import SageFamily, make_sage_kernel
from ._third_party import register_op


class SageFp8CudaSm90Backend(SageFamily):
    NAME = "sage_fp8_cuda_sm90"
    DESCRIPTION = "SageAttention 2 sageattn_qk_int8_pv_fp8_cuda_sm90 (CUDA int8 QK, fp8 PV with Hopper wgmma; lossy, forward only)"
    MIN_VERSION = "2.0.0"
    REQUIRED_ATTRS = ("sageattn_qk_int8_pv_fp8_cuda_sm90",)
    BUILT_FLAG = "SM90_ENABLED"
    MIN_HEAD_DIM = 8
    MAX_HEAD_DIM = 128
    HEAD_DIM_MULTIPLE = 8
    CUDA_MIN_CAPABILITY = (9, 0)
    CUDA_MAX_CAPABILITY = (9, 0)
    CUDA_CAPABILITIES = frozenset({(9, 0)})
    ARCH_NOTE = "the wgmma kernel exists for Hopper (sm90) only"
    # Opt-in only (lossy): ranked before the exact kernels on the GPUs upstream's own sageattn picks it for.
    # Measured on an H200 (2026-11-30, docs/GPU_BACKENDS.md): the fastest lossy kernel auto may take at Wan's
    # video lengths (28.2 vs cuDNN's 38.6 ms), slower than cuDNN up to 8192 keys, where auto's timing decides.
    AUTO_PRIORITY = {"cuda_sm90": 5}

    kernel = staticmethod(make_sage_kernel("sageattn_qk_int8_pv_fp8_cuda_sm90", presmooth_k=False, **{"pv_accum_dtype": "fp32+fp32"}))


register_op(SageFp8CudaSm90Backend)
