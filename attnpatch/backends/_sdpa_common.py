"""What the torch SDPA backends share: one runner builder and torch's own eligibility checks.

Each sub-kernel backend (`sdpa_cudnn`, `sdpa_flash`, `sdpa_efficient`, `sdpa_math`) pins one kernel by
calling torch's own operator for it (``torch.ops.aten._scaled_dot_product_cudnn_attention`` and
friends) with the same preparation ``F.scaled_dot_product_attention`` does before it calls that
operator (boolean masks as additive 0/-inf masks, the memory-efficient kernel's mask alignment, the
flash kernel's head-dim padding). No process-wide state is touched: torch's global SDPA flags stay as
the user left them, so other threads' and other libraries' SDPA calls are unaffected. `sdpa` lets
torch choose (``F.scaled_dot_product_attention``).

On CUDA, `extra_reasons` asks torch itself (``torch.backends.cuda.can_use_*_attention``) whether the
pinned kernel can run the call, so the reasons match what torch would do. The fused kernels return
the log-sum-exp, which the router uses for ``return_lse`` and attention sinks.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..call import Call
from ..registry import Backend, version_at_least

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend
except ImportError:  # pragma: no cover - torch < 2.3
    SDPBackend = None

_CAN_USE = {
    "FLASH_ATTENTION": "can_use_flash_attention",
    "EFFICIENT_ATTENTION": "can_use_efficient_attention",
    "CUDNN_ATTENTION": "can_use_cudnn_attention",
}

#: torch's operator for each pinned kernel, per device type (None: that kernel has no op there).
_OPS = {
    ("FLASH_ATTENTION", "cuda"): "_scaled_dot_product_flash_attention",
    ("FLASH_ATTENTION", "cpu"): "_scaled_dot_product_flash_attention_for_cpu",
    ("CUDNN_ATTENTION", "cuda"): "_scaled_dot_product_cudnn_attention",
    ("EFFICIENT_ATTENTION", "cuda"): "_scaled_dot_product_efficient_attention",
    ("MATH", "cuda"): "_scaled_dot_product_attention_math",
    ("MATH", "cpu"): "_scaled_dot_product_attention_math",
}

#: torch >= 2.5 accepts ``enable_gqa=True`` in scaled_dot_product_attention.
_GQA_NATIVE = version_at_least(torch.__version__, "2.5")


def aten_op(name: str, compiling: bool):
    """torch's operator ``aten.<name>``: for eager calls its generated Python binding ``torch.<name>``
    (the cheapest entry: ~2.6 µs less per call than the OpOverload's ``_op``, which converts arguments
    through the schema; CPU, torch 2.14), the OpOverload (which dynamo traces) under torch.compile;
    None when torch lacks it."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    overload = packet.default
    if compiling:
        return overload
    return getattr(torch, name, None) or getattr(overload, "_op", overload)


def _device_of(call: Call) -> torch.device:
    return torch.device(call.device_type, call.device_index) if call.device_index is not None else torch.device(call.device_type)


def _fake_inputs(call: Call, expand_gqa: bool, combine_causal: bool):
    """Stride-0 tensors on the call's device with the call's shapes (bnsd), for torch's checks."""
    dev = _device_of(call)
    hkv = call.heads_q if expand_gqa else call.heads_kv
    q = torch.empty(1, 1, 1, call.head_dim, device=dev, dtype=call.dtype).expand(call.batch, call.heads_q, call.seq_q, call.head_dim)
    k = torch.empty(1, 1, 1, call.head_dim, device=dev, dtype=call.dtype).expand(call.batch, hkv, call.seq_kv, call.head_dim)
    v = torch.empty(1, 1, 1, call.head_dim_v, device=dev, dtype=call.dtype).expand(call.batch, hkv, call.seq_kv, call.head_dim_v)
    mask = None
    is_causal = call.is_causal
    positional = call.banded or (call.is_causal and call.mask_kind != "none")
    if call.mask_kind != "none" or positional:
        mdtype = torch.bool if call.mask_kind == "bool" else call.dtype
        shape3 = call.mask_shape[:3] if call.mask_shape is not None else (1, 1, 1)
        # contiguous full-size last dim, like a real mask (the efficient kernel checks alignment)
        mask = torch.zeros(1, 1, 1, call.seq_kv, device=dev, dtype=mdtype).expand(*shape3, call.seq_kv)
        if positional:
            mask = mask.expand(shape3[0], shape3[1], call.seq_q, call.seq_kv)
            is_causal = False
    return q, k, v, mask, is_causal


