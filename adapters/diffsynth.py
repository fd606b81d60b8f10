"""DiffSynth-Studio adapter: route the attention calls of DiffSynth models to attnpatch, for the
patched model only.

DiffSynth models reach attention in three ways, all handled here:

* ``diffsynth.core.attention.attention_forward(q, k, v, q_pattern=..., ..., attn_mask=, scale=,
  is_causal=, window_size=, use_flex=, score_mod=)`` — DiffSynth's router (the seed of attnpatch);
* the Wan DiT's own ``flash_attention(q, k, v, num_heads)`` in ``diffsynth.models.wan_video_dit``
  (also imported by the Wan image encoder, MoT and LongCat models), which ignores DiffSynth's
  environment variable and picks FA3 / FA2 / Sage / SDPA by import;
* ``torch.nn.functional.scaled_dot_product_attention`` called directly.

A module is a site when one of its methods (``forward`` or another method defined on its DiffSynth
class, or a ``forward`` DiffSynth installed on the instance) names one of these, directly or through a
module-level DiffSynth helper function (followed up to three calls deep). For each such method the
module gets a copy of the method whose globals resolve those names to this site's replacements (see `attnpatch.rebind`); helpers are copied the same way. The copies live on a
per-site subclass the module is given (`attnpatch.patch.site_class`: same name, and copies or pickles
of the module are of DiffSynth's class, unpatched); a forward DiffSynth installed on the instance is
replaced on the instance. DiffSynth's modules, its functions and torch.nn.functional are never
modified, so other models and other code keep DiffSynth's own behaviour; `remove()` restores the
class and the instance attributes.

Calls that attnpatch cannot express are run on DiffSynth's own function and counted in the report
(`Site.record_bypass`), never dropped: flex attention with a block mask or ``score_mod``
(``use_flex=True``), and sliding windows too long to express as a dense mask.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch

from attnpatch import router
from attnpatch.patch import Adapter, Site, SiteMatch, UndoLog, original_class, own_attr, site_class
from attnpatch.rebind import _SDPA, functional_proxy, rebind, sdpa_for_site, torch_proxy

#: (module name, function name, kind) of DiffSynth's attention entry points replaced per site.
KNOWN_FUNCTIONS = (
    ("diffsynth.core.attention.attention", "attention_forward", "attention_forward"),
    ("diffsynth.models.wan_video_dit", "flash_attention", "wan_flash_attention"),
)

#: Most query × key positions for which a sliding window is routed as a dense boolean mask.
MAX_WINDOW_MASK_ELEMENTS = 1 << 26

#: How deep module-level helper functions are followed from a method.
MAX_HELPER_DEPTH = 3

_LAYOUT_OF_PATTERN = {"b n s d": "bnsd", "b s n d": "bsnd"}


def _join(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def _known() -> Dict[int, Tuple[Callable, str]]:
    """id(function) -> (function, kind) for the entry points whose modules are imported."""
    out = {}
    for mod_name, fn_name, kind in KNOWN_FUNCTIONS:
        mod = sys.modules.get(mod_name)
        fn = getattr(mod, fn_name, None) if mod is not None else None
        if fn is not None:
            out[id(fn)] = (fn, kind)
    return out


def _all_names(code: types.CodeType) -> set:
    """Global names used by ``code`` and by the functions, lambdas and comprehensions nested in it."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _all_names(const)
    return names


# A plan maps a function's global names to what replaces them for a site:
#   ("known", kind, original) | ("helper", function, plan) | ("functional",) | ("torch",) | ("sdpa",)
Plan = Dict[str, tuple]


def plan_function(fn: Callable, known: Dict[int, Tuple[Callable, str]], depth: int = 0,
                  seen: Optional[set] = None) -> Plan:
    """Which global names of ``fn`` lead to attention (empty when none)."""
    code = getattr(fn, "__code__", None)
    g = getattr(fn, "__globals__", None)
    if code is None or g is None:
        return {}
    seen = set() if seen is None else seen
    seen.add(id(fn))
    names = _all_names(code)
    plan: Plan = {}
    uses_sdpa_name = "scaled_dot_product_attention" in names
    for name in names:
        value = g.get(name)
        if value is None:
            continue
        hit = known.get(id(value))
        if hit is not None and hit[0] is value:
            plan[name] = ("known", hit[1], value)
        elif value is _SDPA:
            plan[name] = ("sdpa",)
        elif uses_sdpa_name and value is torch.nn.functional:
            plan[name] = ("functional",)
        elif uses_sdpa_name and value is torch and "nn" in names:
            plan[name] = ("torch",)
        elif (isinstance(value, types.FunctionType) and depth < MAX_HELPER_DEPTH and id(value) not in seen
              and (getattr(value, "__module__", "") or "").startswith("diffsynth.")):
            sub = plan_function(value, known, depth + 1, seen)
            if sub:
                plan[name] = ("helper", value, sub)
    return plan


