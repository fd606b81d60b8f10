"""The patching machinery behind `attnpatch.apply` (which lives in `attnpatch.applying`, with `patched`
and the recipe glue) and `remove`: send a model's attention calls to the router, scoped to that model
and exactly undoable.

`apply_scoped(target, ...)` walks every module of the target (a pipeline's components, a module, or a list), lets
each adapter (``attnpatch.adapters.<name>``, tried in ``PRIORITY`` order) claim the attention sites it
recognises, gives every site a router `Scope` (its backend setting and its report), and patches the
sites. Every change is recorded in an `UndoLog`: the owner, the attribute, whether the attribute was in
the owner's ``__dict__``, the old value and the new one. `Patch.remove()` restores them in reverse
order, each only after checking that the current value is still attnpatch's, so afterwards
``vars(module)``, ``type(module)`` and ``state_dict()`` are as they were and outputs are bitwise equal.
"""

from __future__ import annotations

import copyreg
import inspect
import logging
import os  # noqa: F401  (the RecipeSpec annotation)
import sys
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, List, Literal, Mapping, Optional, Protocol,
                    Sequence, Tuple, Union)

import torch

from . import controls, router
from .controls import Scope
from . import recipes
from .recipes import Recipe  # noqa: F401  (the RecipeSpec annotation, resolvable by typing.get_type_hints)
from .originals import ORIGINAL_CLASS, is_site_class, original_class  # noqa: F401  (re-exported for adapters)
from .report import Report, ReportRow, describe_scope  # noqa: F401  (re-exported)

logger = logging.getLogger("attnpatch")

_LOCK = threading.RLock()
_MISSING = object()

#: root module -> the Patch that patched it (to make apply idempotent and to find it for remove()).
_PATCHES: "weakref.WeakKeyDictionary[torch.nn.Module, Patch]" = weakref.WeakKeyDictionary()
#: patched module -> its Site (adapters look sites up by module; nothing is written on the module).
SITE_OF: "weakref.WeakKeyDictionary[torch.nn.Module, Site]" = weakref.WeakKeyDictionary()


# -- sites -------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Site:
    """One attention site of a patched model.

    ``path`` is the module's dotted path from the target (``transformer.transformer_blocks.0.attn``;
    pipeline components are prefixed with their component name). ``kind`` is "self", "cross",
    "joint" (text and image tokens in one attention) or "unknown". ``routed`` is False for a site
    that computes attention in a way attnpatch cannot route (reported, never silently skipped).
    ``scope`` is what the router receives for this site's calls; `Patch.update` and recipes replace it.
    """

    path: str
    adapter: str
    kind: str = "unknown"
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    module_class: str = ""
    routed: bool = True
    note: str = ""
    component: str = ""
    scope: Optional[Scope] = None
    rule: str = ""  # which recipe rule (or "apply()") set the scope
    #: reason -> calls the adapter could not route and sent to the library's own code (report() shows them)
    bypassed: Counter = field(default_factory=Counter)
    #: adapter-private objects made for this site (e.g. its routed classes): they live and die with the
    #: site, so nothing process-wide keeps a removed patch's site alive
    state: Dict[str, Any] = field(default_factory=dict, repr=False)

    def record_bypass(self, reason: str) -> None:
        """Count one call of this site that its adapter ran on the library's own code instead of the
        router (e.g. diffusers' context parallelism); warns once per (site, reason). Never silent."""
        if reason not in self.bypassed:
            logger.warning("attnpatch: a call of %s was not routed and ran the library's own code: %s "
                           "(shown once; Patch.report() counts them)", self.path or "<root>", reason)
        self.bypassed[reason] += 1

    def counts(self) -> Tuple[Counter, Counter]:
        """(calls per backend, fallbacks per (refused backend, used backend, reason)) for this site."""
        calls: Counter = Counter()
        fallbacks: Counter = Counter()
        for _site, name, fallback, n in router.iter_counts(self):
            calls[name] += n
            for refused, why in fallback:
                fallbacks[(refused, name, why)] += n
        return calls, fallbacks

    def as_dict(self) -> Dict[str, Any]:
        return {
            "path": self.path, "adapter": self.adapter, "kind": self.kind, "heads": self.heads,
            "kv_heads": self.kv_heads, "head_dim": self.head_dim, "module_class": self.module_class,
            "routed": self.routed, "note": self.note, "rule": self.rule,
            "backend": describe_scope(self.scope), "bypassed": dict(self.bypassed),
        }


