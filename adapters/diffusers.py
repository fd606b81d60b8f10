"""diffusers adapter: every attention module of a diffusers model runs its kernel through attnpatch.

What it recognises (``find_sites``):

* **processor sites** — any module with an instance-level ``processor`` (diffusers' ``Attention``,
  ``MochiAttention``, every ``AttentionModuleMixin`` class such as ``FluxAttention`` or ``WanAttention``,
  and user modules that follow the same convention). The processor class's functions that reach
  attention — ``dispatch_attention_fn`` (Flux, Flux2, QwenImage, Wan, HunyuanVideo, LTX, Chroma, Z-Image,
  …), ``F.scaled_dot_product_attention`` (``attention_processor.py``: all UNets, SD3, CogVideoX, PixArt,
  Sana, AuraFlow, Mochi, Lumina2, HunyuanDiT, CogView4, HiDream, OmniGen, the VAEs' blocks), or a
  module-level helper that calls one of them (Flux2's ``_flux2_kv_causal_attention``) — are found by
  reading their code, once per class.
* **method sites** — diffusers modules without a processor whose own methods call SDPA or the
  dispatcher (the Wan / QwenImage / HunyuanImage VAE attention blocks, ``VidTokAttnBlock.attention``,
  ``MochiAttentionPool``, Kolors' ChatGLM ``CoreAttention``).
* Processors that compute attention another way (``AttnProcessor``'s baddbmm + softmax, the xFormers,
  sliced, NPU and XLA processors, custom ones) are reported as not routed, with the fix.

How a site is routed (``patch_site``): the processor object (or, for a method site, the module) gets a
new class through `UndoLog.set_class`: a per-site subclass of its class whose attention functions are
copies of the originals (`attnpatch.rebind.rebind`: same code, defaults and closure) whose globals
resolve ``dispatch_attention_fn`` to `dispatch_for_site` and ``F`` / ``torch`` / ``scaled_dot_product_attention``
to `attnpatch.rebind.sdpa_for_site`, both of which call `attnpatch.router.route` with the site's scope.
Only the kernel changes: projections, norms, RoPE, IP-Adapter, LoRA layers, fused QKV, added KV and
masks are the processor's own code. ``inspect.signature(processor.__call__)`` is unchanged (diffusers
filters kwargs with it), the subclass keeps the class's name, and it pickles and deep-copies as the
original class (a copy of a patched model is an unpatched model). A processor object shared by several
modules (``set_attn_processor(one_instance)``) or already patched by another patch is shallow-copied for
each module (`UndoLog.set_attr`, restored on removal). Nothing outside the patched objects changes: not
``diffusers.models.attention_dispatch``, not torch.nn.functional, not other models.

diffusers' own backend selection is honoured: a backend set with ``set_attention_backend(...)`` (before
or after apply) or an ``attention_backend(...)`` block is mapped to the attnpatch backend that runs the
same kernel (the names table, `attnpatch.aliases`) and passed to the router as an explicit choice (falling back, with a
counted reason, where it cannot serve a call), noted on the site with a warning once; a diffusers
backend with no attnpatch equivalent runs on diffusers' own dispatcher, counted on the site. A
processor set after apply (``set_attn_processor``, ``fuse_qkv_projections()``) is routed to the same
site (the module's per-site class wraps ``set_processor``), or the site is reported not routed. Calls attnpatch cannot serve go to the original
``dispatch_attention_fn`` unchanged and are counted on the site (``Site.bypassed``, shown by
``report()``) with a warning once per reason: context parallelism (``parallel_config``), extra
``attention_kwargs`` (e.g. ``return_lse``), and flex ``BlockMask`` masks.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import types
import weakref
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from attnpatch import router
from attnpatch.patch import SITE_ATTR, Adapter, Site, SiteMatch, UndoLog, is_site_class, original_class, own_attr, site_class
from attnpatch.rebind import _ProxyModule, functional_proxy, rebind, sdpa_for_site, torch_proxy

logger = logging.getLogger("attnpatch")

_SDPA = F.scaled_dot_product_attention
_MAX_HELPER_DEPTH = 4

def join_path(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


@functools.lru_cache(maxsize=1)
def _dispatch_module():
    """diffusers.models.attention_dispatch, or None when diffusers is not importable."""
    try:
        from diffusers.models import attention_dispatch
    except Exception:  # not installed, or broken: the adapter is then unavailable
        return None
    return attention_dispatch


def _dispatch_fn():
    mod = _dispatch_module()
    return None if mod is None else mod.dispatch_attention_fn


# -- reading code: which functions reach attention ---------------------------------------------------

def _code_objects(code: types.CodeType):
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _code_objects(c)


def _names(fn) -> set:
    """Every global/attribute name used by ``fn``'s code, nested functions included (a nested
    function created while the copy runs gets the copy's globals)."""
    out = set()
    for c in _code_objects(fn.__code__):
        out.update(c.co_names)
    return out