def _method_plans(module: torch.nn.Module, known) -> List[Tuple[str, Callable, bool, Plan]]:
    """(attribute name, function, is_static, plan) for every method of ``module`` that leads to
    attention: methods defined on its DiffSynth classes, and a forward DiffSynth set on the instance."""
    out = []
    done = set()
    inst_fwd = module.__dict__.get("forward")
    if isinstance(inst_fwd, types.MethodType) and inst_fwd.__self__ is module:
        done.add("forward")
        plan = plan_function(inst_fwd.__func__, known)
        if plan:
            out.append(("forward", inst_fwd.__func__, False, plan))
    elif inst_fwd is not None:
        done.add("forward")  # wrapped by another library: leave it
    out.extend(entry for entry in _class_plans(original_class(type(module)), known) if entry[0] not in done)
    return out


_CLASS_PLANS: Dict[type, Tuple[frozenset, list]] = {}


def _class_plans(cls: type, known) -> list:
    """The methods of ``cls``'s DiffSynth classes that lead to attention (cached per class and per set
    of known entry points)."""
    key = frozenset(known)
    hit = _CLASS_PLANS.get(cls)
    if hit is not None and hit[0] == key:
        return hit[1]
    out, done = [], set()
    for c in cls.__mro__:
        if c is torch.nn.Module or c is object:
            break
        ours = (c.__module__ or "").startswith("diffsynth.")
        for name, attr in vars(c).items():
            if name in done or name.startswith("__"):
                continue
            done.add(name)  # an override in a subclass (DiffSynth's or not) hides the base method
            if not ours:
                continue
            static = isinstance(attr, staticmethod)
            fn = attr.__func__ if static else attr
            if not isinstance(fn, types.FunctionType):
                continue
            plan = plan_function(fn, known)
            if plan:
                out.append((name, fn, static, plan))
    _CLASS_PLANS[cls] = (key, out)
    return out


# -- replacements ---------------------------------------------------------------------------------------

def make_attention_forward(site: Site, original: Callable) -> Callable:
    """``diffsynth.core.attention.attention_forward`` for one site, served by the router."""
    route = router.route

    def attention_forward(q, k, v, q_pattern="b n s d", k_pattern="b n s d", v_pattern="b n s d",
                          out_pattern="b n s d", dims=None, attn_mask=None, scale=None, is_causal=False,
                          compatibility_mode=False, window_size=None, use_flex=False, score_mod=None):
        def own(reason):
            site.record_bypass(reason)
            return original(q, k, v, q_pattern, k_pattern, v_pattern, out_pattern, dims, attn_mask=attn_mask,
                            scale=scale, is_causal=is_causal, compatibility_mode=compatibility_mode,
                            window_size=window_size, use_flex=use_flex, score_mod=score_mod)

        if use_flex or score_mod is not None:
            return own("flex attention (use_flex=True or a score_mod): block masks and score mods are not "
                       "expressible as attnpatch masks")
        layout = _LAYOUT_OF_PATTERN.get(q_pattern)
        if layout is None or k_pattern != q_pattern or v_pattern != q_pattern:
            from einops import rearrange

            d = dims or {}
            if q_pattern != "b n s d":
                q = rearrange(q, f"{q_pattern} -> b n s d", **d)
            if k_pattern != "b n s d":
                k = rearrange(k, f"{k_pattern} -> b n s d", **d)
            if v_pattern != "b n s d":
                v = rearrange(v, f"{v_pattern} -> b n s d", **d)
            layout = "bnsd"
        mask = attn_mask
        if window_size is not None:
            seq_q = q.shape[2] if layout == "bnsd" else q.shape[1]
            seq_kv = k.shape[2] if layout == "bnsd" else k.shape[1]
            if mask is not None or is_causal or seq_q * seq_kv > MAX_WINDOW_MASK_ELEMENTS:
                return own(f"sliding window {window_size} over {seq_q}x{seq_kv} positions "
                           f"(with a mask or causal, or above {MAX_WINDOW_MASK_ELEMENTS} positions as a dense mask)")
            iq = torch.arange(seq_q, device=q.device)
            ik = torch.arange(seq_kv, device=q.device)
            mask = ((iq[:, None] - ik[None, :]).abs() <= window_size)[None, None]
        elif mask is not None and mask.dim() == 2:  # SDPA reads a 2-D mask as (s_q, s_kv)
            mask = mask[None, None]
        out = route(site.scope, q, k, v, layout, mask, is_causal, scale, 0.0, None)
        produced = "b n s d" if layout == "bnsd" else "b s n d"
        if out_pattern != produced:
            from einops import rearrange

            out = rearrange(out, f"{produced} -> {out_pattern}", **(dims or {}))
        return out

    attention_forward.__wrapped__ = original
    return attention_forward


