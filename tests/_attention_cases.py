"""Shared helpers of the correctness tests: an independent fp64 reference, input makers for every mask
form, and the flash-attn error criterion.

The reference is written here on purpose, not imported from attnpatch: it materialises the full
(b, h_q, s_q, s_kv) mask with explicit loops over the GQA head map and applies SDPA's conventions
(True = attend, float = added, causal top-left, rows with every key masked give zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

import attnpatch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

#: Mask forms: name -> (kind, shape builder). Shapes use b, h (query heads), sq, skv.
MASK_FORMS = {
    "none": None,
    "bool_keypad_2d": ("bool", lambda b, h, sq, skv: (b, skv)),
    "add_keypad_2d": ("additive", lambda b, h, sq, skv: (b, skv)),
    "bool_b11k": ("bool", lambda b, h, sq, skv: (b, 1, 1, skv)),
    "add_b11k": ("additive", lambda b, h, sq, skv: (b, 1, 1, skv)),
    "bool_qk_2d": ("bool", lambda b, h, sq, skv: (sq, skv)),
    "add_qk_2d": ("additive", lambda b, h, sq, skv: (sq, skv)),
    "bool_full": ("bool", lambda b, h, sq, skv: (b, h, sq, skv)),
    "add_full": ("additive", lambda b, h, sq, skv: (b, h, sq, skv)),
    "add_11qk": ("additive", lambda b, h, sq, skv: (1, 1, sq, skv)),
    "bool_11qk": ("bool", lambda b, h, sq, skv: (1, 1, sq, skv)),
    "bool_3d": ("bool", lambda b, h, sq, skv: (h, sq, skv)),
    "add_3d": ("additive", lambda b, h, sq, skv: (1, sq, skv)),
    "bool_1d": ("bool", lambda b, h, sq, skv: (skv,)),
    "bool_b1qk": ("bool", lambda b, h, sq, skv: (b, 1, sq, skv)),
    # every key masked for some query rows: the result there must be zeros
    "bool_dead_rows": ("bool", lambda b, h, sq, skv: (b, 1, sq, skv)),
    "add_dead_rows": ("additive", lambda b, h, sq, skv: (b, h, sq, skv)),
    # an additive mask in float32 while q/k/v are 16-bit (the router casts it)
    "add_fp32_keypad": ("additive", lambda b, h, sq, skv: (b, 1, 1, skv)),
}


@dataclass(frozen=True)
class Case:
    dtype: str = "fp32"
    layout: str = "bnsd"
    b: int = 2
    hq: int = 4
    hkv: int = 4
    sq: int = 33
    skv: int = 33
    d: int = 64
    dv: int = 64
    mask: str = "none"
    causal: bool = False
    scale: Optional[float] = None

    @property
    def id(self) -> str:
        s = (f"{self.dtype}-{self.layout}-b{self.b}h{self.hq}x{self.hkv}-q{self.sq}k{self.skv}-d{self.d}"
             f"v{self.dv}-{self.mask}")
        if self.causal:
            s += "-causal"
        if self.scale is not None:
            s += f"-scale{self.scale}"
        return s

    def valid(self) -> bool:
        """False for cases attnpatch rightly refuses (a 2-D mask that reads both ways)."""
        if self.mask in ("bool_keypad_2d", "add_keypad_2d", "bool_qk_2d", "add_qk_2d"):
            return not (self.b == self.sq and self.b > 1)
        return True


def make_mask(case: Case, gen: torch.Generator) -> Optional[torch.Tensor]:
    form = MASK_FORMS[case.mask]
    if form is None:
        return None
    kind, shape_fn = form
    b, h, sq, skv = case.b, case.hq, case.sq, case.skv
    shape = shape_fn(b, h, sq, skv)
    if case.mask in ("bool_keypad_2d", "add_keypad_2d", "bool_b11k", "add_b11k", "add_fp32_keypad"):
        # Padding that does not start at position 0: batch i keeps keys [start_i, end_i).
        keep = torch.zeros(b, skv, dtype=torch.bool)
        for i in range(b):
            start = min(i * max(1, skv // 5), skv - 1)
            end = max(start + 1, skv - i * max(1, skv // 7))
            keep[i, start:end] = True
        keep = keep.reshape(shape)
    elif case.mask == "bool_dead_rows":
        keep = torch.rand(shape, generator=gen) > 0.3
        keep[:, :, ::3, :] = False  # every third query row sees no key
    elif case.mask == "add_dead_rows":
        keep = torch.rand(shape, generator=gen) > 0.3
        keep[:, :, 1::4, :] = False
    else:
        keep = torch.rand(shape, generator=gen) > 0.3
    if kind == "bool":
        return keep
    mdtype = torch.float32 if case.mask == "add_fp32_keypad" else DTYPES[case.dtype]
    bias = torch.randn(shape, generator=gen) * 0.5  # a real bias (ALiBi-like), not only 0/-inf
    bias = bias.masked_fill(~keep, float("-inf"))
    return bias.to(mdtype)


def make_inputs(case: Case, requires_grad: bool = False, seed: int = 0):
    """q, k, v (in the case's layout) and the mask, random normal data in the case's dtype."""
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]
    shapes = [(case.b, case.hq, case.sq, case.d), (case.b, case.hkv, case.skv, case.d),
              (case.b, case.hkv, case.skv, case.dv)]
    tensors = []
    for shape in shapes:
        t = torch.randn(shape, generator=gen).to(dt)
        if case.layout == "bsnd":
            t = t.transpose(1, 2).contiguous()
        tensors.append(t.requires_grad_(requires_grad))
    return (*tensors, make_mask(case, gen))


def _mask_4d(mask: torch.Tensor, b: int, h: int, sq: int, skv: int) -> torch.Tensor:
    """The caller's mask as a full (b, h, sq, skv) tensor, following attnpatch's documented rules."""
    if mask.dim() == 2 and mask.shape == (b, skv) and (b, skv) != (sq, skv):
        mask = mask[:, None, None, :]  # key padding
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(b, h, sq, skv)


def reference(q, k, v, mask, causal, scale, layout) -> torch.Tensor:
    """fp64 attention, written independently of attnpatch (see module docstring)."""
    q, k, v = q.double(), k.double(), v.double()
    if layout == "bsnd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    group = hq // hkv
    k = torch.stack([k[:, h // group] for h in range(hq)], dim=1)  # query head h reads kv head h // group
    v = torch.stack([v[:, h // group] for h in range(hq)], dim=1)
    s = (1.0 / math.sqrt(d)) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * s
    keep = torch.ones(b, hq, sq, skv, dtype=torch.bool)
    if causal:
        rows = torch.arange(sq)[:, None]
        cols = torch.arange(skv)[None, :]
        keep = keep & (cols <= rows)
    if mask is not None:
        m = _mask_4d(mask, b, hq, sq, skv)
        if m.dtype == torch.bool:
            keep = keep & m
        else:
            scores = scores + m.double()
            keep = keep & ~torch.isneginf(m)
    scores = scores.masked_fill(~keep, float("-inf"))
    live = keep.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~live, 0.0), dim=-1) * live
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
    return out.transpose(1, 2) if layout == "bsnd" else out


def dead_rows(case: Case, mask) -> Optional[torch.Tensor]:
    """Bool (b, h, sq) of query rows that see no key, or None."""
    if mask is None:
        return None
    m = _mask_4d(mask, case.b, case.hq, case.sq, case.skv)
    keep = m if m.dtype == torch.bool else ~torch.isneginf(m)
    if case.causal:
        keep = keep & torch.ones(case.sq, case.skv, dtype=torch.bool).tril()
    dead = ~keep.any(-1)
    return dead if dead.any() else None


def rounding_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """flash-attn's absolute term: twice the error of merely storing the reference in ``dtype``."""
    stored = (ref.to(dtype) + 0.3 - 0.3).double()
    return 2 * (stored - ref).abs().max().item() + 1e-7


def score_rounding(q, k, v, scale, layout) -> float:
    """What rounding the scores in float32 (every kernel's accumulator) can move the output by:
    2 * eps32 * max|score| * max|v|. It matters in float32 with large logits (big head dims or
    scales), where the math kernel's own error may be luckily small."""
    q, k, v = q.detach().double(), k.detach().double(), v.detach().double()
    if layout == "bsnd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)).abs().max().item() * s
    return 2 * torch.finfo(torch.float32).eps * logits * v.abs().max().item()


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref).abs().max().item()


def refusal(name: str, q, k, v, **kw) -> list:
    """The reasons ``name`` refuses this call (empty if it serves it)."""
    return attnpatch.explain(q, k, v, backend=name, **kw).reasons[name]


def with_dtype(case: Case, dtype: str) -> Case:
    return replace(case, dtype=dtype)
