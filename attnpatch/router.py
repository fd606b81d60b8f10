"""`attention_forward`: look up the cached plan for this call's shape and settings, then run it.

The hot path builds one tuple key from the tensors' shapes and dtypes and the active scopes, finds the
plan in a dict and calls it: no validation, reasons, logging or environment reads on a hit. On a miss
the call is validated in full (`build_call`), a backend is chosen (`decide`) and its runner is built
and wrapped for the layout and the mask; the result is cached.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import autotune, controls, registry
import dataclasses

from .call import Call, build_call, call_from_meta, tensor_meta
from .controls import AUTO, Scope, _CONTEXT

logger = logging.getLogger("attnpatch")

#: Most plans kept before the plan cache is emptied (many distinct shapes, e.g. LLM decoding).
MAX_PLANS = 4096


class BackendUnsupportedError(RuntimeError):
    """No backend that was asked for (or, for auto, no backend at all) can serve this call.

    The message shows the call and every backend's reasons."""

    def __init__(self, message: str, call: Optional[Call] = None, reasons: Optional[dict] = None):
        super().__init__(message)
        self.call = call
        self.reasons = reasons or {}


@dataclass
class Decision:
    """Which backend serves a call signature, and why."""

    backend: registry.Backend
    source: str  # "backend= argument", "use_backend()", a patch/recipe label, "ATTNPATCH_BACKEND", "auto (how)"
    requested: Tuple[str, ...] = ()
    fallback: Tuple[Tuple[str, str], ...] = ()  # (refused backend, joined reasons) when it fell back
    reasons: Dict[str, List[str]] = field(default_factory=dict)  # every backend considered -> reasons


class Plan:
    """A decision bound to one exact call shape: the runner to call and the counters."""

    __slots__ = ("backend", "decision", "run", "calls", "site")

    def __init__(self, decision: Decision, run, site):
        self.backend = decision.backend
        self.decision = decision
        self.run = run
        self.calls = 0
        self.site = site


_PLANS: Dict[tuple, Plan] = {}
_DECISIONS: Dict[tuple, Decision] = {}
_TRACED_DECISIONS: Dict[tuple, Decision] = {}  # decided while torch.compile traced
_LOCK = threading.RLock()
_RETIRED: Counter = Counter()  # (site, backend name, fallback) -> calls of plans no longer cached
_WARNED: set = set()


def _device_class_keys(call: Call) -> Tuple[str, ...]:
    if call.capability is not None:
        major, minor = call.capability
        return (f"{call.device_type}_sm{major}{minor}", call.device_type)
    return (call.device_type,)


def _auto_priority(backend: registry.Backend, call: Call) -> Optional[int]:
    for key in _device_class_keys(call):
        if key in backend.AUTO_PRIORITY:
            return backend.AUTO_PRIORITY[key]
    return None


def _layer(scope: Optional[Scope]):
    return scope.backends if scope is not None else None


def _resolve(arg_names, ctx: Optional[Scope], site: Optional[Scope], env: controls.EnvSettings):
    """Which layer decides: returns (names or AUTO, source label, strict, allow_lossy)."""
    strict = env.strict
    allow_lossy = env.allow_lossy
    for scope in (site, ctx):  # inner layers override outer ones for the flags
        if scope is not None:
            if scope.strict is not None:
                strict = scope.strict
            if scope.allow_lossy is not None:
                allow_lossy = scope.allow_lossy
    if arg_names is not None:
        return arg_names, "backend= argument", strict, allow_lossy
    if ctx is not None and ctx.backends is not None:
        return ctx.backends, ctx.source, strict, allow_lossy
    if site is not None and site.backends is not None:
        return site.backends, site.source, strict, allow_lossy
    if env.backends is not None:
        return env.backends, "ATTNPATCH_BACKEND", strict, allow_lossy
    return AUTO, "auto", strict, allow_lossy


def _reasons_for(backend: registry.Backend, call: Call, env: controls.EnvSettings) -> List[str]:
    if backend.NAME in env.disabled:
        return ["disabled by ATTNPATCH_DISABLE"]
    return backend.not_supported_reasons(call)


