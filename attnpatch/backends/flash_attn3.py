"""`flash_attn3`: FlashAttention 3 for Hopper (``flash_attn_interface.flash_attn_func`` and
``flash_attn_varlen_func``, from the ``flash_attn_3`` package built from flash-attention's hopper/).

Same translation as `flash_attn` (bsnd; bottom-right causal translated to SDPA's top-left; key-padding
masks packed for the varlen entry point, any pattern; sliding windows through `window_plan`, softcap as
is). Differences: no dropout; some releases return ``(out, softmax_lse)`` and others ``out`` (both
handled); Hopper only; FlashAttention 3 keeps a window's right edge with more queries than keys (its API
only drops edges that cover every key). A build shrunk with
``FLASH_ATTENTION_DISABLE_*`` switches (as `benchmarks/build_kernels.sh` makes it) refuses the calls that
need what it left out (backward, softcap, windows, fp16, varlen, head dims), with the switch to drop: the
switches are read from the build's ``flash_attn_config``, since such calls crash the process.
Calls that need no gradient skip the interface's Python layers and call FA3's C++ forward operator
(`DirectForward`), when its schema is the one attnpatch knows.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..call import Call
from ._third_party import ThirdPartyBackend, register_op, run_flash_api, window_reasons


def flash_attn3_kernel(fa3, q, k, v, mask, is_causal, scale, dropout_p, window=None, softcap=None):
    """FA3 on bsnd tensors; ``fa3`` is ``flash_attn_interface`` (or a stand-in with its API). Calls that
    need no gradient go to FA3's C++ forward operator directly where its schema is the known one
    (`DirectForward`)."""
    if dropout_p:
        raise ValueError(f"flash_attn3 has no dropout (dropout_p={dropout_p}); the router refuses such calls")
    direct = _DIRECT.get(fa3)
    if direct is None:
        direct = _DIRECT[fa3] = DirectForward.of(fa3)
    return run_flash_api(direct, q, k, v, mask, is_causal, {"softmax_scale": scale}, window=window, softcap=softcap)


#: The arguments of ``torch.ops.flash_attn_3.fwd``, in order, as the FlashAttention 3 `DirectForward` was
#: written against declares them (flash-attention 0251105a, hopper/flash_api.cpp; the same since 3.0.0b1's
#: 34-argument form). A build whose operator differs in any name or position is called through its
#: Python interface.
FA3_FWD_ARGUMENTS = (
    "q", "k", "v", "k_new", "v_new", "q_v", "out", "cu_seqlens_q", "cu_seqlens_k", "cu_seqlens_k_new",
    "seqused_q", "seqused_k", "max_seqlen_q", "max_seqlen_k", "page_table", "kv_batch_idx", "leftpad_k",
    "rotary_cos", "rotary_sin", "seqlens_rotary", "q_descale", "k_descale", "v_descale", "softmax_scale",
    "is_causal", "window_size_left", "window_size_right", "attention_chunk", "softcap", "is_rotary_interleaved",
    "scheduler_metadata", "num_splits", "pack_gqa", "sm_margin")

#: module (``flash_attn_interface`` or a stand-in) -> what `flash_attn3_kernel` calls for it
_DIRECT: dict = {}


def fa3_forward_operator(module):
    """``torch.ops.flash_attn_3.fwd`` as ``module`` (``flash_attn_interface``) reaches it, when its schema's
    arguments are `FA3_FWD_ARGUMENTS`; else None."""
    op = getattr(getattr(getattr(module, "flash_attn_3_gpu", None), "fwd", None), "default", None)
    try:
        names = tuple(a.name for a in op._schema.arguments)
    except AttributeError:
        return None
    return op if names == FA3_FWD_ARGUMENTS else None


class DirectForward:
    """``flash_attn_func`` / ``flash_attn_varlen_func`` as `run_flash_api` calls them, running FA3's C++
    forward operator directly for calls that need no gradient, with the arguments the interface passes
    (``num_splits=1``, no pack_gqa override, no rotary, paging or fp8 descales).

    The interface wraps that operator in an autograd Function and a Python ``torch.library.custom_op`` and
    allocates two empty device tensors per call: at HunyuanVideo's key-padding shape on an H200 the masked
    call took 0.21-0.38 ms of host against 0.42 ms of kernel (2026-11-30, docs/GPU_BACKENDS.md), so it ran
    near host-bound and its timings varied by 40%. Calls that need gradients go through the interface (its
    backward)."""

    def __init__(self, module, op):
        self.module, self.op = module, op

    @classmethod
    def of(cls, module):
        """A `DirectForward` over ``module``, or ``module`` itself when its operator is not the known one."""
        op = fa3_forward_operator(module)
        return module if op is None else cls(module, op)

    def _forward(self, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size, softcap):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** -0.5
        # the interface's own layout fix-ups (``maybe_contiguous``; v may also be strided in its head dim)
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 or v.stride(-3) == 1 else v.contiguous()
        left, right = window_size
        return self.op(q, k, v, None, None, None, None, cu_q, cu_k, None, None, None, max_q, max_k,
                       None, None, None, None, None, None, None, None, None, softmax_scale, causal, left, right,
                       0, softcap, True, None, 1, None, 0)[0]

    @staticmethod
    def _needs_grad(q, k, v) -> bool:
        return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        if self._needs_grad(q, k, v):
            return self.module.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                               window_size=window_size, softcap=softcap)
        return self._forward(q, k, v, None, None, None, None, softmax_scale, causal, window_size, softcap)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        if self._needs_grad(q, k, v):
            return self.module.flash_attn_varlen_func(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=softmax_scale,
                causal=causal, window_size=window_size, softcap=softcap)
        return self._forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                             causal, window_size, softcap)


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

    #: the build's switches (``flash_attn_config.CONFIG["build_flags"]``), read by `check_extension`; {} if unknown
    build_flags: dict = {}

    def check_extension(self, module) -> List[str]:
        """Reads the build's switches from ``flash_attn_config`` (written by FA3's setup.py). They are read,
        never tried: a call that a shrunk build compiled out (softcap, backward) crashes the process
        instead of raising (H200, 2026-11-30), so each missing feature becomes a reason in `call_reasons`."""
        self.build_flags = read_fa3_build_flags()
        # without local kernels, causal with more queries than keys (a window, `causal_plan`) is refused:
        # compiled graphs must then guard on seq_q vs seq_kv
        self.NEEDS_LENGTH_RELATION = bool(self.build_flags.get("FLASHATTENTION_DISABLE_LOCAL"))
        return []

    def call_reasons(self, call: Call):
        reasons = window_reasons(call, fa2=False)
        reasons.extend(build_flag_reasons(self.build_flags, call))
        return reasons


def read_fa3_build_flags() -> dict:
    """``flash_attn_config.CONFIG["build_flags"]`` of the installed FA3, or {} (older builds lack the file)."""
    try:
        from flash_attn_config import CONFIG
        flags = CONFIG["build_flags"]
    except Exception:  # no such module, or another layout: nothing is known to be missing
        return {}
    return {k: bool(v) for k, v in flags.items()} if isinstance(flags, dict) else {}


#: FA3 head-dim kernels a build may leave out; calls round up to the next one built
FA3_HEAD_DIMS = (64, 96, 128, 192, 256)


def build_flag_reasons(flags: dict, call: Call) -> List[str]:
    """Why a call needs kernels this build of FA3 left out (its FLASH_ATTENTION_DISABLE_* switches)."""
    if not flags:
        return []
    fix = "rebuild FlashAttention 3 without FLASH_ATTENTION_DISABLE_{} (benchmarks/build_kernels.sh: FA3_DISABLE)"
    reasons = []
    for needed, switch, what in (
            (call.needs_grad, "BACKWARD", "gradients are needed but this flash_attn_3 build has no backward kernels"),
            (call.softcap is not None, "SOFTCAP", f"{call.softcap_text} but this flash_attn_3 build has no softcap kernels"),
            (call.window is not None, "LOCAL", f"sliding window {call.window} but this flash_attn_3 build has no local kernels"),
            (call.window is None and call.is_causal and call.seq_q > call.seq_kv
             and (call.symbolic_lengths or call.seq_q < 2 * call.seq_kv), "LOCAL",
             f"causal with more queries ({call.seq_q}) than keys ({call.seq_kv}) runs as a window, but this "
             "flash_attn_3 build has no local kernels"),
            (call.dtype == torch.float16, "FP16", "float16 but this flash_attn_3 build has no fp16 kernels"),
            (call.key_padding, "VARLEN", "a key-padding mask needs varlen kernels, which this flash_attn_3 build lacks"),
    ):
        if needed and flags.get("FLASHATTENTION_DISABLE_" + switch):
            reasons.append(f"{what}; {fix.format(switch)}")
    built = [d for d in FA3_HEAD_DIMS if not flags.get(f"FLASHATTENTION_DISABLE_HDIM{d}")]
    if not any(call.head_dim <= d for d in built):
        reasons.append(f"head_dim {call.head_dim} is above every head dim this flash_attn_3 build has kernels for "
                       f"({', '.join(map(str, built)) or 'none'}); rebuild it without FLASH_ATTENTION_DISABLE_HDIM"
                       f"{next(d for d in FA3_HEAD_DIMS if call.head_dim <= d)}")
    return reasons


register_op(FlashAttn3Backend)