class FnPlan:
    """How to make a routed copy of one plain function: which of its global names to replace, each
    with ``"dispatch"`` (the dispatch function), ``"dispatch_module"`` (attention_dispatch used as
    ``mod.dispatch_attention_fn``), ``"sdpa"`` (an imported alias of SDPA), ``"F"`` (a
    torch.nn.functional alias), ``"torch"`` (torch, used as torch.nn.functional.…), ``"nn"`` (torch.nn,
    used as nn.functional.…) or another FnPlan
    (a helper function that reaches attention)."""

    __slots__ = ("fn", "replace")

    def __init__(self, fn, replace: Dict[str, Any]):
        self.fn = fn
        self.replace = replace

    def kinds(self) -> set:
        out = set()
        for v in self.replace.values():
            out |= v.kinds() if isinstance(v, FnPlan) else {"dispatch" if v.startswith("dispatch") else "sdpa"}
        return out


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # function -> FnPlan or False


def plan_for(fn, depth: int = 0) -> Optional[FnPlan]:
    """The FnPlan of plain function ``fn``, or None when its code does not reach attention."""
    if not isinstance(fn, types.FunctionType):
        return None
    cached = _PLANS.get(fn)
    if cached is not None:
        return cached or None
    _PLANS[fn] = False  # recursion guard (mutually recursive helpers)
    names = _names(fn)
    g = fn.__globals__
    dispatch = _dispatch_fn()
    dmod = _dispatch_module()
    replace: Dict[str, Any] = {}
    for name in names:
        if name not in g:
            continue
        value = g[name]
        if dispatch is not None and value is dispatch:
            replace[name] = "dispatch"
        elif dmod is not None and value is dmod and "dispatch_attention_fn" in names:
            replace[name] = "dispatch_module"
        elif value is _SDPA:
            replace[name] = "sdpa"
        elif value is F and "scaled_dot_product_attention" in names:
            replace[name] = "F"
        elif value is torch and "scaled_dot_product_attention" in names and "functional" in names:
            replace[name] = "torch"
        elif value is torch.nn and "scaled_dot_product_attention" in names and "functional" in names:
            replace[name] = "nn"  # nn.functional.scaled_dot_product_attention (HunyuanVideo 1.5's VAE)
        elif (isinstance(value, types.FunctionType) and depth < _MAX_HELPER_DEPTH
              and not (value.__module__ or "").startswith("torch")):
            sub = plan_for(value, depth + 1)
            if sub is not None:
                replace[name] = sub
    plan = FnPlan(fn, replace) if replace else None
    _PLANS[fn] = plan or False
    return plan


_STOP_CLASSES = (object, torch.nn.Module)


