"""The normalised description of one attention call.

`Call` holds everything a backend needs to decide whether it can serve a call: device, dtype, the
sizes in (batch, heads, seq, head_dim) terms whatever the input layout, the mask kind, causal,
sliding window, softcap, sinks, dropout, whether gradients and the log-sum-exp are needed and whether
the inputs' last dimension is contiguous. It is built once per new call shape (on a cache miss),
never on the hot path.

Conventions (the same everywhere in attnpatch):

* Layouts: ``"bnsd"`` is (batch, heads, seq, head_dim), the seed's and SDPA's layout; ``"bsnd"`` is
  (batch, seq, heads, head_dim), the layout of diffusers' dispatcher, flash-attn and xformers.
* Masks: a boolean mask has True = *attend*; a float mask is *added* to the scores. A mask must
  broadcast to (batch, heads, seq_q, seq_kv). A 2-D mask of shape (batch, seq_kv) is a key-padding
  mask; a 2-D mask of shape (seq_q, seq_kv) is a per-query mask as in SDPA; when both readings fit and
  differ (batch == seq_q > 1) the call is refused as ambiguous.
* Causal follows SDPA: top-left aligned, query i attends keys j <= i (also when seq_q != seq_kv).
* Window ``(left, right)``: query i attends keys j with ``i - left <= j <= i + right`` (top-left
  aligned like causal; None = unbounded on that side). With causal, ``right`` is at most 0.
* Softcap ``c``: the scores (after scaling) become ``tanh(s / c) * c`` (Gemma 2).
* Sinks: one logit per query head that joins the softmax's denominator and attends no value (GPT-OSS).
* Log-sum-exp: float32, (batch, heads, seq_q), natural log of the softmax denominator (after scale,
  softcap and mask); ``-inf`` for a row whose keys are all masked.

Lengths enter decisions through `length_bucket`: calls whose sequence lengths fall in the same bucket
share one decision, so a backend's length limits are checked against the bucket's lower bound (the
whole bucket is served alike). Buckets are powers of two up to 256 and quarter powers of two above,
so every power of two (256, 16384, ...) is a bucket boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

LAYOUTS = ("bnsd", "bsnd")

#: Mask kinds a backend can declare in ``SUPPORTED_MASKS``.
MASK_KINDS = ("none", "bool", "additive")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionInputError(ValueError, RuntimeError):
    """The arguments of an attention call are invalid (shapes, dtypes, devices, mask, flags).

    A ValueError, and also a RuntimeError: the type torch's own ``scaled_dot_product_attention``
    raises for such calls, so code written against torch catches it unchanged."""


def length_bucket(n: int) -> int:
    """The lower bound of the length bucket ``n`` falls in (decisions are cached per bucket).

    Powers of two up to 256 ([1, 2), [2, 4), ..., [128, 256)), then four buckets per power of two
    ([256, 320), [320, 384), ...). Every power of two starts a bucket, so a backend limit at a power of
    two (256, 16384) never splits one."""
    if n < 1:
        return 0
    if n < 256:
        return 1 << (n.bit_length() - 1)
    low = 1 << (n.bit_length() - 1)  # the power of two <= n
    quarter = low // 4
    return low + quarter * ((n - low) // quarter)


def bucket_range(n: int) -> Tuple[int, int]:
    """``[lo, hi)``: the lengths that share ``n``'s bucket."""
    lo = length_bucket(n)
    if lo < 1:
        return 0, 1
    if lo < 256:
        return lo, lo * 2
    low = 1 << (lo.bit_length() - 1)
    return lo, lo + low // 4


