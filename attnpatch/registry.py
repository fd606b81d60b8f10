"""Backend declarations and the registry of backends.

A backend is a subclass of `Backend` that states its limits as class constants and answers, for one
`Call`, the list of reasons it cannot serve it (the idea of xformers' ``not_supported_reasons``). The
router knows backends only through these declarations; it never names one.

The registry is the only process-wide state of attnpatch. Registering or unregistering a backend
clears the router's caches.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .call import Call

logger = logging.getLogger("attnpatch")

_DTYPE_NAMES = {
    torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64",
}


_CUDA_AVAILABLE: List[bool] = []


def cuda_available() -> bool:
    """torch.cuda.is_available(), asked once per process."""
    if not _CUDA_AVAILABLE:
        _CUDA_AVAILABLE.append(bool(torch.cuda.is_available()))
    return _CUDA_AVAILABLE[0]


def device_class_keys(call: Call) -> tuple:
    """The keys of ``AUTO_PRIORITY`` / ``AUTO_LEFT_OUT`` that apply to ``call``, most specific first:
    ("cuda_sm90", "cuda") on an sm90 card, ("cpu",) on the CPU."""
    if call.capability is not None:
        major, minor = call.capability
        return (f"{call.device_type}_sm{major}{minor}", call.device_type)
    return (call.device_type,)


def auto_priority(backend: "Backend", call: Call) -> Optional[int]:
    """``backend``'s ``AUTO_PRIORITY`` for ``call``'s device class (lower runs first), or None: auto
    never picks it there."""
    for key in device_class_keys(call):
        if key in backend.AUTO_PRIORITY:
            return backend.AUTO_PRIORITY[key]
    return None


def auto_left_out(backend: "Backend", call: Call) -> Optional[str]:
    """Why auto leaves ``backend`` out for ``call``'s device class (its ``AUTO_LEFT_OUT``), or None."""
    return _left_out_note(backend, device_class_keys(call))


def _left_out_note(backend: "Backend", keys) -> Optional[str]:
    for key in keys:
        if key in backend.AUTO_LEFT_OUT:
            return f"auto leaves it out on {key}: {backend.AUTO_LEFT_OUT[key]}; name it (backend=, use_backend, a recipe) to use it"
    return None


def local_device_class_keys() -> tuple:
    """The ``AUTO_PRIORITY`` keys of this machine's devices: each visible GPU's ("cuda_sm90", "cuda"), then "cpu"."""
    keys = []
    if cuda_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            keys += [f"cuda_sm{major}{minor}", "cuda"]
    return tuple(dict.fromkeys(keys + ["cpu"]))


def auto_left_out_here(backend: "Backend") -> Optional[str]:
    """`auto_left_out` for the devices of this machine (what `attnpatch.backends()` and `attnpatch info` show)."""
    return _left_out_note(backend, local_device_class_keys())


def _dtype_name(dt) -> str:
    return _DTYPE_NAMES.get(dt, str(dt).replace("torch.", ""))


def _version_tuple(v: str) -> tuple:
    out = []
    for part in v.split("+")[0].split("."):
        num = ""
        for ch in part:
            if ch.isdigit():
                num += ch
            else:
                break
        out.append(int(num) if num else 0)
        if not num or num != part:
            break
    return tuple(out)


def version_at_least(have: str, need: str) -> bool:
    """True when version string ``have`` is >= ``need`` (numeric release parts only)."""
    a, b = _version_tuple(have), _version_tuple(need)
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)) >= b + (0,) * (n - len(b))


#: The runner a backend returns from `Backend.build(call)`: takes q, k, v in the backend's
#: NATIVE_LAYOUT, the mask already viewed as 4-D (or None), is_causal, scale (None = 1/sqrt(d)) and
#: dropout_p, and returns the output in NATIVE_LAYOUT. Where ``call.return_lse`` is set it returns
#: ``(out, lse)`` with lse float32 (b, h, s_q) (see `attnpatch.call`); where ``call.sinks`` is set and
#: the backend declares ``SUPPORTS_SINKS`` it takes the sinks tensor (h_q,) as an 8th argument. The
#: window and softcap of the call are fixed per plan (``call.window``, ``call.softcap``).
Runner = Callable[..., torch.Tensor]


