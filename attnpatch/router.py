"""`attention_forward`: look up the cached plan for this call's shape and settings, then run it.

The hot path builds one tuple key from the tensors' shapes and dtypes and the active scopes, finds the
plan in a dict and calls it: no validation, reasons, logging or environment reads on a hit. On a miss
it looks for a plan of the same *length bucket* (a decode step, whose key length grows by one each
token, reuses the plan of its bucket without re-deciding); only when there is none is the call
validated in full (`build_call`), a backend chosen (`decide`) and its runner built and wrapped for the
layout, the mask and the features; the result is cached.

Under torch.compile (and torch.export) the decision is made once per trace from what is static (dtype,
device, head dims, heads, mask kind, layout, causal, grad, features, scopes); batch and sequence sizes
enter it only through comparisons with the length limits that the eligible backends declare (dynamo
turns those into guards), so a compiled model follows shape changes with the recompiles torch itself
makes. See `_traced_forward`.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import autotune, controls, registry, shipped_tables
from .call import (AttentionInputError, Call, Features, NO_FEATURES, build_call, call_from_meta,
                   check_flags, check_shapes, check_softcap, check_window, length_bucket, split_dims, tensor_meta)
from .controls import AUTO, Scope, _CONTEXT

logger = logging.getLogger("attnpatch")

#: Most plans kept before the plan caches are emptied (many distinct shapes).
MAX_PLANS = 4096
#: Most decisions kept before the decision cache is emptied.
MAX_DECISIONS = 4096


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
    """A decision bound to one call shape (or one length bucket): the runner to call and the counter."""

    __slots__ = ("backend", "decision", "run", "calls", "site", "shares")

    def __init__(self, decision: Decision, run, site, shares: bool = False):
        self.backend = decision.backend
        self.decision = decision
        self.run = run
        self.calls = 0
        self.site = site
        self.shares = shares  # the runner serves every length of the plan's bucket


class DelegatingPlan(Plan):
    """A plan whose runner makes routed calls of its own (context parallelism: `attnpatch.parallel`).
    Those calls are counted by their own plans, so this one counts nothing."""

    __slots__ = ()
    calls = property(lambda self: 0, lambda self, value: None)


#: Site -> function that builds the plan of that site's calls in the router's place, or returns None to
#: leave a call to the router: ``planner(scope, query, key, value, layout, attn_mask, is_causal, scale,
#: dropout_p, grad, backend, features, sinks)``. `attnpatch.parallel` registers one per site of a
#: context-parallel model. Consulted on a cache miss only.
SITE_PLANNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


#: `route`'s test for tracing, cheaper than ``torch.compiler.is_compiling()`` (which calls
#: ``torch.jit.is_scripting()`` first: ~0.3 µs more per eager call): dynamo folds
#: ``is_dynamo_compiling()`` to True while it traces; torch.export's non-strict tracing sets the flag
#: that ``is_compiling()`` reads. Older torch without either: ``is_compiling()`` itself.
_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_COMPILER_FLAGS = torch.compiler if hasattr(torch.compiler, "_is_compiling_flag") else type(
    "_NoCompilerFlags", (), {"_is_compiling_flag": False})

_PLANS: Dict[tuple, Plan] = {}  # exact call key -> plan
_BUCKETS: Dict[tuple, Plan] = {}  # length-bucket key -> plan (runners that serve every length of the bucket)
_DECISIONS: Dict[tuple, Decision] = {}
_TRACED_DECISIONS: Dict[tuple, Decision] = {}  # decided while torch.compile traced
_LOCK = threading.RLock()
#: calls of plans no longer cached: site -> Counter[(backend name, fallback)] (site-less calls under None)
_RETIRED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_RETIRED_NO_SITE: Counter = Counter()
_WARNED: set = set()
#: how often `decide` ran (tests count decisions per generated token)
DECISIONS_MADE = [0]


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
        p = registry.auto_priority(b, call)
        if p is not None:
            ranked.append((p, b.NAME, b))
    ranked.sort(key=lambda t: (t[0], t[1]))
    return [b for _, _, b in ranked]


_LOSSY_REASON = ("lossy kernel: auto picks it only with allow_lossy=True (use_backend, apply) or "
                 "ATTNPATCH_ALLOW_LOSSY=1")


def _auto_choose(call: Call, env, allow_lossy: bool, reasons: Dict[str, List[str]], full: bool):
    """Auto's pick: (backend or None, how it was chosen). With more than one eligible backend and
    autotune on, `autotune.choose` picks (this machine's measurement, a shipped decision, or timing);
    with it off, a shipped decision for a measured card (`shipped_tables`); otherwise the static table's first."""
    tune = autotune.applies(call, env)
    whole = full or tune or shipped_tables.has_rule(call)  # these need every eligible backend
    eligible = []
    for b in _auto_candidates(call):
        if b.LOSSY and not allow_lossy and not full:
            # without the opt-in a lossy kernel is out whatever its state: not probing it keeps its package
            # unimported (SageAttention 2's import took 0.28 s of a fresh process's first Flux run on an
            # H200, 2026-11-30: auto's first run 0.94x stock's, the calibrated recipe's 0.985x)
            reasons[b.NAME] = [_LOSSY_REASON]
            continue
        r = _reasons_for(b, call, env)
        if not r and b.LOSSY and not allow_lossy:
            r = [_LOSSY_REASON]
        reasons[b.NAME] = r
        if not r:
            eligible.append(b)
            if not whole:
                break
    if not eligible:
        return None, ""
    picked = None
    if len(eligible) > 1:
        # measuring on: autotune (this machine's cache, then a shipped decision, then timing); off: a
        # shipped decision for a measured card still beats the static order
        picked = autotune.choose(call, eligible) if tune else shipped_tables.choice(call, eligible)
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
    DECISIONS_MADE[0] += 1
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
            r = _reasons_for(b, call, env)
            left_out = None if r or registry.auto_priority(b, call) is not None else registry.auto_left_out(b, call)
            reasons[b.NAME] = [left_out] if left_out else r


def _warn_fallback(decision: Decision) -> None:
    for name, why in decision.fallback:
        key = (name, why)
        if key not in _WARNED:
            _WARNED.add(key)
            logger.warning(
                "attnpatch: backend %r (from %s) cannot serve this call: %s; using %r instead. "
                "This warning is shown once per backend and reason; attnpatch.stats() counts every fallback.",
                name, decision.source, why, decision.backend.NAME)


# -- building the runner of a plan --------------------------------------------------------------------

def _view4(m):
    """A mask of fewer than 4 dims viewed as 4-D (size-1 dims in front)."""
    return m if m.dim() == 4 else m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))