def make_wan_flash_attention(site: Site, original: Callable) -> Callable:
    """The Wan DiT's ``flash_attention(q, k, v, num_heads)`` ((b, s, n·d) in and out) for one site."""
    route = router.route

    def flash_attention(q, k, v, num_heads, compatibility_mode=False):
        b, s = q.shape[0], q.shape[1]
        out = route(site.scope, q.unflatten(2, (num_heads, -1)), k.unflatten(2, (num_heads, -1)),
                    v.unflatten(2, (num_heads, -1)), "bsnd", None, False, None, 0.0, None)
        return out.reshape(b, s, -1)

    flash_attention.__wrapped__ = original
    return flash_attention


_MAKERS = {"attention_forward": make_attention_forward, "wan_flash_attention": make_wan_flash_attention}


class _Realizer:
    """Turns plans into replacement objects for one site (each replacement built once per site)."""

    def __init__(self, site: Site):
        self.site = site
        self._made: Dict[tuple, object] = {}

    def _get(self, key, make):
        obj = self._made.get(key)
        if obj is None:
            obj = self._made[key] = make()
        return obj

    def replacements(self, plan: Plan) -> Dict[str, object]:
        out = {}
        for name, entry in plan.items():
            tag = entry[0]
            if tag == "known":
                _, kind, original = entry
                out[name] = self._get(("known", kind), lambda: _MAKERS[kind](self.site, original))
            elif tag == "helper":
                _, fn, sub = entry
                out[name] = self._get(("helper", id(fn)), lambda: rebind(fn, self.replacements(sub), self.site))
            elif tag == "sdpa":
                out[name] = self._sdpa()
            elif tag == "functional":
                out[name] = self._get(("functional",), lambda: functional_proxy(self._sdpa()))
            elif tag == "torch":
                out[name] = self._get(("torch",), lambda: torch_proxy(
                    self._get(("functional",), lambda: functional_proxy(self._sdpa()))))
        return out

    def _sdpa(self):
        return self._get(("sdpa",), lambda: sdpa_for_site(self.site))


# -- the adapter -----------------------------------------------------------------------------------------

def _kind(path: str) -> str:
    parts = path.lower().split(".")[-2:]
    if any("cross" in p for p in parts):
        return "cross"
    if any("self" in p for p in parts):
        return "self"
    return "unknown"


def _int_attr(module, names) -> Optional[int]:
    for n in names:
        v = own_attr(module, n)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


class DiffSynthAdapter(Adapter):
    NAME = "diffsynth"
    PRIORITY = 30

    def available(self) -> bool:
        try:
            return importlib.util.find_spec("diffsynth") is not None
        except (ImportError, ValueError):  # a broken or blocked install counts as missing
            return False

    def find_sites(self, root: torch.nn.Module, prefix: str) -> List[SiteMatch]:
        if "diffsynth" not in sys.modules:
            return []
        known = _known()
        out: List[SiteMatch] = []

        def visit(name: str, module: torch.nn.Module) -> None:
            # children first: apply() never claims a site inside a claimed one, and a DiffSynth module
            # can be a site while containing another (Wan's CrossAttention with image input and its .attn)
            for child_name, child in module.named_children():
                visit(_join(name, child_name), child)
            if not any((c.__module__ or "").startswith("diffsynth.") for c in type(module).__mro__):
                return
            plans = _method_plans(module, known)
            if not plans:
                return
            heads = _int_attr(module, ("num_heads", "heads", "n_heads", "num_attention_heads"))
            head_dim = _int_attr(module, ("head_dim", "dim_head"))
            path = _join(prefix, name)
            out.append(SiteMatch(module, path, kind=_kind(path), heads=heads, kv_heads=heads, head_dim=head_dim,
                                 note="DiffSynth attention: " + ", ".join(sorted({n for n, *_ in plans})),
                                 data=plans))

        visit("", root)
        return out

    def patch_site(self, match: SiteMatch, site: Site, undo: UndoLog) -> None:
        realize = _Realizer(site)
        module = match.module
        class_methods: Dict[str, object] = {}
        for name, fn, static, plan in match.data:
            new = rebind(fn, realize.replacements(plan), site)
            if name == "forward" and "forward" in module.__dict__:  # a forward DiffSynth set on the instance
                undo.set_attr(module, name, types.MethodType(new, module))
            else:
                class_methods[name] = staticmethod(new) if static else new
        if class_methods:
            # a per-site class: nothing is written on the instance, and a copy or pickle of the module
            # is an unpatched module of DiffSynth's class
            undo.set_class(module, site_class(original_class(type(module)), class_methods))


ADAPTER = DiffSynthAdapter
