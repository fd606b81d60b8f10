"""Applying: `apply` and `patched` (the public entry points) and applying a recipe to a model.

`attnpatch.patch` holds the machinery (sites, adapters, `apply_scoped`, the undo log, `remove`);
`attnpatch.recipes` holds the recipe format (loading, validation, matching rules to sites, step
schedules). This module joins them, so imports flow one way: applying → patch, recipes.
"""

from __future__ import annotations

import contextlib
import logging
import os  # noqa: F401  (RecipeSpec names os.PathLike: typing.get_type_hints resolves it here)
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from . import controls, recipes
from .controls import AUTO, BackendSpec, Scope
from .patch import (_LOCK, _PATCHES, WHAT_ATTNPATCH_LOOKS_FOR, Patch, RecipeSpec, Settings, Target, _components,
                    _label, _ListItem, _site_scope, apply_scoped, discover, setting_of, uncompiled)
from .recipes import (_SCHEDULES, IndexSelector, Recipe, StepSchedule, _rule_scope, _strict_recipes,
                      _track_pipeline_steps, check_unmatched, find_recipe, load, plan)

logger = logging.getLogger("attnpatch")


def apply(target: Target, backend: BackendSpec = "auto", recipe: RecipeSpec = None, allow_lossy: bool = False,
          strict: bool = False, parallel: Any = None) -> Patch:
    """Route every attention call of ``target`` through `attnpatch.attention_forward`.

    ``target`` is a torch.nn.Module (diffusers, transformers, DiffSynth, timm or hand-written), a
    diffusers pipeline (every nn.Module component is patched) or a list of these (a model listed twice
    is patched once). ``backend`` is a name or a priority list, as in the router (other libraries' names
    such as ``"_native_cudnn"`` or ``"flash_attention_2"`` are accepted, see `attnpatch.aliases`;
    reports show attnpatch's names); "auto" picks per call. ``strict=True`` raises instead of falling
    back; ``allow_lossy=True`` lets auto use lossy kernels for these sites. Only this target is
    affected: other models and torch.nn.functional are untouched. Applying again to the same target
    updates the settings (it never wraps twice). Returns the `Patch` handle; a target in which no
    attention site is found gives an empty patch and a warning that says what attnpatch looks for.

    ``recipe`` is a shipped recipe's name (``"flux"``), a path to a ``.yaml`` file, a dict or a
    `attnpatch.recipes.Recipe`: its rules give each site its backend (see `attnpatch.recipes`). With
    ``recipe=None`` and ``backend="auto"``, a shipped recipe that matches the model is used (the report
    names it); in a list, each model gets the recipe that matches it. ``recipe=False`` never uses one.

    A torch.compile'd model (``torch.compile(model)``) is patched through the module it compiles:
    recipes match that module and site paths have no ``_orig_mod.`` prefix. A graph compiled before the
    patch was traced from the unpatched model: dynamo's guards see the changed modules and the next
    call compiles again, now with attnpatch's routing (and once more after `Patch.remove`). Apply
    before compiling to compile once.

    ``parallel`` (an `attnpatch.ContextParallel`, or a dict such as ``{"ulysses": 2}``) also splits the
    model's sequence over the processes of a torch.distributed group (`attnpatch.parallel`); ``remove()``
    undoes it too.
    """
    if not isinstance(strict, bool) or not isinstance(allow_lossy, bool):
        raise TypeError("attnpatch.apply: strict and allow_lossy must be bools")
    names = controls.normalise_backends(backend, "attnpatch.apply(backend=...)")
    if names is None:
        raise ValueError("attnpatch.apply: backend=None is not allowed; use 'auto' or a backend name")
    target = uncompiled(target)
    for _, m in _components(target):  # a patch made with another parallel setting is not updated in place
        p = _PATCHES.get(m)
        if p is not None and p.parallel is not None and not p.parallel.same_as(parallel):
            p.remove()
    if recipe is not False:
        patch = _apply_per_model(target, allow_lossy, strict) if recipe is None and names == controls.AUTO else None
        if patch is None:
            patch = apply_with_recipe(target, backend=setting_of(names), recipe=recipe,
                                              allow_lossy=allow_lossy, strict=strict)
    else:
        settings = Settings(backend=setting_of(names), strict=strict, allow_lossy=allow_lossy, recipe=None)
        patch = apply_scoped(target, settings, lambda site: _site_scope(site, settings, names, "apply()"))
    if not patch.sites and not patch.left_alone:
        logger.warning("attnpatch.apply: no attention sites found in %s, so nothing was patched; attnpatch looks "
                       "for %s (`attnpatch inspect` lists what it finds)", _label(target), WHAT_ATTNPATCH_LOOKS_FOR)
    if parallel is not None and patch.parallel is None:
        from . import parallel as _parallel

        try:
            _parallel.attach(patch, target, parallel, recipe)
        except BaseException:
            patch.remove()
            raise
    return patch



