"""The normalised description of one attention call.

`Call` holds everything a backend needs to decide whether it can serve a call: device, dtype, the
sizes in (batch, heads, seq, head_dim) terms whatever the input layout, the mask kind, causal,
dropout and whether gradients are needed. It is built once per new call shape (on a cache miss), never
on the hot path.

Conventions (the same everywhere in attnpatch):

* Layouts: ``"bnsd"`` is (batch, heads, seq, head_dim), the seed's and SDPA's layout; ``"bsnd"`` is
  (batch, seq, heads, head_dim), the layout of diffusers' dispatcher, flash-attn and xformers.
* Masks: a boolean mask has True = *attend*; a float mask is *added* to the scores. A mask must
  broadcast to (batch, heads, seq_q, seq_kv). A 2-D mask of shape (batch, seq_kv) is a key-padding
  mask; a 2-D mask of shape (seq_q, seq_kv) is a per-query mask as in SDPA; when both readings fit and
  differ (batch == seq_q > 1) the call is refused as ambiguous.
* Causal follows SDPA: top-left aligned, query i attends keys j <= i (also when seq_q != seq_kv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

LAYOUTS = ("bnsd", "bsnd")

#: Mask kinds a backend can declare in ``SUPPORTED_MASKS``.
MASK_KINDS = ("none", "bool", "additive")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def length_bucket(n: int) -> int:
    """Bucket a sequence length for decisions that depend on it.

    Exact up to 256, then four buckets per power of two (upper bounds). So 197 and 4096 never share a
    bucket, and lengths within ~20% of each other above 256 do.
    """
    if n <= 256:
        return n
    p = 1 << (n - 1).bit_length()  # next power of two >= n
    quarter = p // 8  # split (p/2, p] in four
    return p // 2 + quarter * math.ceil((n - p // 2) / quarter)


@dataclass(frozen=True)
class Call:
    """One attention call, normalised to (batch, heads, seq, head_dim) terms.

    ``mask_shape`` is the mask's shape after it is viewed as 4-D (size-1 dims broadcast).
    ``key_padding`` is True when the mask varies only along batch and keys (a padding mask).
    """

    layout: str
    device_type: str
    device_index: Optional[int]
    capability: Optional[tuple]  # CUDA compute capability, e.g. (9, 0); None off CUDA
    dtype: torch.dtype
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    head_dim_v: int
    mask_kind: str = "none"
    mask_shape: Optional[tuple] = None
    key_padding: bool = False
    is_causal: bool = False
    dropout_p: float = 0.0
    needs_grad: bool = False
    scale: Optional[float] = None
    compiling: bool = field(default=False, compare=False)

    @property
    def gqa(self) -> bool:
        """True when key/value have fewer heads than query (GQA or MQA)."""
        return self.heads_kv != self.heads_q

    @property
    def cross(self) -> bool:
        return self.seq_q != self.seq_kv

    def signature(self) -> tuple:
        """The key decisions are cached under: everything a backend's reasons may depend on, with the
        sequence lengths bucketed (see `length_bucket`)."""
        return (
            self.device_type, self.device_index, self.dtype, self.head_dim, self.head_dim_v,
            self.gqa, self.mask_kind, self.key_padding, self.is_causal, self.dropout_p > 0,
            self.needs_grad, length_bucket(self.seq_q), length_bucket(self.seq_kv), self.cross,
        )

    def describe(self) -> str:
        """One line for error messages: shapes in bnsd terms and every flag."""
        mask = "none" if self.mask_kind == "none" else f"{self.mask_kind} {tuple(self.mask_shape)}"
        if self.key_padding:
            mask += " (key padding)"
        dev = self.device_type if self.device_index is None else f"{self.device_type}:{self.device_index}"
        if self.capability is not None:
            dev += f" (sm{self.capability[0]}{self.capability[1]})"
        return (
            f"q=(b={self.batch}, h={self.heads_q}, s={self.seq_q}, d={self.head_dim}) "
            f"kv=(h={self.heads_kv}, s={self.seq_kv}, d_v={self.head_dim_v}) {str(self.dtype).replace('torch.', '')} "
            f"on {dev}, layout={self.layout}, mask={mask}, causal={self.is_causal}, "
            f"dropout_p={self.dropout_p}, grad={self.needs_grad}"
        )


_CAPABILITY_CACHE: dict = {}


def _capability(device: torch.device) -> Optional[tuple]:
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY_CACHE.get(index)
    if cap is None:
        cap = tuple(torch.cuda.get_device_capability(index))
        _CAPABILITY_CACHE[index] = cap
    return cap


def _fail(msg: str) -> None:
    raise ValueError(f"attnpatch.attention_forward: {msg}")


def normalise_mask(mask_meta: Optional[tuple], batch: int, heads: int, seq_q: int, seq_kv: int) -> tuple:
    """Validate a mask and return ``(kind, view4d_fn_spec, shape4d, key_padding)``.

    ``view4d_fn_spec`` is how to turn the caller's mask into a 4-D view: ``None`` (no mask),
    ``"as_is"`` (already broadcasts as 4-D after left-padding with 1s) or ``"key_padding"`` (a
    (batch, seq_kv) mask viewed as (batch, 1, 1, seq_kv)). No data is copied.
    """
    if mask_meta is None:
        return "none", None, None, False
    shape, mdtype = mask_meta[0], mask_meta[1]
    if mdtype == torch.bool:
        kind = "bool"
    elif mdtype in _FLOAT_DTYPES:
        kind = "additive"
    else:
        _fail(
            f"attn_mask has dtype {mdtype}; use torch.bool (True = attend) or a float dtype "
            "(added to the scores). Integer masks are ambiguous: convert with mask.bool() for 1 = attend."
        )
    target = (batch, heads, seq_q, seq_kv)
    ndim = len(shape)
    spec = "as_is"
    if ndim == 2 and shape == (batch, seq_kv) and shape != (seq_q, seq_kv):
        spec = "key_padding"
        shape4 = (batch, 1, 1, seq_kv)
    elif ndim == 2 and shape == (batch, seq_kv) and batch != 1:
        # (batch, seq_kv) == (seq_q, seq_kv) with batch > 1: the two readings differ.
        _fail(
            f"attn_mask of shape {shape} is ambiguous: batch == seq_q == {batch}, so it could be a "
            f"key-padding mask (batch, seq_kv) or a per-query mask (seq_q, seq_kv). Pass it as 4-D: "
            f"mask[:, None, None, :] for key padding or mask[None, None] for a per-query mask."
        )
    elif ndim > 4 or ndim == 0:
        _fail(f"attn_mask must have 1 to 4 dims, got shape {shape}; it must broadcast to (b, h, s_q, s_kv) = {target}")
    else:
        shape4 = (1,) * (4 - len(shape)) + shape
        for have, want, name in zip(shape4, target, ("batch", "heads", "seq_q", "seq_kv")):
            if have != 1 and have != want:
                _fail(
                    f"attn_mask of shape {shape} does not broadcast to (b, h, s_q, s_kv) = {target}: "
                    f"its {name} dim is {have}, expected 1 or {want}. A key-padding mask is (b, s_kv) = "
                    f"{(batch, seq_kv)}."
                )
    key_padding = shape4[1] == 1 and shape4[2] == 1 and shape4[3] == seq_kv
    return kind, spec, shape4, key_padding


def _check_tensors(query, key, value, layout) -> None:
    """Validate the types, ranks and dtypes of q, k, v; raise ValueError/TypeError naming what is wrong."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attnpatch.attention_forward: {name} must be a torch.Tensor, got {type(t).__name__}")


