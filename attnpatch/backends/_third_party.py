"""What the third-party backends (flash-attn 2/3/4, xformers, SageAttention) share: probing a package
safely, the arch rules, the custom op for torch.compile, and the key-padding packing for varlen kernels.

A backend module declares its limits as class constants (see `registry.Backend`), names the module to
import (``MODULE``) and the names it needs from it (``REQUIRED_ATTRS``), and provides a *kernel
function* ``kernel(module, q, k, v, mask, is_causal, scale, dropout_p)`` working in its
``NATIVE_LAYOUT``. The kernel function is plain Python over the library's public API, so tests run it
on CPU with stand-in modules that implement that API in torch.

Importing these modules never imports the third-party package; `probe` does, once, at first use.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import weakref
from typing import Callable, FrozenSet, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..call import Call
from ..registry import Backend, version_at_least
from . import _custom_ops


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return (line[:limit] + "…") if len(line) > limit else line


def describe_import_error(module: str, package: str, exc: BaseException) -> str:
    """A reason for a module that does not import, naming the likely cause."""
    msg = _first_line(exc)
    if isinstance(exc, ImportError) and "undefined symbol" in str(exc):
        return (f"{package} is installed but its compiled extension does not load (ABI mismatch with torch "
                f"{torch.__version__}; rebuild or reinstall {package} for this torch): ImportError: {msg}")
    return f"import {module} failed: {type(exc).__name__}: {msg}"


def _fmt_cap(cap) -> str:
    return f"sm{cap[0]}{cap[1]}"


class ThirdPartyBackend(Backend):
    """Base of the backends that wrap a third-party kernel. Subclasses set the constants below and
    ``kernel`` (a staticmethod); most need nothing else."""

    #: Module imported to reach the entry points (``import_module(MODULE)``).
    MODULE: str = ""
    #: Names that must exist in MODULE (an older or different build lacks them).
    REQUIRED_ATTRS: Tuple[str, ...] = ()
    #: Exact compute capabilities the package's binaries are built for (None = any within MIN/MAX).
    CUDA_CAPABILITIES: Optional[FrozenSet[tuple]] = None
    #: Why the arch rule is what it is (shown with the reason).
    ARCH_NOTE: str = ""
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    SUPPORTS_V_HEAD_DIM_DIFFERENT = False

    kernel: Callable = None  # staticmethod(kernel_function) in subclasses

    # -- probing -------------------------------------------------------------------------------
    def probe(self) -> List[str]:
        reasons = super().probe()  # installed? version >= MIN_VERSION?
        if reasons:
            return reasons
        try:
            module = importlib.import_module(self.MODULE)
        except Exception as exc:  # ImportError, OSError from a broken .so, anything a package raises
            return [describe_import_error(self.MODULE, self.PACKAGE, exc)]
        missing = [a for a in self.REQUIRED_ATTRS if not hasattr(module, a)]
        if missing:
            return [f"{self.MODULE} ({self.PACKAGE} {self._version}) has no {', '.join(missing)}; "
                    f"this backend needs a release that provides {'them' if len(missing) > 1 else 'it'}"]
        reasons = self.check_extension(module)
        if reasons:
            return reasons
        if torch.cuda.is_available():
            caps = sorted({tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
            if caps and not any(self.capability_reason(c) is None for c in caps):
                return [self.capability_reason(caps[0])]
            return self.smoke_test(module, torch.device("cuda", torch.cuda.current_device()))
        return []

    def check_extension(self, module) -> List[str]:
        """Reasons the package's compiled kernels are not usable (checked without a GPU call)."""
        return []

    def smoke_test(self, module, device: torch.device) -> List[str]:
        """A tiny real call on ``device`` (the current CUDA device when probing), for packages that
        import but fail on use."""
        return []

    def capability_reason(self, cap: tuple) -> Optional[str]:
        """Why compute capability ``cap`` is not supported (None when it is)."""
        cap = tuple(cap)
        note = f" ({self.ARCH_NOTE})" if self.ARCH_NOTE else ""
        if self.CUDA_CAPABILITIES is not None and cap not in self.CUDA_CAPABILITIES:
            allowed = ", ".join(_fmt_cap(c) for c in sorted(self.CUDA_CAPABILITIES))
            return f"GPU {_fmt_cap(cap)} is not supported by {self.PACKAGE} kernels (supported: {allowed}){note}"
        if self.CUDA_MIN_CAPABILITY and cap < tuple(self.CUDA_MIN_CAPABILITY):
            return f"GPU {_fmt_cap(cap)} is below {self.PACKAGE}'s minimum {_fmt_cap(self.CUDA_MIN_CAPABILITY)}{note}"
        if self.CUDA_MAX_CAPABILITY and cap > tuple(self.CUDA_MAX_CAPABILITY):
            return f"GPU {_fmt_cap(cap)} is above {self.PACKAGE}'s maximum {_fmt_cap(self.CUDA_MAX_CAPABILITY)}{note}"
        return None

    # -- per call ------------------------------------------------------------------------------
    def extra_reasons(self, call: Call) -> List[str]:
        reasons = []
        if call.device_type == "cuda" and call.capability is not None and self.CUDA_CAPABILITIES is not None:
            r = self.capability_reason(call.capability)
            if r:
                reasons.append(r)
        if call.compiling and call.needs_grad and call.dropout_p > 0:
            reasons.append(f"dropout_p={call.dropout_p} with gradients under torch.compile (the custom op's "
                           "recompute backward cannot replay the dropout mask; use dropout_p=0 or run eagerly)")
        return reasons + self.call_reasons(call)

    def call_reasons(self, call: Call) -> List[str]:
        """Backend-specific per-call checks (subclasses)."""
        return []

    # -- running -------------------------------------------------------------------------------
    def op(self):
        """This backend's ``attnpatch::<NAME>`` custom op (defined at import of the backend module)."""
        return _custom_ops.OPS[self.NAME]

    def build(self, call: Call):
        # a sliding window and softcapping are fixed per plan; only backends declaring them get calls with them
        window, softcap = _custom_ops.encode_window(call.window), call.softcap
        if call.compiling:
            op = self.op()
            if window is None and softcap is None:
                def run(q, k, v, m, c, s, p):
                    return op(q, k, v, m, c, s, p)
                return run

            def run(q, k, v, m, c, s, p):  # noqa: F811
                return op(q, k, v, m, c, s, p, window, softcap)
            return run
        module = importlib.import_module(self.MODULE)
        kernel = type(self).kernel
        if window is None and softcap is None:
            def run(q, k, v, m, c, s, p):  # noqa: F811 - eager: call the library directly
                return kernel(module, q, k, v, m, c, s, p)
            return run
        feats = _custom_ops.features(window, softcap)

        def run(q, k, v, m, c, s, p):  # noqa: F811
            return kernel(module, q, k, v, m, c, s, p, **feats)
        return run


