"""What the torch SDPA backends share: one runner builder and torch's own eligibility checks.

Each sub-kernel backend (`sdpa_cudnn`, `sdpa_flash`, `sdpa_efficient`, `sdpa_math`) pins one kernel with
`torch.nn.attention.sdpa_kernel`; `sdpa` lets torch choose. On CUDA, `extra_reasons` asks torch itself
(``torch.backends.cuda.can_use_*_attention``) whether the pinned kernel can run the call, so the
reasons match what torch would do, and `build` drops the context manager when torch's own choice is the
pinned kernel anyway. Pinning sets torch's kernel flags directly (`pinned_call`), which is much cheaper
than the `sdpa_kernel` context manager.
"""

from __future__ import annotations

import threading
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..call import Call
from ..registry import Backend, version_at_least

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    SDPBackend = None
    sdpa_kernel = None

_CAN_USE = {
    "FLASH_ATTENTION": "can_use_flash_attention",
    "EFFICIENT_ATTENTION": "can_use_efficient_attention",
    "CUDNN_ATTENTION": "can_use_cudnn_attention",
}


#: torch >= 2.5 accepts ``enable_gqa=True`` in scaled_dot_product_attention.
_GQA_NATIVE = version_at_least(torch.__version__, "2.5")


def _fake_inputs(call: Call, expand_gqa: bool, combine_causal: bool):
    """Stride-0 tensors on the call's device with the call's shapes (bnsd), for torch's checks."""
    dev = torch.device(call.device_type, call.device_index) if call.device_index is not None else torch.device(call.device_type)
    hkv = call.heads_q if expand_gqa else call.heads_kv
    q = torch.empty(1, 1, 1, call.head_dim, device=dev, dtype=call.dtype).expand(call.batch, call.heads_q, call.seq_q, call.head_dim)
    k = torch.empty(1, 1, 1, call.head_dim, device=dev, dtype=call.dtype).expand(call.batch, hkv, call.seq_kv, call.head_dim)
    v = torch.empty(1, 1, 1, call.head_dim_v, device=dev, dtype=call.dtype).expand(call.batch, hkv, call.seq_kv, call.head_dim_v)
    mask = None
    is_causal = call.is_causal
    if call.mask_kind != "none":
        mdtype = torch.bool if call.mask_kind == "bool" else call.dtype
        # contiguous full-size last dim, like a real mask (the efficient kernel checks alignment)
        mask = torch.zeros(1, 1, 1, call.seq_kv, device=dev, dtype=mdtype).expand(*call.mask_shape[:3], call.seq_kv)
        if combine_causal and call.is_causal:
            mask = mask.expand(call.mask_shape[0], call.mask_shape[1], call.seq_q, call.seq_kv)
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


def _flag_accessors():
    """(getter, setter, SDPBackend name) for each of torch's global SDPA kernel flags, or None when this
    torch does not expose them. Setting them directly costs ~1 µs; `sdpa_kernel` costs ~6 µs on a fast
    CPU and ~40 µs on the GPU box's host (measured), for the same effect."""
    names = getattr(getattr(torch.nn, "attention", None), "_backend_names", None)
    if not isinstance(names, dict) or not names:
        return None
    out = []
    for short, long in names.items():
        get = getattr(torch._C, f"_get_{short}_sdp_enabled", None)
        put = getattr(torch._C, f"_set_sdp_use_{short}", None)
        if get is None or put is None:
            return None
        out.append((get, put, long))
    return tuple(out)


_FLAGS = _flag_accessors()
_FLAGS_LOCK = threading.Lock()


def pinned_call(kernel: str, compiling: bool):
    """A function ``f(sdpa, *args, **kwargs)`` that runs ``sdpa`` with only ``kernel`` enabled and
    restores torch's flags afterwards (also on error). Under torch.compile it uses `sdpa_kernel`,
    which dynamo understands."""
    if compiling or _FLAGS is None:
        backend = getattr(SDPBackend, kernel)

        def call_with_context(sdpa, *args, **kwargs):
            with sdpa_kernel(backend):
                return sdpa(*args, **kwargs)
        return call_with_context
    getters = tuple(g for g, _, _ in _FLAGS)
    pin = tuple((put, long == kernel) for _, put, long in _FLAGS)
    restore = tuple(put for _, put, _ in _FLAGS)

    def call_with_flags(sdpa, *args, **kwargs):
        # torch's flags are process-wide: the lock keeps two threads' pinned calls from interleaving
        # their set/restore steps (held only while the kernel is launched, not while it runs).
        with _FLAGS_LOCK:
            saved = [g() for g in getters]
            for put, on in pin:
                put(on)
            try:
                return sdpa(*args, **kwargs)
            finally:
                for put, was in zip(restore, saved):
                    put(was)
    return call_with_flags


