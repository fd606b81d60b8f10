"""Plain-torch twin of attnpatch's 8-bit (int8 QK / fp8-e4m3 PV) attention kernel.

Everything the Triton kernel in :mod:`attnpatch.kernels.fp8_attention` does to the
numbers is reproduced here with ordinary torch ops, in the same order and in the
same precision (fp32), so the GPU kernel can be compared tightly with this and
this can be tested on a CPU-only machine.

Quantization scheme (SageAttention-2 style, our own implementation):

* Q: the softmax scale and log2(e) are folded into Q first (``q' = q * scale *
  log2(e)``, scores come out in the log2 domain); then Q is quantized to int8
  **per token** (one fp32 scale per query row, symmetric, range [-127, 127]).
* K: smoothed by its mean over the tokens of each (batch, kv-head, channel)
  (``k - mean_t(k)``; this adds the same constant ``q . mean`` to every score of
  a query row, so the softmax is unchanged), the mean rounded to bf16; then int8
  **per block of KV_BLOCK (=128) tokens** (one fp32 scale per block).
* S = (q8 @ k8^T) in int32 (exact), times ``q_scale[i] * k_scale[block]``.
* Online softmax over key blocks of KV_BLOCK keys, in base 2, with the running
  row max m: ``p = exp2(s - m + log2(448))`` so ``0 <= p <= 448`` fills the
  e4m3 range; P is rounded to fp8 e4m3 (RNE); the row sum l uses the unrounded p.
* V: smoothed by its mean over tokens (bf16-rounded), then fp8 e4m3 with one
  fp32 scale **per channel** (per batch, kv-head): ``v8 = fp8((v - vm) * 448 /
  amax_c)``.  With a key_padding mask, means and scales of K and V are taken
  over the attended tokens only, and masked tokens are stored as 0 (so garbage
  in padded positions cannot spoil the quantization of the real ones).  Since each normalized row of P sums to one, ``O = (P8 @ v8) *
  v_scale / l + vm``.
* P @ V accumulates in fp32.  A query row whose keys are all masked gives 0.

Rounding details (identical in kernel and twin): divisions that make scales are
IEEE (``div_rn``); float -> int8 rounds half away from zero via
``trunc(y + copysign(0.5, y))`` in fp32; float -> fp8 is round-to-nearest-even
after clamping to [-448, 448].
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "KV_BLOCK",
    "P_SCALE",
    "LOG2_P_SCALE",
    "LOG2E",
    "TINY",
    "FP8_DTYPE",
    "to_bnsd",
    "from_bnsd",
    "resolve_scale",
    "round_half_away",
    "quantize_q",
    "kv_means",
    "quantize_k",
    "quantize_v",
    "dequantize_q",
    "dequantize_k",
    "dequantize_v",
    "emulate_fp8_attention",
    "reference_attention",
]

KV_BLOCK = 128  # tokens per K-scale block == key block of the kernel's inner loop
FP8_MAX = 448.0
P_SCALE = 448.0
LOG2_P_SCALE = math.log2(P_SCALE)
LOG2E = 1.4426950408889634
INT8_MAX = 127.0
TINY = 2.0 ** -40  # floor for absolute maxima (all-zero rows/blocks/channels);
# keeps q_scale * k_scale a normal fp32 number
FP8_DTYPE = torch.float8_e4m3fn


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def to_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View (no copy) of ``x`` as (batch, heads, seq, dim)."""
    if layout == "bnsd":
        return x
    if layout == "bsnd":
        return x.transpose(1, 2)
    raise ValueError(f"layout={layout!r} (supported: 'bnsd', 'bsnd')")


def from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bnsd" else x.transpose(1, 2)


def resolve_scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def round_half_away(y: torch.Tensor) -> torch.Tensor:
    """fp32 round-half-away-from-zero exactly as the kernel does it."""
    half = torch.where(y >= 0, _f32(0.5), _f32(-0.5))
    return torch.trunc(y + half)