def _wrap(runner, call: Call, mask_spec: Optional[str], backend: registry.Backend):
    """Wrap a backend runner for the caller's layout, mask form and features. The common case (bnsd,
    no mask reshaping, no features) returns the runner itself. The result serves every call of the
    plan's shape (and of its length bucket when the backend shares runners across lengths)."""
    transpose = call.layout != backend.NATIVE_LAYOUT
    dtype = call.dtype
    cast_mask = call.mask_kind == "additive"
    key_padding = mask_spec == "key_padding"
    fix_mask = mask_spec is not None
    native_sinks = call.sinks and backend.SUPPORTS_SINKS
    rescale_sinks = call.sinks and not backend.SUPPORTS_SINKS  # the runner returns (out, lse)
    user_lse = call.return_lse
    plain = not (transpose or fix_mask or call.sinks or user_lse)
    if plain:
        return runner

    def run(q, k, v, m, c, s, p, sinks=None):
        if fix_mask:
            m = m[:, None, None, :] if key_padding else _view4(m)
            if cast_mask and m.dtype != dtype:
                m = m.to(dtype)
        if transpose:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if native_sinks:
            res = runner(q, k, v, m, c, s, p, sinks)
        else:
            res = runner(q, k, v, m, c, s, p)
        if rescale_sinks or user_lse:
            out, lse = res
        else:
            out, lse = res, None
        if transpose:
            out = out.transpose(1, 2)
        if rescale_sinks:
            # softmax over keys and sinks = softmax over keys * sigmoid(lse - sink)
            w = torch.sigmoid(lse - sinks.to(lse.dtype).view(1, -1, 1))
            w = w[..., None] if call.layout == "bnsd" else w.transpose(1, 2)[..., None]
            out = (out * w).to(out.dtype)
        return (out, lse) if user_lse else out
    return run


def _stride_guarded(inner, on_strided):
    """Run ``inner`` when q/k/v have stride 1 in their last dim, else ``on_strided()``'s plan."""
    def run(q, k, v, *rest):
        if q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1:
            return inner(q, k, v, *rest)
        return on_strided()(q, k, v, *rest)
    return run


def _stride_checked_by_kernel(inner, on_strided):
    """As `_stride_guarded`, for kernels that raise on a strided last dim themselves: no check on the
    way in; when ``inner`` raises and a stride is not 1, ``on_strided()``'s plan serves the call."""
    def run(q, k, v, *rest):
        try:
            return inner(q, k, v, *rest)
        except RuntimeError:
            if q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1:
                raise
        return on_strided()(q, k, v, *rest)
    return run


def _build_call_for(backend: registry.Backend, call: Call) -> Call:
    """The Call the backend builds its runner from: asks for the log-sum-exp when the router needs it
    to add attention sinks."""
    if call.sinks and not backend.SUPPORTS_SINKS and not call.return_lse:
        return dataclasses.replace(call, return_lse=True)
    return call


# -- caches -------------------------------------------------------------------------------------------------

def _retire(plan: Plan) -> None:
    if not plan.calls:
        return
    key = (plan.backend.NAME, plan.decision.fallback)
    if plan.site is None:
        _RETIRED_NO_SITE[key] += plan.calls
    else:
        _RETIRED.setdefault(plan.site, Counter())[key] += plan.calls
    plan.calls = 0


def _clear_plans() -> None:
    with _LOCK:
        seen = set()
        for plan in list(_PLANS.values()) + list(_BUCKETS.values()):
            if id(plan) not in seen:
                seen.add(id(plan))
                _retire(plan)
        _PLANS.clear()
        _BUCKETS.clear()