def _auto_candidates(call: Call) -> List[registry.Backend]:
    ranked = []
    for b in registry.all_backends():
        p = _auto_priority(b, call)
        if p is not None:
            ranked.append((p, b.NAME, b))
    ranked.sort(key=lambda t: (t[0], t[1]))
    return [b for _, _, b in ranked]


def _auto_choose(call: Call, env, allow_lossy: bool, reasons: Dict[str, List[str]], full: bool):
    """Auto's pick: (backend or None, how it was chosen). With more than one eligible backend and
    autotune on, `autotune.choose` picks by measured speed; otherwise the static table's first."""
    tune = autotune.applies(call, env)
    eligible = []
    for b in _auto_candidates(call):
        r = _reasons_for(b, call, env)
        if not r and b.LOSSY and not allow_lossy:
            r = ["lossy kernel: auto picks it only with allow_lossy=True (use_backend, apply) or ATTNPATCH_ALLOW_LOSSY=1"]
        reasons[b.NAME] = r
        if not r:
            eligible.append(b)
            if not (full or tune):
                break
    if not eligible:
        return None, ""
    picked = autotune.choose(call, eligible) if tune and len(eligible) > 1 else None
    return picked if picked is not None else (eligible[0], "static table")


def _format_error(headline: str, call: Call, reasons: Dict[str, List[str]], hint: str) -> str:
    lines = [headline, f"  call: {call.describe()}"]
    for name, r in reasons.items():
        lines.append(f"  {name}: " + ("; ".join(r) if r else "eligible"))
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def decide(call: Call, arg_names, ctx: Optional[Scope], site: Optional[Scope], full: bool = False) -> Decision:
    """Choose the backend for ``call`` under the given scopes. ``full`` computes every backend's
    reasons (for explain()); otherwise it stops at the first eligible one."""
    env = controls.env_settings()
    names, source, strict, allow_lossy = _resolve(arg_names, ctx, site, env)
    reasons: Dict[str, List[str]] = {}
    if names == AUTO:
        chosen, how = _auto_choose(call, env, allow_lossy, reasons, full)
        if chosen is None:
            raise BackendUnsupportedError(
                _format_error("attnpatch: no attention backend can serve this call.", call, reasons,
                              "Hint: check the input sizes and dtype, or register a backend that supports them."),
                call, reasons)
        if full:
            _fill_rest(call, env, reasons)
        return Decision(chosen, f"{source} ({how})", (), (), reasons)
    registry.check_names(names, source)  # a backend unregistered since the scope or env was set
    chosen = None
    for name in names:
        b = registry.get_backend(name)
        r = _reasons_for(b, call, env)  # naming a lossy backend is the opt-in for it
        reasons[name] = r
        if not r and chosen is None:
            chosen = b
            if not full:
                break
    if chosen is not None:
        if full:
            _fill_rest(call, env, reasons)
        return Decision(chosen, source, tuple(names), (), reasons)
    refused = {n: reasons[n] for n in names}
    if strict:
        raise BackendUnsupportedError(
            _format_error(f"attnpatch (strict): the backends requested by {source} cannot serve this call.",
                          call, refused, "Hint: pick a backend that supports this call (attnpatch.explain shows "
                          "each one's reasons), or turn strict off to fall back."),
            call, refused)
    auto_reasons: Dict[str, List[str]] = {}
    chosen, _how = _auto_choose(call, env, allow_lossy, auto_reasons, full)
    if chosen is None:
        raise BackendUnsupportedError(
            _format_error("attnpatch: no attention backend can serve this call.", call, {**refused, **auto_reasons}, ""),
            call, {**refused, **auto_reasons})
    for n, r in auto_reasons.items():
        reasons.setdefault(n, r)
    if full:
        _fill_rest(call, env, reasons)
    fallback = tuple((n, "; ".join(refused[n])) for n in names)
    return Decision(chosen, source, tuple(names), fallback, reasons)


def _fill_rest(call: Call, env, reasons: Dict[str, List[str]]) -> None:
    for b in registry.all_backends():
        if b.NAME not in reasons:
            reasons[b.NAME] = _reasons_for(b, call, env)