@dataclass(frozen=True)
class Call:
    """One attention call, normalised to (batch, heads, seq, head_dim) terms.

    ``mask_shape`` is the mask's shape after it is viewed as 4-D (size-1 dims broadcast).
    ``key_padding`` is True when the mask varies only along batch and keys (a padding mask).
    ``symbolic_lengths`` is True for a call traced by torch.compile / torch.export whose batch and
    sequence sizes may change between runs: its ``seq_q``/``seq_kv`` are then representatives chosen
    on the same side of every length limit as the real ones, and ``batch`` is 1.
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
    window: Optional[Tuple[Optional[int], Optional[int]]] = None
    softcap: Optional[float] = None
    sinks: bool = False
    return_lse: bool = False
    last_dim_contiguous: bool = True
    compiling: bool = field(default=False, compare=False)
    symbolic_lengths: bool = field(default=False, compare=False)

    @property
    def gqa(self) -> bool:
        """True when key/value have fewer heads than query (GQA or MQA)."""
        return self.heads_kv != self.heads_q

    @property
    def cross(self) -> bool:
        return self.seq_q != self.seq_kv

    @property
    def seq_q_floor(self) -> int:
        """The shortest query length sharing this call's decision (its bucket's lower bound)."""
        return self.seq_q if self.symbolic_lengths else length_bucket(self.seq_q)

    @property
    def seq_kv_floor(self) -> int:
        """The shortest key length sharing this call's decision (its bucket's lower bound)."""
        return self.seq_kv if self.symbolic_lengths else length_bucket(self.seq_kv)

    @property
    def window_bounds(self) -> Tuple[Optional[int], Optional[int]]:
        """(left, right) of the keys each query sees, causal folded in; (None, None) = all keys."""
        left, right = self.window if self.window is not None else (None, None)
        if self.is_causal:
            right = 0 if right is None else min(right, 0)
        return left, right

    @property
    def banded(self) -> bool:
        """True when the call limits keys by position beyond plain causal (a sliding window)."""
        if self.window is None:
            return False
        left, right = self.window
        return left is not None or (right is not None and not (self.is_causal and right >= 0))

    def signature(self) -> tuple:
        """The key decisions are cached under: everything a backend's reasons may depend on, with the
        sequence lengths bucketed (see `length_bucket`)."""
        rel = (self.seq_q > self.seq_kv) - (self.seq_q < self.seq_kv)
        return (
            self.device_type, self.device_index, self.dtype, self.head_dim, self.head_dim_v,
            self.gqa, self.mask_kind, self.key_padding, self.is_causal, self.dropout_p > 0,
            self.needs_grad, self.seq_q_floor, self.seq_kv_floor, rel, self.window, self.softcap,
            self.sinks, self.return_lse, self.last_dim_contiguous,
        )

    @property
    def softcap_text(self) -> str:
        """``softcap=<value>``; in a traced call's decision only its presence is known (`router._traced_forward`)."""
        return "softcap (value not part of a compiled decision)" if self.compiling else f"softcap={self.softcap}"

    def describe(self) -> str:
        """One line for error messages: shapes in bnsd terms and every flag."""
        mask = "none" if self.mask_kind == "none" else f"{self.mask_kind} {tuple(self.mask_shape)}"
        if self.key_padding:
            mask += " (key padding)"
        dev = self.device_type if self.device_index is None else f"{self.device_type}:{self.device_index}"
        if self.capability is not None:
            dev += f" (sm{self.capability[0]}{self.capability[1]})"
        sq, skv = (self.seq_q, self.seq_kv) if not self.symbolic_lengths else ("?", "?")
        extra = ""
        if self.window is not None:
            extra += f", window={self.window}"
        if self.softcap is not None:
            extra += f", {self.softcap_text}"
        if self.sinks:
            extra += ", sinks"
        if self.return_lse:
            extra += ", return_lse"
        if not self.last_dim_contiguous:
            extra += ", strided last dim"
        if self.symbolic_lengths:
            extra += ", sizes symbolic (compiled)"
        return (
            f"q=(b={self.batch if not self.symbolic_lengths else '?'}, h={self.heads_q}, s={sq}, d={self.head_dim}) "
            f"kv=(h={self.heads_kv}, s={skv}, d_v={self.head_dim_v}) {str(self.dtype).replace('torch.', '')} "
            f"on {dev}, layout={self.layout}, mask={mask}, causal={self.is_causal}, "
            f"dropout_p={self.dropout_p}, grad={self.needs_grad}{extra}"
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
    raise AttentionInputError(f"attnpatch.attention_forward: {msg}")


def normalise_mask(mask_meta: Optional[tuple], batch: int, heads: int, seq_q: int, seq_kv: int) -> tuple:
    """Validate a mask and return ``(kind, view4d_fn_spec, shape4d, key_padding)``.

    ``view4d_fn_spec`` is how to turn the caller's mask into a 4-D view: ``None`` (no mask),
    ``"as_is"`` (already broadcasts as 4-D after left-padding with 1s) or ``"key_padding"`` (a
    (batch, seq_kv) mask viewed as (batch, 1, 1, seq_kv)). No data is copied.
    """
    if mask_meta is None:
        return "none", None, None, False
    shape, mdtype = tuple(mask_meta[0]), mask_meta[1]
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


def _check_tensors(query, key, value) -> None:
    """Validate the types of q, k, v; raise TypeError naming what is wrong."""
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
    contiguous = query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
    return (
        tuple(int(x) for x in query.shape), tuple(int(x) for x in key.shape),
        tuple(int(x) for x in value.shape), (query.dtype, key.dtype, value.dtype),
        (query.device, key.device, value.device), mask, contiguous,
    )


@dataclass(frozen=True)
class Features:
    """The optional attention features of one call (all default to off)."""

    window: Optional[Tuple[Optional[int], Optional[int]]] = None
    softcap: Optional[float] = None
    sinks: bool = False
    return_lse: bool = False


NO_FEATURES = Features()


def check_window(window, where: str = "window") -> Optional[Tuple[Optional[int], Optional[int]]]:
    """Validate ``window=(left, right)`` (ints >= 0 or None); returns a tuple or None."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        _fail(f"{where} must be None or (left, right) with ints >= 0 or None for unbounded, got {window!r}")
    out = []
    for side, v in zip(("left", "right"), window):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            _fail(f"{where}: {side}={v!r} must be an int >= 0 or None (unbounded)")
        out.append(int(v))
    if out == [None, None]:
        return None
    return (out[0], out[1])


def check_softcap(softcap) -> Optional[float]:
    if softcap is None:
        return None
    if not isinstance(softcap, bool) and isinstance(softcap, (int, float)):
        softcap = float(softcap)
        # comparisons, not math.isfinite: under torch.compile(dynamic=True) the value may be symbolic
        # (a guard then); NaN fails both
        if 0 < softcap < math.inf:
            return softcap
    _fail(f"softcap must be None or a finite float > 0 (scores become tanh(s / c) * c), got {softcap!r}")


def build_call(query, key, value, layout: str, attn_mask, is_causal: bool, scale, dropout_p: float,
               needs_grad: bool, compiling: bool = False, features: Features = NO_FEATURES) -> tuple:
    """Validate one call fully and return ``(Call, mask_spec)``. Used on cache misses and by explain()."""
    _check_tensors(query, key, value)
    return call_from_meta(tensor_meta(query, key, value, attn_mask), layout, is_causal, scale, dropout_p,
                          needs_grad, compiling, features)


def check_flags(layout, is_causal, scale, dropout_p) -> None:
    if layout not in LAYOUTS:
        _fail(f"layout={layout!r} is not known; use one of {LAYOUTS}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"attnpatch.attention_forward: is_causal must be a bool, got {type(is_causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        _fail(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        _fail(f"scale must be None (meaning 1/sqrt(head_dim)) or a finite float, got {scale!r}")


def split_dims(layout: str, shape: tuple) -> tuple:
    """(batch, heads, seq, dim) of a 4-D shape in ``layout``."""
    if layout == "bnsd":
        return tuple(shape)
    b, s, h, d = shape
    return b, h, s, d


def check_shapes(meta: tuple, layout: str) -> tuple:
    """Validate ranks, dtypes, devices and sizes of q/k/v; returns (b, hq, sq, d, hk, sk, dv)."""
    (qs, ks, vs), dtypes, devices = meta[:3], meta[3], meta[4]
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
    b, hq, sq, d = split_dims(layout, qs)
    bk, hk, sk, dk = split_dims(layout, ks)
    bv, hv, sv, dv = split_dims(layout, vs)
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
    return b, hq, sq, d, hk, sk, dv


def call_from_meta(meta: tuple, layout: str, is_causal, scale, dropout_p, needs_grad: bool,
                   compiling: bool = False, features: Features = NO_FEATURES) -> tuple:
    """`build_call` on metadata only (see `tensor_meta`)."""
    check_flags(layout, is_causal, scale, dropout_p)
    b, hq, sq, d, hk, sk, dv = check_shapes(meta, layout)
    if min(b, hq, sq, d, dv, sk) == 0:
        _fail(f"empty input: query {meta[0]}, key {meta[1]}, value {meta[2]} (the router serves empty "
              "inputs before building a call; this is a bug)")
    devices, mask = meta[4], meta[5]
    kind, spec, shape4, key_padding = normalise_mask(mask, b, hq, sq, sk)
    if mask is not None and mask[2] != devices[0]:
        _fail(f"attn_mask is on {mask[2]} but query is on {devices[0]}")
    device = devices[0]
    call = Call(
        layout=layout, device_type=device.type, device_index=device.index,
        capability=_capability(device), dtype=meta[3][0], batch=b, heads_q=hq, heads_kv=hk,
        seq_q=sq, seq_kv=sk, head_dim=d, head_dim_v=dv, mask_kind=kind, mask_shape=shape4,
        key_padding=key_padding, is_causal=is_causal, dropout_p=float(dropout_p), needs_grad=needs_grad,
        scale=None if scale is None else float(scale), window=features.window, softcap=features.softcap,
        sinks=features.sinks, return_lse=features.return_lse, last_dim_contiguous=bool(meta[6]),
        compiling=compiling,
    )
    return call, spec