def clear_cache() -> None:
    """Forget every cached decision and plan (counts are kept). Called when controls change."""
    with _LOCK:
        _clear_plans()
        _DECISIONS.clear()
        _TRACED_DECISIONS.clear()


autotune.ON_CLEAR.append(clear_cache)

def forget_scopes(scopes) -> None:
    """Drop every cached plan and decision made under one of ``scopes`` (a patch is being removed):
    afterwards the router holds no reference to them, their sites or their modules. Counts move to the
    sites (a removed patch's report still shows them)."""
    ids = {id(s) for s in scopes if s is not None}
    if not ids:
        return

    def mentions(key) -> bool:
        return any(id(x) in ids for x in key if isinstance(x, Scope))

    with _LOCK:
        for cache in (_PLANS, _BUCKETS):
            for key in [k for k in cache if mentions(k)]:
                _retire(cache.pop(key))
        for cache in (_DECISIONS, _TRACED_DECISIONS):
            for key in [k for k in cache if mentions(k)]:
                del cache[key]


registry.on_registry_change(clear_cache)
controls.on_env_change(clear_cache)


def _arg_names(backend):
    if backend is None:
        return None
    return controls.normalise_backends(backend, "backend= argument")


def _decision_for(call: Call, arg_names, ctx, site) -> Decision:
    dkey = (call.signature(), call.heads_q, call.heads_kv, arg_names, ctx, site, controls.env_settings())
    decision = _DECISIONS.get(dkey)
    if decision is None:
        decision = decide(call, arg_names, ctx, site)
        with _LOCK:
            if len(_DECISIONS) >= MAX_DECISIONS:
                _DECISIONS.clear()
            _DECISIONS[dkey] = decision
    return decision


def _bucket_key(cache_key: tuple) -> Optional[tuple]:
    """The key of ``cache_key``'s length bucket: the exact key with the sequence lengths replaced by
    their buckets (and whether they are equal, and whether the values' length is the keys'); None for
    calls that keep exact plans (2-D masks, whose reading depends on the sizes, and inputs that are not
    4-D). On the hot path of decoding (a new key length every step): plain indexing, no loops."""
    qs, ks, vs = cache_key[0], cache_key[1], cache_key[2]
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return None
    if cache_key[8] == "bnsd":
        b, h, sq, d = qs
        bk, hk, skv, dk = ks
        bv, hv, sv, dv = vs
    else:  # "bsnd" (an unknown layout finds no bucket and is refused when planned)
        b, sq, h, d = qs
        bk, skv, hk, dk = ks
        bv, sv, hv, dv = vs
    if not sq or not skv:
        return None
    mkey = None
    mask = cache_key[7]
    if mask is not None:
        mshape = mask[0]
        if len(mshape) < 3:
            return None
        # each mask dim is 1 or the call's size; the last two follow the lengths
        mkey = (tuple(mshape[:-2]), mshape[-2] == 1, mshape[-1] == 1, mshape[-2] in (1, sq),
                mshape[-1] in (1, skv), mask[1])
        if not (mkey[3] and mkey[4]):
            return None
    lengths = (length_bucket(sq), length_bucket(skv), (sq > skv) - (sq < skv), sv == skv)
    return ((b, h, d, bk, hk, dk, bv, hv, dv), lengths, mkey) + cache_key[3:7] + cache_key[8:]


def _miss(cache_key, bkey, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad, backend,
          features, sinks) -> Plan:
    """Plan a call whose exact key and length bucket (``bkey``, None for exact-only calls) have none."""
    ctx, site = cache_key[-3], cache_key[-2]
    owner = site.site if site is not None else None
    planner = SITE_PLANNERS.get(owner) if owner is not None and query.dim() == 4 else None
    plan = planner(site, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad, backend, features,
                   sinks) if planner is not None else None
    if plan is not None:
        pass
    elif query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        plan = _reshaping_plan(query, key, value, layout, attn_mask, backend, ctx, site, features)
    elif query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        plan = _empty_plan(query, key, value, layout, attn_mask, is_causal, scale, dropout_p, site)
    else:
        plan = _new_plan(query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad, backend,
                         features, ctx, site, cache_key)
    with _LOCK:
        if len(_PLANS) >= MAX_PLANS or len(_BUCKETS) >= MAX_PLANS:
            _clear_plans()
        _PLANS[cache_key] = plan
        if bkey is not None and plan.shares:
            _BUCKETS[bkey] = plan
    return plan


