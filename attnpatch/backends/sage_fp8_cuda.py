"""`sage_fp8_cuda`: SageAttention 2's explicit kernel ``sageattention.sageattn_qk_int8_pv_fp8_cuda`` — CUDA int8 QK, fp8 PV (Ada / consumer Blackwell).

Lossy, forward only, no masks; HND layout; head dims up to 128 (SageAttention pads smaller ones).
Arch rule: the fp8 mma.sync kernel is built for sm89 and sm120. Accuracy floor and shared behaviour: see `_sage_common`.
"""

from __future__ import annotations

from ._sage_common import SageFamily, make_sage_kernel
from ._third_party import register_op


class SageFp8CudaBackend(SageFamily):
    NAME = "sage_fp8_cuda"
    DESCRIPTION = "SageAttention 2 sageattn_qk_int8_pv_fp8_cuda (CUDA int8 QK, fp8 PV (Ada / consumer Blackwell); lossy, forward only)"
    MIN_VERSION = "2.0.0"
    REQUIRED_ATTRS = ("sageattn_qk_int8_pv_fp8_cuda",)
    BUILT_FLAG = "SM89_ENABLED"
    MIN_HEAD_DIM = 8
    MAX_HEAD_DIM = 128
    HEAD_DIM_MULTIPLE = 8
    CUDA_MIN_CAPABILITY = (8, 9)
    CUDA_MAX_CAPABILITY = None
    CUDA_CAPABILITIES = frozenset({(8, 9), (12, 0)})
    ARCH_NOTE = "the fp8 mma.sync kernel is built for sm89 and sm120"
    # Opt-in only (lossy): ranked before the exact kernels on the GPUs upstream's own sageattn picks it for.
    # Estimates from upstream's dispatch (sm89, sm120): not measured (no such card on the project's boxes).
    AUTO_PRIORITY = {"cuda_sm89": 5, "cuda_sm120": 5}

    kernel = staticmethod(make_sage_kernel("sageattn_qk_int8_pv_fp8_cuda", presmooth_k=False, **{"qk_quant_gran": "per_warp", "pv_accum_dtype": "fp32+fp32"}))


register_op(SageFp8CudaBackend)
