"""`flash_attn3_fp8`: FlashAttention 3's fp8 (e4m3) forward kernel on Hopper (``flash_attn_interface.
flash_attn_func`` given float8_e4m3fn tensors and their descale factors), from the ``flash_attn_3`` package
built with its fp8 kernels (flash-attention's hopper/ without ``FLASH_ATTENTION_DISABLE_FP8``).

Lossy, forward only. attnpatch quantises the bf16/fp16 inputs itself, in torch, before the call:

* one scale per batch row and key/value head, FA3's descale shape ``(batch, heads_kv)``: the query heads of
  one GQA group share their scale (the amax over the group);
* ``x8 = x * (448 / amax)`` cast to e4m3 (448 is e4m3's largest finite value), ``descale = amax / 448``;
* the keys are smoothed first, ``k - mean(k over the sequence)`` per head and channel (SageAttention's
  observation): it removes the offset that diffusion models' keys share, which would otherwise take most
  of e4m3's range, and it changes every score of a query row by the same constant, so the softmax, and
  the exact result, are unchanged.

The kernel quantises the softmax probabilities to e4m3 for P·V itself and returns bf16 (cast back to fp16
for fp16 inputs). No masks (the varlen entry point would need per-sequence descales), no dropout; causal
is translated as for `flash_attn3` (SDPA's top-left alignment). Head dims: multiples of 16 (FA3's fp8
alignment), as built.
"""

from __future__ import annotations

from typing import List

import torch

from ._third_party import ThirdPartyBackend, register_op, run_flash_api
from .flash_attn3 import read_fa3_build_flags

#: e4m3's largest finite value.
E4M3_MAX = 448.0
#: amax below this counts as an all-zero head (its scale then stays finite).
_TINY = 1e-30


def quantize_e4m3(x: torch.Tensor, heads_kv: int):
    """``x`` bsnd (b, s, h, d), fp16/bf16 → ``(x8, descale)``: ``x8`` float8_e4m3fn in x's layout, ``descale``
    float32 (b, heads_kv) with ``x ≈ x8 * descale`` for every head of a group."""
    b, _, h, _ = x.shape
    amax = torch.linalg.vector_norm(x, float("inf"), dim=(1, 3))  # (b, h); exact in x's dtype, no copy
    amax = amax.float().view(b, heads_kv, h // heads_kv).amax(dim=2).clamp_min(_TINY)  # (b, heads_kv)
    # The multiplier is rounded to x's dtype, and the descale is taken from the rounded value, so the two
    # stay exact inverses (a rounded product lands at most 2^-8 above 448, which e4m3 still rounds to 448).
    mult = (E4M3_MAX / amax).to(x.dtype)
    descale = mult.float().reciprocal()
    per_head = mult.repeat_interleave(h // heads_kv, dim=1)[:, None, :, None]
    return (x * per_head).to(torch.float8_e4m3fn), descale


def flash_attn3_fp8_kernel(fa3, q, k, v, mask, is_causal, scale, dropout_p):
    """FA3's fp8 forward on bsnd fp16/bf16 tensors; ``fa3`` is ``flash_attn_interface`` (or a stand-in)."""
    if mask is not None or dropout_p:
        raise ValueError("flash_attn3_fp8 takes no mask and no dropout; the router refuses such calls")
    heads_kv = k.shape[2]
    k = k - k.mean(dim=1, keepdim=True)
    q8, q_descale = quantize_e4m3(q, heads_kv)
    k8, k_descale = quantize_e4m3(k, heads_kv)
    v8, v_descale = quantize_e4m3(v, heads_kv)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out = run_flash_api(fa3, q8, k8, v8, None, is_causal, {
        "softmax_scale": scale, "q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale})
    return out if out.dtype == q.dtype else out.to(q.dtype)


class FlashAttn3Fp8Backend(ThirdPartyBackend):
    NAME = "flash_attn3_fp8"
    DESCRIPTION = "FlashAttention 3 fp8 e4m3 forward (flash_attn_3 package built with fp8, Hopper; lossy, forward only)"
    PACKAGE = "flash_attn_3"
    MIN_VERSION = "3.0.0b1"
    EXTRA = None
    INSTALL_HINT = ("build FlashAttention-3 from source with its fp8 kernels: the hopper/ folder of "
                    "Dao-AILab/flash-attention, without FLASH_ATTENTION_DISABLE_FP8 (benchmarks/build_kernels.sh fa3)")
    MODULE = "flash_attn_interface"
    REQUIRED_ATTRS = ("flash_attn_func",)
    LOSSY = True
    SUPPORTS_BACKWARD = False
    SUPPORTS_DROPOUT = False
    SUPPORTS_GQA = True
    SUPPORTS_CAUSAL = True
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    SUPPORTED_MASKS = frozenset({"none"})
    MIN_HEAD_DIM = 16
    MAX_HEAD_DIM = 256
    HEAD_DIM_MULTIPLE = 16
    CUDA_MIN_CAPABILITY = (9, 0)
    CUDA_MAX_CAPABILITY = (9, 0)
    CUDA_CAPABILITIES = frozenset({(9, 0)})
    ARCH_NOTE = "FlashAttention 3's fp8 kernels are built for Hopper (sm90)"
    NATIVE_LAYOUT = "bsnd"
    # Never picked by auto, not even with the lossy opt-in: name it (backend=, a recipe) or let `calibrate`
    # measure it on the model. On an H200 (2026-11-30, docs/GPU_BACKENDS.md) it is the fastest kernel at
    # Wan 14B's self-attention (26.3 ms against SageAttention 2's 28.2 and cuDNN's 38.6), but its e4m3 Q·K
    # (3 mantissa bits, against SageAttention's int8 per block) moved Wan's self-attention output by 0.10
    # relative L2 on the pipeline's own activations, twenty times SageAttention 2's 5e-3.
    AUTO_PRIORITY: dict = {}
    #: Relative error bound ||out - ref|| / ||ref|| against an fp32 reference on random normal inputs
    #: (H200: 5.4e-2 at Wan 480p's shape); real activations can be far worse (above).
    TOLERANCE = {torch.float16: 6e-2, torch.bfloat16: 6e-2}

    kernel = staticmethod(flash_attn3_fp8_kernel)

    def smoke_test(self, module, device: torch.device) -> List[str]:
        """A build without fp8 kernels imports and serves bf16. Its switches say so where the build wrote
        them (``flash_attn_config``; an fp8 call into such a build may crash the process rather than raise,
        as softcap and backward calls did on an H200, 2026-11-30); older builds are asked with an fp8 call."""
        flags = read_fa3_build_flags()
        if flags:
            if flags.get("FLASHATTENTION_DISABLE_FP8"):
                return ["this flash_attn_3 build has no fp8 kernels (built with FLASH_ATTENTION_DISABLE_FP8): "
                        "rebuild it without FLASH_ATTENTION_DISABLE_FP8"]
            return []
        x = torch.randn(1, 128, 1, 64, device=device, dtype=torch.bfloat16)
        try:
            flash_attn3_fp8_kernel(module, x, x, x, None, False, None, 0.0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # RuntimeError from the extension's TORCH_CHECK
            text = str(exc).strip().splitlines()
            return [f"this flash_attn_3 build cannot run fp8 ({text[0][:200] if text else type(exc).__name__}): "
                    "rebuild it without FLASH_ATTENTION_DISABLE_FP8"]
        return []


register_op(FlashAttn3Fp8Backend)