def _new_plan(query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad, backend, features,
              ctx, site, cache_key) -> Plan:
    call, mask_spec = build_call(query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad,
                                 False, features)
    arg_names = _arg_names(backend)
    decision = _decision_for(call, arg_names, ctx, site)
    _warn_fallback(decision)
    b = decision.backend
    owner = site.site if site is not None else None
    runner = _wrap(b.build_for_site(_build_call_for(b, call), owner), call, mask_spec, b)
    shares = b.shares_runner_across_lengths(call) and not (attn_mask is not None and attn_mask.dim() < 3)
    plan = Plan(decision, runner, owner, shares)
    if b.needs_unit_stride(call) and call.last_dim_contiguous:
        strided: List[Plan] = []

        def on_strided():
            # the same call with a strided last dim is decided on its own (a fallback, or the strict error)
            if not strided:
                scall = dataclasses.replace(call, last_dim_contiguous=False)
                sdec = _decision_for(scall, arg_names, ctx, site)
                _warn_fallback(sdec)
                sb = sdec.backend
                strided.append(Plan(sdec, _wrap(sb.build(_build_call_for(sb, scall)), scall, mask_spec, sb), plan.site))
                with _LOCK:
                    _PLANS[cache_key + ("strided",)] = strided[0]
            plan.calls -= 1
            strided[0].calls += 1
            return strided[0].run
        plan.run = (_stride_checked_by_kernel if b.kernel_checks_unit_stride(call) else _stride_guarded)(
            runner, on_strided)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("attnpatch: %s -> %s (%s)", call.describe(), b.NAME, decision.source)
    return plan


def _torch_sdpa_bnsd(q, k, v, m, c, s, p, layout):
    """torch's own F.scaled_dot_product_attention on attnpatch's conventions (empty inputs)."""
    if layout == "bsnd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if m is not None and m.dim() == 2 and tuple(m.shape) == (q.shape[0], k.shape[2]) and m.shape[0] != q.shape[2]:
        m = m[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p, is_causal=c, scale=s,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2) if layout == "bsnd" else out


def _empty_plan(query, key, value, layout, attn_mask, is_causal, scale, dropout_p, site) -> Plan:
    """Empty in, empty out: a call with a zero-size dimension gets torch's own result (zeros where
    there are no keys), after the same validation as any call."""
    check_flags(layout, is_causal, scale, dropout_p)
    meta = tensor_meta(query, key, value, attn_mask)
    check_shapes(meta, layout)
    sdpa = registry.get_backend("sdpa")

    def run(q, k, v, m, c, s, p, *rest):
        return _torch_sdpa_bnsd(q, k, v, m, c, s, p, layout)
    return Plan(Decision(sdpa, "empty input (torch's own result)"), run, site.site if site is not None else None)