def _warn_fallback(decision: Decision) -> None:
    for name, why in decision.fallback:
        key = (name, why)
        if key not in _WARNED:
            _WARNED.add(key)
            logger.warning(
                "attnpatch: backend %r (from %s) cannot serve this call: %s; using %r instead. "
                "This warning is shown once per backend and reason; attnpatch.stats() counts every fallback.",
                name, decision.source, why, decision.backend.NAME)


def _wrap(runner, call: Call, mask_spec: Optional[str], native_layout: str):
    """Wrap a backend runner for the caller's layout and mask form. The common case (bnsd, no mask
    reshaping) returns the runner itself."""
    transpose = call.layout != native_layout
    mask_dims = None if call.mask_shape is None else call.mask_shape
    dtype = call.dtype
    cast_mask = call.mask_kind == "additive"

    def fix_mask(m):
        if m is None:
            return None
        if mask_spec == "key_padding":
            m = m[:, None, None, :]
        elif m.dim() < 4:
            m = m.reshape(mask_dims)
        if cast_mask and m.dtype != dtype:
            m = m.to(dtype)
        return m

    needs_mask_fix = mask_spec is not None
    if not transpose and not needs_mask_fix:
        return runner
    if not transpose:
        def run(q, k, v, m, c, s, p):
            return runner(q, k, v, fix_mask(m), c, s, p)
        return run
    if not needs_mask_fix:
        def run(q, k, v, m, c, s, p):
            return runner(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m, c, s, p).transpose(1, 2)
        return run

    def run(q, k, v, m, c, s, p):
        return runner(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), fix_mask(m), c, s, p).transpose(1, 2)
    return run


def _clear_plans() -> None:
    with _LOCK:
        for plan in _PLANS.values():
            if plan.calls:
                _RETIRED[(plan.site, plan.backend.NAME, plan.decision.fallback)] += plan.calls
        _PLANS.clear()


def clear_cache() -> None:
    """Forget every cached decision and plan (counts are kept). Called when controls change."""
    with _LOCK:
        _clear_plans()
        _DECISIONS.clear()
        _TRACED_DECISIONS.clear()


registry.on_registry_change(clear_cache)
controls.on_env_change(clear_cache)


def _arg_names(backend):
    if backend is None:
        return None
    return controls.normalise_backends(backend, "backend= argument")


def _miss(cache_key, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad, backend) -> Plan:
    compiling = torch.compiler.is_compiling()
    call, mask_spec = build_call(query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad,
                                 compiling)
    arg_names = _arg_names(backend)
    ctx, site = cache_key[-2], cache_key[-1]
    dkey = (call.signature(), call.heads_q, call.heads_kv, arg_names, ctx, site, controls.env_settings())
    decision = _DECISIONS.get(dkey)
    if decision is None:
        decision = decide(call, arg_names, ctx, site)
        _DECISIONS[dkey] = decision
    _warn_fallback(decision)
    runner = decision.backend.build(call)
    plan = Plan(decision, _wrap(runner, call, mask_spec, decision.backend.NATIVE_LAYOUT),
                site.site if site is not None else None)
    with _LOCK:
        if len(_PLANS) >= MAX_PLANS:
            _clear_plans()
        _PLANS[cache_key] = plan
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("attnpatch: %s -> %s (%s)", call.describe(), decision.backend.NAME, decision.source)
    return plan


def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, layout: str = "bnsd",
                      attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                      scale: Optional[float] = None, dropout_p: float = 0.0,
                      backend: Union[str, Sequence[str], None] = None) -> torch.Tensor:
    """Scaled dot-product attention on the best eligible kernel; the output has the input's layout.

    Args:
        query: (b, h_q, s_q, d) for ``layout="bnsd"`` or (b, s_q, h_q, d) for ``"bsnd"``.
        key, value: (b, h_kv, s_kv, d) and (b, h_kv, s_kv, d_v) in the same layout; h_kv must divide
            h_q (GQA/MQA). d_v may differ from d where the backend allows it.
        attn_mask: None; a bool mask (True = attend); or a float mask added to the scores. It must
            broadcast to (b, h_q, s_q, s_kv); a 2-D (b, s_kv) mask is a key-padding mask.
        is_causal: SDPA's convention: top-left aligned, query i attends keys j <= i.
        scale: multiplies q·k; None means 1/sqrt(d).
        dropout_p: dropout on the attention weights, applied whenever > 0 (pass 0.0 in eval).
        backend: None (the controls decide), "auto", a name, or a priority list of names.

    A query row whose keys are all masked gives zeros (SDPA's result since torch 2.5), not NaN.
    The output is (b, h_q, s_q, d_v) for "bnsd" and (b, s_q, h_q, d_v) for "bsnd".
    """
    return route(None, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, backend)