def class_plans(cls: type) -> Dict[str, Tuple[str, FnPlan]]:
    """The functions of ``cls`` (through its MRO, stopping at torch.nn.Module) that reach attention:
    name -> (wrapper kind "function" / "staticmethod" / "classmethod", plan). Cached per class."""
    cached = _CLASS_PLANS.get(cls)
    if cached is not None:
        return cached
    out: Dict[str, Tuple[str, FnPlan]] = {}
    seen = set()
    for klass in cls.__mro__:
        if klass in _STOP_CLASSES:
            break
        for name, attr in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            kind, fn = "function", attr
            if isinstance(attr, staticmethod):
                kind, fn = "staticmethod", attr.__func__
            elif isinstance(attr, classmethod):
                kind, fn = "classmethod", attr.__func__
            plan = plan_for(fn)
            if plan is not None:
                out[name] = (kind, plan)
    _CLASS_PLANS[cls] = out
    return out


_CLASS_PLANS: "weakref.WeakKeyDictionary[type, Dict[str, Tuple[str, FnPlan]]]" = weakref.WeakKeyDictionary()


# -- the per-site replacements -----------------------------------------------------------------------

def _bypass(site: Site, reason: str) -> None:
    if torch.compiler.is_compiling():
        return
    record = getattr(site, "record_bypass", None)
    if record is not None:
        record(reason)


def diffusers_backend_to_attnpatch(value: str) -> Optional[str]:
    """The attnpatch backend that runs diffusers' backend ``value`` (an ``AttentionBackendName`` value),
    from attnpatch's one name table (`attnpatch.aliases`); None when attnpatch has no such kernel."""
    from attnpatch import aliases, registry

    if value in registry.backend_names():
        return value
    entry = aliases.alias(value)
    return entry.backend if entry is not None else None


def _registry_class():
    mod = _dispatch_module()
    return getattr(mod, "_AttentionBackendRegistry", None) if mod is not None else None


def _backend_value(backend) -> str:
    return str(getattr(backend, "value", backend))


def dispatch_for_site(site: Site, original: Callable) -> Callable:
    """A drop-in for diffusers' ``dispatch_attention_fn`` that routes this site's calls to the router.

    Same signature as diffusers 0.42's function (plus ``**kwargs`` for arguments of later versions);
    inputs are (batch, seq, heads, head_dim). Masks keep the native path's meaning: a 2-D mask of shape
    (batch, seq_kv) is a key-padding mask, any other 2-D mask is SDPA's (seq_q, seq_kv), 3-D and 4-D
    masks broadcast as in SDPA; bool masks are True = attend, float masks are added. ``backend``
    (diffusers' per-processor or hard-coded choice, or an ``attention_backend(...)`` block) is honoured:
    mapped to attnpatch's backend for the same kernel (`attnpatch.aliases`). Calls attnpatch cannot
    serve run the original function and are counted on the site."""
    route = router.route
    Tensor = torch.Tensor
    registry_cls = _registry_class()
    # diffusers' "no choice": its dispatcher then runs torch's SDPA (set_attention_backend on any model,
    # and attention_backend(...), set the process-wide active backend, which diffusers itself honours)
    default_active = _dispatch_module().AttentionBackendName.NATIVE if registry_cls is not None else None
    honoured: Dict[str, Optional[str]] = {}

    def attnpatch_name(backend) -> Optional[str]:
        """The attnpatch backend for a diffusers backend the user chose (set_attention_backend on the
        processor, or the attention_backend(...) context manager): honoured, noted on the site."""
        value = _backend_value(backend)
        name = honoured.get(value, ...)
        if name is ...:
            name = diffusers_backend_to_attnpatch(value)
            honoured[value] = name
            what = f"diffusers attention backend {value!r} (set_attention_backend / attention_backend)"
            if name is None:
                site.note = f"{what} has no attnpatch equivalent: those calls run on diffusers' dispatcher"
            else:
                site.note = f"{what} honoured as attnpatch backend {name!r}"
            logger.warning("attnpatch: %s: %s", site.path, site.note)
        return name

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None,
                              **kwargs):
        if backend is None and registry_cls is not None and registry_cls._active_backend != default_active:
            backend = registry_cls._active_backend  # inside diffusers' attention_backend(...) block
        chosen = None
        if backend is not None:
            chosen = attnpatch_name(backend)
            if chosen is None:
                _bypass(site, f"diffusers attention backend {_backend_value(backend)!r} has no attnpatch equivalent")
                return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                attention_kwargs, backend=backend, parallel_config=parallel_config, **kwargs)
        if parallel_config is not None or attention_kwargs or kwargs or (
                attn_mask is not None and not isinstance(attn_mask, Tensor)):
            if parallel_config is not None:
                why = "context parallelism (parallel_config) runs on diffusers' own dispatcher"
            elif attention_kwargs:
                why = f"attention_kwargs {sorted(attention_kwargs)} are diffusers-backend options attnpatch does not serve"
            elif kwargs:
                why = f"unknown dispatch_attention_fn arguments {sorted(kwargs)}"
            else:
                why = f"attn_mask of type {type(attn_mask).__name__} (not a tensor) runs on diffusers' own dispatcher"
            _bypass(site, why)
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                            backend=backend, parallel_config=parallel_config, **kwargs)
        if attn_mask is not None and attn_mask.dim() == 2:
            if attn_mask.shape[0] == query.shape[0] and attn_mask.shape[1] == key.shape[1]:
                attn_mask = attn_mask[:, None, None, :]  # (batch, seq_kv) key padding, as diffusers' native path
            else:
                attn_mask = attn_mask[None, None]  # SDPA's (seq_q, seq_kv)
        return route(site.scope, query, key, value, "bsnd", attn_mask, is_causal, scale, dropout_p, chosen)

    dispatch_attention_fn.__wrapped__ = original
    return dispatch_attention_fn


