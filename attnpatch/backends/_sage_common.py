"""What the SageAttention backends share (`sage`, `sage_fp16_triton`, `sage_fp16_cuda`, `sage_fp8_cuda`,
`sage_fp8_cuda_sm90`; `sage3` has its own package).

All are lossy (8-bit Q·K, 8- or 16-bit P·V), forward only, take no mask and no dropout, and run in
the "HND" layout (bnsd) with ``sm_scale``. Their causal flag is documented "only applicable when
qo_len == kv_len", so causal with s_q != s_kv is refused. GQA is native (k/v may have fewer heads).

Accuracy floor: DESIGN.md measured sageattention 1.0.6 at 0.14–0.2 relative error at 197–200 tokens
(fp16 and bf16) but 1.2–1.9e-2 from 256 tokens up; the per-block quantisation (blocks of 128 queries
and 64 keys) degrades on short sequences. So these backends declare ``MIN_SEQ_KV = 256``: shorter
calls go to an exact kernel. The SageAttention 2 kernels have not been measured on short sequences
here; they get the same floor as a precaution.

sageattention 1.x subtracts the key mean *in place* (``k -= km``) when ``smooth_k=True``, which would
modify the caller's key tensor; the wrappers therefore smooth ``k`` out of place and pass
``smooth_k=False`` to the 1.x entry point (same result: the mean shift cancels in the softmax).
"""

from __future__ import annotations

from typing import Callable, List

import torch

from ..call import Call
from ._third_party import ThirdPartyBackend, first_output


def make_sage_kernel(function: str, presmooth_k: bool, **fixed) -> Callable:
    """A kernel function calling ``sageattention.<function>`` in the HND layout."""

    def kernel(sage, q, k, v, mask, is_causal, scale, dropout_p):
        if mask is not None or dropout_p:
            raise ValueError(f"sageattention.{function} takes no mask and no dropout; the router refuses such calls")
        kwargs = dict(fixed)
        if presmooth_k:
            k = k - k.mean(dim=2, keepdim=True)
            kwargs["smooth_k"] = False
        fn = getattr(sage, function)
        return first_output(fn(q, k, v, tensor_layout="HND", is_causal=is_causal, sm_scale=scale, **kwargs))

    kernel.__name__ = f"sage_{function}_kernel"
    return kernel


class SageFamily(ThirdPartyBackend):
    PACKAGE = "sageattention"
    EXTRA = "sage"
    MODULE = "sageattention"
    LOSSY = True
    SUPPORTS_BACKWARD = False
    SUPPORTS_DROPOUT = False
    SUPPORTS_GQA = True
    SUPPORTS_CAUSAL = True
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    SUPPORTED_MASKS = frozenset({"none"})
    MIN_SEQ_KV = 256
    NATIVE_LAYOUT = "bnsd"
    #: Relative error bound ||out - ref|| / ||ref|| against an fp32 reference, from 256 tokens up.
    TOLERANCE = {torch.float16: 5e-2, torch.bfloat16: 5e-2}
    #: Flag in ``sageattention.core`` that says the compiled kernel of this backend was built.
    BUILT_FLAG: str = ""

    def check_extension(self, module) -> List[str]:
        if not self.BUILT_FLAG:
            return []
        import sys
        core = sys.modules.get(f"{self.MODULE}.core") or getattr(module, "core", None)
        if core is None or not getattr(core, self.BUILT_FLAG, False):
            return [f"sageattention {self._version} was installed without this kernel's compiled extension "
                    f"(sageattention.core.{self.BUILT_FLAG} is False): rebuild SageAttention for this GPU"]
        return []

    def call_reasons(self, call: Call) -> List[str]:
        if call.is_causal and call.seq_q != call.seq_kv:
            return [f"causal with seq_q={call.seq_q} != seq_kv={call.seq_kv} (SageAttention's causal is "
                    "documented for qo_len == kv_len only)"]
        return []
