"""attnpatch's 8-bit attention forward for Hopper (sm90), in Triton.

int8 Q.K^T (per-token Q, per-128-token-block K after smoothing K by its token
mean) and fp8-e4m3 P.V (per-channel V scales after smoothing V), fp32
accumulation.  Quantization is three small memory-bound kernels; all four
launches are what a call costs.  The numerics are specified -- and reproduced in
plain torch -- by :mod:`attnpatch.kernels.fp8_emulation`.

Importing this module is cheap and works without CUDA or triton: triton and the
kernels are imported on first GPU use.  The op ``torch.ops.attnpatch.fp8_attention``
is registered at import (CUDA: the Triton kernels; CPU: the plain-torch twin).
"""
from __future__ import annotations

import functools
import math
import os
from typing import List, Optional

import torch

from . import fp8_emulation as _emu

__all__ = [
    "fp8_attention",
    "fp8_not_supported_reasons",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_DTYPES",
    "MIN_SEQ_LEN_Q",
    "MIN_SEQ_LEN_KV",
]

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_LAYOUTS = ("bnsd", "bsnd")
# Speed thresholds (docs/FP8_KERNEL.md has the measurements behind them).  On an H100,
# with quantization included, every call kind measured at >= 16384 tokens and head_dim
# 128 is faster than SDPA cuDNN bf16: 1.33x at (1,40,32760,128), 1.25-1.35x at
# (1,12,32760,128) across runs, 1.08-1.13x causal, 1.20x key-padded and 1.20x GQA at 16384.  It is slower
# or too close to call at (1,24,4608,128) (0.68x), causal 8192 (0.97x), key-padded 4096
# (1.01x), and at every head_dim 64 shape measured (0.48x-0.68x).  So, unless
# ``check_speed=False``, fp8_not_supported_reasons declines sequences shorter than these,
# and head_dim 64.
MIN_SEQ_LEN_Q = 16384
MIN_SEQ_LEN_KV = 16384
SPEED_HEAD_DIMS = (128,)

# Kernel variant switches (constexprs of the attention kernel), chosen from the
# H100/H200 measurements; overridable for experiments.
_EXP_F16 = os.environ.get("ATTNPATCH_FP8_EXP_F16", "0") == "1"
_MAGIC = os.environ.get("ATTNPATCH_FP8_MAGIC", "1") == "1"


@functools.lru_cache(maxsize=1)
def _triton_available() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton is not importable ({type(e).__name__})"
    return None


def fp8_not_supported_reasons(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    key_padding: Optional[torch.Tensor] = None,
    layout: str = "bnsd",
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    check_speed: bool = True,
    check_device: bool = True,
) -> List[str]:
    """Why :func:`fp8_attention` should not take this call (empty list: it should).

    Each entry is a short sentence naming the offending value and what is allowed.
    ``check_speed=False`` skips the declared minimum-length thresholds (which exist
    because below them cuDNN bf16 is faster); ``check_device=False`` skips the
    device/GPU checks (useful to validate shapes on a CPU).
    """
    r: List[str] = []
    if layout not in SUPPORTED_LAYOUTS:
        return [f"layout={layout!r} (supported: 'bnsd', 'bsnd')"]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return [f"{name} is {type(t).__name__} (supported: torch.Tensor)"]
        if t.dim() != 4:
            return [f"{name}.dim()={t.dim()} (supported: 4, {layout})"]
    if attn_mask is not None:
        r.append("attn_mask given (supported: none; use key_padding for padding masks)")
    if dropout_p:
        r.append(f"dropout_p={dropout_p} (supported: 0.0, forward inference only)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            r.append(f"{name}.dtype={str(t.dtype).replace('torch.', '')} (supported: bfloat16, float16)")
    if not (q.dtype == k.dtype == v.dtype):
        r.append(f"mixed dtypes q={q.dtype}, k={k.dtype}, v={v.dtype} (supported: all equal)")
    if q.requires_grad or k.requires_grad or v.requires_grad:
        if torch.is_grad_enabled():
            r.append("inputs require grad (supported: forward only, no backward)")
    qb, kb, vb = (_emu.to_bnsd(t, layout) for t in (q, k, v))
    b, hq, sq, d = qb.shape
    bk, hkv, skv, dk = kb.shape
    if d not in SUPPORTED_HEAD_DIMS:
        r.append(f"head_dim={d} (supported: 64, 128)")
    if dk != d or vb.shape[-1] != d:
        r.append(f"head dims q={d}, k={dk}, v={vb.shape[-1]} (supported: all equal)")
    if tuple(vb.shape[:3]) != (bk, hkv, skv):
        r.append(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)}")
    if bk != b:
        r.append(f"batch q={b}, kv={bk} (supported: equal)")
    if hkv == 0 or hq % hkv:
        r.append(f"heads q={hq}, kv={hkv} (supported: kv heads dividing q heads)")
    if sq == 0 or skv == 0:
        r.append(f"empty sequence sq={sq}, skv={skv} (supported: >= 1)")
    if key_padding is not None:
        if key_padding.dtype != torch.bool:
            r.append(f"key_padding.dtype={key_padding.dtype} (supported: torch.bool, True = attend)")
        if tuple(key_padding.shape) != (b, skv):
            r.append(f"key_padding shape {tuple(key_padding.shape)} (supported: (batch, seq_kv) = ({b}, {skv}))")
    if scale is not None and not math.isfinite(float(scale)):
        r.append(f"scale={scale} (supported: finite)")
    if check_device:
        devs = {t.device for t in (q, k, v)}
        if key_padding is not None:
            devs.add(key_padding.device)
        if len(devs) > 1:
            r.append(f"tensors on several devices {sorted(map(str, devs))} (supported: one)")
        if q.device.type != "cuda":
            r.append(f"device {q.device.type} (supported: cuda)")
        else:
            cap = torch.cuda.get_device_capability(q.device)
            if cap != (9, 0):
                r.append(f"requires compute capability 9.0 (Hopper); this GPU is {cap[0]}.{cap[1]}")
            why = _triton_available()
            if why:
                r.append(why)
    if check_speed:
        if d in SUPPORTED_HEAD_DIMS and d not in SPEED_HEAD_DIMS:
            r.append(f"head_dim={d} is correct but not faster than cuDNN bf16 (faster at: 128)")
        if sq < MIN_SEQ_LEN_Q:
            r.append(f"seq_len_q={sq} below MIN_SEQ_LEN_Q={MIN_SEQ_LEN_Q} (cuDNN bf16 is faster there)")
        if skv < MIN_SEQ_LEN_KV:
            r.append(f"seq_len_kv={skv} below MIN_SEQ_LEN_KV={MIN_SEQ_LEN_KV} (cuDNN bf16 is faster there)")
    return r