class _SiteFunctions:
    """The replacement objects of one site, shared by every function copied for it."""

    def __init__(self, site: Site):
        self.site = site
        self.sdpa = sdpa_for_site(site)
        original = _dispatch_fn()
        self.dispatch = dispatch_for_site(site, original) if original is not None else None
        self._functional = None
        self._torch = None
        self._dmod = None
        self._copies: Dict[int, Callable] = {}

    def value(self, how):
        if how == "dispatch":
            return self.dispatch
        if how == "sdpa":
            return self.sdpa
        if how == "F":
            if self._functional is None:
                self._functional = functional_proxy(self.sdpa)
            return self._functional
        if how == "torch":
            if self._torch is None:
                self._torch = torch_proxy(self.value("F"))
            return self._torch
        if how == "nn":
            return self.value("torch").nn
        if how == "dispatch_module":
            if self._dmod is None:
                self._dmod = _ProxyModule(_dispatch_module(), {"dispatch_attention_fn": self.dispatch})
            return self._dmod
        raise ValueError(how)

    def copy_of(self, plan: FnPlan) -> Callable:
        """The routed copy of ``plan.fn`` (helpers are copied once per site)."""
        key = id(plan.fn)
        got = self._copies.get(key)
        if got is not None:
            return got
        replacements: Dict[str, Any] = {}
        new = rebind(plan.fn, replacements, self.site)  # placeholder first: helpers may recurse into it
        self._copies[key] = new
        for name, how in plan.replace.items():
            new.__globals__[name] = self.copy_of(how) if isinstance(how, FnPlan) else self.value(how)
        return new


def routed_class(orig: type, site: Site) -> type:
    """The per-site subclass of ``orig`` whose attention functions route to ``site``."""
    cache = site.state.setdefault("diffusers.routed_classes", {})
    cls = cache.get(orig)
    if cls is not None:
        return cls
    funcs = _SiteFunctions(site)
    ns: Dict[str, Any] = {SITE_ATTR: weakref.ref(site)}
    for name, (kind, plan) in class_plans(orig).items():
        fn = funcs.copy_of(plan)
        ns[name] = staticmethod(fn) if kind == "staticmethod" else classmethod(fn) if kind == "classmethod" else fn
    cls = site_class(orig, ns)
    cache[orig] = cls
    return cls




def is_routed_class(cls: type) -> bool:
    return is_site_class(cls)


# -- site info -----------------------------------------------------------------------------------------