@dataclass
class SiteMatch:
    """What an adapter's `find_sites` returns for one module it recognises."""

    module: torch.nn.Module
    path: str
    kind: str = "unknown"
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    routed: bool = True
    note: str = ""
    data: Any = None  # adapter-private (e.g. which function to rebind)


# -- per-site classes ------------------------------------------------------------------------------------

#: attribute names attnpatch puts on the per-site classes it creates (never on instances)
# ORIGINAL_CLASS, original_class, is_site_class: attnpatch.originals (a leaf module; re-exported here)


def _reduce_as(orig: type, holder: list):
    """``__reduce_ex__`` for a per-site class: pickle and copy objects as ``orig``."""

    def __reduce_ex__(self, protocol):
        rv = super(holder[0], self).__reduce_ex__(protocol)
        if not (isinstance(rv, tuple) and len(rv) >= 2 and isinstance(rv[1], tuple) and rv[1]
                and rv[1][0] is type(self)):
            return rv
        if rv[0] is copyreg.__newobj__ and len(rv[1]) == 1:
            # pickle insists that __newobj__'s class is the object's own; _reconstructor(cls, object,
            # None) is object.__new__(orig) (a stdlib callable, so pickles do not need attnpatch)
            return (copyreg._reconstructor, (orig, object, None)) + rv[2:]
        if rv[0] is copyreg._reconstructor:
            return (rv[0], (orig,) + rv[1][1:]) + rv[2:]
        return rv

    return __reduce_ex__


def site_class(orig: type, namespace: Dict[str, Any]) -> type:
    """A subclass of ``orig`` that adds ``namespace`` (attnpatch's routed functions or properties) and
    otherwise behaves as ``orig``: the same name, module and qualname, and objects of it pickle,
    copy and deep-copy as ``orig`` objects, so a copy of a patched model is an unpatched model. Give
    an object this class with `UndoLog.set_class` (undone exactly by `Patch.remove`)."""
    ns: Dict[str, Any] = {"__slots__": (), "__module__": orig.__module__, "__qualname__": orig.__qualname__,
                          "__doc__": orig.__doc__, ORIGINAL_CLASS: orig}
    ns.update(namespace)
    holder: list = []
    ns["__reduce_ex__"] = _reduce_as(orig, holder)
    cls = type(orig)(orig.__name__, (orig,), ns)
    holder.append(cls)
    return cls


#: The attribute of a per-site class (never of an instance) holding a weak reference to its `Site`: the
#: adapters' routed functions find their site through the object they serve.
SITE_ATTR = "_attnpatch_site"

#: What `site_class` puts in every per-site class's namespace itself (not carried over by `extended_class`).
_SITE_CLASS_OWN = frozenset({"__slots__", "__module__", "__qualname__", "__doc__", ORIGINAL_CLASS, "__reduce_ex__",
                             "__dict__", "__weakref__"})


def extended_class(cls: type, namespace: Dict[str, Any]) -> type:
    """The per-site class for an object of class ``cls`` with ``namespace`` added: when ``cls`` already is
    a per-site class (another adapter's, or context parallelism's), its functions are kept and
    ``namespace`` wins over them; the new class still pickles and copies as the original class."""
    ns: Dict[str, Any] = {}
    if is_site_class(cls):
        ns = {k: v for k, v in vars(cls).items() if k not in _SITE_CLASS_OWN}
    ns.update(namespace)
    return site_class(original_class(cls), ns)


# -- undo ---------------------------------------------------------------------------------------------

