"""`sage_hub`: SageAttention 2's ``sageattn`` as the prebuilt ``SageAttention/sage-attention`` kernel from
the Hugging Face hub, loaded through the `kernels` package (the repository and version 3 that
diffusers' ``sage_hub`` backend loads).

``sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs)``
picks a kernel by GPU: sm80 → int8 QK / fp16 PV, sm89 and sm120 → int8 QK / fp8 PV, sm90 → the wgmma
fp8 PV kernel; any other GPU raises "Unsupported CUDA architecture" (read in kernels-community's
``sage-attention/torch-ext/sage_attention/core.py``, the hub packaging of the same SageAttention
sources; the ``SageAttention/sage-attention`` repository's own files were not readable here). It does
not modify the caller's key tensor (the key mean is passed to the quantiser), so no pre-smoothing.
Lossy, forward only, no masks, HND layout; accuracy floor and shared rules: see `_sage_common`. It is
never downloaded to answer "is it available?": see `_hub_common`.

No ``AUTO_PRIORITY``: auto never picks it, even with allow_lossy; name it. The binary has not been run
on our GPU box (no hub access there), so its accuracy and speed are unmeasured, and a lossy kernel
without a measured accuracy bound must not be chosen for the user. The locally installed Sage
backends have the auto slots.
"""

from __future__ import annotations

from typing import List, Optional

from ..call import Call

from ._hub_common import HubKernelBackend, make_hub_kernel
from ._sage_common import SageFamily, make_sage_kernel
from ._third_party import register_op

sage_hub_kernel = make_sage_kernel("sageattn", presmooth_k=False)

#: GPU -> the flag in the build's ``core`` module that says its kernel for that GPU loaded.
_BUILT_FLAGS = {(8, 0): "SM80_ENABLED", (8, 9): "SM89_ENABLED", (9, 0): "SM90_ENABLED", (12, 0): "SM89_ENABLED"}


class SageHubBackend(HubKernelBackend, SageFamily):
    NAME = "sage_hub"
    DESCRIPTION = ("SageAttention 2 sageattn, prebuilt from the hub (SageAttention/sage-attention via kernels; loaded "
                   "only when present locally or downloads are allowed): int8 QK, lossy, forward only")
    REPO_ID = "SageAttention/sage-attention"
    REPO_VERSION = 3
    REQUIRED_ATTRS = ("sageattn",)
    MIN_HEAD_DIM = 8
    MAX_HEAD_DIM = 128
    HEAD_DIM_MULTIPLE = 8
    CUDA_MIN_CAPABILITY = (8, 0)
    CUDA_MAX_CAPABILITY = None
    CUDA_CAPABILITIES = frozenset(_BUILT_FLAGS)
    ARCH_NOTE = "the hub build's sageattn dispatches sm80, sm89, sm90 and sm120 only"
    AUTO_PRIORITY = {}  # see the module docstring
    KERNEL_FN = staticmethod(sage_hub_kernel)
    kernel = staticmethod(make_hub_kernel("sage_hub", sage_hub_kernel))

    def _not_built(self, module, cap) -> Optional[str]:
        core = getattr(module, "core", None)
        flag = _BUILT_FLAGS.get(tuple(cap))
        if core is not None and flag is not None and getattr(core, flag, True) is False:
            return (f"the {self.REPO_ID} build loaded without its kernels for sm{cap[0]}{cap[1]} "
                    f"(core.{flag} is False)")
        return None

    def check_loaded(self, module, caps) -> List[str]:
        missing = [self._not_built(module, c) for c in caps]
        return [missing[0]] if missing and all(missing) else []

    def call_reasons(self, call: Call) -> List[str]:
        reasons = super().call_reasons(call)
        if call.device_type == "cuda" and call.capability is not None and self._module is not None:
            r = self._not_built(self._module, call.capability)
            if r:
                reasons.append(r)
        return reasons

register_op(SageHubBackend)