def _int_attr(module, *names) -> Optional[int]:
    for n in names:
        v = own_attr(module, n)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def site_shape(module) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(heads, kv heads, head dim) of a diffusers attention module, where its attributes tell."""
    heads = _int_attr(module, "heads", "num_heads", "n_heads", "num_attention_heads")
    head_dim = _int_attr(module, "head_dim", "dim_head", "attention_head_dim")
    inner = _int_attr(module, "inner_dim")
    if head_dim is None and heads and inner and inner % heads == 0:
        head_dim = inner // heads
    kv = _int_attr(module, "kv_heads", "num_kv_heads", "num_key_value_heads")
    if kv is None and head_dim:
        inner_kv = _int_attr(module, "inner_kv_dim")
        if inner_kv and inner_kv % head_dim == 0:
            kv = inner_kv // head_dim
    if kv is None:
        kv = heads
    return heads, kv, head_dim


def site_kind(module) -> str:
    """self / cross / joint from the module's attributes (diffusers' own flags)."""
    if getattr(module, "is_cross_attention", False) is True:
        return "cross"
    if getattr(module, "added_kv_proj_dim", None) is not None or getattr(module, "add_k_proj", None) is not None:
        return "joint"
    return "self"


def processor_of(module: torch.nn.Module):
    """The module's instance-level ``processor`` (in ``__dict__`` or ``_modules``), or None."""
    proc = module.__dict__.get("processor")
    if proc is None:
        proc = module.__dict__.get("_modules", {}).get("processor")
    return proc if proc is not None and callable(proc) else None


_NOT_ROUTED_HINTS = (
    ("xformers", "calls xformers directly; use AttnProcessor2_0 (model.set_attn_processor(AttnProcessor2_0())) "
                 "so that attnpatch can route it (xformers is an attnpatch backend)"),
    ("sliced", "slices attention and computes each slice with baddbmm + softmax; disable attention slicing "
               "(pipe.disable_attention_slicing()) so that attnpatch can route it"),
    ("linear", "computes linear attention (no softmax, e.g. Sana's self-attention): there is no softmax "
               "attention kernel to route, so it is left as is"),
    ("npu", "calls torch_npu's fused attention directly"),
    ("xla", "calls the XLA flash-attention kernel directly"),
)


def not_routed_note(proc) -> str:
    name = type(proc).__name__
    low = name.lower()
    for key, hint in _NOT_ROUTED_HINTS:
        if key in low:
            return f"processor {name} {hint}"
    code_names = set()
    call = getattr(type(proc), "__call__", None)
    if isinstance(call, types.FunctionType):
        code_names = _names(call)
    if "get_attention_scores" in code_names or "baddbmm" in code_names or "softmax" in code_names:
        return (f"processor {name} computes softmax(q·kᵀ) itself (attn.get_attention_scores / baddbmm); "
                "set AttnProcessor2_0 (model.set_attn_processor(AttnProcessor2_0())) so that attnpatch can route it")
    return (f"processor {name} calls neither dispatch_attention_fn nor scaled_dot_product_attention "
            "(directly or through a helper), so attnpatch cannot route it")


def _from_diffusers(cls: type) -> bool:
    return (cls.__module__ or "").startswith("diffusers.")


# -- the adapter -----------------------------------------------------------------------------------------

