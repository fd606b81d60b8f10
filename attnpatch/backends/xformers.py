"""`xformers`: ``xformers.ops.memory_efficient_attention`` (bsnd, ``p`` for dropout, ``scale``).

Translation:

* causal without a mask: ``xformers.ops.LowerTriangularMask()``, which is top-left aligned like SDPA
  also when s_q != s_kv (xformers' bottom-right variant is a separate class).
* masks: turned into an additive bias tensor in the query dtype (bool False → -inf), causal folded in,
  broadcast dims kept at stride 0. xformers needs the bias rows 8-element aligned, so the bias is
  allocated with its last dim padded to a multiple of 8 and sliced back. Rows whose keys are all
  masked get a zero bias row (so the kernel never sees an all -inf row) and a zero output row.
* GQA: the 5-D (B, M, G, H, K) form when no gradient and no bias is involved (no copy); otherwise k/v
  heads are repeated (xformers has no backward for the 5-D form).
* Per call, xformers' own dispatcher is asked whether one of its operators takes the inputs (as the
  sdpa backends ask torch), so an unsupported head dim or bias layout is a reason, not a crash.

Probe: xformers 0.0.35 built for torch 2.10 imports under torch 2.11 with a warning, then raises
``NotImplementedError`` on every call. The probe reads xformers' own record of the failed extension
load and, on a CUDA machine, makes one tiny real call.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from ..call import Call
from ._third_party import ThirdPartyBackend, _first_line, register_op


def _aligned_bias(bias: torch.Tensor) -> torch.Tensor:
    """The same values, with the last dim's storage padded to a multiple of 8 (xformers' alignment)."""
    s_kv = bias.shape[-1]
    pad = (-s_kv) % 8
    if pad == 0 and bias.is_contiguous():
        return bias
    return F.pad(bias, (0, pad))[..., :s_kv]


def _bias_and_dead(mask, is_causal, s_q, s_kv, dtype):
    """Additive bias (mask dims, causal folded in, 8-aligned) and the rows with no key to attend."""
    if mask.dtype == torch.bool:
        keep = mask
        base = torch.zeros((), dtype=dtype, device=mask.device)
    else:
        keep = mask != float("-inf")
        base = mask.to(dtype)
    if is_causal:
        keep = keep & torch.ones(s_q, s_kv, dtype=torch.bool, device=mask.device).tril()
    bias = torch.where(keep, base, torch.full((), float("-inf"), dtype=dtype, device=mask.device))
    dead = ~keep.any(dim=-1)  # (mb, mh, msq)
    bias = torch.where(dead[..., None], torch.zeros((), dtype=dtype, device=mask.device), bias)
    bias = bias.expand(*bias.shape[:-1], s_kv)  # a mask broadcast over keys still needs real key columns
    return _aligned_bias(bias), dead


def xformers_kernel(xops, q, k, v, mask, is_causal, scale, dropout_p):
    """memory_efficient_attention on bsnd tensors; ``xops`` is ``xformers.ops`` (or a stand-in)."""
    B, s_q, H, _ = q.shape
    s_kv, H_kv = k.shape[1], k.shape[2]
    attn_bias = None
    dead = None
    if mask is not None:
        bias, dead = _bias_and_dead(mask, is_causal, s_q, s_kv, q.dtype)
        attn_bias = bias.expand(B, H, s_q, s_kv)
    elif is_causal:
        attn_bias = xops.LowerTriangularMask()
    if H_kv != H:
        rep = H // H_kv
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if grad or mask is not None:
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        else:
            q5 = q.reshape(B, s_q, H_kv, rep, q.shape[-1])
            k5 = k.reshape(B, s_kv, H_kv, 1, k.shape[-1]).expand(B, s_kv, H_kv, rep, k.shape[-1])
            v5 = v.reshape(B, s_kv, H_kv, 1, v.shape[-1]).expand(B, s_kv, H_kv, rep, v.shape[-1])
            out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=attn_bias, p=dropout_p, scale=scale)
            return out.reshape(B, s_q, H, v.shape[-1])
    out = xops.memory_efficient_attention(q, k, v, attn_bias=attn_bias, p=dropout_p, scale=scale)
    if dead is not None:
        # dead is (mb, mh, msq) over (b, h, s_q); out is (b, s_q, h, d)
        out = out.masked_fill(dead.permute(0, 2, 1)[..., None], 0.0)
    return out


class XformersBackend(ThirdPartyBackend):
    NAME = "xformers"
    DESCRIPTION = "xformers memory_efficient_attention (its dispatcher picks cutlass / flash kernels)"
    PACKAGE = "xformers"
    MIN_VERSION = "0.0.28"
    EXTRA = "xformers"
    MODULE = "xformers.ops"
    REQUIRED_ATTRS = ("memory_efficient_attention", "LowerTriangularMask")
    LOSSY = False
    SUPPORTS_BACKWARD = True
    SUPPORTS_DROPOUT = True
    SUPPORTS_GQA = True
    SUPPORTS_CAUSAL = True
    SUPPORTS_CAUSAL_WITH_MASK = True
    SUPPORTS_V_HEAD_DIM_DIFFERENT = True
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
    SUPPORTED_MASKS = frozenset({"none", "bool", "additive"})
    MIN_HEAD_DIM = 1
    MAX_HEAD_DIM = 256
    CUDA_MIN_CAPABILITY = (6, 0)
    ARCH_NOTE = "xformers' CUDA kernels need compute capability 6.0 or newer"
    NATIVE_LAYOUT = "bsnd"
    # sm90 measured (H200, 2026-11-30, built from source): it runs FlashAttention 3 when that imports (the
    # same time as flash_attn3), else torch's flash / efficient kernels, behind cuDNN everywhere (Flux 0.78
    # vs 0.42 ms, 8k causal 1.72 vs 0.99, key padding 1.75 vs 0.51): after torch's kernels, before torch's
    # own dispatch. Elsewhere an estimate.
    AUTO_PRIORITY = {"cuda_sm90": 35, "cuda": 25}
    TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    kernel = staticmethod(xformers_kernel)

    def check_extension(self, module) -> List[str]:
        import sys
        root = sys.modules.get("xformers")
        cpp = getattr(root, "_cpp_lib", None) if root is not None else None
        exc = getattr(cpp, "_cpp_library_load_exception", None) if cpp is not None else None
        if exc is not None:
            return [f"xformers {self._version} is installed but its C++/CUDA extension did not load: "
                    f"{_first_line(exc)} ({' '.join(str(exc).split())[:300]})"]
        return []

    def smoke_test(self, module, device: torch.device) -> List[str]:
        q = torch.randn(1, 16, 1, 64, device=device, dtype=torch.float16)
        try:
            module.memory_efficient_attention(q, q, q)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # NotImplementedError: no operator built/loadable for this torch
            return [f"xformers {self._version} imports but its kernels do not run here "
                    f"(torch {torch.__version__}): {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"]
        return []

    def call_reasons(self, call: Call) -> List[str]:
        if call.device_type != "cuda":
            return []
        try:
            from xformers.ops import fmha
            from xformers.ops.fmha import dispatch
        except Exception:  # pragma: no cover - probe already vouched for the import
            return []
        dev = torch.device("cuda", call.device_index if call.device_index is not None else torch.cuda.current_device())
        hkv = call.heads_q  # the runner repeats k/v heads whenever a bias or gradients are involved
        q = torch.empty(1, 1, 1, call.head_dim, device=dev, dtype=call.dtype).expand(call.batch, call.seq_q, call.heads_q, call.head_dim)
        k = torch.empty(1, 1, 1, call.head_dim, device=dev, dtype=call.dtype).expand(call.batch, call.seq_kv, hkv, call.head_dim)
        v = torch.empty(1, 1, 1, call.head_dim_v, device=dev, dtype=call.dtype).expand(call.batch, call.seq_kv, hkv, call.head_dim_v)
        bias = None
        if call.mask_kind != "none":
            bias = _aligned_bias(torch.zeros(1, 1, 1, call.seq_kv, device=dev, dtype=call.dtype)).expand(
                call.batch, call.heads_q, call.seq_q, call.seq_kv)
        elif call.is_causal:
            bias = fmha.attn_bias.LowerTriangularMask()
        try:
            inp = fmha.Inputs(query=q, key=k, value=v, attn_bias=bias, p=call.dropout_p, scale=call.scale)
            dispatch._dispatch_fw(inp, call.needs_grad)
            if call.needs_grad:
                try:
                    dispatch._dispatch_bw(inp, None)
                except TypeError:  # older xformers: _dispatch_bw(inp)
                    dispatch._dispatch_bw(inp)
        except NotImplementedError as exc:
            return [f"xformers has no operator for this call: {' '.join(str(exc).split())[:500]}"]
        except (AttributeError, TypeError):  # private dispatcher API changed: rely on the declarations
            return []
        return []


register_op(XformersBackend)