def _apply_per_model(target, allow_lossy: bool, strict: bool) -> Optional[Patch]:
    """`apply(list)` with no recipe named: each model of the list gets the shipped recipe that matches it,
    and its sites are labelled with that recipe. None when the models all match one recipe (or none):
    the ordinary path serves them."""
    if not isinstance(target, (list, tuple)) or any(isinstance(t, (list, tuple)) for t in target):
        return None
    items: List[Tuple[str, Any]] = []
    seen = set()
    for i, t in enumerate(target):
        t = uncompiled(t)
        if id(t) not in seen:
            seen.add(id(t))
            item = _ListItem(i, t) if isinstance(t, torch.nn.Module) else t
            items.append((_label(item), item))
    found = [recipes.find_recipe(item) for _, item in items]
    if len({r.name if r is not None else None for r in found}) <= 1:
        return None
    with _LOCK:
        parts: List[Patch] = []
        try:
            for _, item in items:
                parts.append(apply_with_recipe(item, backend="auto", recipe=None, allow_lossy=allow_lossy,
                                                       strict=strict))
        except BaseException:
            for p in parts:
                p.remove()
            raise
        settings = Settings(backend="auto", strict=strict, allow_lossy=allow_lossy,
                            recipe=tuple(r.name if r is not None else None for r in found))
        return _merged(parts, [label for label, _ in items], settings)


def _merged(parts: List[Patch], labels: List[str], settings: Settings) -> Patch:
    """One Patch holding the roots of ``parts`` (patches of the models of one list); removing it undoes
    them all. Its ``recipe_name`` says which recipe each model got."""
    merged = Patch(settings)
    for p in parts:
        merged._roots += p._roots
        merged.left_alone += p.left_alone
        p._roots = []
        merged._parts.append(p)
    for rp in merged._roots:
        _PATCHES[rp.root] = merged
    merged.schedule = next((p.schedule for p in parts if p.schedule is not None), None)
    merged.recipe_name = "; ".join(f"{p.recipe_name or 'none'} for {label}" for p, label in zip(parts, labels))
    return merged



@contextlib.contextmanager
def patched(target: Target, backend: BackendSpec = "auto", recipe: RecipeSpec = None, allow_lossy: bool = False,
            strict: bool = False) -> Iterator[Patch]:
    """``with attnpatch.patched(model, backend=...) as patch:`` — apply on entry, remove on exit (also
    on error). If the target was already patched, its earlier settings come back on exit instead."""
    roots = [m for _, m in _components(target)]
    before = {id(_PATCHES.get(m)) for m in roots}
    earlier = _PATCHES.get(roots[0]) if len(before) == 1 and None not in [_PATCHES.get(m) for m in roots] else None
    saved = earlier.settings if earlier is not None else None
    saved_scopes = [(s, s.scope) for s in earlier.sites] if earlier is not None else []
    p = apply(target, backend=backend, recipe=recipe, allow_lossy=allow_lossy, strict=strict)
    try:
        yield p
    finally:
        if earlier is not None and p is earlier:  # it was patched before: restore its settings
            with _LOCK:
                earlier.settings = saved
                for site, scope in saved_scopes:
                    site.scope = scope
        else:
            p.remove()


# -- recipes -------------------------------------------------------------------------------------------