def route(site: Optional[Scope], query, key, value, layout="bnsd", attn_mask=None, is_causal=False,
          scale=None, dropout_p=0.0, backend=None):
    """`attention_forward` for adapters: ``site`` is the patched site's `Scope` (its backend setting,
    recipe rule and report), passed explicitly so that compiled graphs need no context variable."""
    if torch.compiler.is_compiling():
        return _traced_forward(site, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, backend)
    try:
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        cache_key = (
            query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device,
            None if attn_mask is None else (attn_mask.shape, attn_mask.dtype),
            layout, is_causal, dropout_p, grad,
            backend if backend is None or backend.__class__ is str else tuple(backend),
            _CONTEXT.get(), site,
        )
        plan = _PLANS.get(cache_key)
    except (AttributeError, TypeError):  # a non-tensor, a bad backend= or an unhashable argument
        build_call(query, key, value, layout, attn_mask, is_causal, scale, dropout_p, False)  # says which
        _arg_names(backend)
        raise
    if plan is None:
        plan = _miss(cache_key, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad, backend)
    plan.calls += 1
    return plan.run(query, key, value, attn_mask, is_causal, scale, dropout_p)


# -- under torch.compile ---------------------------------------------------------------------------

_CALL_FIELDS = tuple(f.name for f in dataclasses.fields(Call))

#: (site, backend name) pairs decided while tracing under torch.compile (compiled calls are not counted).
COMPILED_DECISIONS: set = set()


def _compile_decision(meta, layout, is_causal, scale, dropout_p, grad, backend, ctx, site):
    """Run eagerly while torch.compile traces (see `_traced_forward`): validate, decide, and return
    only constants (backend name, the Call's fields, the mask form)."""
    ctx = _CONTEXT.get() if isinstance(ctx, str) and ctx == _READ_CONTEXT_AT_TRACE else controls.scope_by_token(ctx)
    site = controls.scope_by_token(site)
    call, spec = call_from_meta(meta, layout, is_causal, scale, dropout_p, grad, compiling=True)
    arg_names = _arg_names(backend)
    dkey = (call.signature(), call.heads_q, call.heads_kv, arg_names, ctx, site, controls.env_settings())
    decision = _DECISIONS.get(dkey) or _TRACED_DECISIONS.get(dkey)
    if decision is None:
        # Kept apart from _DECISIONS: a choice made while tracing is static (autotune never times
        # under compile), and eager calls of the same signature should still get measured.
        decision = decide(call, arg_names, ctx, site)
        _TRACED_DECISIONS[dkey] = decision
    _warn_fallback(decision)
    COMPILED_DECISIONS.add((site.site if site is not None else None, decision.backend.NAME))
    return decision.backend.NAME, tuple(getattr(call, f) for f in _CALL_FIELDS), spec


try:  # torch >= 2.1: dynamo runs the function at trace time and keeps its result as a constant
    _compile_decision = torch._dynamo.assume_constant_result(_compile_decision)
except AttributeError:  # pragma: no cover
    pass


#: torch >= 2.14's dynamo traces ContextVar.get and guards on its value (a use_backend() block
#: around a compiled call then recompiles for its setting); older dynamo cannot trace it at all, so
#: `_compile_decision` reads the use_backend() state itself, eagerly, at trace time: the setting at the
#: first trace is compiled in (call torch._dynamo.reset() after changing it).
_DYNAMO_GUARDS_CONTEXTVARS = registry.version_at_least(torch.__version__, "2.14")
_READ_CONTEXT_AT_TRACE = "attnpatch: read use_backend() state at trace time"


