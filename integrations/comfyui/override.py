"""The ``optimized_attention_override`` that the "Attention (attnpatch)" node installs on a cloned MODEL.

How ComfyUI calls it (read in ComfyUI ``comfy/ldm/modules/attention.py`` at commit a125cd84, Oct 2025,
and in the nodes that set it: ``comfy_extras`` "Patch SageAttention 3", KJNodes' "Patch Sage
Attention"): every attention function there is ``f(q, k, v, heads, mask=None, attn_precision=None,
skip_reshape=False, skip_output_reshape=False, **kwargs)`` wrapped by ``wrap_attn``, which, when the
call carries ``transformer_options`` with an ``"optimized_attention_override"``, returns
``override(func, *args, **kwargs)`` instead (``func``: the unwrapped function that was called;
``kwargs`` also holds ``_inside_attn_wrapper=True`` so that calling ``func`` does not recurse).

The conventions translated here (as ComfyUI's own ``attention_pytorch`` does):

* ``skip_reshape=False``: q, k, v are (batch, seq, heads * head_dim) → viewed as (b, s, h, d),
  attnpatch layout ``"bsnd"`` (no copy). k/v may have fewer heads (GQA): their head count is
  ``k.shape[-1] // head_dim``. ``skip_reshape=True``: (batch, heads, seq, head_dim), layout ``"bnsd"``.
* ``mask``: None, bool (True = attend) or float (added to the scores); 2-D is (seq_q, seq_kv), 3-D is
  (batch, seq_q, seq_kv), 4-D as is. It is made 4-D before attnpatch sees it (attnpatch would read a
  2-D (batch, seq_kv) mask as key padding).
* Output: (b, seq_q, heads * head_dim_v), or with ``skip_output_reshape=True`` (b, heads, seq_q, d_v).
* Scale 1/sqrt(head_dim), no causal, no dropout. ``attn_precision`` is ignored, as ComfyUI's
  ``attention_pytorch``, ``attention_sage`` and ``attention_flash`` ignore it (the kernels accumulate
  in fp32).

A call with arguments not in that list is not guessed at: it runs ComfyUI's own function and is
counted as "not routed" in the report (warned once). Everything else goes to
``attnpatch.router.route`` with the `Scope` of the step rule in force, so the report (calls per
backend, fallbacks with reasons) comes from attnpatch's own counters.

Step rules work on ComfyUI's sigmas: ``transformer_options["sample_sigmas"]`` is the schedule of the
running sampler (N steps → N + 1 sigmas, the last usually 0) and ``transformer_options["sigmas"]`` the
sigma of the current model evaluation. A call at sigma s belongs to step i, the last i < N with
``sample_sigmas[i] >= s`` (a sampler's extra evaluation between two sigmas counts in the step it
started; one exactly at ``sample_sigmas[i + 1]``, as Heun's correction, counts in step i + 1, as in
ComfyUI's own Sage3 node). The index selectors are attnpatch recipes' `IndexSelector` (``first N``,
``last M``, ranges): "first 2" means the first two steps of that sampler run.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import torch

from attnpatch import controls, recipes, registry, router
from attnpatch.controls import AUTO, Scope
from attnpatch.patch import Site
from attnpatch.recipes import IndexSelector

logger = logging.getLogger("attnpatch.comfyui")

#: The parameters of ComfyUI's attention functions, in order (``**kwargs`` last).
COMFY_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
#: Keyword arguments ComfyUI adds that do not change the result.
PASSIVE_KWARGS = frozenset({"transformer_options", "_inside_attn_wrapper"})
#: Where the node puts the override (ComfyUI's key).
OVERRIDE_KEY = "optimized_attention_override"

SOURCE = "ComfyUI node 'Attention (attnpatch)'"


class StepRule:
    """One candidate: the steps it covers (None = every step), its router `Scope` and its report site."""

    __slots__ = ("label", "steps", "scope", "site")

    def __init__(self, label: str, steps: Optional[IndexSelector], backends, allow_lossy: bool, strict: bool):
        self.label = label
        self.steps = steps
        self.site = Site(path=f"comfyui: {label}", adapter="comfyui", rule=label)
        self.scope = Scope(backends=backends, strict=strict, allow_lossy=allow_lossy, source=f"{SOURCE}: {label}",
                           site=self.site)
        self.site.scope = self.scope

    def describe(self) -> str:
        steps = "every step" if self.steps is None else f"steps {self.steps.describe()}"
        names = "auto" if self.scope.backends == AUTO else ",".join(self.scope.backends)
        lossy = "lossy allowed" if self.scope.allow_lossy else "exact only unless named"
        return f"{self.label} ({steps}; backend {names}; {lossy})"


def _names(spec: str, what: str):
    spec = (spec or "").strip() or "auto"
    return controls.normalise_backends(spec, f"{SOURCE}, input {what}")


def _site_selectors(rule) -> List[str]:
    out = []
    if rule.patterns:
        out.append("pattern")
    if rule.kinds:
        out.append("kind")
    if rule.blocks is not None:
        out.append("blocks")
    if rule.components:
        out.append("components")
    return out


class ComfyAttention:
    """The override object (callable as ``override(func, *args, **kwargs)``) plus its report.

    Made once per node execution; ComfyUI deep-copies ``model_options`` on every clone, and this object
    returns itself from ``__deepcopy__`` (as a function would), so every clone shares one report."""

    def __init__(self, backend: str = "auto", recipe: Optional[str] = None, allow_lossy: bool = False,
                 strict: bool = False, exact_first_steps: int = 0, exact_last_steps: int = 0,
                 exact_backend: str = "auto"):
        for name, n in (("exact_first_steps", exact_first_steps), ("exact_last_steps", exact_last_steps)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{SOURCE}: {name} must be an int >= 0, got {n!r}")
        names = _names(backend, "backend")
        exact_names = _names(exact_backend, "exact_backend")
        lossy_exact = [n for n in (exact_names or ()) if registry.get_backend(n).LOSSY]
        if lossy_exact:
            raise ValueError(f"{SOURCE}: exact_backend names lossy backend(s) {', '.join(lossy_exact)}; the exact "
                             "steps need an exact backend or auto (auto there never picks a lossy kernel)")
        rec = recipes.load(recipe) if recipe and str(recipe).strip() else None
        self.settings = dict(backend=backend or "auto", recipe=rec.name if rec else None, allow_lossy=allow_lossy,
                             strict=strict, exact_first_steps=exact_first_steps, exact_last_steps=exact_last_steps,
                             exact_backend=exact_backend or "auto")
        self.rules: List[StepRule] = []
        self.notes: List[str] = []
        if exact_first_steps or exact_last_steps:
            items = tuple(x for x in (("first", exact_first_steps), ("last", exact_last_steps)) if x[1])
            self.rules.append(StepRule("exact steps", IndexSelector(items), exact_names, False, strict))
        default_names = names
        default_lossy = allow_lossy
        if rec is not None:
            if names == AUTO:
                default_names = rec.default_backend
            default_lossy = rec.allow_lossy or allow_lossy
            ignored = []
            for r in rec.rules:
                sel = _site_selectors(r)
                if sel:
                    ignored.append(f"{r.name} ({'/'.join(sel)})")
                    continue
                rb = r.backend if r.backend is not None else default_names
                lossy = r.allow_lossy if r.allow_lossy is not None else default_lossy
                self.rules.append(StepRule(f"recipe {rec.name}: rule {r.name}", r.steps, rb, lossy, strict))
                if r.steps is None:
                    break  # it holds at every step: later rules and the default never apply
            if ignored:
                msg = (f"recipe {rec.name}: rules {', '.join(ignored)} select attention sites by module path, kind or "
                       "block, which ComfyUI's attention override cannot see (it gets q, k, v only); they are not "
                       "applied. Their steps rules and default_backend/allow_lossy are.")
                if strict:
                    raise ValueError(f"{SOURCE} (strict): {msg} Use a recipe with steps-only rules, or turn strict off.")
                self.notes.append(msg)
                logger.warning("attnpatch: %s", msg)
        self.default = StepRule("default", None, default_names, default_lossy, strict)
        self.rules.append(self.default)
        self._memo: Dict[Tuple[Optional[int], Optional[int]], StepRule] = {}
        self._last_key = (None, None)
        self._last_step: Tuple[Optional[int], Optional[int]] = (None, None)
        self._lock = threading.Lock()
        self.run_steps: Dict[int, str] = {}
        self.run_total: Optional[int] = None
        self.last_run_report: Optional[str] = None
        self.runs = 0

    # -- ComfyUI's copies --------------------------------------------------------------------------
    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    # -- the override -----------------------------------------------------------------------------
    def __call__(self, func, *args, **kwargs):
        vals: Dict[str, Any] = dict(zip(COMFY_PARAMS, args))
        extra = [f"positional #{i}" for i in range(len(COMFY_PARAMS), len(args))]
        for name, value in kwargs.items():
            if name in COMFY_PARAMS:
                vals[name] = value
            elif name not in PASSIVE_KWARGS:
                extra.append(name)
        rule = self.rule_for(kwargs.get("transformer_options"))
        if extra or not all(n in vals for n in ("q", "k", "v", "heads")):
            why = (f"ComfyUI passed argument(s) attnpatch does not translate: {', '.join(extra)}" if extra
                   else "q, k, v or heads missing")
            rule.site.record_bypass(why)
            return func(*args, **kwargs)
        return self._route(rule, vals["q"], vals["k"], vals["v"], vals["heads"], vals.get("mask"),
                           bool(vals.get("skip_reshape", False)), bool(vals.get("skip_output_reshape", False)))

    def _route(self, rule: StepRule, q, k, v, heads, mask, skip_reshape: bool, skip_output_reshape: bool):
        if skip_reshape:
            layout = "bnsd"
        else:
            layout = "bsnd"
            d = q.shape[-1] // heads
            q = q.unflatten(-1, (heads, d))
            k = k.unflatten(-1, (-1, d))
            v = v.unflatten(-1, (k.shape[2], -1))
        if mask is not None:
            if mask.ndim == 2:
                mask = mask[None, None]
            elif mask.ndim == 3:
                mask = mask[:, None]
        out = router.route(rule.scope, q, k, v, layout, mask, False, None, 0.0, None)
        if layout == "bsnd":
            return out.transpose(1, 2) if skip_output_reshape else out.flatten(2)
        return out if skip_output_reshape else out.transpose(1, 2).flatten(2)

    # -- steps -------------------------------------------------------------------------------------
    def step_of(self, transformer_options) -> Tuple[Optional[int], Optional[int]]:
        """(step, total steps) of the current model evaluation, or (None, None) where ComfyUI did not
        say (no sampler: rules with steps are then skipped). One host sync per model evaluation: the
        result is kept for the ``sigmas`` tensor object that every attention call of it shares."""
        if not transformer_options:
            return None, None
        sig = transformer_options.get("sigmas")
        sched = transformer_options.get("sample_sigmas")
        if not isinstance(sig, torch.Tensor) or not isinstance(sched, torch.Tensor) or sched.numel() < 2:
            return None, None
        key = (sig, sched)
        last = self._last_key
        if last[0] is sig and last[1] is sched:
            return self._last_step
        s = float(sig.detach().float().max())
        schedule = sched.detach().float().flatten().tolist()
        total = len(schedule) - 1
        step = 0
        for i in range(total):
            if schedule[i] >= s - 1e-4 * max(abs(schedule[i]), 1e-6):
                step = i
        self._last_key, self._last_step = key, (step, total)
        return step, total

    def rule_for(self, transformer_options) -> StepRule:
        step, total = self.step_of(transformer_options)
        hit = self._memo.get((step, total))
        if hit is None:
            hit = self.default
            for r in self.rules:
                if r.steps is None or (step is not None and r.steps.contains(step, total)):
                    hit = r
                    break
            with self._lock:
                self._memo[(step, total)] = hit
        if step is not None and step not in self.run_steps:
            self.run_steps[step] = hit.label
            self.run_total = total
        return hit

    # -- report -------------------------------------------------------------------------------------
    def counts(self) -> Dict[str, Tuple[Counter, Counter, Counter]]:
        """Per rule label: (calls per backend, fallbacks per (refused, used, reason), calls not routed)."""
        out = {}
        for r in self.rules:
            calls, fallbacks = r.site.counts()
            out[r.label] = (calls, fallbacks, Counter(r.site.bypassed))
        return out

    def report(self, since: Optional[Dict[str, Tuple[Counter, Counter, Counter]]] = None) -> str:
        """What ran: per step rule, the backends with call counts and every fallback with its reason;
        with ``since`` (an earlier `counts()`), only what happened after it."""
        now = self.counts()
        s = self.settings
        head = [f"attnpatch attention (ComfyUI): backend={s['backend']}, allow_lossy={s['allow_lossy']}, "
                f"strict={s['strict']}" + (f", recipe={s['recipe']}" if s["recipe"] else "")
                + (f", exact first {s['exact_first_steps']} / last {s['exact_last_steps']} steps on "
                   f"{s['exact_backend']}" if s["exact_first_steps"] or s["exact_last_steps"] else "")]
        head += [f"note: {n}" for n in self.notes]
        if self.run_steps:
            head.append("steps: " + _step_ranges(self.run_steps) + (f" (of {self.run_total})" if self.run_total else ""))
        lines = []
        for r in self.rules:
            calls, fallbacks, bypassed = now[r.label]
            if since is not None and r.label in since:
                calls, fallbacks, bypassed = (c - p for c, p in zip((calls, fallbacks, bypassed), since[r.label]))
            ran = ", ".join(f"{n}×{c}" for n, c in sorted(calls.items()) if c > 0) or "no calls"
            lines.append(f"  {r.describe()}: {ran}")
            for (a, b, why), n in sorted(fallbacks.items()):
                if n > 0:
                    lines.append(f"      fell back {a} -> {b} ×{n}: {why}")
            for why, n in sorted(bypassed.items()):
                if n > 0:
                    lines.append(f"      not routed ×{n} (ran ComfyUI's own attention): {why}")
        return "\n".join(head + lines)

    # -- ComfyUI's OUTER_SAMPLE wrapper: one report per sampler run -----------------------------------------
    def outer_sample_wrapper(self, executor, *args, **kwargs):
        before = self.counts()
        self.run_steps, self.run_total = {}, None
        try:
            return executor(*args, **kwargs)
        finally:
            self.runs += 1
            self.last_run_report = self.report(since=before)
            logger.info("%s", self.last_run_report)

    attnpatch_report = report  # duck-typed marker for the report node


def _step_ranges(run_steps: Dict[int, str]) -> str:
    parts = []
    for step in sorted(run_steps):
        label = run_steps[step]
        if parts and parts[-1][2] == label and parts[-1][1] == step - 1:
            parts[-1][1] = step
        else:
            parts.append([step, step, label])
    return ", ".join(f"{a}–{b} {lab}" if a != b else f"{a} {lab}" for a, b, lab in parts)


def previous_override(model_options: dict) -> Optional[Any]:
    return (model_options or {}).get("transformer_options", {}).get(OVERRIDE_KEY)


__all__ = ["ComfyAttention", "StepRule", "COMFY_PARAMS", "OVERRIDE_KEY", "previous_override"]
