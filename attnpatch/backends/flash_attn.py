"""`flash_attn`: FlashAttention 2 (``flash_attn.flash_attn_func``; key-padding masks through
``flash_attn_varlen_func``).

Translation (flash-attn takes bsnd, ``softmax_scale``, ``dropout_p``, ``causal``, ``window_size``):

* causal: flash-attn aligns its causal mask to the bottom right when s_q != s_kv; attnpatch follows
  SDPA (top left). `causal_plan` translates: for s_kv > s_q the keys no query can see are dropped and
  the rest is square; for s_q > s_kv a sliding window with right edge s_q - s_kv gives exactly
  "key j <= query i".
* key-padding masks (bool, (b, 1, 1, s_kv), any pattern, not only a prefix): the kept keys of each row
  are packed back to back (`pack_keys`, no host sync, so CUDA graphs can capture it) and the queries
  are the full rows; a row with no kept key gives zeros. Other masks, additive masks and causal with a
  mask are refused with a reason.
* GQA: native (flash-attn takes fewer k/v heads). Dropout: native, also with gradients in eager mode
  (flash-attn's own autograd); under torch.compile only without gradients (see `_custom_ops`).
* sliding windows (``window``): flash-attn's ``window_size``, translated to SDPA's top-left alignment by
  `window_plan`; refused with a mask, and any window when there are more queries than keys
  (FlashAttention 2 bounds an open right edge at seqlen_k, which then hides keys from the first queries:
  `window_reasons`; found on an H200, 2026-11-30, docs/GPU_BACKENDS.md). Softcapping
  (``softcap``): flash-attn's own, the same formula.
"""

from __future__ import annotations

import torch

from ..call import Call
from ._third_party import ThirdPartyBackend, register_op, run_flash_api, window_reasons


def flash_attn_kernel(fa, q, k, v, mask, is_causal, scale, dropout_p, window=None, softcap=None):
    """FA2 on bsnd tensors; ``fa`` is the ``flash_attn`` module (or a stand-in with its API)."""
    return run_flash_api(fa, q, k, v, mask, is_causal, {"dropout_p": dropout_p, "softmax_scale": scale},
                         window=window, softcap=softcap)


class FlashAttnBackend(ThirdPartyBackend):
    NAME = "flash_attn"
    DESCRIPTION = "FlashAttention 2 (flash-attn package): exact, sm80+, key-padding masks via varlen"
    PACKAGE = "flash-attn"
    MIN_VERSION = "2.6.0"
    EXTRA = "flash"
    MODULE = "flash_attn"
    REQUIRED_ATTRS = ("flash_attn_func", "flash_attn_varlen_func")
    LOSSY = False
    SUPPORTS_BACKWARD = True
    SUPPORTS_DROPOUT = True
    SUPPORTS_GQA = True
    SUPPORTS_CAUSAL = True
    SUPPORTS_CAUSAL_WITH_MASK = False
    SUPPORTS_WINDOW = True
    SUPPORTS_SOFTCAP = True
    # a window is refused with more queries than keys (`window_reasons`): compiled
    # graphs guard on seq_q vs seq_kv
    NEEDS_LENGTH_RELATION = True
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    SUPPORTED_MASKS = frozenset({"none", "bool"})
    KEY_PADDING_MASKS_ONLY = True
    MIN_HEAD_DIM = 8
    MAX_HEAD_DIM = 256
    HEAD_DIM_MULTIPLE = 8
    CUDA_MIN_CAPABILITY = (8, 0)
    ARCH_NOTE = "FlashAttention 2 needs Ampere or newer"
    NATIVE_LAYOUT = "bsnd"
    # sm90 measured (H200, 2026-11-30, docs/GPU_BACKENDS.md, fifth run): slower than cuDNN and FA3 on every
    # row (Flux 0.719 vs 0.439 / 0.396 ms), about torch's sdpa_flash kernel, its twin. "cuda": an estimate
    # from the same ordering (Ampere and Ada not measured).
    AUTO_PRIORITY = {"cuda_sm90": 15, "cuda": 15}
    TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    kernel = staticmethod(flash_attn_kernel)

    def call_reasons(self, call: Call):
        return window_reasons(call, fa2=True)


register_op(FlashAttnBackend)
