"""`eager`: the seed's formula in plain torch, softmax(q·kᵀ·scale + mask)·v. The reference backend:
every feature, any device and dtype; slow and memory-hungry (it materialises the score matrix)."""

from __future__ import annotations

import torch

from ..call import Call
from ..registry import Backend


def eager_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0):
    """Reference attention in bnsd. Softmax runs in float32 for 16-bit inputs (as transformers' eager
    path does). Rows whose keys are all masked give zeros. GQA repeats k/v heads."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale
    keep = None
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else (keep & attn_mask)
        else:
            scores = scores + attn_mask.to(compute)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)  # every key masked in this row
    weights = torch.exp(scores - torch.where(dead, torch.zeros_like(row_max), row_max))
    denom = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(dead, torch.ones_like(denom), denom)
    if dropout_p > 0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v.to(compute)).to(q.dtype)


class EagerBackend(Backend):
    NAME = "eager"
    DESCRIPTION = "plain torch matmul-softmax-matmul (the seed's formula); the reference"
    SUPPORTS_DROPOUT = True
    AUTOTUNE_TIMED = False  # never worth measuring: the slow reference
    AUTO_PRIORITY = {"cpu": 90, "cuda": 90}
    TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    def build(self, call: Call):
        def run(q, k, v, m, c, s, p):
            return eager_attention(q, k, v, m, c, s, p)
        return run