def torch_kernel_reasons(call: Call, kernel: str, expand_gqa: bool) -> List[str]:
    """Ask torch whether the CUDA sub-kernel ``kernel`` (an SDPBackend name) can run this call."""
    fn = getattr(torch.backends.cuda, _CAN_USE[kernel], None)
    params_cls = getattr(torch.backends.cuda, "SDPAParams", None)
    if fn is None or params_cls is None:
        return []  # old torch: rely on the declarations
    q, k, v, mask, is_causal = _fake_inputs(call, expand_gqa, combine_causal=True)
    try:
        params = params_cls(q, k, v, mask, call.dropout_p, is_causal, call.gqa and not expand_gqa)
    except TypeError:  # torch < 2.5: no enable_gqa field
        params = params_cls(q, k, v, mask, call.dropout_p, is_causal)
    if fn(params, False):
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(params, True)
    texts = [str(w.message).strip().rstrip(".") for w in caught]
    return [f"torch refuses {kernel.lower()}: {t}" for t in texts] or [f"torch refuses {kernel.lower()} for this call"]


def causal_mask(seq_q: int, seq_kv: int, device) -> torch.Tensor:
    """SDPA's causal convention as a bool mask: top-left aligned, query i attends keys j <= i."""
    return torch.ones(seq_q, seq_kv, dtype=torch.bool, device=device).tril()


def band_mask(seq_q: int, seq_kv: int, left: Optional[int], right: Optional[int], device) -> torch.Tensor:
    """Bool (seq_q, seq_kv): True where ``i - left <= j <= i + right`` (None = unbounded)."""
    i = torch.arange(seq_q, device=device)[:, None]
    j = torch.arange(seq_kv, device=device)[None, :]
    keep = torch.ones(seq_q, seq_kv, dtype=torch.bool, device=device)
    if right is not None:
        keep = keep & (j <= i + right)
    if left is not None:
        keep = keep & (j >= i - left)
    return keep


class PositionMask:
    """The bool (seq_q, seq_kv) mask of a call's causal/window limits, rebuilt only when the lengths
    change (eager); computed in the traced code under torch.compile."""

    __slots__ = ("left", "right", "device", "compiling", "_key", "_mask")

    def __init__(self, call: Call):
        self.left, self.right = call.window_bounds
        self.device = _device_of(call)
        self.compiling = call.compiling
        self._key = None
        self._mask = None

    def get(self, seq_q, seq_kv) -> torch.Tensor:
        if self.compiling:
            return band_mask(seq_q, seq_kv, self.left, self.right, self.device)
        key = (seq_q, seq_kv)
        if key != self._key:
            self._mask = band_mask(seq_q, seq_kv, self.left, self.right, self.device)
            self._key = key
        return self._mask