def register_op(cls) -> None:
    """Define the custom op of a backend class (at import of its module; cheap, imports nothing)."""
    _custom_ops.attention_op(cls.NAME, cls.kernel, cls.MODULE, backward=cls.SUPPORTS_BACKWARD)


# -- helpers for kernels -----------------------------------------------------------------------------

def causal_plan(s_q: int, s_kv: int) -> Tuple[Optional[int], bool, Optional[int]]:
    """Translate SDPA's top-left causal for a library whose causal flag is bottom-right aligned
    (flash-attn 2/3/4). Returns ``(keys_to_keep, causal_flag, window_right)``:

    * s_q == s_kv: both alignments agree → ``(None, True, None)``.
    * s_kv > s_q: top-left never lets any query see keys at or after s_q, so those keys are dropped and
      the square remainder is causal → ``(s_q, True, None)``.
    * s_q > s_kv: no flag; a sliding window with right edge ``s_q - s_kv`` (flash-attn's window is
      anchored bottom-right: query i sees keys j <= i + s_kv - s_q + right = i) → ``(None, False, s_q - s_kv)``.
      FlashAttention 2 drops a right edge >= s_kv, so `run_flash_api` splits those calls instead.
    """
    if s_q == s_kv:
        return None, True, None
    if s_kv > s_q:
        return s_q, True, None
    return None, False, s_q - s_kv


def window_plan(s_q: int, s_kv: int, left: Optional[int], right: Optional[int]) -> Tuple[int, int, Tuple[int, int]]:
    """Translate attnpatch's sliding window (top-left aligned like SDPA's causal: query i sees keys
    ``i - left <= j <= i + right``, None = unbounded, causal folded in as ``right <= 0``; both >= 0 here)
    for flash-attn, whose ``window_size=(l, r)`` is anchored bottom-right (query i sees keys
    ``i + s_kv - s_q - l <= j <= i + s_kv - s_q + r``) and reads -1, and any negative edge, as unbounded.

    Returns ``(keys, rows, (l, r))``: run the first ``rows`` queries against the first ``keys`` keys with
    that window; the queries after ``rows`` see no key (their output is zeros). Keys at or after
    ``s_q + right`` are seen by no query, so they are dropped, which makes ``r`` >= 0; queries whose left
    edge passes the last key are cut, which makes ``l`` >= 0. Both edges are then exact for
    FlashAttention 3, whose API turns an edge that covers every key into -1. FlashAttention 2 turns a
    right edge >= seqlen_k into -1 and an open right edge beside a bounded left one into seqlen_k, which
    limits the first rows when there are more queries than keys: its backend refuses those calls."""
    keys = s_kv if right is None else min(s_kv, s_q + right)
    rows = s_q if left is None else min(s_q, keys + left)
    shift = keys - rows
    return keys, rows, (-1 if left is None else left + shift, -1 if right is None else right - shift)


