"""Scoped redirection of attention calls: a copy of a function whose global names resolve to
attnpatch's replacements, for one patched site only.

`rebind(fn, replacements)` returns a new function with ``fn``'s code, defaults and closure, and a
copy of its module's globals in which some names are replaced (e.g. ``F`` by a proxy of
torch.nn.functional whose ``scaled_dot_product_attention`` is the site's router call). The original
function, its module and torch.nn.functional are untouched; only code that attnpatch installed on a
patched module or processor runs the copy.
"""

from __future__ import annotations

import itertools
import sys
import types
import weakref
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

_SDPA = F.scaled_dot_product_attention


class _ProxyModule(types.ModuleType):
    """A module object that serves ``overrides`` and falls back to ``real`` for everything else."""

    def __init__(self, real: types.ModuleType, overrides: Dict[str, object]):
        super().__init__(real.__name__, getattr(real, "__doc__", None))
        self.__dict__.update({k: v for k, v in real.__dict__.items() if k not in ("__getattr__",)})
        self.__dict__.update(overrides)
        self.__dict__["_attnpatch_real"] = real

    def __getattr__(self, name):
        return getattr(self.__dict__["_attnpatch_real"], name)


def functional_proxy(sdpa: Callable) -> types.ModuleType:
    """torch.nn.functional with ``scaled_dot_product_attention`` replaced by ``sdpa``."""
    return _ProxyModule(F, {"scaled_dot_product_attention": sdpa})


def torch_proxy(functional: types.ModuleType) -> types.ModuleType:
    """torch with ``torch.nn.functional`` replaced by ``functional`` (for code that writes
    ``torch.nn.functional.scaled_dot_product_attention``)."""
    nn = _ProxyModule(torch.nn, {"functional": functional})
    return _ProxyModule(torch, {"nn": nn})


def sdpa_replacements(fn: Callable, sdpa: Callable, extra: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """The global names of ``fn`` that lead to F.scaled_dot_product_attention, mapped to replacements:
    the torch.nn.functional module (any alias), the function itself (``from ... import``), and torch."""
    g = fn.__globals__
    names = set(fn.__code__.co_names)
    out: Dict[str, object] = {}
    functional = None
    for name in names:
        value = g.get(name)
        if value is F:
            functional = functional or functional_proxy(sdpa)
            out[name] = functional
        elif value is _SDPA:
            out[name] = sdpa
        elif value is torch and "nn" in names:
            functional = functional or functional_proxy(sdpa)
            out[name] = torch_proxy(functional)
        elif value is torch.nn and "functional" in names:  # nn.functional.scaled_dot_product_attention
            functional = functional or functional_proxy(sdpa)
            out[name] = torch_proxy(functional).nn
    if extra:
        for name, value in extra.items():
            if name in names:
                out[name] = value
    return out


def calls_sdpa(fn: Callable) -> bool:
    """True when ``fn``'s own code names scaled_dot_product_attention (F.…, torch.nn.functional.… or
    an imported alias of the function)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    if "scaled_dot_product_attention" in code.co_names:
        return True
    return any(fn.__globals__.get(n) is _SDPA for n in code.co_names)


_COUNTER = itertools.count()


def rebind(fn: Callable, replacements: Dict[str, object], owner=None) -> Callable:
    """A copy of plain function ``fn`` (with its own code object) whose globals have ``replacements`` applied.

    The copied globals are the ``__dict__`` of a private module registered in ``sys.modules`` under
    a unique name: torch.compile (dynamo) finds a function's globals by importing ``__name__``, so they
    must be importable to be traced and guarded. ``owner`` (a patched `Site`) records the name in
    ``owner.state["rebound_modules"]``, and removing the patch unregisters it (`unregister`); without
    an owner the module goes when the copy is garbage-collected.
    """
    if isinstance(fn, types.MethodType):
        raise TypeError("rebind expects a plain function (use type(obj).method), got a bound method")
    original = str(fn.__globals__.get("__name__", "module")).replace(".", "_")
    name = f"_attnpatch_rebound_{next(_COUNTER)}_{original}"
    module = types.ModuleType(name)
    g = module.__dict__
    g.update(fn.__globals__)
    g.update(replacements)
    g["__name__"] = name
    g.pop("__spec__", None)
    g.pop("__loader__", None)
    # A code object of its own: dynamo caches compiled frames per code object and installs their
    # helpers in the globals of the frame it compiled first, so two copies sharing one code object but
    # not their globals would look those helpers up in the wrong globals after a graph break.
    new = types.FunctionType(fn.__code__.replace(), g, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    new.__wrapped__ = fn
    new.__annotations__ = fn.__annotations__
    sys.modules[name] = module
    weakref.finalize(new, sys.modules.pop, name, None)
    if owner is not None:
        owner.state.setdefault("rebound_modules", []).append(name)
    return new


def unregister(site) -> None:
    """Take the private modules of ``site``'s rebound functions out of ``sys.modules`` (at removal:
    they would otherwise keep the functions, and through them the site, alive)."""
    for name in site.state.pop("rebound_modules", ()):
        sys.modules.pop(name, None)


def sdpa_for_site(site) -> Callable:
    """A drop-in for F.scaled_dot_product_attention that routes this site's calls to the router.

    Keeps SDPA's semantics: a 2-D mask is (s_q, s_kv); inputs of rank 3 and higher are (…, heads, seq,
    dim); torch's ``CausalBias`` masks are understood. ``enable_gqa`` is not needed: the router serves
    GQA whenever key/value have fewer heads."""
    from . import router

    route = router.route
    Tensor = torch.Tensor

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        features = None
        if attn_mask is not None:
            if type(attn_mask) is not Tensor:
                attn_mask, is_causal, window = router.causal_bias_args(attn_mask, is_causal, None)
                features = router.make_features(window)
            if attn_mask is not None and attn_mask.dim() == 2:
                attn_mask = attn_mask[None, None]
        return route(site.scope, query, key, value, "bnsd", attn_mask, is_causal, scale, dropout_p, None, features)

    return scaled_dot_product_attention