def causal_mask(seq_q: int, seq_kv: int, device) -> torch.Tensor:
    """SDPA's causal convention as a bool mask: top-left aligned, query i attends keys j <= i."""
    return torch.ones(seq_q, seq_kv, dtype=torch.bool, device=device).tril()


class SdpaFamily(Backend):
    """Base for the torch SDPA backends. ``KERNEL`` is an SDPBackend name, or None for torch's choice.
    ``NATIVE_GQA`` says whether the kernel takes ``enable_gqa`` (else the router's runner repeats k/v
    heads, which costs memory but keeps the fused kernel)."""

    KERNEL: Optional[str] = None
    NATIVE_GQA: bool = True
    SUPPORTS_DROPOUT = True
    #: On CUDA, pass bool masks as additive 0/-inf masks. Measured on an H200 (torch 2.11, cuDNN 9.19):
    #: cuDNN attention returns non-zero rows for fully masked query rows of a *bool* mask, but zeros for
    #: an additive mask whose row is all -inf; attnpatch's convention is zeros.
    CUDA_BOOL_MASK_AS_ADDITIVE: bool = False

    def probe(self) -> List[str]:
        if self.KERNEL is not None and SDPBackend is None:
            return [f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel (needs torch >= 2.3)"]
        if self.KERNEL is not None and not hasattr(SDPBackend, self.KERNEL):
            return [f"torch {torch.__version__} has no SDPBackend.{self.KERNEL}"]
        return []

    def _expand_gqa(self, call: Call) -> bool:
        return call.gqa and not (self.NATIVE_GQA and _GQA_NATIVE)

    def extra_reasons(self, call: Call) -> List[str]:
        if self.KERNEL in _CAN_USE and call.device_type == "cuda":
            return torch_kernel_reasons(call, self.KERNEL, self._expand_gqa(call))
        return []

    def _torch_picks_same(self, call: Call) -> bool:
        """True when torch's default choice for this call is this backend's pinned kernel."""
        if self.KERNEL is None or call.device_type != "cuda" or call.compiling:
            return False
        choice = getattr(torch, "_fused_sdp_choice", None)
        if choice is None:
            return False
        q, k, v, mask, is_causal = _fake_inputs(call, self._expand_gqa(call), combine_causal=True)
        kwargs = {}
        if call.gqa and not self._expand_gqa(call):
            kwargs["enable_gqa"] = True
        try:
            picked = choice(q, k, v, mask, call.dropout_p, is_causal, call.scale, **kwargs)
        except Exception:
            return False
        return int(picked) == int(getattr(SDPBackend, self.KERNEL).value)

    def build(self, call: Call):
        expand = self._expand_gqa(call)
        rep = call.heads_q // call.heads_kv
        gqa_kw = {"enable_gqa": True} if call.gqa and not expand else {}
        combine = call.is_causal and call.mask_kind != "none"
        cmask = causal_mask(call.seq_q, call.seq_kv, torch.device(call.device_type, call.device_index)
                            if call.device_index is not None else call.device_type) if combine else None
        pinned = None
        if self.KERNEL is not None and not self._torch_picks_same(call):
            pinned = pinned_call(self.KERNEL, call.compiling)
        sdpa = F.scaled_dot_product_attention
        additive = self.CUDA_BOOL_MASK_AS_ADDITIVE and call.device_type == "cuda" and call.mask_kind == "bool"

        def run(q, k, v, m, c, s, p):
            if expand:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            if combine:
                m = (m & cmask) if m.dtype == torch.bool else m.masked_fill(~cmask, float("-inf"))
                c = False
            if additive:
                m = torch.zeros(m.shape, dtype=q.dtype, device=m.device).masked_fill_(~m, float("-inf"))
            if pinned is None:
                return sdpa(q, k, v, attn_mask=m, dropout_p=p, is_causal=c, scale=s, **gqa_kw)
            return pinned(sdpa, q, k, v, attn_mask=m, dropout_p=p, is_causal=c, scale=s, **gqa_kw)

        if not expand and not combine and pinned is None and not gqa_kw and not additive:
            def run(q, k, v, m, c, s, p):  # noqa: F811 - the fast common case
                return sdpa(q, k, v, attn_mask=m, dropout_p=p, is_causal=c, scale=s)
        return run