def _reshaping_plan(query, key, value, layout, attn_mask, backend, ctx, site, features) -> Plan:
    """Inputs of rank 3 or more than 4, as torch's SDPA takes them: (…, heads, seq, dim) for bnsd,
    (…, seq, heads, dim) for bsnd; the leading dims are folded into one batch dim (a 3-D input has
    batch 1) and the call goes through the router as 4-D."""
    ranks = {query.dim(), key.dim(), value.dim()}
    if len(ranks) != 1 or min(ranks) < 3:
        dims = "(…, heads, seq, head_dim)" if layout == "bnsd" else "(…, seq, heads, head_dim)"
        raise AttentionInputError(
            f"attnpatch.attention_forward: query, key and value must have the same rank, 3 or more "
            f"{dims} for layout={layout!r}; got shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    rank = query.dim()
    lead = tuple(query.shape[:-3])
    if tuple(key.shape[:-3]) != lead or tuple(value.shape[:-3]) != lead:
        raise AttentionInputError(
            f"attnpatch.attention_forward: the leading dims of query, key and value must match, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    scope_site = site

    def to4(t):
        return t.reshape((-1,) + tuple(t.shape[-3:])) if rank > 3 else t[None]

    def run(q, k, v, m, c, s, p, sinks=None):
        if m is not None:
            if m.dim() == 2:  # torch's reading: (s_q, s_kv)
                m = m[None, None]
            elif rank > 4 and m.dim() > 3:  # leading dims: broadcast, then fold like the inputs
                m = m.reshape((1,) * (rank - m.dim()) + tuple(m.shape))
                m = m.expand(lead + tuple(m.shape[-3:])).reshape((-1,) + tuple(m.shape[-3:]))
        res = route(scope_site, to4(q), to4(k), to4(v), layout, m, c, s, p, backend, features, sinks)
        out, lse = res if isinstance(res, tuple) else (res, None)
        out = out.reshape(lead + tuple(out.shape[1:])) if rank > 3 else out[0]
        if lse is None:
            return out
        return out, (lse.reshape(lead + tuple(lse.shape[1:])) if rank > 3 else lse[0])

    sdpa = registry.get_backend("sdpa")
    plan = Plan(Decision(sdpa, f"{rank}-D inputs, routed as 4-D"), run, None)
    return plan


def route(site: Optional[Scope], query, key, value, layout="bnsd", attn_mask=None, is_causal=False,
          scale=None, dropout_p=0.0, backend=None, features: Optional[Features] = None, sinks=None):
    """`attention_forward` for adapters: ``site`` is the patched site's `Scope` (its backend setting,
    recipe rule and report), passed explicitly so that compiled graphs need no context variable.
    ``features`` (a `Features`, or None for none) carries window / softcap / sinks / return_lse;
    ``sinks`` is the sinks tensor when ``features.sinks``."""
    if _dynamo_compiling() or _COMPILER_FLAGS._is_compiling_flag:
        return _traced_forward(site, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, backend,
                               features, sinks)
    try:
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        cache_key = (
            query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device,
            None if attn_mask is None else (attn_mask.shape, attn_mask.dtype),
            layout, is_causal, dropout_p, grad,
            backend if backend is None or backend.__class__ is str else tuple(backend),
            _CONTEXT.get(), site, features,
        )
        plan = _PLANS.get(cache_key)
    except (AttributeError, TypeError):  # a non-tensor, a bad backend= or an unhashable argument
        build_call(query, key, value, layout, attn_mask, is_causal, scale, dropout_p, False)  # says which
        _arg_names(backend)
        raise
    if plan is None:  # a new exact shape: its length bucket's plan serves it (decoding), else plan it
        bkey = _bucket_key(cache_key)
        plan = _BUCKETS.get(bkey) if bkey is not None else None
        if plan is None:
            plan = _miss(cache_key, bkey, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad,
                         backend, features or NO_FEATURES, sinks)
        elif len(_PLANS) < MAX_PLANS:  # the other layers of this decoding step find it by its exact key
            _PLANS[cache_key] = plan
    plan.calls += 1
    if sinks is None:
        return plan.run(query, key, value, attn_mask, is_causal, scale, dropout_p)
    return plan.run(query, key, value, attn_mask, is_causal, scale, dropout_p, sinks)


def make_features(window=None, softcap=None, sinks=None, return_lse: bool = False) -> Optional[Features]:
    """Validate the optional features of a call; None when none is used (the common case)."""
    if window is None and softcap is None and sinks is None and not return_lse:
        return None
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        raise TypeError(f"attnpatch.attention_forward: sinks must be a tensor of one logit per query head, "
                        f"got {type(sinks).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"attnpatch.attention_forward: return_lse must be a bool, got {type(return_lse).__name__}")
    return Features(window=check_window(window), softcap=check_softcap(softcap), sinks=sinks is not None,
                    return_lse=return_lse)


def causal_bias_args(attn_mask, is_causal, window):
    """torch's ``CausalBias`` masks (``causal_upper_left`` / ``causal_lower_right``) as attnpatch
    arguments: (mask, is_causal, window). Upper-left is SDPA's causal; lower-right (the last query sees
    every key: decoding with a cache) is a window whose right edge is ``seq_kv - seq_q``."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if not isinstance(attn_mask, CausalBias):
        return attn_mask, is_causal, window
    if is_causal:
        raise AttentionInputError("attnpatch.attention_forward: is_causal=True together with a CausalBias mask; "
                                  "the CausalBias already says causal (pass one or the other)")
    sq, skv = attn_mask.seq_len_q, attn_mask.seq_len_kv
    if attn_mask.variant == CausalVariant.UPPER_LEFT or sq == skv:
        return None, True, window
    if skv > sq and window is None:
        return None, False, (None, skv - sq)
    return attn_mask._materialize(attn_mask.device), False, window


def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, layout: str = "bnsd",
                      attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                      scale: Optional[float] = None, dropout_p: float = 0.0,
                      backend: Union[str, Sequence[str], None] = None,
                      window: Optional[Tuple[Optional[int], Optional[int]]] = None, softcap: Optional[float] = None,
                      sinks: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Scaled dot-product attention on the best eligible kernel; the output has the input's layout.

    Args:
        query: (b, h_q, s_q, d) for ``layout="bnsd"`` or (b, s_q, h_q, d) for ``"bsnd"``. Rank 3 (no
            batch) and higher ranks (extra leading batch dims) are accepted as in torch's SDPA.
        key, value: (b, h_kv, s_kv, d) and (b, h_kv, s_kv, d_v) in the same layout; h_kv must divide
            h_q (GQA/MQA). d_v may differ from d where the backend allows it.
        attn_mask: None; a bool mask (True = attend); a float mask added to the scores; or torch's
            ``CausalBias`` (``causal_upper_left`` / ``causal_lower_right``). It must broadcast to
            (b, h_q, s_q, s_kv); a 2-D (b, s_kv) mask is a key-padding mask.
        is_causal: SDPA's convention: top-left aligned, query i attends keys j <= i. May be combined with
            a mask (an attnpatch extension: torch's SDPA refuses that).
        scale: multiplies q·k; None means 1/sqrt(d).
        dropout_p: dropout on the attention weights, applied whenever > 0 (pass 0.0 in eval).
        backend: None (the controls decide), "auto", a name, or a priority list of names.
        window: ``(left, right)``: query i attends keys ``i - left <= j <= i + right`` (None =
            unbounded), top-left aligned like ``is_causal`` (sliding-window attention).
        softcap: scores (after scale) become ``tanh(s / softcap) * softcap`` (Gemma 2).
        sinks: (h_q,) logits that join each row's softmax denominator (GPT-OSS attention sinks).
        return_lse: also return the log-sum-exp, float32 (b, h_q, s_q) (the sinks excluded).

    A query row whose keys are all masked gives zeros (SDPA's result since torch 2.5), not NaN.
    The output is (b, h_q, s_q, d_v) for "bnsd" and (b, s_q, h_q, d_v) for "bsnd"; with
    ``return_lse`` the result is ``(out, lse)``. An empty input gives an empty (or zero) output.
    """
    if attn_mask is not None and type(attn_mask) is not torch.Tensor:
        attn_mask, is_causal, window = causal_bias_args(attn_mask, is_causal, window)
    if window is None and softcap is None and sinks is None and return_lse is False:  # the common case
        features = None
    else:
        features = make_features(window, softcap, sinks, return_lse)
    return route(None, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, backend, features, sinks)


# -- under torch.compile ---------------------------------------------------------------------------

_CALL_FIELDS = tuple(f.name for f in dataclasses.fields(Call))

#: backends decided while tracing under torch.compile, per site (compiled calls are not counted):
#: site -> {backend name: how it was decided}; site-less calls under None in COMPILED_NO_SITE.
COMPILED_DECISIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
COMPILED_NO_SITE: Dict[str, str] = {}


def compiled_decisions_of(site) -> Dict[str, str]:
    """{backend name: how it was decided} for the calls of ``site`` traced under torch.compile (None:
    calls made with no site)."""
    return dict(COMPILED_DECISIONS.get(site, {})) if site is not None else dict(COMPILED_NO_SITE)


def clear_compiled_decisions() -> None:
    COMPILED_DECISIONS.clear()
    COMPILED_NO_SITE.clear()


def _static_call(static: tuple, lengths: tuple) -> Tuple[Call, Optional[str]]:
    """The Call of a traced call: the static facts and representative lengths (see `_representatives`)."""
    (layout, dtype, device, heads_q, heads_kv, head_dim, head_dim_v, batch_is_1, mask, is_causal, has_dropout,
     grad, contiguous, features) = static
    dropout = 0.5 if has_dropout else 0.0  # decisions depend only on dropout_p > 0; runners get the real one
    sq, skv = lengths
    b = 1 if batch_is_1 else 2
    if layout == "bnsd":
        shapes = ((b, heads_q, sq, head_dim), (b, heads_kv, skv, head_dim), (b, heads_kv, skv, head_dim_v))
    else:
        shapes = ((b, sq, heads_q, head_dim), (b, skv, heads_kv, head_dim), (b, skv, heads_kv, head_dim_v))
    mmeta = None
    if mask is not None:
        pattern, mdtype = mask  # per 4-D dim: True = size 1, else the call's size
        full = (b, heads_q, sq, skv)
        mmeta = (tuple(1 if one else n for one, n in zip(pattern, full)), mdtype, device)
    meta = shapes + ((dtype, dtype, dtype), (device, device, device), mmeta, contiguous)
    call, spec = call_from_meta(meta, layout, is_causal, None, dropout, grad, compiling=True,
                                features=Features(*features))
    return dataclasses.replace(call, symbolic_lengths=True), spec


def _length_limits_of(backends, static) -> Tuple[Tuple[int, ...], bool]:
    """The length limits (MIN_SEQ_Q/MIN_SEQ_KV > 1) of ``backends``, and whether one of them needs the
    relation between seq_q and seq_kv."""
    limits = set()
    relation = False
    for b in backends:
        for n in (b.MIN_SEQ_Q, b.MIN_SEQ_KV):
            if n > 1:
                limits.add(n)
        relation = relation or b.NEEDS_LENGTH_RELATION or not b.SUPPORTS_CROSS
    return tuple(sorted(limits)), relation


def _compile_limits(static, backend, ctx, site):
    """Run at trace time: the length limits the decision for this static call depends on. Only
    backends that could serve the call (available, right device and dtype, lossy only with the opt-in)
    are asked, so a CPU model never guards on lengths."""
    ctx = controls.scope_by_token(ctx) if not (isinstance(ctx, str) and ctx == _READ_CONTEXT_AT_TRACE) else _CONTEXT.get()
    site = controls.scope_by_token(site)
    env = controls.env_settings()
    names, _source, _strict, allow_lossy = _resolve(_arg_names(backend), ctx, site, env)
    probe, _ = _static_call(static, (1, 1))
    named = set(names) if names != AUTO else set()
    relevant = []
    for b in registry.all_backends():
        if b.availability() or probe.device_type not in b.SUPPORTED_DEVICES or probe.dtype not in b.SUPPORTED_DTYPES:
            continue
        if b.NAME not in named and (registry.auto_priority(b, probe) is None or (b.LOSSY and not allow_lossy)):
            continue
        relevant.append(b)
    return _length_limits_of(relevant, static)


def _compile_decision(static, lengths, backend, ctx, site):
    """Run eagerly while torch.compile traces (see `_traced_forward`): validate, decide, and return
    only constants (backend name, the Call's fields, the mask form, how it was decided)."""
    ctx = _CONTEXT.get() if isinstance(ctx, str) and ctx == _READ_CONTEXT_AT_TRACE else controls.scope_by_token(ctx)
    site = controls.scope_by_token(site)
    if site is not None and site.site is not None and site.site in SITE_PLANNERS:
        raise BackendUnsupportedError(
            f"attnpatch: {getattr(site.site, 'path', 'a site')} is context parallel (apply(..., parallel=...)), which "
            "runs eagerly: torch.compile of a context-parallel model is not supported; compile without parallel=")
    call, _spec = _static_call(static, lengths)
    arg_names = _arg_names(backend)
    dkey = (call.signature(), call.heads_q, call.heads_kv, arg_names, ctx, site, controls.env_settings())
    decision = _TRACED_DECISIONS.get(dkey)
    if decision is None:
        decision = decide(call, arg_names, ctx, site)
        _TRACED_DECISIONS[dkey] = decision
    _warn_fallback(decision)
    how = decision.source
    owner = site.site if site is not None else None
    if owner is None:
        COMPILED_NO_SITE[decision.backend.NAME] = how
    else:
        COMPILED_DECISIONS.setdefault(owner, {})[decision.backend.NAME] = how
    return decision.backend.NAME, tuple(getattr(call, f) for f in _CALL_FIELDS)


def assume_constant_result(fn):
    """``torch._dynamo.assume_constant_result`` without importing dynamo when attnpatch is imported (a
    2 s cost): dynamo runs a function so marked at trace time and keeps its result as a constant. The
    mark is the attribute torch's own decorator sets (tests/test_compile_shapes.py checks that it is)."""
    fn._dynamo_marked_constant = True
    return fn


_compile_limits = assume_constant_result(_compile_limits)
_compile_decision = assume_constant_result(_compile_decision)


def _known(cond) -> bool:
    """A size comparison made while tracing: True only when it holds (a guard for dynamo where the size
    is symbolic); False where it cannot be known (a data-dependent size), never an error. Uses torch's
    ``guard_or_false`` (imported by dynamo and export, so not imported here)."""
    guard = getattr(getattr(getattr(torch.fx, "experimental", None), "symbolic_shapes", None), "guard_or_false", None)
    if guard is None:  # pragma: no cover - torch without it
        return True if cond else False
    return True if guard(cond) else False


#: torch >= 2.14's dynamo traces ContextVar.get and guards on its value (a use_backend() block
#: around a compiled call then recompiles for its setting); older dynamo cannot trace it at all, so
#: the trace-time functions read the use_backend() state themselves, eagerly, at trace time: the
#: setting at the first trace is compiled in (call torch._dynamo.reset() after changing it).
_DYNAMO_GUARDS_CONTEXTVARS = registry.version_at_least(torch.__version__, "2.14")
_READ_CONTEXT_AT_TRACE = "attnpatch: read use_backend() state at trace time"


def _representatives(sq, skv, limits, relation, exporting):
    """Representative (seq_q, seq_kv) for a traced call: on the same side of every limit as the real
    lengths (a comparison dynamo turns into a guard), 1 where a length is 1, and in the same order
    when a backend needs the relation. Under torch.export no length is compared (an exported program
    must hold for every length in its range): lengths then count as 1, so length-limited backends refuse."""
    def rep(n):
        if _known(n == 1):
            return 1
        if exporting:
            return 2
        out = 2
        for t in limits:
            if _known(n >= t):
                out = t
        return out

    rq, rkv = rep(sq), rep(skv)
    if relation and not exporting:
        if _known(sq == skv):
            rkv = rq
        elif _known(sq < skv):
            if rq >= rkv:
                rkv = rq + 1
        elif rq <= rkv:
            rq = rkv + 1
    elif relation and exporting and rq == rkv:
        rkv = rq + 1  # unknown order: counts as cross-attention
    return rq, rkv


def _is_one(n) -> bool:
    return _known(n == 1)


def _mask_pattern(m, b, h, sq, skv, layout):
    """Per 4-D dim of a traced mask: True where it has size 1 (a broadcast dim); and its form."""
    n = m.dim()
    if n == 2:
        # attnpatch's (b, s_kv) key padding, or SDPA's (s_q, s_kv): which size matches decides
        padding = _known(m.shape[0] == b) and not (_known(m.shape[0] == sq) and not _is_one(b))
        if padding:
            return (_is_one(m.shape[0]), True, True, _is_one(m.shape[1])), "key_padding"
        return (True, True, _is_one(m.shape[0]), _is_one(m.shape[1])), "as_is"
    if n > 4 or n == 0:
        raise AttentionInputError(f"attnpatch.attention_forward: attn_mask must have 1 to 4 dims, got {n}")
    shape = (1,) * (4 - n) + tuple(m.shape)
    return tuple(_is_one(d) for d in shape), "as_is"


def _traced_forward(site, query, key, value, layout, attn_mask, is_causal, scale, dropout_p, backend,
                    features, sinks):
    """The path torch.compile and torch.export trace: the decision is made once per trace from static
    facts (guarded by dynamo on the scopes and on the length limits that matter), and the chosen
    backend's runner is traced into the graph."""
    if query.dim() != 4:
        lead_rank = query.dim() - 3
        if lead_rank < 0 or key.dim() != query.dim() or value.dim() != query.dim():
            raise AttentionInputError("attnpatch.attention_forward: query, key and value must have the same rank, 3 or more")

        def to4(t):
            return t.reshape((-1,) + tuple(t.shape[-3:])) if lead_rank else t[None]
        out = _traced_forward(site, to4(query), to4(key), to4(value), layout, attn_mask, is_causal, scale,
                              dropout_p, backend, features, sinks)
        res, lse = out if isinstance(out, tuple) else (out, None)
        res = res.reshape(tuple(query.shape[:-3]) + tuple(res.shape[1:])) if lead_rank else res[0]
        return res if lse is None else (res, lse.reshape(tuple(query.shape[:-3]) + tuple(lse.shape[1:])) if lead_rank else lse[0])
    # a literal for no features: reading NO_FEATURES' fields would add guards on that global to every call
    # With dynamic=True dynamo holds a Python int or float that is not a literal in the traced code (a
    # closure's, a config's) as symbolic, and the decision's static key must be constants: window edges
    # are specialised (index(): a guard); softcap's value takes no part in any decision, so the key holds
    # 1.0 for it and the runner gets the real (maybe symbolic) value
    feats = (None, None, False, False) if features is None else (
        None if features.window is None else tuple(None if e is None else operator.index(e) for e in features.window),
        None if features.softcap is None else 1.0, features.sinks, features.return_lse)  # a literal: a global
    # float would itself be symbolic under dynamic=True
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    b, hq, sq, d = split_dims(layout, query.shape)
    _, hk, skv, _ = split_dims(layout, key.shape)
    dv = split_dims(layout, value.shape)[3]
    mask = None
    spec = None
    if attn_mask is not None:
        pattern, spec = _mask_pattern(attn_mask, b, hq, sq, skv, layout)
        mask = (pattern, attn_mask.dtype)
    # control flow turns a (possibly symbolic) comparison into a plain bool (a guard if needed)
    contiguous = _known(query.stride(-1) == 1) and _known(key.stride(-1) == 1) and _known(value.stride(-1) == 1)
    batch_is_1 = _is_one(b)
    has_dropout = True if dropout_p > 0 else False  # dropout_p may be a symbolic float (dynamic=True)
    # head dims and head counts are static facts (operator.index specialises a size dynamo holds as
    # symbolic); batch and sequence sizes are never specialised
    static = (layout, query.dtype, query.device, operator.index(hq), operator.index(hk), operator.index(d),
              operator.index(dv), batch_is_1, mask, is_causal, has_dropout, grad, contiguous,
              feats)
    if _DYNAMO_GUARDS_CONTEXTVARS:
        # read only once a use_backend() block was entered: a guard on the context variable is a Python call
        ctx = _CONTEXT.get() if controls.USE_BACKEND_ENTERED else None
        ctx = None if ctx is None else ctx.token
    else:
        ctx = _READ_CONTEXT_AT_TRACE
    bk = backend if backend is None or isinstance(backend, str) else tuple(backend)
    token = None if site is None else site.token
    limits, relation = _compile_limits(static, bk, ctx, token)
    lengths = _representatives(sq, skv, limits, relation, torch.compiler.is_exporting())
    name, fields = _compile_decision(static, lengths, bk, ctx, token)
    call = Call(*fields)
    if features is not None and features.softcap is not None:
        call = dataclasses.replace(call, softcap=features.softcap)
    chosen = registry.get_backend(name)
    run = _wrap(chosen.build(_build_call_for(chosen, call)), call, spec, chosen)
    if sinks is None:
        return run(query, key, value, attn_mask, is_causal, scale, dropout_p)
    return run(query, key, value, attn_mask, is_causal, scale, dropout_p, sinks)


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
            scale=None, dropout_p: float = 0.0, backend=None, site: Optional[Scope] = None, window=None,
            softcap=None, sinks=None, return_lse: bool = False) -> Explanation:
    """Which backend `attention_forward` would use for these arguments, and why each other backend was
    refused. Recomputes everything (no cache); raises the same errors the call would. ``site`` is a
    patched site's scope (adapters and the CLI pass it)."""
    if attn_mask is not None and type(attn_mask) is not torch.Tensor:
        attn_mask, is_causal, window = causal_bias_args(attn_mask, is_causal, window)
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    features = make_features(window, softcap, sinks, return_lse) or NO_FEATURES
    call, _ = build_call(query, key, value, layout, attn_mask, is_causal, scale, dropout_p, grad, False, features)
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


def iter_counts(site=...):
    """Yield (site, backend name, fallback, calls) over live and retired plans (of one ``site`` when
    given; None is the site-less calls)."""
    with _LOCK:
        if site is ...:
            retired = [(s, k, n) for s, c in _RETIRED.items() for k, n in c.items()]
            retired += [(None, k, n) for k, n in _RETIRED_NO_SITE.items()]
        elif site is None:
            retired = [(None, k, n) for k, n in _RETIRED_NO_SITE.items()]
        else:
            retired = [(site, k, n) for k, n in _RETIRED.get(site, Counter()).items()]
        seen = set()
        live = []
        for p in list(_PLANS.values()) + list(_BUCKETS.values()):
            if p.calls and id(p) not in seen and (site is ... or p.site is site):
                seen.add(id(p))
                live.append((p.site, p.backend.NAME, p.decision.fallback, p.calls))
    for s, (name, fallback), n in retired:
        yield s, name, fallback, n
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
            _RETIRED_NO_SITE.clear()
            for p in list(_PLANS.values()) + list(_BUCKETS.values()):
                p.calls = 0
    return Stats(dict(calls), dict(fallbacks))