def merge_masks(m: Optional[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The user's mask (bool, True = attend, or additive) limited to the positions ``keep`` allows."""
    if m is None:
        return keep
    if m.dtype == torch.bool:
        return m & keep
    return m.masked_fill(~keep, float("-inf"))


def additive(m: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """A bool mask as an additive 0/-inf mask in ``dtype`` (what F.scaled_dot_product_attention does
    before calling a kernel); other masks unchanged."""
    if m is None or m.dtype != torch.bool:
        return m
    return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))


def aligned_for_efficient(m: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The memory-efficient kernel's mask preparation (as F.scaled_dot_product_attention does it):
    strides aligned to 8 elements (padding the last dim, then slicing it back) and expanded to
    (b, h, s_q, s_kv)."""
    aligned = m.stride(-1) == 1 and all(m.stride(i) % 8 == 0 for i in range(m.dim() - 1))
    if not aligned:
        n = m.shape[-1]
        m = F.pad(m, (0, 8 - n % 8))[..., :n]
    return m.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _lse_3d(lse: torch.Tensor, seq_q) -> torch.Tensor:
    if lse.dim() == 4:  # cuDNN: (b, h, s_q, 1)
        lse = lse[..., 0]
    return lse[..., :seq_q]  # efficient: padded to a multiple of 32


class SdpaFamily(Backend):
    """Base for the torch SDPA backends. ``KERNEL`` is an SDPBackend name, or None for torch's choice.
    ``NATIVE_GQA`` says whether the kernel takes fewer k/v heads (else the runner repeats k/v heads,
    which costs memory but keeps the fused kernel)."""

    KERNEL: Optional[str] = None
    NATIVE_GQA: bool = True
    SUPPORTS_DROPOUT = True
    SUPPORTS_WINDOW = True  # as an explicit mask (refused where the kernel takes no mask)
    #: On CUDA, pass bool masks as additive 0/-inf masks. Measured on an H200 (torch 2.11, cuDNN 9.19):
    #: cuDNN attention returns non-zero rows for fully masked query rows of a *bool* mask, but zeros for
    #: an additive mask whose row is all -inf; attnpatch's convention is zeros.
    CUDA_BOOL_MASK_AS_ADDITIVE: bool = False

    def probe(self) -> List[str]:
        reasons = super().probe()
        if reasons:
            return reasons
        if self.KERNEL is not None and SDPBackend is None:
            return [f"torch {torch.__version__} has no torch.nn.attention (needs torch >= 2.3)"]
        if self.KERNEL is not None and not hasattr(SDPBackend, self.KERNEL):
            return [f"torch {torch.__version__} has no SDPBackend.{self.KERNEL}"]
        return []

    def op_name(self, call: Call) -> Optional[str]:
        return _OPS.get((self.KERNEL, call.device_type)) if self.KERNEL is not None else None

    def _expand_gqa(self, call: Call) -> bool:
        return call.gqa and not (self.NATIVE_GQA and _GQA_NATIVE)

    def needs_unit_stride(self, call: Call) -> bool:
        # torch's fused CUDA kernels need stride 1 in the last dim; CPU flash and math do not.
        return self.NEEDS_UNIT_LAST_DIM_STRIDE or (self.KERNEL in _CAN_USE and call.device_type == "cuda")

    def kernel_checks_unit_stride(self, call: Call) -> bool:
        # torch's CUDA flash (FA2's mha_fwd: "Input tensor must have contiguous last dimension") and
        # memory-efficient (CHECK_NOSPARSE_LASTCONTIGUOUS_CUDA) operators raise on a strided last dim
        # before launching; cuDNN's is not relied on (the router keeps checking its calls).
        return call.device_type == "cuda" and self.KERNEL in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION")

    def extra_reasons(self, call: Call) -> List[str]:
        reasons = []
        if self.KERNEL is not None and self.op_name(call) is None:
            reasons.append(f"torch has no {self.KERNEL.lower()} kernel on {call.device_type}")
        elif self.KERNEL is not None and aten_op(self.op_name(call), False) is None:
            reasons.append(f"torch {torch.__version__} has no torch.ops.aten.{self.op_name(call)}")
        if self.KERNEL in _CAN_USE and call.device_type == "cuda" and not reasons:
            reasons += torch_kernel_reasons(call, self.KERNEL, self._expand_gqa(call))
        return reasons

    def _packs_gqa(self, call: Call) -> bool:
        """Whether a GQA call this kernel would serve by repeating the k/v heads is a decoding step that
        can fold each k/v head's query heads into the query length instead: q (b, h_q, 1, d) runs as
        (b, h_kv, h_q / h_kv, d) against the k/v heads as they are, so no copy of the key/value cache is
        made per call (what transformers' SDPA path does for masked decoding). Exact when there is one
        query token, no causal or window limit, and a mask the same for every query head."""
        if not (call.seq_q == 1 and self._expand_gqa(call) and not call.symbolic_lengths):
            return False
        if call.is_causal or call.window is not None or call.return_lse or call.sinks:
            return False
        shape = call.mask_shape
        return shape is None or (len(shape) == 4 and shape[1] == 1 and shape[2] == 1)

    def build(self, call: Call):
        if self._packs_gqa(call):
            return _packed_gqa_runner(self.build(dataclasses.replace(
                call, heads_q=call.heads_kv, seq_q=call.heads_q // call.heads_kv)), call)
        expand = self._expand_gqa(call)
        rep = call.heads_q // call.heads_kv
        positional = call.banded or (call.is_causal and call.mask_kind != "none")
        pmask = PositionMask(call) if positional else None
        bool_as_additive = call.mask_kind == "bool" or positional
        if self.KERNEL is None:
            bool_as_additive = bool_as_additive and self.CUDA_BOOL_MASK_AS_ADDITIVE and call.device_type == "cuda"
        dtype = call.dtype
        kernel = self.KERNEL if self.KERNEL is not None else "SDPA"
        op = aten_op(self.op_name(call), call.compiling) if self.KERNEL is not None else None
        lse = call.return_lse
        want_lse = lse or call.needs_grad  # the fused kernels' backward needs it
        dv = call.head_dim_v

        def prepare(q, k, v, m, c):
            if expand:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            if pmask is not None:
                m = merge_masks(m, pmask.get(q.shape[2], k.shape[2]))
                c = False
            if bool_as_additive:
                m = additive(m, dtype)
            return k, v, m, c

        if kernel == "SDPA":
            sdpa = F.scaled_dot_product_attention
            gqa = call.gqa and not expand

            if not expand and pmask is None and not bool_as_additive:
                if gqa:
                    def run(q, k, v, m, c, s, p):  # the fast common case with GQA (decoding)
                        return sdpa(q, k, v, m, p, c, scale=s, enable_gqa=True)
                    return run

                def run(q, k, v, m, c, s, p):  # the fast common case
                    return sdpa(q, k, v, m, p, c, scale=s)
                return run

            def run(q, k, v, m, c, s, p):
                k, v, m, c = prepare(q, k, v, m, c)
                if gqa:
                    return sdpa(q, k, v, m, p, c, scale=s, enable_gqa=True)
                return sdpa(q, k, v, m, p, c, scale=s)
            return run

        if kernel == "MATH":
            gqa = call.gqa and not expand

            def run(q, k, v, m, c, s, p):
                k, v, m, c = prepare(q, k, v, m, c)
                return op(q, k, v, additive(m, q.dtype), p, c, None, scale=s, enable_gqa=gqa)[0]
            return run

        if kernel == "FLASH_ATTENTION" and call.device_type == "cpu":
            def run(q, k, v, m, c, s, p):
                k, v, m, c = prepare(q, k, v, m, c)
                out, l = op(q, k, v, p, c, attn_mask=additive(m, q.dtype), scale=s)
                return (out, l) if lse else out
            return run

        plain = not expand and pmask is None and not bool_as_additive and not lse

        if kernel == "FLASH_ATTENTION":  # CUDA: no mask; head dim padded to a multiple of 8
            pad = (-call.head_dim) % 8
            pad_v = (-dv) % 8
            default_scale = call.head_dim ** -0.5

            if plain and not pad and not pad_v:
                def run(q, k, v, m, c, s, p):  # the fast common case (decoding steps): one operator call
                    return op(q, k, v, p, c, False, scale=default_scale if s is None else s)[0]
                return run

            def run(q, k, v, m, c, s, p):
                k, v, m, c = prepare(q, k, v, m, c)
                if pad:
                    q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
                if pad_v:
                    v = F.pad(v, (0, pad_v))
                res = op(q, k, v, p, c, False, scale=default_scale if s is None else s)
                out = res[0][..., :dv] if pad_v else res[0]
                return (out, res[1]) if lse else out
            return run

        if kernel == "CUDNN_ATTENTION":
            if plain:
                def run(q, k, v, m, c, s, p):  # the fast common case: one operator call
                    return op(q, k, v, m, want_lse, p, c, False, scale=s)[0]
                return run

            def run(q, k, v, m, c, s, p):
                k, v, m, c = prepare(q, k, v, m, c)
                res = op(q, k, v, m, want_lse, p, c, False, scale=s)
                return (res[0], _lse_3d(res[1], q.shape[2])) if lse else res[0]
            return run

        if kernel == "EFFICIENT_ATTENTION":
            def run(q, k, v, m, c, s, p):
                k, v, m, c = prepare(q, k, v, m, c)
                if m is not None:
                    m = aligned_for_efficient(m, q, k)
                res = op(q, k, v, m, want_lse, p, c, scale=s)
                return (res[0], _lse_3d(res[1], q.shape[2])) if lse else res[0]
            return run

        raise NotImplementedError(f"{self.NAME}: no runner for kernel {kernel} on {call.device_type}")


def _packed_gqa_runner(inner, call: Call):
    """``inner`` (built for q (b, h_kv, h_q / h_kv, d), no GQA) serving a one-token GQA call: query
    head j = g * rep + r (the heads of k/v head g, as ``repeat_interleave`` pairs them) becomes query row
    r of head g; the output goes back to (b, h_q, 1, d_v)."""
    hkv, rep = call.heads_kv, call.heads_q // call.heads_kv

    def run(q, k, v, m, c, s, p):
        b = q.shape[0]
        out = inner(q.reshape(b, hkv, rep, q.shape[-1]), k, v, m, c, s, p)
        return out.reshape(b, hkv * rep, 1, out.shape[-1])
    return run