def window_reasons(call: Call, fa2: bool) -> List[str]:
    """Why a flash-attn backend cannot serve ``call``'s sliding window (empty when it can)."""
    if call.window is None:
        return []
    left, right = call.window_bounds  # both >= 0 or None (`call.check_window`)
    if call.mask_kind != "none":
        return ["a sliding window together with a mask: the key-padding path packs the kept keys, which "
                "moves their positions (flex and SDPA with an explicit mask serve it)"]
    if fa2 and call.seq_q > call.seq_kv:
        # Decisions are cached per length bucket and the order of the lengths (`Call.signature`), so the
        # refusal covers every window with more queries than keys, not only the lengths where keys go missing.
        return [f"sliding window {call.window} (causal={call.is_causal}) with more queries ({call.seq_q}) than "
                f"keys ({call.seq_kv}): FlashAttention 2 turns a right window edge that is open or past the last "
                "key into seqlen_k, which hides keys from the first queries (flash_api.cpp)"]
    return []


def key_padding_keep(mask: torch.Tensor, batch: int, s_kv: int) -> torch.Tensor:
    """A key-padding mask (viewed as (b or 1, 1, 1, s_kv), bool, True = attend) as (batch, s_kv)."""
    return mask.expand(batch, 1, 1, s_kv).reshape(batch, s_kv)


