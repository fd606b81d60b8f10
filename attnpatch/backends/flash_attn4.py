"""`flash_attn4`: FlashAttention 4 (``flash_attn.cute.flash_attn_func``, the CuTe-DSL kernels of the
``flash-attn-4`` package; Hopper and Blackwell datacenter GPUs).

The entry point returns ``(out, lse)``; the wrapper keeps ``out``. Causal is bottom-right aligned in
flash-attn; SDPA's top-left is translated for s_kv >= s_q (keys no query can see are dropped) and the
call is refused for s_q > s_kv (the window arguments differ between FA4 releases, so the wrapper does
not rely on them). No masks, no dropout.
"""

from __future__ import annotations

from typing import List

import torch

from ..call import Call
from ._third_party import ThirdPartyBackend, causal_plan, first_output, register_op


def flash_attn4_kernel(cute, q, k, v, mask, is_causal, scale, dropout_p):
    """FA4 on bsnd tensors; ``cute`` is ``flash_attn.cute`` (or a stand-in with its API)."""
    if mask is not None or dropout_p:
        raise ValueError("flash_attn4 takes no mask and no dropout; the router refuses such calls")
    causal = False
    if is_causal:
        keys, causal, right = causal_plan(q.shape[1], k.shape[1])
        if right is not None:
            raise ValueError("flash_attn4: causal with s_q > s_kv is refused by the router")
        if keys is not None:
            k, v = k[:, :keys], v[:, :keys]
    return first_output(cute.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal))


class FlashAttn4Backend(ThirdPartyBackend):
    NAME = "flash_attn4"
    DESCRIPTION = "FlashAttention 4 (flash-attn-4 package, CuTe DSL; Hopper and Blackwell)"
    PACKAGE = "flash-attn-4"
    MIN_VERSION = "4.0.0b1"
    EXTRA = "flash4"
    MODULE = "flash_attn.cute"
    REQUIRED_ATTRS = ("flash_attn_func",)
    LOSSY = False
    SUPPORTS_BACKWARD = True
    SUPPORTS_DROPOUT = False
    SUPPORTS_GQA = True
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    SUPPORTED_MASKS = frozenset({"none"})
    MIN_HEAD_DIM = 64
    MAX_HEAD_DIM = 128
    HEAD_DIM_MULTIPLE = 32
    CUDA_CAPABILITIES = frozenset({(9, 0), (10, 0), (10, 3)})
    CUDA_MIN_CAPABILITY = (9, 0)
    ARCH_NOTE = "FlashAttention 4 targets Hopper (sm90) and datacenter Blackwell (sm100/sm103)"
    NATIVE_LAYOUT = "bsnd"
    # sm90 measured on an H200 (2026-11-30, docs/GPU_BACKENDS.md): as fast as FlashAttention 3 at long
    # sequences (Flux 1024² 0.379-0.391 ms vs cuDNN 0.401-0.430; Wan 480p 32.2-32.9 ms vs 38.1-38.4), but a
    # fresh process pays 4.5-5.2 s to import flash_attn.cute and 1.6-2.4 s to compile its first kernel
    # (the DSL's disk cache is off unless FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1; the import stays). Auto
    # timing it made the first Flux call of a fresh process 7.0 s against stock's 1.0 s, more than a Flux or
    # Wan run gains, so auto leaves it out on sm90 (it never imports it there); naming it uses it. Blackwell,
    # which it targets: estimates (first, the seed's order), not measured.
    AUTO_PRIORITY = {"cuda_sm100": 5, "cuda_sm103": 5}
    AUTO_LEFT_OUT = {"cuda_sm90": "on Hopper it is as fast as FlashAttention 3 but a fresh process pays ~5 s "
                                  "to import it and ~2 s to compile each new kernel (H200, 2026-11-30)"}
    TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    kernel = staticmethod(flash_attn4_kernel)

    def call_reasons(self, call: Call) -> List[str]:
        if call.is_causal and call.seq_q > call.seq_kv:
            return [f"causal with seq_q={call.seq_q} > seq_kv={call.seq_kv}: flash-attn's causal is bottom-right "
                    "aligned and this wrapper does not translate that case for FA4"]
        return []


register_op(FlashAttn4Backend)