def tensor_meta(query, key, value, attn_mask) -> tuple:
    """The metadata a decision depends on, as plain Python values (shapes as ints)."""
    mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attnpatch.attention_forward: attn_mask must be a torch.Tensor or None, "
                            f"got {type(attn_mask).__name__}")
        mask = (tuple(int(x) for x in attn_mask.shape), attn_mask.dtype, attn_mask.device)
    return (
        tuple(int(x) for x in query.shape), tuple(int(x) for x in key.shape),
        tuple(int(x) for x in value.shape), (query.dtype, key.dtype, value.dtype),
        (query.device, key.device, value.device), mask,
    )


def build_call(query, key, value, layout: str, attn_mask, is_causal: bool, scale, dropout_p: float,
               needs_grad: bool, compiling: bool = False) -> tuple:
    """Validate one call fully and return ``(Call, mask_spec)``. Used on cache misses and by explain()."""
    _check_tensors(query, key, value, layout)
    return call_from_meta(tensor_meta(query, key, value, attn_mask), layout, is_causal, scale, dropout_p,
                          needs_grad, compiling)


def call_from_meta(meta: tuple, layout: str, is_causal, scale, dropout_p, needs_grad: bool,
                   compiling: bool = False) -> tuple:
    """`build_call` on metadata only (see `tensor_meta`): what the compiled path uses."""
    (qs, ks, vs), dtypes, devices, mask = meta[:3], meta[3], meta[4], meta[5]
    if layout not in LAYOUTS:
        _fail(f"layout={layout!r} is not known; use one of {LAYOUTS}")
    dims = "batch, heads, seq, head_dim" if layout == "bnsd" else "batch, seq, heads, head_dim"
    for name, shape, dt in zip(("query", "key", "value"), (qs, ks, vs), dtypes):
        if len(shape) != 4:
            _fail(f"{name} must be 4-D ({dims} for layout={layout!r}), got shape {shape}")
        if not dt.is_floating_point:
            _fail(f"{name} has dtype {dt}; attention needs a floating dtype (float16, bfloat16, float32, float64)")
    if not (dtypes[0] == dtypes[1] == dtypes[2]):
        _fail(f"query, key and value must share a dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}")
    if not (devices[0] == devices[1] == devices[2]):
        _fail(f"query, key and value must be on one device, got {devices[0]}, {devices[1]}, {devices[2]}")
    if layout == "bnsd":
        b, hq, sq, d = qs
        bk, hk, sk, dk = ks
        bv, hv, sv, dv = vs
    else:
        b, sq, hq, d = qs
        bk, sk, hk, dk = ks
        bv, sv, hv, dv = vs
    if not (b == bk == bv):
        _fail(f"batch sizes differ: query {b}, key {bk}, value {bv} (layout={layout!r})")
    if hk != hv:
        _fail(f"key and value must have the same number of heads, got {hk} and {hv} (layout={layout!r})")
    if hk == 0 or hq % hk != 0:
        _fail(f"query heads ({hq}) must be a multiple of key/value heads ({hk}) for GQA/MQA (layout={layout!r})")
    if sk != sv:
        _fail(f"key and value must have the same sequence length, got {sk} and {sv} (layout={layout!r})")
    if d != dk:
        _fail(f"query and key must have the same head_dim, got {d} and {dk} (layout={layout!r})")
    if min(b, hq, sq, d, dv) == 0 or sk == 0:
        _fail(f"empty input: query {qs}, key {ks}, value {vs}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"attnpatch.attention_forward: is_causal must be a bool, got {type(is_causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        _fail(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        _fail(f"scale must be None (meaning 1/sqrt(head_dim)) or a finite float, got {scale!r}")
    kind, spec, shape4, key_padding = normalise_mask(mask, b, hq, sq, sk)
    if mask is not None and mask[2] != devices[0]:
        _fail(f"attn_mask is on {mask[2]} but query is on {devices[0]}")
    device = devices[0]
    call = Call(
        layout=layout, device_type=device.type, device_index=device.index,
        capability=_capability(device), dtype=dtypes[0], batch=b, heads_q=hq, heads_kv=hk,
        seq_q=sq, seq_kv=sk, head_dim=d, head_dim_v=dv, mask_kind=kind, mask_shape=shape4,
        key_padding=key_padding, is_causal=is_causal, dropout_p=float(dropout_p), needs_grad=needs_grad,
        scale=None if scale is None else float(scale), compiling=compiling,
    )
    return call, spec