def apply_with_recipe(target, backend="auto", recipe=None, allow_lossy: bool = False, strict: bool = False):
    """`attnpatch.apply` with a recipe (called by it): ``recipe`` is a shipped name, a path, a dict, a
    `Recipe`, or None (use a shipped recipe that matches the model when ``backend`` is "auto").

    A ``backend`` other than "auto" replaces the recipe's ``default_backend`` (rules keep theirs);
    ``allow_lossy=True`` applies where a rule does not say; ``strict`` applies to every site and also
    makes a rule that matches no site an error (as does ``ATTNPATCH_STRICT=1``)."""
    names = controls.normalise_backends(backend, "attnpatch.apply(backend=...)")
    if recipe is None:
        found = find_recipe(target) if names == AUTO else None
        if found is None:
            settings = Settings(backend=backend if isinstance(backend, str) else tuple(backend),
                                       strict=strict, allow_lossy=allow_lossy, recipe=None)
            return apply_scoped(
                target, settings, lambda site: _site_scope(site, settings, names, "apply()"))
        rec = found
    else:
        rec = load(recipe)
    override = None if names == AUTO else names
    sites = discover(target)
    comps = [c for c, _ in _components(target)]
    rplan = plan(rec, sites, comps)
    label = getattr(target, "model_label", None) or type(target).__name__  # a list's model: patch._ListItem
    check_unmatched(rplan, sites, _strict_recipes(strict), label)
    rules = rec.rules
    per_site: Dict[Tuple[str, str], List[Tuple[Optional[IndexSelector], Scope]]] = {}

    def scope_for(site):
        key = (site.component, site.path)
        why = rplan.excluded.get(key)
        if why is not None:
            site.rule = f"recipe {rec.name}: {why}"
            return None
        cands = []
        for i in rplan.candidates.get(key, []):
            rule = rules[i]
            cands.append((rule.steps, _rule_scope(rec, rule, site, override, allow_lossy, strict)))
            if rule.steps is None:
                break
        if not cands or cands[-1][0] is not None:
            cands.append((None, _rule_scope(rec, None, site, override, allow_lossy, strict)))
        per_site[key] = cands
        # before any step is known, the first rule without steps (or the default) holds
        return cands[-1][1]

    settings = Settings(backend=backend if isinstance(backend, str) else tuple(backend), strict=strict,
                               allow_lossy=allow_lossy, recipe=rec.name)

    def finish(patch):
        patch.recipe_name = rec.name + ("" if recipe is not None else " (chosen automatically)")
        entries = [(s, per_site[(s.component, s.path)]) for s in patch.sites
                   if s.routed and len(per_site.get((s.component, s.path), ())) > 1]
        if entries:
            sched = StepSchedule(entries)
            patch.schedule = sched
            _SCHEDULES.add(sched)
            _track_pipeline_steps(target, patch, sched)

    return apply_scoped(target, settings, scope_for, skip_components=rplan.skip_components, finish=finish)


def explain_sites(target, recipe=None, backend="auto", allow_lossy: bool = False) -> Tuple[Optional[Recipe], List[Dict[str, Any]]]:
    """Without patching: each attention site of ``target`` and the recipe rule and backend it would get
    (for `attnpatch inspect` and `attnpatch recipe check --model`). Rules with ``steps`` are listed with
    their steps. Each row's ``candidates`` gives the same as data (see `_candidate`; empty when the
    recipe leaves the site alone)."""
    names = controls.normalise_backends(backend, "backend")
    rec = None
    if recipe is None:
        rec = find_recipe(target) if names == AUTO else None
    elif recipe is not False:
        rec = load(recipe)
    sites = discover(target)
    rows = []
    if rec is None:
        for s in sites:
            d = s.as_dict()
            d.update(component=s.component, rule="apply()", backend=_describe(names), allow_lossy=allow_lossy,
                     steps="", candidates=[_candidate("apply()", names, allow_lossy, None)])
            rows.append(d)
        return None, rows
    comps = [c for c, _ in _components(target)]
    rplan = plan(rec, sites, comps)
    override = None if names == AUTO else names
    for s in sites:
        d = s.as_dict()
        d["component"] = s.component
        key = (s.component, s.path)
        if s.component in rplan.skip_components or key in rplan.excluded:
            why = rplan.excluded.get(key) or f"exclude.components {s.component!r}"
            d.update(rule=why, backend="(left alone)", allow_lossy=False, steps="", candidates=[])
            rows.append(d)
            continue
        parts = []
        cands = []
        for i in rplan.candidates.get(key, []):
            r = rec.rules[i]
            sc = _rule_scope(rec, r, s, override, allow_lossy, False)
            parts.append((r.name, _describe(sc.backends), sc.allow_lossy,
                          f"steps {r.steps.describe()}" if r.steps else ""))
            cands.append(_candidate(r.name, sc.backends, sc.allow_lossy, r.steps.describe() if r.steps else None))
            if r.steps is None:
                break
        if not parts or parts[-1][3]:
            sc = _rule_scope(rec, None, s, override, allow_lossy, False)
            parts.append(("default_backend", _describe(sc.backends), sc.allow_lossy, ""))
            cands.append(_candidate("default_backend", sc.backends, sc.allow_lossy, None))
        d["candidates"] = cands
        d.update(rule=" | ".join(p[0] for p in parts), backend=" | ".join(p[1] for p in parts),
                 allow_lossy=any(p[2] for p in parts), steps=" | ".join(p[3] or "other steps" for p in parts)
                 if len(parts) > 1 else "")
        rows.append(d)
    return rec, rows


def _candidate(rule: str, names, allow_lossy: bool, steps: Optional[str]) -> Dict[str, Any]:
    """One (rule, backend) a site may get, as data: ``backend`` is a list of names (``["auto"]`` for auto),
    ``steps`` the rule's step selector or None (every step not taken by an earlier rule)."""
    return {"rule": rule, "backend": ["auto"] if names is None or names == AUTO else list(names),
            "allow_lossy": bool(allow_lossy), "steps": steps}


def _describe(names) -> str:
    if names is None or names == AUTO:
        return "auto"
    return ",".join(names)