def _traced_forward(site, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, backend):
    """The path torch.compile traces: the decision is made once at trace time (guarded by dynamo on
    the scopes and shapes), and the chosen backend's runner is traced into the graph."""
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    meta = tensor_meta(query, key, value, attn_mask)
    if _DYNAMO_GUARDS_CONTEXTVARS:
        ctx = _CONTEXT.get()
        ctx = None if ctx is None else ctx.token
    else:
        ctx = _READ_CONTEXT_AT_TRACE
    # Only constants cross into the trace-time decision (torch 2.11's dynamo insists): scope tokens.
    name, fields, spec = _compile_decision(
        meta, layout, is_causal, scale, dropout_p, grad,
        backend if backend is None or isinstance(backend, str) else tuple(backend), ctx,
        None if site is None else site.token)
    call = Call(*fields)
    b = registry.get_backend(name)
    run = _wrap(b.build(call), call, spec, b.NATIVE_LAYOUT)
    return run(query, key, value, attn_mask, is_causal, scale, dropout_p)


# -- introspection ---------------------------------------------------------------------------------

@dataclass
class Explanation:
    """What `explain` returns: the call, the chosen backend, where the choice came from, and every
    backend's reasons (an empty list means eligible)."""

    call: Call
    backend: str
    source: str
    requested: Tuple[str, ...]
    fallback: Tuple[Tuple[str, str], ...]
    reasons: Dict[str, List[str]]

    def __str__(self) -> str:
        lines = [f"call: {self.call.describe()}", f"chosen: {self.backend} (decided by {self.source})"]
        for name, why in self.fallback:
            lines.append(f"fell back from {name}: {why}")
        lines.append("backends:")
        width = max(len(n) for n in self.reasons) if self.reasons else 0
        for name, r in self.reasons.items():
            mark = "*" if name == self.backend else " "
            lines.append(f" {mark} {name.ljust(width)}  " + ("eligible" if not r else "; ".join(r)))
        return "\n".join(lines)


def explain(query, key, value, *, layout: str = "bnsd", attn_mask=None, is_causal: bool = False,
            scale=None, dropout_p: float = 0.0, backend=None, site: Optional[Scope] = None) -> Explanation:
    """Which backend `attention_forward` would use for these arguments, and why each other backend was
    refused. Recomputes everything (no cache); raises the same errors the call would. ``site`` is a
    patched site's scope (adapters and the CLI pass it)."""
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    call, _ = build_call(query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad)
    d = decide(call, _arg_names(backend), _CONTEXT.get(), site, full=True)
    return Explanation(call, d.backend.NAME, d.source, d.requested, d.fallback, d.reasons)


@dataclass
class Stats:
    """Per-backend call counts and fallback counts (keyed by (refused backend, used backend, reason))."""

    calls: Dict[str, int]
    fallbacks: Dict[Tuple[str, str, str], int]

    def __str__(self) -> str:
        lines = ["calls:"] + [f"  {n}: {c}" for n, c in sorted(self.calls.items())]
        if self.fallbacks:
            lines.append("fallbacks:")
            lines += [f"  {a} -> {b} ({why}): {c}" for (a, b, why), c in sorted(self.fallbacks.items())]
        return "\n".join(lines)


def iter_counts():
    """Yield (site, backend name, fallback, calls) over live and retired plans."""
    with _LOCK:
        items = list(_RETIRED.items())
        live = [(p.site, p.backend.NAME, p.decision.fallback, p.calls) for p in _PLANS.values() if p.calls]
    for (site, name, fallback), n in items:
        yield site, name, fallback, n
    yield from live


def stats(reset: bool = False) -> Stats:
    """Counts since start (or the last reset): calls per backend that ran, and fallbacks with reasons."""
    calls: Counter = Counter()
    fallbacks: Counter = Counter()
    for _site, name, fallback, n in iter_counts():
        calls[name] += n
        for refused, why in fallback:
            fallbacks[(refused, name, why)] += n
    if reset:
        with _LOCK:
            _RETIRED.clear()
            for p in _PLANS.values():
                p.calls = 0
    return Stats(dict(calls), dict(fallbacks))