class DiffusersAdapter(Adapter):
    NAME = "diffusers"
    PRIORITY = 100  # before the generic torch adapter (1000)

    def available(self) -> bool:
        try:
            if importlib.util.find_spec("diffusers") is None:
                return False
        except (ImportError, ValueError):  # e.g. sys.modules["diffusers"] = None
            return False
        return _dispatch_module() is not None

    def find_sites(self, root: torch.nn.Module, prefix: str) -> List[SiteMatch]:
        out: List[SiteMatch] = []
        holders: Counter = Counter()
        found = []
        for name, module in root.named_modules():
            path = join_path(prefix, name)
            proc = processor_of(module)
            if proc is not None:
                holders[id(proc)] += 1
                found.append(("processor", module, path, proc))
                continue
            cls = original_class(type(module))
            if _from_diffusers(cls) and class_plans(cls):
                found.append(("methods", module, path, None))
        for how, module, path, proc in found:
            heads, kv, head_dim = site_shape(module)
            kind = site_kind(module) if how == "processor" else "self"
            if how == "methods":
                out.append(SiteMatch(module, path, kind=kind, heads=heads, kv_heads=kv, head_dim=head_dim,
                                     data=("methods", None)))
                continue
            pcls = original_class(type(proc))
            if not class_plans(pcls):
                out.append(SiteMatch(module, path, kind=kind, heads=heads, kv_heads=kv, head_dim=head_dim,
                                     routed=False, note=not_routed_note(proc)))
                continue
            note = ""
            backend = getattr(proc, "_attention_backend", None)
            if backend is not None:
                value = getattr(backend, "value", backend)
                mapped = diffusers_backend_to_attnpatch(str(value))
                note = (f"diffusers attention backend {value!r} (set_attention_backend) honoured as attnpatch "
                        f"backend {mapped!r}" if mapped else
                        f"diffusers attention backend {value!r} (set_attention_backend) has no attnpatch "
                        "equivalent: those calls run on diffusers' dispatcher")
            shared = holders[id(proc)] > 1 or is_routed_class(type(proc))
            out.append(SiteMatch(module, path, kind=kind, heads=heads, kv_heads=kv, head_dim=head_dim, note=note,
                                 data=("processor", shared)))
        return out

    def patch_site(self, match: SiteMatch, site: Site, undo: UndoLog) -> None:
        how, shared = match.data
        module = match.module
        if how == "methods":
            cls = routed_class(original_class(type(module)), site)
            undo.set_class(module, cls)
            return
        proc = processor_of(module)
        if shared:
            proc = copy.copy(proc)  # a patched processor copies as its original class
            undo.set_attr(module, "processor", proc)
        cls = routed_class(original_class(type(proc)), site)
        undo.set_class(proc, cls)
        if callable(getattr(type(module), "set_processor", None)):
            undo.set_class(module, _module_class(original_class(type(module)), site, undo))


def _route_new_processor(module, site: Site, undo: UndoLog) -> None:
    """A processor set on a patched module after apply (``set_attn_processor``, ``fuse_qkv_projections``,
    PAG): route it to the same site, or report the site as not routed, with a warning, when it computes
    attention in a way attnpatch cannot reach."""
    proc = processor_of(module)
    if proc is None:
        return
    pcls = original_class(type(proc))
    if not class_plans(pcls):
        if site.routed:
            site.routed = False
            site.note = f"{not_routed_note(proc)} (set after apply)"
            logger.warning("attnpatch: %s: the processor set after apply is not routed: %s", site.path, site.note)
        return
    if is_site_class(type(proc)):  # one processor object set on several modules: each gets its copy
        proc = copy.copy(proc)
        undo.set_attr(module, "processor", proc)
    undo.set_class(proc, routed_class(pcls, site))
    if not site.routed and site.note.endswith("(set after apply)"):
        site.routed, site.note = True, ""


def _module_class(orig: type, site: Site, undo: UndoLog) -> type:
    """The per-site class of a patched attention module: its ``set_processor`` routes the processor it
    is given (so ``fuse_qkv_projections()`` and ``set_attn_processor(...)`` after apply stay routed)."""
    cache = site.state.setdefault("diffusers.module_classes", {})
    cls = cache.get(orig)
    if cls is None:
        set_processor = orig.set_processor
        undo_ref = weakref.ref(undo)

        def routed_set_processor(self, processor, *args, **kwargs):
            out = set_processor(self, processor, *args, **kwargs)
            log = undo_ref()
            if log is not None and len(log):  # the patch is live
                _route_new_processor(self, site, log)
            return out

        routed_set_processor.__wrapped__ = set_processor
        cls = site_class(orig, {"set_processor": routed_set_processor})
        cache[orig] = cls
    return cls


ADAPTER = DiffusersAdapter
