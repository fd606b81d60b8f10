"""`eager`: the seed's formula in plain torch, softmax(q·kᵀ·scale + mask)·v. The reference backend:
every feature (masks, causal, sliding windows, softcap, sinks, the log-sum-exp, dropout, gradients),
any device and dtype; slow and memory-hungry (it materialises the score matrix)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..call import Call
from ..registry import Backend


def eager_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0, *,
                    window: Optional[Tuple[Optional[int], Optional[int]]] = None, softcap: Optional[float] = None,
                    sinks: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Reference attention in bnsd. Softmax runs in float32 for 16-bit inputs (as transformers' eager
    path does). Rows whose keys are all masked give zeros (and lse -inf). GQA repeats k/v heads.

    ``window=(left, right)``: query i sees keys ``i - left <= j <= i + right`` (top-left aligned, None
    unbounded). ``softcap``: scores (after scale) become ``tanh(s / c) * c``. ``sinks``: (h_q,) logits
    that join each row's softmax denominator. With ``return_lse`` returns ``(out, lse)``, lse float32
    (b, h, s_q) over the keys (the sinks excluded)."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    keep = None
    s_q, s_kv = q.shape[-2], k.shape[-2]
    if is_causal or window is not None:
        left, right = window if window is not None else (None, None)
        if is_causal:
            right = 0 if right is None else min(right, 0)
        i = torch.arange(s_q, device=q.device)[:, None]
        j = torch.arange(s_kv, device=q.device)[None, :]
        keep = torch.ones(s_q, s_kv, dtype=torch.bool, device=q.device)
        if right is not None:
            keep = keep & (j <= i + right)
        if left is not None:
            keep = keep & (j >= i - left)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else (keep & attn_mask)
        else:
            scores = scores + attn_mask.to(compute)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)  # every key masked in this row
    shift = torch.where(dead, torch.zeros_like(row_max), row_max)
    if sinks is not None:
        sink = sinks.to(compute).reshape(1, -1, 1, 1)
        shift = torch.maximum(shift, sink)
    weights = torch.exp(scores - shift)
    denom = weights.sum(dim=-1, keepdim=True)
    lse = None
    if return_lse:
        lse = torch.where(dead, torch.full_like(row_max, float("-inf")), torch.log(denom) + shift)[..., 0].float()
    if sinks is not None:
        denom = denom + torch.exp(sink - shift)
    weights = weights / torch.where(dead & (denom == 0), torch.ones_like(denom), denom)
    if dropout_p > 0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    out = torch.matmul(weights, v.to(compute)).to(q.dtype)
    return (out, lse) if return_lse else out


class EagerBackend(Backend):
    NAME = "eager"
    DESCRIPTION = "plain torch matmul-softmax-matmul (the seed's formula); the reference"
    SUPPORTS_DROPOUT = True
    SUPPORTS_WINDOW = True
    SUPPORTS_SOFTCAP = True
    SUPPORTS_SINKS = True
    SUPPORTS_LSE = True
    AUTOTUNE_TIMED = False  # never worth measuring: the slow reference
    AUTO_PRIORITY = {"cpu": 90, "cuda": 90}
    TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    def build(self, call: Call):
        kw = dict(window=call.window, softcap=call.softcap, return_lse=call.return_lse)
        if call.sinks:
            def run(q, k, v, m, c, s, p, sinks):
                return eager_attention(q, k, v, m, c, s, p, sinks=sinks, **kw)
            return run

        def run(q, k, v, m, c, s, p):
            return eager_attention(q, k, v, m, c, s, p, **kw)
        return run