class UndoLog:
    """Records every change attnpatch makes so that it can be undone exactly, in reverse order."""

    def __init__(self) -> None:
        self._entries: List[Tuple[str, Any]] = []

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` in ``obj.__dict__`` (bypassing nn.Module.__setattr__), recording
        whether the name was in ``__dict__`` and its old value."""
        d = obj.__dict__
        old = d.get(name, _MISSING)
        d[name] = value
        self._entries.append(("attr", (weakref.ref(obj), name, old, value)))

    def set_class(self, obj: Any, new_cls: type) -> None:
        old = obj.__class__
        obj.__class__ = new_cls
        self._entries.append(("class", (weakref.ref(obj), old, new_cls)))

    def call(self, undo: Callable[[], None], label: str) -> None:
        """Record an arbitrary undo step (e.g. restoring a transformers config value)."""
        self._entries.append(("call", (undo, label)))

    def undo(self) -> List[str]:
        """Undo everything, newest first. Returns warnings for entries that were changed by someone
        else since (those are left alone)."""
        problems = []
        while self._entries:
            kind, data = self._entries.pop()
            if kind == "attr":
                ref, name, old, new = data
                obj = ref()
                if obj is None:
                    continue
                d = obj.__dict__
                if d.get(name, _MISSING) is not new:
                    problems.append(f"{type(obj).__name__}.{name} was changed after attnpatch patched it; left as is")
                    continue
                if old is _MISSING:
                    del d[name]
                else:
                    d[name] = old
            elif kind == "class":
                ref, old, new = data
                obj = ref()
                if obj is None:
                    continue
                if obj.__class__ is not new:
                    problems.append(f"the class of a {old.__name__} was changed after attnpatch patched it; left as is")
                    continue
                obj.__class__ = old
            else:
                fn, label = data
                try:
                    fn()
                except Exception as exc:  # keep undoing the rest
                    problems.append(f"undo step {label!r} failed: {type(exc).__name__}: {exc}")
        return problems

    def __len__(self) -> int:
        return len(self._entries)


# -- adapters -----------------------------------------------------------------------------------------

class Adapter:
    """Base class of adapters (one per model family, in ``adapters/<name>.py``).

    * ``NAME`` — shown in `Patch.sites` and reports.
    * ``PRIORITY`` — lower claims sites first (library adapters before the generic one).
    * `find_sites(root, prefix)` — the sites this adapter recognises under ``root``.
    * `patch_root(root, sites, undo)` — optional model-level change (e.g. transformers' attention
      implementation), done once per root before the sites.
    * `patch_site(match, site, undo)` — route one site; every change goes through ``undo``.
    * `refresh_site(match, site)` — optional: called after a site's scope changed.
    """

    NAME = ""
    PRIORITY = 100

    def available(self) -> bool:
        return True

    def find_sites(self, root: torch.nn.Module, prefix: str) -> List[SiteMatch]:
        raise NotImplementedError

    def patch_root(self, root: torch.nn.Module, matches: List[SiteMatch], undo: UndoLog) -> None:
        pass

    def patch_site(self, match: SiteMatch, site: Site, undo: UndoLog) -> None:
        raise NotImplementedError


def own_attr(module: Any, name: str, default: Any = None) -> Any:
    """``getattr(module, name, default)`` for what the object itself defines (instance attributes, class
    attributes, properties), never through a ``__getattr__`` fallback: diffusers' models answer unknown
    names from their config with a FutureWarning ("Accessing config attribute ... directly"). Adapters
    read heads and head dims with it."""
    try:
        inspect.getattr_static(module, name)
    except AttributeError:
        return default
    return getattr(module, name, default)


_ADAPTERS: List[Adapter] = []


def register_adapter(adapter: Union[Adapter, type]) -> Adapter:
    """Add an adapter (its class or an instance); adapters are tried in ``PRIORITY`` order."""
    if isinstance(adapter, type):
        adapter = adapter()
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter expects an Adapter, got {type(adapter).__name__}")
    with _LOCK:
        _ADAPTERS[:] = [a for a in _ADAPTERS if a.NAME != adapter.NAME] + [adapter]
        _ADAPTERS.sort(key=lambda a: (a.PRIORITY, a.NAME))
    return adapter


def adapters() -> List[Adapter]:
    _load_builtin_adapters()
    return list(_ADAPTERS)


_BUILTIN_LOADED = False


def _load_builtin_adapters() -> None:
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    with _LOCK:
        if _BUILTIN_LOADED:
            return
        import importlib

        for name in BUILTIN_ADAPTERS:
            mod = importlib.import_module(f"attnpatch.adapters.{name}")
            register_adapter(mod.ADAPTER)  # adapters import their library lazily (see Adapter.available)
        _BUILTIN_LOADED = True


#: Adapter modules shipped in ``attnpatch.adapters`` (fixed names; nothing from user input).
BUILTIN_ADAPTERS = ("diffusers", "transformers", "diffsynth", "torch_sdpa")


# -- targets ------------------------------------------------------------------------------------------

class HasComponents(Protocol):
    """A diffusers-style pipeline: ``components`` maps names to its parts (the nn.Module ones are patched)."""

    components: Mapping[str, Any]


#: What `apply`, `remove` and `patched` take: a module (also a torch.compile'd one), a pipeline, or a
#: list of these.
Target = Union[torch.nn.Module, HasComponents, Sequence[Union[torch.nn.Module, HasComponents]]]

#: What ``recipe=`` takes: a shipped name, a path to a .yaml file, a dict, a `Recipe`; None (the shipped
#: recipe that matches, when backend is auto) or False (no recipe).
RecipeSpec = Union[None, Literal[False], str, "os.PathLike[str]", Mapping[str, Any], "Recipe"]


def uncompiled(obj: Any) -> Any:
    """The module inside a torch.compile'd module (``OptimizedModule._orig_mod``, unwrapped repeatedly);
    any other object as it is."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # nothing is compiled before dynamo is loaded
    if eval_frame is None:
        return obj
    while isinstance(obj, eval_frame.OptimizedModule):
        obj = obj._orig_mod
    return obj


def _components(target) -> List[Tuple[str, torch.nn.Module]]:
    """The (name, module) roots of a target: a module, a diffusers-style pipeline, or a list. Modules
    compiled with torch.compile are replaced by the module they compile; a module given twice is one
    root (the first name)."""
    out: List[Tuple[str, torch.nn.Module]] = []
    seen = set()
    for name, m in _roots_of(target):
        m = uncompiled(m)
        if id(m) not in seen:
            seen.add(id(m))
            out.append((name, m))
    return out


def _roots_of(target) -> List[Tuple[str, torch.nn.Module]]:
    if isinstance(target, torch.nn.Module):
        return [("", target)]
    if isinstance(target, (list, tuple)):
        out = []
        for i, t in enumerate(target):
            for name, m in _roots_of(t):
                out.append((name or str(i), m))
        return out
    comps = getattr(target, "components", None)
    if isinstance(comps, dict):
        mods = [(name, m) for name, m in comps.items() if isinstance(m, torch.nn.Module)]
        if not mods:
            raise TypeError(f"attnpatch.apply: the pipeline {type(target).__name__} has no torch.nn.Module components")
        return mods
    raise TypeError(
        f"attnpatch.apply: target must be a torch.nn.Module, a diffusers pipeline (with .components) or a "
        f"list of these; got {type(target).__name__}"
    )


class _ListItem:
    """One model of a list target, applied on its own (with the recipe that matches it) under its list
    index, so that its sites keep the paths they have in the list ("1.layers.0.self_attn")."""

    def __init__(self, index: int, module: torch.nn.Module) -> None:
        self.components = {str(index): module}
        self.model_label = f"{index} ({type(module).__name__})"


#: What `apply` looks for (the warning for a target without attention sites says it).
WHAT_ATTNPATCH_LOOKS_FOR = (
    "diffusers attention modules (Attention, FluxAttention, ... with a processor), transformers models that "
    "dispatch through AttentionInterface, DiffSynth-Studio attention functions, and any module whose own "
    "forward calls F.scaled_dot_product_attention")


# -- the patch handle ----------------------------------------------------------------------------------

@dataclass
class Settings:
    backend: Union[str, Tuple[str, ...]] = "auto"
    strict: bool = False
    allow_lossy: bool = False
    recipe: Any = None


@dataclass(eq=False)
class _RootPatch:
    component: str
    root: torch.nn.Module
    sites: List[Site]
    matches: List[SiteMatch]
    undo: UndoLog
    adapters: Dict[int, Adapter] = field(default_factory=dict)


class Patch:
    """The handle `apply` returns: ``sites``, ``report()``, ``update(...)`` and ``remove()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._roots: List[_RootPatch] = []
        self.removed = False
        self.recipe_name: Optional[str] = None
        #: pipeline components a recipe left alone (not patched at all), for the report.
        self.left_alone: List[str] = []
        #: a recipe's step schedule (`attnpatch.recipes.StepSchedule`), or None.
        self.schedule = None
        #: changes outside the patched roots (e.g. a pipeline scheduler's step tracking).
        self._undo_extra = UndoLog()
        #: sites of roots already removed (the report still shows what ran on them)
        self._removed_sites: List[Site] = []
        #: for a list whose models got different recipes: the per-model patches merged into this one
        #: (their roots are this patch's; their step schedules and extra changes are undone with it).
        self._parts: List["Patch"] = []
        #: context parallelism (`attnpatch.parallel.ParallelState`), or None.
        self.parallel = None

    @property
    def sites(self) -> List[Site]:
        """Every attention site found, routed or not, in walk order."""
        return [s for r in self._roots for s in r.sites]

    @property
    def routed_sites(self) -> List[Site]:
        return [s for s in self.sites if s.routed]

    def report(self) -> "Report":
        """Per site: the backend that actually ran and how many times, and every fallback with its
        reason. Calls traced under torch.compile are listed as decided, not counted. After `remove`
        the report still shows what ran while the patch was applied."""
        rows = []
        for s in self._removed_sites + self.sites:
            calls, fallbacks = s.counts()
            compiled = router.compiled_decisions_of(s)
            rows.append(ReportRow(s, dict(calls), dict(fallbacks), sorted(compiled), compiled))
        notes = [f"left alone (not patched): {', '.join(self.left_alone)}"] if self.left_alone else []
        if self.parallel is not None:
            notes += self.parallel.describe()
        return Report(rows, self.recipe_name, notes)

    def update(self, backend=None, *, strict: Optional[bool] = None, allow_lossy: Optional[bool] = None) -> "Patch":
        """Change the settings of every site of this patch in place (no re-patching). A recipe's step
        schedule stops switching scopes from then on (the new settings hold for every step)."""
        with _LOCK:
            for sched in self._schedules():
                sched.active = False
            s = self.settings
            names = controls.normalise_backends(backend, "Patch.update(backend=...)") if backend is not None else None
            new = Settings(backend=setting_of(names) if names is not None else s.backend,
                           strict=s.strict if strict is None else strict,
                           allow_lossy=s.allow_lossy if allow_lossy is None else allow_lossy, recipe=s.recipe)
            self.settings = new
            router.forget_scopes(self._all_scopes())
            for site in self.sites:
                old = site.scope
                site.scope = Scope(
                    backends=names if names is not None else (old.backends if old else None),
                    strict=new.strict, allow_lossy=new.allow_lossy,
                    source=old.source if old else "apply()", site=site,
                )
        return self

    def _all_scopes(self) -> List[Scope]:
        """Every Scope this patch gave the router (each site's, and those of its step schedule)."""
        scopes = [s.scope for s in self.sites if s.scope is not None]
        for sched in self._schedules():
            scopes += [scope for _site, cands in sched.entries for _sel, scope in cands]
        return scopes

    def _schedules(self) -> list:
        """This patch's step schedules (a merged list patch may have one per model)."""
        out = [p.schedule for p in [self] + self._parts if p.schedule is not None]
        return list({id(x): x for x in out}.values())

    def remove(self) -> None:
        """Undo every change of this patch (newest first). Idempotent. The router forgets the plans
        and decisions it cached for this patch's sites (their call counts stay in `report`)."""
        with _LOCK:
            if self.removed:
                return
            scopes = self._all_scopes()
            self._undo_extras()
            for rp in reversed(self._roots):
                self._remove_root(rp)
            self._removed_sites += [s for rp in self._roots for s in rp.sites]
            self._roots.clear()
            self.removed = True
            router.forget_scopes(scopes)

    def _undo_extras(self) -> None:
        for sched in self._schedules():
            sched.active = False
        for p in [self] + self._parts:
            for problem in p._undo_extra.undo():
                logger.warning("attnpatch.remove: %s", problem)

    def _remove_root(self, rp: _RootPatch) -> None:
        from .rebind import unregister

        for problem in rp.undo.undo():
            logger.warning("attnpatch.remove: %s", problem)
        for m in rp.matches:
            SITE_OF.pop(m.module, None)
        for site in rp.sites:
            unregister(site)
            site.state.clear()  # the per-site classes and copies: nothing needs them any more
        if _PATCHES.get(rp.root) is self:
            del _PATCHES[rp.root]

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self.routed_sites)} routed sites"
        return f"<attnpatch.Patch {state}, backend={self.settings.backend!r}>"


# -- apply / remove ----------------------------------------------------------------------------------

def _site_scope(site: Site, settings: Settings, names, source: str) -> Scope:
    return Scope(backends=names, strict=settings.strict, allow_lossy=settings.allow_lossy, source=source, site=site)


def setting_of(names: Tuple[str, ...]) -> Union[str, Tuple[str, ...]]:
    """A patch's canonical backend setting from normalised names: "auto", one name, or a tuple."""
    if names == controls.AUTO:
        return "auto"
    return names[0] if len(names) == 1 else tuple(names)


def _label(target) -> str:
    return getattr(target, "model_label", None) or type(target).__name__


def apply_scoped(target, settings: Settings, scope_for: Callable[[Site], Optional[Scope]], *,
                 skip_components: Sequence[str] = (), finish: Optional[Callable[[Patch], None]] = None) -> Patch:
    """Patch ``target`` giving each site the scope ``scope_for(site)`` returns (None: leave the site
    alone). Components named in ``skip_components`` are not patched at all. ``finish(patch)`` runs
    before the patch is returned (an exception there undoes everything). A target already patched
    without a recipe, and patched again without one, is updated in place; otherwise the old patch is
    removed first, so nothing is ever wrapped twice."""
    roots = _components(target)
    with _LOCK:
        existing = [_PATCHES.get(m) for _, m in roots]
        if (settings.recipe is None and all(p is not None for p in existing)
                and len({id(p) for p in existing}) == 1 and existing[0].settings.recipe is None):
            patch = existing[0]
            patch.update(settings.backend, strict=settings.strict, allow_lossy=settings.allow_lossy)
            return patch
        for (_, m), p in zip(roots, existing):  # patched before by another apply: start over for those
            if p is not None:
                p._remove_roots_of([m])
        patch = Patch(settings)
        try:
            for comp, root in roots:
                if comp and comp in skip_components:
                    patch.left_alone.append(comp)
                    continue
                patch._roots.append(_patch_root(patch, comp, root, scope_for))
            if finish is not None:
                finish(patch)
        except BaseException:
            patch.remove()
            raise
        routed = len(patch.routed_sites)
        unrouted = [s for s in patch.sites if not s.routed and not s.note.startswith(LEFT_ALONE)]
        logger.info("attnpatch.apply: %d attention sites routed in %s", routed, _label(target))
        for s in unrouted:
            logger.warning("attnpatch.apply: %s (%s) is not routed: %s", s.path, s.module_class, s.note)
        return patch


#: How a site that a recipe excluded is marked in ``Site.note`` (it is reported, not routed).
LEFT_ALONE = "left alone"


def _find_matches(root: torch.nn.Module, component: str) -> List[Tuple[Adapter, SiteMatch]]:
    """Every site the adapters claim under ``root``, in walk order (an inner site of a claimed one is
    never claimed again)."""
    claimed: Dict[int, Tuple[Adapter, SiteMatch]] = {}
    order: List[int] = []
    for adapter in adapters():
        if not adapter.available():
            continue
        for m in adapter.find_sites(root, component):
            key = id(m.module)
            if key in claimed or _inside_claimed(m.path, claimed):
                continue
            claimed[key] = (adapter, m)
            order.append(key)
    return [claimed[k] for k in order]


def _new_site(adapter: Adapter, m: SiteMatch, component: str) -> Site:
    return Site(path=m.path, adapter=adapter.NAME, kind=m.kind, heads=m.heads, kv_heads=m.kv_heads,
                head_dim=m.head_dim, module_class=type(m.module).__name__, routed=m.routed, note=m.note,
                component=component)


def discover(target) -> List[Site]:
    """The attention sites `apply` would patch in ``target``, without patching anything (their
    ``scope`` is None). For `attnpatch inspect` and recipe checks."""
    out = []
    for comp, root in _components(target):
        for adapter, m in _find_matches(root, comp):
            out.append(_new_site(adapter, m, comp))
    return out


def _patch_root(patch: Patch, component: str, root: torch.nn.Module,
                scope_for: Callable[[Site], Optional[Scope]]) -> _RootPatch:
    undo = UndoLog()
    rp = _RootPatch(component, root, [], [], undo)
    found = _find_matches(root, component)
    sites = []
    for adapter, m in found:
        site = _new_site(adapter, m, component)
        scope = scope_for(site)
        if scope is None:  # a recipe leaves this site alone: reported, not patched
            site.routed = False
            site.rule = site.rule or "exclude"
            site.note = f"{LEFT_ALONE} by {site.rule}" if m.routed else site.note
        else:
            site.scope = scope
            site.rule = scope.source
        sites.append(site)
    for adapter in adapters():
        ms = [m for (a, m), site in zip(found, sites) if a is adapter and site.routed]
        if ms:
            adapter.patch_root(root, ms, undo)
    for (adapter, m), site in zip(found, sites):
        if site.routed:
            adapter.patch_site(m, site, undo)
            SITE_OF[m.module] = site
        rp.sites.append(site)
        rp.matches.append(m)
        rp.adapters[id(m.module)] = adapter
    _PATCHES[root] = patch
    return rp


def _inside_claimed(path: str, claimed) -> bool:
    for _, m in claimed.values():
        if m.routed and m.path and path.startswith(m.path + "."):
            return True
    return False


def _remove_roots_of(self: Patch, modules: List[torch.nn.Module]) -> None:
    with _LOCK:
        if self.parallel is not None:  # context parallelism spans the whole patch: removing a part removes it all
            self.remove()
            return
        scopes = self._all_scopes()
        keep = []
        for rp in self._roots:
            if any(rp.root is m for m in modules):
                self._remove_root(rp)
                self._removed_sites += rp.sites
            else:
                keep.append(rp)
        self._roots = keep
        if not keep:
            self._undo_extras()
            self.removed = True
        live = {id(s) for s in self._all_scopes()} if keep else set()
        router.forget_scopes([s for s in scopes if id(s) not in live])


Patch._remove_roots_of = _remove_roots_of


def remove(target: Target) -> int:
    """Undo attnpatch's changes to ``target`` (a module, pipeline or list). Returns how many roots were
    restored (0 when the target was not patched)."""
    roots = _components(target)
    n = 0
    with _LOCK:
        for _, m in roots:
            p = _PATCHES.get(m)
            if p is not None:
                p._remove_roots_of([m])
                n += 1
    return n


def patch_of(module: torch.nn.Module) -> Optional[Patch]:
    """The Patch that patched ``module`` (a root), or None."""
    return _PATCHES.get(module)


def patches_of(target) -> List[Patch]:
    """The patches of ``target`` (a Patch, a module, a pipeline or a list), each once."""
    if isinstance(target, Patch):
        return [target]
    out: List[Patch] = []
    for _, m in _components(target):
        p = _PATCHES.get(m)
        if p is not None and p not in out:
            out.append(p)
    return out


recipes.PATCHES_OF = patches_of  # step schedules find a target's patches through this (no import cycle)
