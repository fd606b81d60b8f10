"""`sage`: ``sageattention.sageattn`` — SageAttention's own entry point (1.x: the Triton int8 kernel;
2.x: it picks a kernel by GPU). Lossy (8-bit), forward only, no masks; see `_sage_common` for the
accuracy floor (``MIN_SEQ_KV = 256``) and the in-place key smoothing of 1.x that the wrapper avoids.

Measured on an H200 (DESIGN.md): 1.0.6 runs at about half the speed of cuDNN on Flux/SDXL shapes, so
auto ranks it behind the exact kernels even with the lossy opt-in (it is there to be named).
"""

from __future__ import annotations

from typing import List

from ..call import Call
from ..registry import version_at_least
from ._sage_common import SageFamily, make_sage_kernel
from ._third_party import register_op

#: GPUs sageattention 2.x's ``sageattn`` dispatches (anything else raises "Unsupported CUDA architecture").
_V2_CAPABILITIES = frozenset({(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)})


class SageBackend(SageFamily):
    NAME = "sage"
    DESCRIPTION = "SageAttention sageattn (int8 QK; lossy, forward only)"
    MIN_VERSION = "1.0.6"
    REQUIRED_ATTRS = ("sageattn",)
    MIN_HEAD_DIM = 64
    MAX_HEAD_DIM = 128
    HEAD_DIM_MULTIPLE = 32  # 1.x: 64, 96, 128
    CUDA_MIN_CAPABILITY = (8, 0)
    ARCH_NOTE = "SageAttention's int8 kernels need Ampere or newer"
    # sm90 measured (H200, 2026-11-26 and 2026-11-30, docs/GPU_BACKENDS.md): lossy, and slower than cuDNN up to
    # SDXL's and Flux's lengths (0.787 vs 0.413 ms at Flux 1024²); lossy opt-in only, behind the exact kernels.
    # "cuda": an estimate.
    AUTO_PRIORITY = {"cuda_sm90": 60, "cuda": 60}

    kernel = staticmethod(make_sage_kernel("sageattn", presmooth_k=True))

    def call_reasons(self, call: Call) -> List[str]:
        reasons = super().call_reasons(call)
        if (call.capability is not None and self._version and version_at_least(self._version, "2.0.0")
                and tuple(call.capability) not in _V2_CAPABILITIES):
            allowed = ", ".join(f"sm{a}{b}" for a, b in sorted(_V2_CAPABILITIES))
            reasons.append(f"sageattention {self._version}'s sageattn has no kernel for "
                           f"sm{call.capability[0]}{call.capability[1]} (supported: {allowed})")
        return reasons


register_op(SageBackend)
