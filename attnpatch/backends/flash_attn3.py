"""`flash_attn3`: FlashAttention 3 for Hopper (``flash_attn_interface.flash_attn_func`` and
``flash_attn_varlen_func``, from the ``flash_attn_3`` package built from flash-attention's hopper/).

Same translation as `flash_attn` (bsnd; bottom-right causal translated to SDPA's top-left; key-padding
masks packed for the varlen entry point, any pattern; sliding windows through `window_plan`, softcap as
is). Differences: no dropout; some releases return ``(out, softmax_lse)`` and others ``out`` (both
handled); Hopper only; FlashAttention 3 keeps a window's right edge with more queries than keys (its API
only drops edges that cover every key). A build without softcap kernels
(``FLASH_ATTENTION_DISABLE_SOFTCAP``, as `benchmarks/build_kernels.sh` shrinks it) is found by the probe
on the GPU and refuses softcapped calls with that reason.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..call import Call
from ._third_party import ThirdPartyBackend, _first_line, register_op, run_flash_api, window_reasons


def flash_attn3_kernel(fa3, q, k, v, mask, is_causal, scale, dropout_p, window=None, softcap=None):
    """FA3 on bsnd tensors; ``fa3`` is ``flash_attn_interface`` (or a stand-in with its API)."""
    if dropout_p:
        raise ValueError(f"flash_attn3 has no dropout (dropout_p={dropout_p}); the router refuses such calls")
    return run_flash_api(fa3, q, k, v, mask, is_causal, {"softmax_scale": scale}, window=window, softcap=softcap)


class FlashAttn3Backend(ThirdPartyBackend):
    NAME = "flash_attn3"
    DESCRIPTION = "FlashAttention 3 (flash_attn_3 package, Hopper): exact, key-padding masks via varlen"
    PACKAGE = "flash_attn_3"
    MIN_VERSION = "3.0.0b1"
    EXTRA = None
    INSTALL_HINT = "build FlashAttention-3 from source: the hopper/ folder of Dao-AILab/flash-attention (it is not on PyPI)"
    MODULE = "flash_attn_interface"
    REQUIRED_ATTRS = ("flash_attn_func", "flash_attn_varlen_func")
    LOSSY = False
    SUPPORTS_BACKWARD = True
    SUPPORTS_DROPOUT = False
    SUPPORTS_GQA = True
    SUPPORTS_CAUSAL = True
    SUPPORTS_CAUSAL_WITH_MASK = False
    SUPPORTS_WINDOW = True
    SUPPORTS_SOFTCAP = True
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    SUPPORTED_MASKS = frozenset({"none", "bool"})
    KEY_PADDING_MASKS_ONLY = True
    MIN_HEAD_DIM = 8
    MAX_HEAD_DIM = 256
    HEAD_DIM_MULTIPLE = 8
    CUDA_MIN_CAPABILITY = (9, 0)
    CUDA_MAX_CAPABILITY = (9, 0)
    ARCH_NOTE = "FlashAttention 3 is built for Hopper (sm90)"
    NATIVE_LAYOUT = "bsnd"
    # Measured on an H200 (2026-11-30, docs/GPU_BACKENDS.md): the fastest exact kernel at long sequences
    # (Flux 1024² 0.393 vs cuDNN 0.432 ms, Wan 480p 32.5 vs 38.1 ms, 8k causal prefill 0.81 vs 0.96 ms),
    # but 2-6x slower below ~4k tokens, where its Python wrapper (~80 µs per call) dominates. Kept behind
    # cuDNN in the static order (what decides when nothing can be timed); auto times both.
    AUTO_PRIORITY = {"cuda_sm90": 12}
    TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    kernel = staticmethod(flash_attn3_kernel)

    #: why this build cannot softcap (found by `smoke_test` on the GPU), or None
    softcap_missing: Optional[str] = None

    def smoke_test(self, module, device: torch.device) -> List[str]:
        """A tiny softcapped call: builds shrunk with FLASH_ATTENTION_DISABLE_SOFTCAP raise on it. That is
        not a reason to be unavailable, only to refuse softcapped calls."""
        x = torch.randn(1, 128, 1, 64, device=device, dtype=torch.bfloat16)
        try:
            module.flash_attn_func(x, x, x, softcap=30.0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.softcap_missing = None
        except Exception as exc:  # RuntimeError from the extension's TORCH_CHECK
            self.softcap_missing = (f"this flash_attn_3 build has no softcap kernels ({_first_line(exc, 200)}); "
                                    "rebuild it without FLASH_ATTENTION_DISABLE_SOFTCAP")
        return []

    def call_reasons(self, call: Call):
        reasons = window_reasons(call, fa2=False)
        if call.softcap is not None and self.softcap_missing:
            reasons.append(self.softcap_missing)
        return reasons


register_op(FlashAttn3Backend)