def packing_order(keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(source, cu_seqlens_k, dead)`` for packing the kept keys of ``keep`` ((b, s_kv) bool, any pattern)
    back to back, without a host sync: ``source`` (b*s_kv,) orders the flattened keys kept-first (row 0's,
    then row 1's, …), then the dropped ones; ``cu_seqlens_k`` (b+1,) int32 are the kept counts' offsets;
    ``dead`` (b,) marks rows with no kept key, which keep *all* their keys here (the kernel never sees an
    empty sequence) and whose output the caller must zero."""
    dead = ~keep.any(dim=1)
    keep = keep | dead[:, None]
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    # kept keys first, then the dropped ones, each in their order: a stable descending sort of the flags
    source = torch.argsort(keep.reshape(-1).view(torch.uint8), descending=True, stable=True)
    return source, cu, dead


def pack_keys(keep: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Pack the kept keys of each batch row back to back for a varlen kernel, without a host sync.

    ``keep`` is (b, s_kv) bool (any pattern, not only a prefix); ``k``/``v`` are (b, s_kv, h, d). Returns
    ``(k_packed, v_packed, cu_seqlens_k, dead)``: the packed tensors have b*s_kv rows, of which the
    first ``cu_seqlens_k[-1]`` are the kept keys in order and the rest the dropped keys, which no
    sequence refers to (`packing_order`).
    """
    source, cu, dead = packing_order(keep)
    return _gather_keys(source, k), _gather_keys(source, v), cu, dead


def _gather_keys(source: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(b, s_kv, h, d) -> (b*s_kv, h, d) rows in ``source``'s order."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]).index_select(0, source)


#: `key_packing`'s results per mask tensor: id(root tensor) -> (weakref to it, version, geometry, value).
_PACKINGS: dict = {}
#: Masks remembered at once (a model passes one mask to all its layers; a few for CFG and batches).
PACKINGS_KEPT = 8


def _cacheable(mask: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or mask.is_inference():  # inference tensors have no version counter
        return False
    return not (mask.is_cuda and torch.cuda.is_current_stream_capturing())  # a graph keeps its own


def key_packing(mask: torch.Tensor, batch: int, s_kv: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`packing_order` of a key-padding mask (viewed as (b or 1, 1, 1, s_kv), bool, True = attend),
    computed once per mask tensor and reused while the tensor is unchanged.

    A model builds its mask once per forward and passes the same tensor to every layer, and the packing
    is a dozen small kernels whose launches cost more host time than the attention kernel's GPU time
    (H200, HunyuanVideo's joint shape, 2026-11-30: 0.38-0.48 ms of host per call against FlashAttention 3's
    0.37 ms, which made the masked call host-bound at 0.6-1.0 ms; docs/GPU_BACKENDS.md). The result is
    reused only for the very same tensor object (or a view of it: the entry holds a weak reference to the
    base) whose version counter has not moved, i.e. no in-place write since, on the same CUDA stream;
    never inside a CUDA-graph capture, a torch.compile trace or for inference-mode tensors (no version
    counter), which compute it afresh. Writes that bypass the version counter (through ``.data``, or into ``data_ptr()`` from another
    library) are not seen.
    """
    if not _cacheable(mask):
        return packing_order(key_padding_keep(mask, batch, s_kv))
    root = mask if mask._base is None else mask._base
    # the stream too: the cached tensors were made on one stream, and reading them from another could race
    # with the allocator reusing their memory once they are replaced
    stream = torch.cuda.current_stream(mask.device).cuda_stream if mask.is_cuda else None
    geometry = (tuple(mask.shape), mask.stride(), mask.storage_offset(), batch, s_kv, stream)
    version = mask._version
    hit = _PACKINGS.get(id(root))
    if hit is not None and hit[0]() is root and hit[1] == version and hit[2] == geometry:
        return hit[3]
    value = packing_order(key_padding_keep(mask, batch, s_kv))
    if len(_PACKINGS) >= PACKINGS_KEPT and id(root) not in _PACKINGS:
        _PACKINGS.pop(next(iter(_PACKINGS)))
    _PACKINGS[id(root)] = (weakref.ref(root), version, geometry, value)
    return value


def clear_key_packings() -> None:
    """Forget every remembered packing (tests)."""
    _PACKINGS.clear()


def query_cu_seqlens(batch: int, s_q: int, device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * s_q, s_q, dtype=torch.int32, device=device)


def first_output(result):
    """The attention output from a library call that returns ``out`` or ``(out, lse, ...)``."""
    return result[0] if isinstance(result, (tuple, list)) else result


def version_of(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


__all__ = ["ThirdPartyBackend", "register_op", "causal_plan", "window_plan", "window_reasons", "key_padding_keep",
           "pack_keys", "packing_order", "key_packing", "clear_key_packings", "query_cu_seqlens", "first_output",
           "describe_import_error", "version_at_least", "version_of"]


def run_flash_api(fa, q, k, v, mask, is_causal, kwargs, window=None, softcap=None):
    """Call a flash-attn style module (``flash_attn_func`` / ``flash_attn_varlen_func``, bsnd) with SDPA's
    conventions: causal translated from flash-attn's bottom-right alignment to top-left (`causal_plan`),
    key-padding masks packed for the varlen entry point (any pattern), rows with no kept key set to 0,
    a sliding window translated by `window_plan` (never with a mask: `window_reasons`), softcap passed
    as is (flash-attn's ``softcap`` is attnpatch's: ``tanh(s / c) * c`` on the scaled scores).
    ``kwargs`` carries what differs between releases (softmax_scale, dropout_p)."""
    if softcap is not None:
        kwargs = dict(kwargs, softcap=softcap)
    b, s_q = q.shape[0], q.shape[1]
    s_kv = k.shape[1]
    if window is not None:
        left, right = window
        if is_causal:
            right = 0 if right is None else min(right, 0)
        keys, rows, fa_window = window_plan(s_q, s_kv, left, right)
        out = first_output(fa.flash_attn_func(q[:, :rows], k[:, :keys], v[:, :keys],
                                              **dict(kwargs, causal=False, window_size=fa_window)))
        if rows < s_q:  # these queries see no key: zeros, as SDPA gives rows with nothing to attend
            out = torch.cat((out, out.new_zeros((b, s_q - rows) + tuple(out.shape[2:]))), dim=1)
        return out
    if is_causal and s_q >= 2 * s_kv:
        # The window of `causal_plan` would have its right edge (s_q - s_kv) at or past the key length,
        # which FlashAttention 2 drops as "no limit" (flash_api.cpp; H200, 2026-11-30: relative error 0.71
        # at 384 queries / 128 keys). Top-left causal is the square causal problem for the first s_kv
        # query rows; every later row sees every key.
        head = run_flash_api(fa, q[:, :s_kv], k, v, mask, True, kwargs)
        tail = run_flash_api(fa, q[:, s_kv:], k, v, mask, False, kwargs)
        return torch.cat((head, tail), dim=1)
    kwargs = dict(kwargs, causal=False)
    if is_causal:
        keys, flag, right = causal_plan(s_q, s_kv)
        if keys is not None:
            k, v = k[:, :keys], v[:, :keys]
        kwargs["causal"] = flag
        if right is not None:
            kwargs["window_size"] = (-1, right)
    if mask is None:
        return first_output(fa.flash_attn_func(q, k, v, **kwargs))
    source, cu_k, dead = key_packing(mask, b, s_kv)
    kp, vp = _gather_keys(source, k), _gather_keys(source, v)
    out = first_output(fa.flash_attn_varlen_func(
        q.reshape(b * s_q, *q.shape[2:]), kp, vp, query_cu_seqlens(b, s_q, q.device), cu_k, s_q, s_kv,
        **kwargs))
    out = out.reshape(b, s_q, *out.shape[1:])
    return out.masked_fill(dead[:, None, None, None], 0)