# ------------------------------------------------------------------ GPU launcher
# Launch parameters of the quantization passes: rows per iteration and warps of the
# K/V statistics pass, the programs per SM it aims for, warps of the K/V pass.
# Chosen on an H100 (docs/FP8_KERNEL.md): 0.88 ms instead of 1.52 ms for the passes
# at (1, 40, 32760, 128), 0.110 ms instead of 0.142 ms at (1, 24, 4608, 128).
STATS_ROWS = 32
STATS_WARPS = 4
STATS_PROGRAMS_PER_SM = 4
KV_WARPS = 4


def _nsplit(bh: int, skv: int, n_sm: int) -> int:
    want = max(1, (STATS_PROGRAMS_PER_SM * n_sm) // max(bh, 1))
    most = max(1, -(-skv // 64))
    n = min(want, most, 64)
    return 1 << (n.bit_length() - 1)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=8)
def _measured_config(index: int):
    from . import _fp8_triton as T

    return T.measured_config(torch.cuda.get_device_capability(index))


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _triton_forward(q, k, v, scale: float, is_causal: bool, key_padding, layout: str,
                    *, exp_f16: Optional[bool] = None, magic: Optional[bool] = None,
                    pv_fp8: bool = True, fixed_config=None, out=None,
                    return_quant: bool = False):
    """Launch the four kernels.  q, k, v: torch tensors on one device (cuda, or
    cpu under TRITON_INTERPRET=1).  Returns the output in ``layout``."""
    from . import _fp8_triton as T

    exp_f16 = _EXP_F16 if exp_f16 is None else exp_f16
    magic = _MAGIC if magic is None else magic
    qb, kb, vb = (_emu.to_bnsd(t, layout) for t in (q, k, v))
    b, hq, sq, d = qb.shape
    hkv, skv = kb.shape[1], kb.shape[2]
    dev = q.device
    BN = T.KV_BLOCK
    skv_pad = -(-skv // BN) * BN
    nblk = skv_pad // BN

    # pass 1: statistics of K and V (token sums, V max/min) in partial splits
    n_sm = _sm_count(dev.index or 0) if dev.type == "cuda" else 4
    nsplit = _nsplit(b * hkv, skv, n_sm)
    tps = -(-skv // nsplit)
    tps = -(-tps // 64) * 64
    nsplit = -(-skv // tps)
    if key_padding is not None:
        kp = key_padding.to(dev)
        kp = kp.view(torch.uint8) if kp.dtype == torch.bool else kp.to(torch.uint8)
        stride_kpb = kp.stride(0)
    else:
        kp, stride_kpb = None, 0
    part = torch.empty((b * hkv, nsplit, 5, d), device=dev, dtype=torch.float32)
    kp_arg = part if kp is None else kp
    T._kv_stats_kernel[(nsplit, b * hkv)](
        kb, vb, kp_arg, part, *kb.stride(), *vb.stride(), stride_kpb, hkv, skv, tps, nsplit,
        D=d, BS=STATS_ROWS, HAS_KP=kp is not None, num_warps=STATS_WARPS)
    # pass 2: Q per token
    q8 = torch.empty((b, hq, sq, d), device=dev, dtype=torch.int8)
    qs = torch.empty((b, hq, sq), device=dev, dtype=torch.float32)
    QBM = 64
    T._quant_q_kernel[(triton_cdiv(sq, QBM), b * hq)](
        qb, q8, qs, float(scale) * _emu.LOG2E, *qb.stride(), hq, sq, D=d, BM=QBM, num_warps=4)
    # pass 3: K int8 per block, V fp8 per channel (transposed)
    k8 = torch.empty((b, hkv, skv_pad, d), device=dev, dtype=torch.int8)
    ks = torch.empty((b, hkv, nblk), device=dev, dtype=torch.float32)
    if pv_fp8:
        vt8 = torch.empty((b, hkv, d, skv_pad), device=dev, dtype=torch.float8_e4m3fn)
        vsc = torch.empty((b, hkv, d), device=dev, dtype=torch.float32)
        vm = torch.empty((b, hkv, d), device=dev, dtype=torch.float32)
    else:
        vt8, vsc, vm = ks, ks, ks
    T._quant_kv_kernel[(nblk, b * hkv)](
        kb, vb, kp_arg, part, k8, ks, vt8, vsc, vm, *kb.stride(), *vb.stride(), stride_kpb,
        hkv, skv, skv_pad, nsplit,
        D=d, BN=BN, NSPLIT_P2=max(2, triton_next_pow2(nsplit)), QUANT_V=pv_fp8,
        HAS_KP=kp is not None, num_warps=KV_WARPS)
    if return_quant:
        return dict(q8=q8, qs=qs, k8=k8, ks=ks, vt8=vt8, vs=vsc, vm=vm, part=part)
    # pass 4: attention
    if out is None:
        out = torch.empty(q.shape, device=dev, dtype=q.dtype)
    ob = _emu.to_bnsd(out, layout)
    if kp is None:
        kp = ks
    vq = vt8 if pv_fp8 else vb
    args = (q8, qs, k8, ks, vq, vsc, vm, kp, ob, *vb.stride(), *ob.stride(), stride_kpb,
            hq, hq // hkv, sq, skv, skv_pad, _bucket(sq), _bucket(skv))
    kw = dict(D=d, BN=BN, IS_CAUSAL=bool(is_causal), HAS_KP=key_padding is not None,
              EXP_F16=bool(exp_f16), MAGIC=bool(magic), PV_FP8=bool(pv_fp8))
    if fixed_config is None and dev.type == "cuda":
        fixed_config = _measured_config(dev.index or 0)  # a measured card: no autotuning, one compile
    if fixed_config is None and dev.type == "cuda":
        grid = lambda meta: (triton_cdiv(sq, meta["BM"]), b * hq)  # noqa: E731
        T._attn_fwd[grid](*args, **kw)
    else:
        BM, nw, ns = fixed_config or (64, 4, 1)
        T._attn_fwd_kernel[(triton_cdiv(sq, BM), b * hq)](*args, BM=BM, num_warps=nw, num_stages=ns, **kw)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------ custom op
@torch.library.custom_op("attnpatch::fp8_attention", mutates_args=())
def _fp8_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
    layout: str,
    pv_fp8: bool,
) -> torch.Tensor:
    if q.device.type == "cuda":
        return _triton_forward(q, k, v, scale, is_causal, key_padding, layout, pv_fp8=pv_fp8)
    return _emu.emulate_fp8_attention(q, k, v, scale=scale, is_causal=is_causal,
                                      key_padding=key_padding, layout=layout,
                                      exp_f16=_EXP_F16, pv_fp8=pv_fp8)


@_fp8_attention_op.register_fake
def _(q, k, v, key_padding, scale, is_causal, layout, pv_fp8):
    return q.new_empty(q.shape)


def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    key_padding: Optional[torch.Tensor] = None,
    layout: str = "bnsd",
    pv_fp8: bool = True,
) -> torch.Tensor:
    """8-bit attention forward.  q: (b, hq, sq, d), k/v: (b, hkv, skv, d) for
    ``layout="bnsd"``; (b, s, h, d) for ``"bsnd"``.  GQA when hkv divides hq.
    ``key_padding``: optional bool (b, skv), True = attend.  ``is_causal``: SDPA's
    top-left convention (query i attends keys j <= i).  A query row with every key
    masked returns zeros.  Output: q's dtype, shape and layout (contiguous).
    ``pv_fp8=False`` selects the accurate variant: int8 Q.K^T but P.V in the input
    dtype (about 1% relerr instead of about 4% on N(0,1) inputs; slower).

    On CUDA (sm90) this runs the Triton kernels; on CPU the plain-torch twin.  It
    does not check :func:`fp8_not_supported_reasons` (the router does); shapes it
    cannot run raise ValueError.
    """
    d = _emu.to_bnsd(q, layout).shape[-1]
    bad = fp8_not_supported_reasons(q, k, v, scale=scale, is_causal=is_causal,
                                    key_padding=key_padding, layout=layout,
                                    check_speed=False, check_device=False)
    if bad:
        raise ValueError("fp8_attention: " + "; ".join(bad))
    sc = _emu.resolve_scale(scale, d)
    return torch.ops.attnpatch.fp8_attention(q, k, v, key_padding, sc, bool(is_causal), layout,
                                             bool(pv_fp8))