# --------------------------------------------------------------------------- Q
def quantize_q(q: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of ``q * scale * log2(e)``.

    q: (b, h, s, d) any float dtype.  Returns ``(q8 int8 (b,h,s,d), qs fp32 (b,h,s))``
    with ``q * scale * log2(e) ~= q8 * qs[..., None]``.
    """
    qmul = _f32(float(scale) * LOG2E)
    qf = q.float() * qmul
    amax = qf.abs().amax(dim=-1).clamp_min(TINY)
    inv = _f32(INT8_MAX) / amax
    qs = amax / _f32(INT8_MAX)
    y = qf * inv[..., None]
    q8 = round_half_away(y).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q8, qs


# --------------------------------------------------------------------- K and V
def _valid_tokens(x: torch.Tensor, key_padding: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(b, 1, s, 1) bool of the tokens that are attended (None: all)."""
    if key_padding is None:
        return None
    return key_padding.to(device=x.device, dtype=torch.bool)[:, None, :, None]


def kv_means(k: torch.Tensor, v: torch.Tensor,
             key_padding: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-(b, h, channel) means of K and V over the attended tokens (all tokens
    without key_padding), fp32 sums, rounded to bf16 (returned as fp32 tensors
    holding bf16 values), shape (b, h, d).  No attended token: 0."""
    valid = _valid_tokens(k, key_padding)
    kf, vf = k.float(), v.float()
    if valid is None:
        n = torch.full(k.shape[:2], float(k.shape[2]), dtype=torch.float32, device=k.device)
    else:
        kf = kf.masked_fill(~valid, 0.0)
        vf = vf.masked_fill(~valid, 0.0)
        n = valid.sum(dim=2, dtype=torch.float32)[..., 0].expand(k.shape[:2])
    n = n.clamp_min(1.0)[..., None]
    km = (kf.sum(dim=2) / n).to(torch.bfloat16).float()
    vm = (vf.sum(dim=2) / n).to(torch.bfloat16).float()
    return km, vm


def quantize_k(
    k: torch.Tensor, km: Optional[torch.Tensor] = None, block: int = KV_BLOCK,
    key_padding: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth K by its token mean, then int8 per block of ``block`` tokens.

    Returns ``(k8 int8 (b,h,s_pad,d), ks fp32 (b,h,s_pad//block), km fp32 (b,h,d))``
    where ``s_pad`` is s rounded up to ``block`` (pad tokens are 0) and
    ``k - km ~= k8 * ks`` blockwise.  Masked tokens (key_padding False) are
    stored as 0 and do not enter the means or the scales.
    """
    b, h, s, d = k.shape
    if km is None:
        km, _ = kv_means(k, k, key_padding)
    kc = k.float() - km[:, :, None, :]
    valid = _valid_tokens(k, key_padding)
    if valid is not None:
        kc = kc.masked_fill(~valid, 0.0)
    s_pad = -(-s // block) * block
    kc = torch.nn.functional.pad(kc, (0, 0, 0, s_pad - s))
    kb = kc.view(b, h, s_pad // block, block, d)
    amax = kb.abs().amax(dim=(-1, -2)).clamp_min(TINY)
    inv = _f32(INT8_MAX) / amax
    ks = amax / _f32(INT8_MAX)
    y = kb * inv[..., None, None]
    k8 = round_half_away(y).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return k8.view(b, h, s_pad, d), ks, km


def quantize_v(
    v: torch.Tensor, vm: Optional[torch.Tensor] = None, block: int = KV_BLOCK,
    key_padding: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth V by its token mean, then fp8 e4m3 with one scale per channel.

    Returns ``(v8 fp8 (b,h,s_pad,d), vs fp32 (b,h,d), vm fp32 (b,h,d))`` with
    ``v - vm ~= v8 * vs``.  (The kernel stores v8 transposed, (b,h,d,s_pad).)
    """
    b, h, s, d = v.shape
    if vm is None:
        _, vm = kv_means(v, v, key_padding)
    vf = v.float()
    valid = _valid_tokens(v, key_padding)
    if valid is None:
        vmax = vf.amax(dim=2)
        vmin = vf.amin(dim=2)
    else:
        vmax = vf.masked_fill(~valid, -math.inf).amax(dim=2)
        vmin = vf.masked_fill(~valid, math.inf).amin(dim=2)
    amax = torch.maximum(vmax - vm, vm - vmin).clamp_min(TINY)
    vs = amax / _f32(FP8_MAX)
    inv = _f32(FP8_MAX) / amax
    y = ((vf - vm[:, :, None, :]) * inv[:, :, None, :]).clamp(-FP8_MAX, FP8_MAX)
    if valid is not None:
        y = y.masked_fill(~valid, 0.0)
    s_pad = -(-s // block) * block
    y = torch.nn.functional.pad(y, (0, 0, 0, s_pad - s))
    return y.to(FP8_DTYPE), vs, vm


def dequantize_q(q8: torch.Tensor, qs: torch.Tensor, scale: float) -> torch.Tensor:
    """Back to the scale of the original q (undoing scale*log2e)."""
    return q8.float() * qs[..., None] / (float(scale) * LOG2E)


def dequantize_k(k8: torch.Tensor, ks: torch.Tensor, km: torch.Tensor, s: int,
                 block: int = KV_BLOCK) -> torch.Tensor:
    b, h, s_pad, d = k8.shape
    kb = k8.float().view(b, h, s_pad // block, block, d) * ks[..., None, None]
    return kb.view(b, h, s_pad, d)[:, :, :s] + km[:, :, None, :]


def dequantize_v(v8: torch.Tensor, vs: torch.Tensor, vm: torch.Tensor, s: int) -> torch.Tensor:
    return v8.float()[:, :, :s] * vs[:, :, None, :] + vm[:, :, None, :]


# ------------------------------------------------------------------- attention
def _valid_mask(b: int, sq: int, skv: int, n0: int, n1: int, is_causal: bool,
                key_padding: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """(b or 1, 1, sq, n1-n0) bool mask of attended keys for key block [n0, n1)."""
    j = torch.arange(n0, n1, device=device)
    mask = (j < skv)[None, None, None, :].expand(1, 1, sq, n1 - n0)
    if is_causal:
        i = torch.arange(sq, device=device)
        mask = mask & (j[None, :] <= i[:, None])[None, None]
    if key_padding is not None:
        kp = torch.zeros(b, n1 - n0, dtype=torch.bool, device=device)
        hi = min(n1, skv)
        if hi > n0:
            kp[:, : hi - n0] = key_padding[:, n0:hi].to(device=device, dtype=torch.bool)
        mask = mask & kp[:, None, None, :]
    return mask


def emulate_fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    key_padding: Optional[torch.Tensor] = None,
    layout: str = "bnsd",
    exp_f16: bool = False,
    pv_fp8: bool = True,
) -> torch.Tensor:
    """Plain-torch emulation of :func:`attnpatch.kernels.fp8_attention.fp8_attention`.

    Same arguments and output (dtype of q, in ``layout``).  ``exp_f16`` mirrors the
    kernel variant that evaluates exp2 in fp16 (then rounds fp16 -> fp8).
    ``pv_fp8=False`` mirrors the accurate variant: P rounded to the input dtype
    (bf16/fp16) times the unquantized V (no V smoothing), fp32 accumulation.
    Works on any device; all arithmetic after quantization is fp32.
    """
    out_dtype = q.dtype
    qb, kb, vb = (to_bnsd(t, layout) for t in (q, k, v))
    b, hq, sq, d = qb.shape
    hkv, skv = kb.shape[1], kb.shape[2]
    if hq % hkv:
        raise ValueError(f"heads_q={hq} not a multiple of heads_kv={hkv}")
    sc = resolve_scale(scale, d)

    q8, qs = quantize_q(qb, sc)
    km, vm = kv_means(kb, vb, key_padding)
    k8, ks, _ = quantize_k(kb, km, key_padding=key_padding)
    if pv_fp8:
        v8, vs, _ = quantize_v(vb, vm, key_padding=key_padding)
    else:
        s_pad = k8.shape[2]
        v8 = torch.nn.functional.pad(vb.float(), (0, 0, 0, s_pad - skv))
        vs = torch.ones(b, hkv, d, device=vb.device)
        vm = torch.zeros(b, hkv, d, device=vb.device)
    g = hq // hkv
    if g > 1:
        k8, ks, v8, vs, vm = (t.repeat_interleave(g, dim=1) for t in (k8, ks, v8, vs, vm))

    dev = qb.device
    qf = q8.float()
    m = torch.full((b, hq, sq), -math.inf, device=dev)
    l = torch.zeros((b, hq, sq), device=dev)
    acc = torch.zeros((b, hq, sq, d), device=dev)
    log2p = _f32(LOG2_P_SCALE).to(dev)
    s_pad = k8.shape[2]
    for blk, n0 in enumerate(range(0, s_pad, KV_BLOCK)):
        n1 = n0 + KV_BLOCK
        if is_causal and n0 > sq - 1:
            break  # every key of this block is after every query (kernel skips it)
        s_int = qf @ k8[:, :, n0:n1].float().transpose(-1, -2)  # exact: |s| < 2**22
        c = qs * ks[:, :, blk, None]  # (b, hq, sq)
        valid = _valid_mask(b, sq, skv, n0, n1, is_causal, key_padding, dev)
        s_int = s_int.masked_fill(~valid, -math.inf)
        mx = s_int.amax(dim=-1)
        m_blk = torch.where(mx == -math.inf, mx, mx * c)
        m_new = torch.maximum(m, m_blk)
        m_use = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        alpha = torch.exp2(m - m_use)
        arg = torch.where(valid, s_int * c[..., None] - (m_use - log2p)[..., None],
                          torch.full_like(s_int, -math.inf))
        if exp_f16:
            p = torch.exp2(arg.half())
            l = l * alpha + p.float().sum(dim=-1)
        else:
            p = torch.exp2(arg)
            l = l * alpha + p.sum(dim=-1)
        p8 = p.to(FP8_DTYPE if pv_fp8 else out_dtype).float()
        acc = acc * alpha[..., None] + p8 @ v8[:, :, n0:n1].float()
        m = m_new
    pos = l > 0
    l_safe = torch.where(pos, l, torch.ones_like(l))
    o = acc / l_safe[..., None] * vs[:, :, None, :] + vm[:, :, None, :]
    o = torch.where(pos[..., None], o, torch.zeros_like(o))
    return from_bnsd(o.to(out_dtype), layout)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    key_padding: Optional[torch.Tensor] = None,
    layout: str = "bnsd",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Exact attention in ``dtype`` (default fp64) with the same semantics
    (top-left causal, key_padding True = attend, GQA, fully masked rows -> 0).
    Returns (b, h, s, d) in ``layout`` and ``dtype``."""
    qb, kb, vb = (to_bnsd(t, layout).to(dtype) for t in (q, k, v))
    b, hq, sq, d = qb.shape
    hkv, skv = kb.shape[1], kb.shape[2]
    g = hq // hkv
    if g > 1:
        kb = kb.repeat_interleave(g, dim=1)
        vb = vb.repeat_interleave(g, dim=1)
    sc = resolve_scale(scale, d)
    s = (qb @ kb.transpose(-1, -2)) * sc
    valid = _valid_mask(b, sq, skv, 0, skv, is_causal, key_padding, qb.device)
    s = s.masked_fill(~valid, -math.inf)
    mx = s.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    p = torch.exp(s - mx)
    den = p.sum(dim=-1, keepdim=True)
    o = (p @ vb) / torch.where(den > 0, den, torch.ones_like(den))
    return from_bnsd(o, layout)
