"""`flash_attn3`: FlashAttention 3 for Hopper (``flash_attn_interface.flash_attn_func`` and
``flash_attn_varlen_func``, from the ``flash_attn_3`` package built from flash-attention's hopper/).

Same translation as `flash_attn` (bsnd; bottom-right causal translated to SDPA's top-left; key-padding
masks packed for the varlen entry point, any pattern). Differences: no dropout; some releases return
``(out, softmax_lse)`` and others ``out`` (both handled); Hopper only.
"""

from __future__ import annotations

import torch

from ._third_party import (ThirdPartyBackend, causal_plan, first_output, key_padding_keep, pack_keys,
                           query_cu_seqlens, register_op)


def flash_attn3_kernel(fa3, q, k, v, mask, is_causal, scale, dropout_p):
    """FA3 on bsnd tensors; ``fa3`` is ``flash_attn_interface`` (or a stand-in with its API)."""
    if dropout_p:
        raise ValueError(f"flash_attn3 has no dropout (dropout_p={dropout_p}); the router refuses such calls")
    b, s_q = q.shape[0], q.shape[1]
    s_kv = k.shape[1]
    kwargs = {"softmax_scale": scale, "causal": False}
    if is_causal:
        keys, flag, right = causal_plan(s_q, s_kv)
        if keys is not None:
            k, v = k[:, :keys], v[:, :keys]
        kwargs["causal"] = flag
        if right is not None:
            kwargs["window_size"] = (-1, right)
    if mask is None:
        return first_output(fa3.flash_attn_func(q, k, v, **kwargs))
    keep = key_padding_keep(mask, b, s_kv)
    kp, vp, cu_k, dead = pack_keys(keep, k, v)
    out = first_output(fa3.flash_attn_varlen_func(
        q.reshape(b * s_q, *q.shape[2:]), kp, vp, query_cu_seqlens(b, s_q, q.device), cu_k, s_q, s_kv,
        **kwargs))
    out = out.reshape(b, s_q, *out.shape[1:])
    return out.masked_fill(dead[:, None, None, None], 0)


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
    AUTO_PRIORITY = {"cuda_sm90": 12}
    TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    kernel = staticmethod(flash_attn3_kernel)


register_op(FlashAttn3Backend)