class Backend:
    """Base class of every backend. Subclasses override the constants and, where needed,
    `probe`, `extra_reasons` and `build`.

    Constants (data, not code):

    * ``NAME`` — the token used in ``backend=``, ``ATTNPATCH_BACKEND``, recipes and the CLI.
    * ``PACKAGE`` / ``MIN_VERSION`` / ``EXTRA`` — the distribution that provides the kernel, its minimum
      version and the ``attnpatch[extra]`` that installs it (``None`` for torch itself);
      ``INSTALL_HINT`` replaces the extra in messages for packages that are not on PyPI.
    * ``LOSSY`` — True for approximate kernels (8-bit, fp8): never chosen by auto without an opt-in.
    * ``SUPPORTS_BACKWARD``, ``SUPPORTS_DROPOUT``, ``SUPPORTS_GQA``, ``SUPPORTS_CAUSAL``,
      ``SUPPORTS_CAUSAL_WITH_MASK``, ``SUPPORTS_CROSS`` (seq_q != seq_kv), ``SUPPORTS_V_HEAD_DIM_DIFFERENT``.
    * ``SUPPORTED_DEVICES``, ``SUPPORTED_DTYPES``, ``SUPPORTED_MASKS`` (subset of "none", "bool",
      "additive"), ``KEY_PADDING_MASKS_ONLY`` (masks must be (b, 1, 1, s_kv)-shaped).
    * ``MIN_HEAD_DIM``, ``MAX_HEAD_DIM``, ``HEAD_DIM_MULTIPLE``, ``MIN_SEQ_KV`` / ``MIN_SEQ_Q`` (accuracy
      or speed floors, checked against the lower bound of the call's length bucket so that a decision
      holds for every length that shares it), ``CUDA_MIN_CAPABILITY``, ``CUDA_MAX_CAPABILITY``
      (inclusive, e.g. (9, 0) for Hopper only).
    * ``SUPPORTS_WINDOW`` (sliding window), ``SUPPORTS_SOFTCAP`` (score softcapping),
      ``SUPPORTS_SINKS`` (per-head sink logits, natively), ``SUPPORTS_LSE`` (the runner can also
      return the log-sum-exp; the router then serves ``return_lse`` and, by rescaling the output,
      sinks without gradients), ``LSE_WITH_MASKS`` (its LSE is -inf for fully masked rows, so it may
      be asked for with a mask or window).
    * ``NEEDS_UNIT_LAST_DIM_STRIDE`` — q/k/v must have stride 1 in their last dimension (most fused
      kernels); the router checks it per call for these backends and falls back otherwise. Where the
      kernel itself raises on a strided input (`kernel_checks_unit_stride`), the router checks the
      strides only when the kernel raised (no per-call check on the hot path).
    * ``NEEDS_LENGTH_RELATION`` — the reasons depend on whether seq_q is <, == or > seq_kv beyond
      ``SUPPORTS_CROSS`` (compiled calls then guard on that relation).
    * ``RUNNER_FIXED_LENGTHS`` — the runner built for one call bakes in its sequence lengths (e.g. a
      block mask), so it is rebuilt for each new length instead of being shared within a bucket.
    * ``NATIVE_LAYOUT`` — the layout the runner takes ("bnsd" or "bsnd"); the router transposes views.
    * ``AUTO_PRIORITY`` — static auto order per device class ("cpu", "cuda", "cuda_sm90", ...): lower
      runs first, missing means auto never picks it on that device class.
    * ``AUTO_LEFT_OUT`` — per device class, why auto leaves out a backend that runs there (it costs a
      fresh process more than it gains); `explain` shows it, naming the backend still uses it.
    * ``TOLERANCE`` — per-dtype (atol, rtol-like) used by tests; lossy backends state their own bound.
    """

    NAME: str = ""
    DESCRIPTION: str = ""
    PACKAGE: Optional[str] = None
    MIN_VERSION: Optional[str] = None
    EXTRA: Optional[str] = None
    INSTALL_HINT: Optional[str] = None  # how to install PACKAGE when no extra covers it
    LOSSY: bool = False
    SUPPORTS_BACKWARD: bool = True
    SUPPORTS_DROPOUT: bool = False
    SUPPORTS_GQA: bool = True
    SUPPORTS_CAUSAL: bool = True
    SUPPORTS_CAUSAL_WITH_MASK: bool = True
    SUPPORTS_CROSS: bool = True
    SUPPORTS_V_HEAD_DIM_DIFFERENT: bool = True
    SUPPORTED_DEVICES: frozenset = frozenset({"cpu", "cuda"})
    SUPPORTED_DTYPES: frozenset = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    SUPPORTED_MASKS: frozenset = frozenset({"none", "bool", "additive"})
    KEY_PADDING_MASKS_ONLY: bool = False
    MIN_HEAD_DIM: int = 1
    MAX_HEAD_DIM: Optional[int] = None
    HEAD_DIM_MULTIPLE: int = 1
    MIN_SEQ_KV: int = 1
    MIN_SEQ_KV_WHY: str = "where this kernel is accurate"
    MIN_SEQ_Q: int = 1
    MIN_SEQ_Q_WHY: str = "where this kernel is accurate"
    SUPPORTS_WINDOW: bool = False
    SUPPORTS_SOFTCAP: bool = False
    SUPPORTS_SINKS: bool = False
    SUPPORTS_LSE: bool = False
    LSE_WITH_MASKS: bool = True
    NEEDS_UNIT_LAST_DIM_STRIDE: bool = False
    NEEDS_LENGTH_RELATION: bool = False
    RUNNER_FIXED_LENGTHS: bool = False
    CUDA_MIN_CAPABILITY: Optional[tuple] = None
    CUDA_MAX_CAPABILITY: Optional[tuple] = None
    NATIVE_LAYOUT: str = "bnsd"
    AUTO_PRIORITY: Dict[str, int] = {}
    AUTO_LEFT_OUT: Dict[str, str] = {}
    TOLERANCE: Dict[torch.dtype, float] = {}

    def __init__(self) -> None:
        self._probe_lock = threading.Lock()
        self._availability: Optional[List[str]] = None
        self._version: Optional[str] = None

    # -- availability -------------------------------------------------------------------------
    def probe(self) -> List[str]:
        """Check that the kernel can really be used here; return reasons it cannot (empty = available).

        Runs once per process, at first use (never at ``import attnpatch``). The default checks that
        ``PACKAGE`` is installed at ``MIN_VERSION`` or newer. Overrides import the package and load its
        compiled extension; a failure is a reason, never an exception.
        """
        if self.PACKAGE is None:
            return []
        try:
            version = importlib.metadata.version(self.PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            hint = self.INSTALL_HINT or (f"pip install 'attnpatch[{self.EXTRA}]'" if self.EXTRA
                                         else f"pip install {self.PACKAGE}")
            return [f"package {self.PACKAGE} is not installed ({hint})"]
        self._version = version
        if self.MIN_VERSION and not version_at_least(version, self.MIN_VERSION):
            return [f"{self.PACKAGE} {version} is older than the minimum {self.MIN_VERSION}"]
        return []

    def availability(self) -> List[str]:
        """Reasons this backend is unavailable in this process (cached after the first probe)."""
        if self._availability is None:
            with self._probe_lock:
                if self._availability is None:
                    reasons = []
                    if self.SUPPORTED_DEVICES == frozenset({"cuda"}) and not cuda_available():
                        reasons.append("no CUDA device in this process (torch.cuda.is_available() is False); "
                                       "this backend runs on CUDA only")
                    try:
                        reasons += [r for r in self.probe() if r not in reasons]
                    except Exception as exc:  # a probe must never take the process down
                        reasons.append(f"probe failed: {type(exc).__name__}: {exc}")
                    self._availability = reasons
        return self._availability

    @property
    def available(self) -> bool:
        return not self.availability()

    def version(self) -> Optional[str]:
        """The provider's version (torch's for torch backends), once probed."""
        if self.PACKAGE is None:
            return torch.__version__
        self.availability()
        return self._version

    def reset_probe(self) -> None:
        """Forget the cached probe result (tests; after installing a package)."""
        with self._probe_lock:
            self._availability = None

    # -- per-call reasons -----------------------------------------------------------------------
    def not_supported_reasons(self, call: Call) -> List[str]:
        """Every reason this backend cannot serve ``call`` (empty list = it can).

        Each reason names the value and what is allowed. Subclasses extend `extra_reasons`.
        """
        reasons = list(self.availability())
        if call.device_type not in self.SUPPORTED_DEVICES:
            reasons.append(f"device {call.device_type} (supported: {', '.join(sorted(self.SUPPORTED_DEVICES))})")
        if call.device_type == "cuda" and call.capability is not None:
            cap = call.capability
            if self.CUDA_MIN_CAPABILITY and cap < tuple(self.CUDA_MIN_CAPABILITY):
                reasons.append(
                    f"GPU compute capability {cap[0]}.{cap[1]} is below the minimum "
                    f"{self.CUDA_MIN_CAPABILITY[0]}.{self.CUDA_MIN_CAPABILITY[1]}"
                )
            if self.CUDA_MAX_CAPABILITY and cap > tuple(self.CUDA_MAX_CAPABILITY):
                reasons.append(
                    f"GPU compute capability {cap[0]}.{cap[1]} is above the maximum "
                    f"{self.CUDA_MAX_CAPABILITY[0]}.{self.CUDA_MAX_CAPABILITY[1]}"
                )
        if call.dtype not in self.SUPPORTED_DTYPES:
            allowed = ", ".join(sorted(_dtype_name(d) for d in self.SUPPORTED_DTYPES))
            reasons.append(f"dtype={_dtype_name(call.dtype)} (supported: {allowed})")
        for label, dim in (("head_dim", call.head_dim), ("value head_dim", call.head_dim_v)):
            if dim < self.MIN_HEAD_DIM or (self.MAX_HEAD_DIM is not None and dim > self.MAX_HEAD_DIM):
                hi = self.MAX_HEAD_DIM if self.MAX_HEAD_DIM is not None else "any"
                reasons.append(f"{label}={dim} (supported: {self.MIN_HEAD_DIM} to {hi})")
            elif dim % self.HEAD_DIM_MULTIPLE:
                reasons.append(f"{label}={dim} is not a multiple of {self.HEAD_DIM_MULTIPLE}")
        if call.head_dim_v != call.head_dim and not self.SUPPORTS_V_HEAD_DIM_DIFFERENT:
            reasons.append(f"value head_dim {call.head_dim_v} != query head_dim {call.head_dim} (not supported)")
        if call.mask_kind not in self.SUPPORTED_MASKS:
            allowed = ", ".join(k for k in ("none", "bool", "additive") if k in self.SUPPORTED_MASKS)
            reasons.append(f"mask kind {call.mask_kind} (supported: {allowed})")
        elif call.mask_kind != "none" and self.KEY_PADDING_MASKS_ONLY and not call.key_padding:
            reasons.append(f"mask of shape {call.mask_shape} is not a key-padding mask (b, 1, 1, s_kv); only those are supported")
        if call.is_causal and not self.SUPPORTS_CAUSAL:
            reasons.append("causal attention is not supported")
        if call.is_causal and call.mask_kind != "none" and not self.SUPPORTS_CAUSAL_WITH_MASK:
            reasons.append("causal together with an explicit mask is not supported")
        if call.gqa and not self.SUPPORTS_GQA:
            reasons.append(f"GQA/MQA ({call.heads_q} query heads, {call.heads_kv} kv heads) is not supported")
        if call.cross and not self.SUPPORTS_CROSS:
            reasons.append(f"seq_q={call.seq_q} != seq_kv={call.seq_kv} (cross-attention) is not supported")
        if call.dropout_p > 0 and not self.SUPPORTS_DROPOUT:
            reasons.append(f"dropout_p={call.dropout_p} (this backend has no dropout)")
        if call.needs_grad and not self.SUPPORTS_BACKWARD:
            reasons.append("gradients are needed but this backend is forward-only")
        for label, n, floor, need, why in (
                ("seq_kv", call.seq_kv, call.seq_kv_floor, self.MIN_SEQ_KV, self.MIN_SEQ_KV_WHY),
                ("seq_q", call.seq_q, call.seq_q_floor, self.MIN_SEQ_Q, self.MIN_SEQ_Q_WHY)):
            if floor < need:
                if call.symbolic_lengths:
                    reasons.append(f"{label} is symbolic in this compiled call and may be below {need}, {why}")
                elif n < need:
                    reasons.append(f"{label}={n} is below {need}, {why}")
                else:
                    reasons.append(f"{label}={n} shares a length bucket with lengths from {floor}, below {need} "
                                   f"({why}); decisions hold for a whole bucket")
        if call.window is not None and not self.SUPPORTS_WINDOW:
            reasons.append(f"sliding window {call.window} is not supported")
        if call.softcap is not None and not self.SUPPORTS_SOFTCAP:
            reasons.append(f"{call.softcap_text} is not supported")
        if call.sinks and not self.SUPPORTS_SINKS:
            if not self.SUPPORTS_LSE:
                reasons.append("attention sinks are not supported (no native sinks and no log-sum-exp to rescale by)")
            elif call.needs_grad:
                reasons.append("attention sinks with gradients need native sinks (the log-sum-exp rescaling is forward-only)")
        if call.return_lse or (call.sinks and not self.SUPPORTS_SINKS):
            if not self.SUPPORTS_LSE:
                if call.return_lse:
                    reasons.append("return_lse: this kernel does not return the log-sum-exp")
            elif not self.LSE_WITH_MASKS and (call.mask_kind != "none" or call.banded):
                reasons.append("the log-sum-exp of this kernel is not -inf for fully masked rows, so it is not "
                               "used with a mask or window")
        if not call.last_dim_contiguous and self.needs_unit_stride(call):
            reasons.append("query/key/value have a strided last dimension (stride != 1); this kernel needs "
                           "stride 1 there (call .contiguous() on the inputs)")
        if not reasons:
            reasons.extend(self.extra_reasons(call))
        return reasons

    def extra_reasons(self, call: Call) -> List[str]:
        """Backend-specific checks beyond the declared constants (only asked when those all pass)."""
        return []

    def shares_runner_across_lengths(self, call: Call) -> bool:
        """Whether the runner built for ``call`` also serves other sequence lengths of its bucket (the
        router then reuses it, e.g. for each token while decoding). Default: not
        ``RUNNER_FIXED_LENGTHS``."""
        return not self.RUNNER_FIXED_LENGTHS

    def needs_unit_stride(self, call: Call) -> bool:
        """Whether this backend's kernel for ``call`` needs q/k/v with stride 1 in the last dim (the
        router then checks each call's strides). Default: ``NEEDS_UNIT_LAST_DIM_STRIDE``."""
        return self.NEEDS_UNIT_LAST_DIM_STRIDE

    def kernel_checks_unit_stride(self, call: Call) -> bool:
        """Whether the kernel ``needs_unit_stride`` for ``call`` refuses a strided last dim itself, with
        an exception, before it runs: then the router catches that instead of checking every call's
        strides. Default: False (the router checks)."""
        return False

    def supports(self, call: Call) -> bool:
        return not self.not_supported_reasons(call)

    # -- running -----------------------------------------------------------------------------------
    def build(self, call: Call) -> Runner:
        """Return the function that runs calls of this signature (decided once, then cached)."""
        raise NotImplementedError(f"backend {self.NAME!r} does not implement build()")

    def build_for_site(self, call: Call, site) -> Runner:
        """The runner for ``call`` made at patched site ``site`` (an `attnpatch.patch.Site`, or None for
        a call made without one); the router uses it for eager calls (compiled calls use `build`).
        Default: `build` (kernels do not depend on the site). `attnpatch.capture` overrides it to know
        which site a sample comes from."""
        return self.build(call)

    def __repr__(self) -> str:
        return f"<attnpatch backend {self.NAME!r}>"


@dataclass(frozen=True)
class BackendInfo:
    """What `attnpatch.backends()` reports for one backend."""

    name: str
    available: bool
    reasons: tuple
    version: Optional[str]
    lossy: bool
    backward: bool
    package: Optional[str]
    description: str
    disabled: bool = False
    #: why auto never picks it on this machine's devices (its ``AUTO_LEFT_OUT``), or None
    auto_note: Optional[str] = None

    @property
    def why_not(self) -> str:
        return "; ".join(self.reasons)


_REGISTRY: Dict[str, Backend] = {}
_REGISTRY_LOCK = threading.Lock()
_listeners: List[Callable[[], None]] = []


def on_registry_change(fn: Callable[[], None]) -> None:
    """Call ``fn`` whenever the registry changes (the router clears its caches)."""
    _listeners.append(fn)


def _changed() -> None:
    for fn in _listeners:
        fn()


def register_backend(backend, *, replace: bool = False) -> Backend:
    """Add a backend (a `Backend` subclass or instance) to the registry and return the instance.

    Its ``NAME`` must be new unless ``replace=True``. Registering never selects it: auto considers it
    only through its ``AUTO_PRIORITY``; otherwise name it with ``backend=`` or `use_backend`.
    """
    if isinstance(backend, type):
        if not issubclass(backend, Backend):
            raise TypeError(f"register_backend expects a Backend subclass or instance, got {backend!r}")
        backend = backend()
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend expects a Backend subclass or instance, got {type(backend).__name__}")
    name = backend.NAME
    if not name or not isinstance(name, str) or not name.replace("_", "").isalnum() or name == "auto":
        raise ValueError(f"backend NAME must be a non-empty identifier other than 'auto', got {name!r}")
    if backend.NATIVE_LAYOUT not in ("bnsd", "bsnd"):
        raise ValueError(f"backend {name!r}: NATIVE_LAYOUT must be 'bnsd' or 'bsnd', got {backend.NATIVE_LAYOUT!r}")
    with _REGISTRY_LOCK:
        if name in _REGISTRY and not replace:
            raise ValueError(f"a backend named {name!r} is already registered; pass replace=True to replace it")
        _REGISTRY[name] = backend
    _changed()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend by name (tests, plug-ins)."""
    with _REGISTRY_LOCK:
        if name not in _REGISTRY:
            raise ValueError(f"no backend named {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
        del _REGISTRY[name]
    _changed()


def get_backend(name: str) -> Backend:
    return _REGISTRY[name]


def backend_names() -> List[str]:
    return list(_REGISTRY)


def all_backends() -> List[Backend]:
    return list(_REGISTRY.values())


def check_names(names: Iterable[str], source: str) -> None:
    """Raise ValueError naming ``source`` and listing valid names if any name is unknown."""
    for n in names:
        if n not in _REGISTRY:
            valid = ", ".join(["auto"] + sorted(_REGISTRY))
            raise ValueError(f"unknown attention backend {n!r} from {source}; valid names: {valid}")
