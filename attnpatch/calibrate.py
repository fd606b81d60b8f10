"""`attnpatch.calibrate`: measure each attention site's error on the model's own activations and write
the fastest recipe that keeps the output within a stated bound.

``calibrate(target, run)`` runs the user's workload ``run(target)`` (a pipeline call with their prompt,
steps and resolution, or a model forward) and:

1. **Captures** (`attnpatch.capture`): the run goes through the model once, exact (each call on the
   exact backend auto picks: the *reference*); at the first call of each denoising step of each site
   a bounded sample of the real q/k/v is taken and every candidate backend (lossy and exact) is run on
   it against a float64/float32 reference. Errors are kept per site and *step bucket* (``step_buckets``
   contiguous ranges of the run's denoising steps).
2. **Times** every candidate on each site's real call shape (`attnpatch.autotune.measure`: CUDA
   events). Off CUDA nothing is timed (host time says little; the references then stay) unless
   ``timer=`` or `attnpatch.autotune.override_timer` gives a timer (tests do).
3. **Chooses**, per site and step bucket, the fastest candidate whose relative error on the samples
   is at most ``site_max_error`` (exact candidates always qualify); a backend other than the
   reference must be at least ``min_gain`` faster than it, else the reference stays.
4. **Validates end to end**: the whole ``run`` again with the chosen recipe, same seed, against the
   exact run: free-running (the output: PSNR, SSIM for images and video, relative L2, max abs) and,
   for diffusers pipelines, teacher-forced per step (`attnpatch.teacher_forcing`: the exact run's
   latents fed to each step); each beside the *exact-kernel floor*, the same measurement between the
   reference and another exact backend.
5. **Backs off** while the bound is missed: the site-steps whose chosen backend had the largest error
   go back to their exact reference, ``backoff_fraction`` of them per round, and the recipe is
   validated again. The rounds are reported.

The result, a `Calibration`, holds the recipe as an ordinary dict (``.recipe``): rules that name
concrete backends per site and step range, ``[chosen, reference]`` (the reference serves any call
the chosen one cannot), so nothing is measured when it runs. ``.save(path)`` writes it as YAML with
the measurements as comments (load it with ``attnpatch.apply(pipe, recipe=path)``); ``.report()``
shows per site the backend, its error and the time it saves.

The bound is ``min_psnr`` (dB) and/or ``max_error`` (relative L2), checked on the free-running output
(``bound_on="output"``, the default) or on the worst teacher-forced step (``bound_on="step"``). With
neither given, ``min_psnr`` is `DEFAULT_MIN_PSNR`. A run with every site back on its reference
kernel reproduces the exact run, so back-off always ends with the bound met.

Cost: the exact run, one timing pass, and per validation 1 run (2 with teacher forcing); the floor
takes 1-2 more runs. Samples are measured during the exact run and freed at once (`capture`).
The run must be deterministic given the seed: each run starts from ``torch.manual_seed(seed)`` (in a
forked RNG state, so the caller's random streams are left as they were).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import applying, autotune, controls, quality, recipes, registry
from .call import Call
from .capture import (DEFAULT_BUDGET, DEFAULT_HEADS, DEFAULT_MAX_SAMPLES, DEFAULT_QUERY_ROWS, Capture, Errors,
                      SiteRecord)
from .capture import step_buckets as bucket_ranges
from .quality import OutputMetrics
from .teacher_forcing import StepError, scheduler_of, step_errors, trace_steps

logger = logging.getLogger("attnpatch")

#: The bound when neither ``min_psnr`` nor ``max_error`` is given (dB, output vs the exact run).
DEFAULT_MIN_PSNR = 35.0
#: A site's chosen backend may have at most this relative L2 error on its samples, by default.
DEFAULT_SITE_MAX_ERROR = 0.1
#: A backend other than the reference must be this much faster than it (fraction), by default.
DEFAULT_MIN_GAIN = 0.03
#: Fraction of the initially chosen site-steps sent back to exact per back-off round, by default.
DEFAULT_BACKOFF_FRACTION = 0.25

#: ``progress(done, total, phase)``: called when a phase starts (and with done == total at the end).
Progress = Callable[[int, int, str], None]


# -- results ----------------------------------------------------------------------------------------------

@dataclass
class SiteChoice:
    """The choice for one site in one step range, with what it was based on.

    ``steps`` is the inclusive (first, last) step range, or None for calls with no known step.
    ``times_ms`` is each timed backend's mean time per call over this site-step's calls; ``errors``
    each measured backend's worst error on the samples. ``status`` is "lossy", "exact" (the
    reference), "exact, faster" (another exact kernel) or "back to exact" (reverted by back-off)."""

    path: str
    component: str
    pattern: str
    kind: str
    steps: Optional[Tuple[int, int]]
    calls: int
    reference: str
    references: Tuple[str, ...]
    backend: str
    errors: Dict[str, Errors]
    times_ms: Dict[str, float]
    samples: int
    sample_bytes: int
    status: str
    why: str = ""
    initial: str = ""  # the backend chosen before back-off

    @property
    def error(self) -> Optional[Errors]:
        return self.errors.get(self.backend)

    @property
    def saved_ms(self) -> Optional[float]:
        """Attention time this choice saves over the reference, in ms, over this site-step's calls of
        the calibration run (None when either was not timed)."""
        a, b = self.times_ms.get(self.reference), self.times_ms.get(self.backend)
        if a is None or b is None:
            return None
        return (a - b) * self.calls

    @property
    def backends(self) -> List[str]:
        """What the recipe names for this site-step: the choice, then the exact reference(s)."""
        return list(dict.fromkeys((self.backend,) + self.references))

    def steps_label(self) -> str:
        return "all" if self.steps is None else f"{self.steps[0]}-{self.steps[1]}"

    def as_dict(self) -> Dict[str, Any]:
        return {
            "path": self.path, "component": self.component, "kind": self.kind,
            "steps": list(self.steps) if self.steps else None, "calls": self.calls, "reference": self.reference,
            "backend": self.backend, "backends": self.backends, "status": self.status, "why": self.why,
            "initial": self.initial, "samples": self.samples, "sample_bytes": self.sample_bytes,
            "errors": {n: dataclasses.asdict(e) for n, e in self.errors.items()},
            "times_ms": self.times_ms, "saved_ms": self.saved_ms,
        }


@dataclass
class Bound:
    """What "within the bound" means: ``min_psnr`` (dB) and/or ``max_error`` (relative L2), on the
    free-running output (``on="output"``) or on the worst teacher-forced step (``on="step"``)."""

    min_psnr: Optional[float]
    max_error: Optional[float]
    on: str = "output"

    def holds(self, psnr_db: float, rel_l2: float) -> bool:
        if self.min_psnr is not None and not psnr_db >= self.min_psnr:
            return False
        if self.max_error is not None and not rel_l2 <= self.max_error:
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.min_psnr is not None:
            parts.append(f"PSNR >= {self.min_psnr:g} dB")
        if self.max_error is not None:
            parts.append(f"relative L2 <= {self.max_error:g}")
        where = ("the output, free-running, vs the exact run" if self.on == "output"
                 else "every denoising step, teacher-forced, vs the exact run")
        return " and ".join(parts) + f" ({where})"


@dataclass
class Validation:
    """End-to-end measurements of one recipe against the exact run."""

    free_running: Optional[OutputMetrics] = None
    teacher_forced: List[StepError] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return {"free_running": self.free_running.as_dict() if self.free_running else None,
                "teacher_forced": [dataclasses.asdict(e) for e in self.teacher_forced], "note": self.note}


@dataclass
class BackoffRound:
    """One back-off round: the measurement that missed the bound, and what went back to exact."""

    index: int
    psnr_db: float
    rel_l2: float
    reverted: List[str]


@dataclass
class Calibration:
    """What `calibrate` returns. ``recipe`` is an ordinary recipe dict (see `attnpatch.recipes`)."""

    recipe: Dict[str, Any]
    choices: List[SiteChoice]
    bound: Bound
    bound_met: bool
    validation: Validation
    floor: Validation
    backoff: List[BackoffRound]
    total_steps: Optional[int]
    buckets: List[Tuple[int, int]]
    candidates: List[str]
    not_called: List[str]
    notes: List[str]
    machine: Dict[str, Any]
    capture: Dict[str, Any]

    @property
    def lossy_choices(self) -> List[SiteChoice]:
        return [c for c in self.choices if c.status == "lossy"]

    def saved_ms(self) -> float:
        """Attention time the recipe saves per run of the calibration workload (ms, from the timings)."""
        return sum(c.saved_ms or 0.0 for c in self.choices)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "recipe": self.recipe, "bound": dataclasses.asdict(self.bound), "bound_met": self.bound_met,
            "validation": self.validation.as_dict(), "floor": self.floor.as_dict(),
            "backoff": [dataclasses.asdict(r) for r in self.backoff], "total_steps": self.total_steps,
            "buckets": [list(b) for b in self.buckets], "candidates": self.candidates,
            "not_called": self.not_called, "notes": self.notes, "machine": self.machine, "capture": self.capture,
            "saved_ms": self.saved_ms(), "choices": [c.as_dict() for c in self.choices],
        }

    def report(self) -> str:
        """A readable summary: the bound and the end-to-end numbers beside the floor, back-off, and per
        site and step range the backend, its error and the time it saves."""
        from .cli import table

        n_sites = len({c.path for c in self.choices})
        lines = [f"attnpatch calibration: {n_sites} site{'' if n_sites == 1 else 's'} measured"
                 + (f", {self.total_steps} steps in buckets {', '.join(f'{a}-{b}' for a, b in self.buckets)}"
                    if self.buckets else ", no denoising steps seen")
                 + f"; candidates: {', '.join(self.candidates) or 'none'}",
                 f"bound: {self.bound.describe()}: {'MET' if self.bound_met else 'MISSED'}"]
        v, f = self.validation, self.floor
        rows = []
        if v.free_running is not None or f.free_running is not None:
            rows.append(("output, free-running", v.note or (v.free_running.describe() if v.free_running else "-"),
                         f.free_running.describe() if f.free_running else f.note or "-"))
        if v.teacher_forced or f.teacher_forced:
            rows.append(("steps, teacher-forced", _describe_steps(v.teacher_forced) or v.note or "-",
                         _describe_steps(f.teacher_forced) or f.note or "-"))
        if rows:
            lines += ["", table(rows, ["vs the exact run", "calibrated recipe", "exact-kernel floor"])]
        if self.backoff:
            lines.append("")
            for r in self.backoff:
                shown = ", ".join(r.reverted[:6]) + (f" and {len(r.reverted) - 6} more" if len(r.reverted) > 6 else "")
                lines.append(f"back-off round {r.index}: PSNR {quality.format_db(r.psnr_db)}, rel L2 {r.rel_l2:.3g} "
                             f"missed the bound; back to exact: {shown}")
        else:
            lines.append("back-off: none needed")
        lines.append(f"attention time saved per run: {self.saved_ms():.1f} ms (timed per call, times the calls of "
                     "the calibration run)")
        trows = []
        for c in self.choices:
            e = c.error
            ref_e = c.errors.get(c.reference)
            tr, tc = c.times_ms.get(c.reference), c.times_ms.get(c.backend)
            trows.append((c.path or "<root>", c.steps_label(), c.backend, c.status,
                          "-" if e is None else f"{e.rel_l2:.2e} ({e.cosine:.5f})",
                          f"{c.reference}" + ("" if ref_e is None else f" {ref_e.rel_l2:.1e}"),
                          "-" if tr is None or tc is None else f"{tr:.3f} -> {tc:.3f}",
                          "-" if c.saved_ms is None else f"{c.saved_ms:.1f}", c.calls, c.why))
        lines += ["", table(trows, ["site", "steps", "backend", "status", "rel L2 (cosine)", "exact reference",
                                    "ms/call ref -> chosen", "saved ms", "calls", "why"])]
        if self.not_called:
            lines.append(f"\nnot called during the run (default_backend auto): {', '.join(self.not_called)}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    def to_yaml(self) -> str:
        """The recipe as YAML text, with the measurements as comments (what `save` writes)."""
        return _recipe_yaml(self)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> str:
        """Write the recipe to ``path`` as YAML with the measurements as comments; returns the path.
        ``attnpatch.apply(target, recipe=path)`` (or `attnpatch.recipes.load`) reads it back."""
        path = os.fspath(path)
        text = self.to_yaml()
        recipes.loads(text, path)  # what is written must load
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path


def _describe_steps(errors: List[StepError]) -> str:
    if not errors:
        return ""
    worst = max(errors, key=lambda e: e.rel_l2)
    mean = sum(e.rel_l2 for e in errors) / len(errors)
    return (f"worst rel L2 {worst.rel_l2:.3g} (step {worst.step}, PSNR {quality.format_db(worst.psnr_db)}), "
            f"mean {mean:.3g} over {len(errors)} steps")


# -- the run ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


#: Why nothing is timed on devices attnpatch does not time (the reference then stays everywhere).
NOT_TIMED = ("not timed: attnpatch times kernels on CUDA only (host timing elsewhere says little); pass "
             "timer= or use attnpatch.autotune.override_timer to time them")


def _default_timer(call: Call):
    """`attnpatch.autotune`'s timer for ``call``: `attnpatch.autotune.measure` (CUDA events) on CUDA, an
    `attnpatch.autotune.override_timer` where one is active, else None (not timed)."""
    return autotune._timer_for(call)


def _check_target(target) -> None:
    from . import patch as _patch

    for _, m in _patch._components(target):
        if _patch.patch_of(m) is not None:
            raise ValueError(f"attnpatch.calibrate: {type(target).__name__} is patched (attnpatch.apply); call "
                             "patch.remove() first: calibration patches it itself, run by run")
    ctx = controls._CONTEXT.get()
    if ctx is not None and ctx.backends is not None:
        raise ValueError("attnpatch.calibrate was called inside use_backend(...), whose choice would override "
                         "every site's; call it outside the block")


def _exclude_of(base: Optional[recipes.Recipe]) -> Dict[str, List[str]]:
    if base is None:
        return {}
    out = {}
    if base.exclude.components:
        out["components"] = list(base.exclude.components)
    if base.exclude.sites:
        out["sites"] = list(base.exclude.sites)
    return out


class _Runner:
    """Runs the workload under a recipe, seeded, teacher-forced when given the exact run's trace; counts
    the phases for ``progress``."""

    def __init__(self, target, run, seed: int, progress: Optional[Progress]):
        self.target = target
        self.run = run
        self.seed = seed
        self.progress = progress
        self.done = 0
        self.total = 0

    def phase(self, what: str) -> None:
        logger.info("attnpatch.calibrate: %s", what)
        if self.progress is not None:
            self.progress(self.done, self.total, what)
        self.done += 1

    def __call__(self, recipe: Dict[str, Any], feed=None):
        """(output tensor, the run's step trace or None): ``run`` under ``recipe``; with ``feed``, teacher-forced."""
        from .applying import apply

        patch = apply(self.target, recipe=recipe)
        try:
            with _seeded(self.seed):
                if feed is not None:
                    with trace_steps(self.target, feed=feed) as tr:
                        out = self.run(self.target)
                    return quality.to_tensor(out), tr
                return quality.to_tensor(self.run(self.target)), None
        finally:
            patch.remove()


def calibrate(target, run: Callable[[Any], Any], *, candidates: Optional[Sequence[str]] = None,
              budget: int = DEFAULT_BUDGET, min_psnr: Optional[float] = None, max_error: Optional[float] = None,
              bound_on: str = "output", site_max_error: float = DEFAULT_SITE_MAX_ERROR,
              step_buckets: Union[int, Sequence[int]] = 4, heads: int = DEFAULT_HEADS,
              query_rows: int = DEFAULT_QUERY_ROWS, max_samples: int = DEFAULT_MAX_SAMPLES,
              min_gain: float = DEFAULT_MIN_GAIN, backoff_fraction: float = DEFAULT_BACKOFF_FRACTION,
              teacher_forcing: bool = True, recipe=None, name: Optional[str] = None, seed: int = 0,
              timer: Optional[Callable[[Any, Call], float]] = None,
              progress: Optional[Progress] = None) -> Calibration:
    """Calibrate lossy attention for ``target`` on its own workload ``run(target)`` (see the module
    docstring). ``run`` must return the output to compare (a tensor, numpy array, PIL images, or a
    diffusers / transformers output).

    Args:
        candidates: backend names to consider (default: every available backend except the slow
            reference kernels, ``AUTOTUNE_TIMED = False``, and those auto leaves out on the device, its
            ``AUTO_LEFT_OUT``: FlashAttention 4 on sm90, whose cold start a recipe would pay in every
            fresh process; name them here to measure them anyway). The exact reference is always measured.
        budget: the most bytes one captured sample may hold (`attnpatch.capture`).
        min_psnr / max_error / bound_on: the end-to-end bound (see `Bound`); default ``min_psnr=35``.
        site_max_error: the largest relative L2 error a lossy backend may have on a site's samples.
        step_buckets: how many contiguous step ranges to calibrate separately, or the first step of each.
        heads / query_rows / max_samples: the size and number of samples per site and step bucket.
        min_gain: how much faster than the reference another backend must be (fraction).
        backoff_fraction: the share of the first choice's non-reference site-steps reverted per round.
        teacher_forcing: also measure per-step errors on the exact run's latents (diffusers pipelines).
        recipe: a base recipe whose ``exclude`` is kept (default: the shipped exact recipe that matches
            the target; False: none). Its rules are not used.
        name: the calibrated recipe's name (default "<base>-calibrated" or "calibrated").
        seed: each run starts from ``torch.manual_seed(seed)``.
        timer: ``timer(backend, call) -> ms`` instead of `attnpatch.autotune.measure`.
        progress: ``progress(done, total, phase)`` at each phase (the CLI's progress bar).
    """
    if not callable(run):
        raise TypeError(f"attnpatch.calibrate: run must be a callable run(target), got {type(run).__name__}")
    if bound_on not in ("output", "step"):
        raise ValueError(f"attnpatch.calibrate: bound_on={bound_on!r}; use 'output' (free-running) or 'step' "
                         "(teacher-forced, diffusers pipelines)")
    for label, value in (("site_max_error", site_max_error), ("min_gain", min_gain)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"attnpatch.calibrate: {label} must be a number >= 0, got {value!r}")
    if not (0 < backoff_fraction <= 1):
        raise ValueError(f"attnpatch.calibrate: backoff_fraction must be in (0, 1], got {backoff_fraction!r}")
    for label, value in (("budget", budget), ("heads", heads), ("query_rows", query_rows),
                         ("max_samples", max_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"attnpatch.calibrate: {label} must be a positive int, got {value!r}")
    if candidates is not None:
        candidates = list(dict.fromkeys(candidates))
        registry.check_names(candidates, "attnpatch.calibrate(candidates=...)")
    if min_psnr is None and max_error is None:
        min_psnr = DEFAULT_MIN_PSNR
    bound = Bound(min_psnr, max_error, bound_on)
    _check_target(target)
    base = None
    if recipe is None:
        base = recipes.find_recipe(target)
    elif recipe is not False:
        base = recipes.load(recipe)
    exclude = _exclude_of(base)
    if name is None:
        name = f"{base.name}-calibrated" if base is not None else "calibrated"
    has_scheduler = scheduler_of(target) is not None
    if bound_on == "step" and not has_scheduler:
        raise ValueError("attnpatch.calibrate: bound_on='step' needs a diffusers pipeline (a target with "
                         "scheduler.step) to teacher-force; use bound_on='output'")
    can_force = has_scheduler and (teacher_forcing or bound_on == "step")
    runner = _Runner(target, run, seed, progress)
    runner.total = 4 + (2 if can_force else 0)
    notes: List[str] = []

    # 1. the exact run, captured
    capture = Capture(candidates, step_buckets, budget, heads, query_rows, max_samples)
    runner.phase("exact run: capturing and measuring samples")
    exact_out, exact_trace, sites = _capture_run(target, run, seed, capture, exclude, can_force)
    if can_force and (exact_trace is None or not len(exact_trace)):
        can_force = False
        runner.total -= 2
        notes.append("teacher forcing: the run made no scheduler.step call; only the output is compared")
    total_steps = capture.total_steps
    buckets = bucket_ranges(total_steps, step_buckets)

    # 2. timing on the real shapes
    runner.phase("timing the candidates on the real call shapes")
    times, timing_failed = _time_candidates(capture, timer)

    # 3. the choice
    choices = _choose(capture, times, timing_failed, site_max_error, min_gain)
    called = {id(r.site) for r in capture.records.values()}
    not_called = [s.path for s in sites if s.routed and id(s) not in called]
    if not choices:
        notes.append("no routed attention call was made during the run: nothing to calibrate")

    # 4. the floor
    floor = Validation()
    floor_recipe = _floor_recipe(capture, choices, exclude)
    if floor_recipe is None:
        floor.note = "no second exact backend serves these calls"
        runner.total -= 2 if can_force else 1
    else:
        runner.phase("exact-kernel floor: free-running")
        out, _ = runner(floor_recipe)
        floor.free_running = quality.compare(out, exact_out)
        if can_force:
            runner.phase("exact-kernel floor: teacher-forced")
            _, tr = runner(floor_recipe, feed=exact_trace)
            floor.teacher_forced = step_errors(tr, exact_trace)

    # 5. validate, back off
    validation, backoff, bound_met = _validate_and_back_off(runner, choices, bound, exact_out, exact_trace,
                                                           can_force, exclude, name, backoff_fraction)
    if floor.free_running is not None and not bound.holds(floor.free_running.psnr_db, floor.free_running.rel_l2) \
            and bound.on == "output":
        notes.append("the exact-kernel floor itself misses the bound: changing one exact kernel for another moves "
                     "this output that much, so the bound cannot tell lossy kernels from exact ones here "
                     "(bound_on='step' measures per step, where errors do not compound)")
    unavailable = [n for n in (candidates or []) if registry.get_backend(n).availability()]
    for n in unavailable:
        notes.append(f"candidate {n} is unavailable here: {'; '.join(registry.get_backend(n).availability())}")
    if runner.progress is not None:
        runner.progress(runner.total, runner.total, "done")
    return Calibration(
        recipe=_recipe_dict(choices, exclude, name, bound),
        choices=choices, bound=bound, bound_met=bound_met, validation=validation, floor=floor,
        backoff=backoff, total_steps=total_steps, buckets=buckets,
        candidates=sorted({n for i in capture.infos.values() for n in i.candidates + (i.reference,)}),
        not_called=not_called, notes=notes, machine=_machine(capture),
        capture={"budget_bytes": budget, "heads": heads, "query_rows": query_rows, "max_samples": max_samples,
                 "max_sample_bytes": capture.max_sample_bytes, "site_max_error": site_max_error,
                 "min_gain": min_gain},
    )


def _capture_run(target, run, seed: int, capture: Capture, exclude, trace: bool):
    """The exact run through the capture: returns (output tensor, step trace or None, the sites)."""
    backend = registry.register_backend(capture.backend())
    try:
        cap_recipe = {"version": 1, "name": "calibrate-capture", "default_backend": backend.NAME}
        if exclude:
            cap_recipe["exclude"] = exclude
        patch = applying.apply_with_recipe(target, recipe=cap_recipe)
        try:
            schedule = recipes.StepSchedule([])
            patch.schedule = schedule
            recipes._SCHEDULES.add(schedule)
            recipes._track_pipeline_steps(target, patch, schedule)
            capture.schedule = schedule
            sites = list(patch.sites)
            with _seeded(seed):
                if trace:
                    with trace_steps(target) as tr:
                        out = run(target)
                else:
                    out, tr = run(target), None
            return quality.to_tensor(out).clone(), tr, sites  # a copy: the reference of every comparison
        finally:
            patch.remove()
    finally:
        registry.unregister_backend(backend.NAME)


def _time_candidates(capture: Capture, timer) -> Tuple[Dict[Tuple[Call, str], float], Dict[Tuple[Call, str], str]]:
    """ms per call of the reference and each candidate on each distinct real call shape (``timer``, or
    `_default_timer`); failures and untimed backends with the reason."""
    times: Dict[Tuple[Call, str], float] = {}
    failed: Dict[Tuple[Call, str], str] = {}
    for call, info in capture.infos.items():
        if not info.candidates:
            continue  # nothing to compare the reference with
        time_it = timer or _default_timer(call)
        for name in (info.reference,) + info.candidates:
            if time_it is None:
                failed[(call, name)] = NOT_TIMED
                continue
            try:
                ms = float(time_it(registry.get_backend(name), call))
                if not (math.isfinite(ms) and ms > 0):
                    raise ValueError(f"timer returned {ms!r}")
                times[(call, name)] = ms
            except Exception as exc:  # a backend that cannot be timed is not chosen; say why
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                failed[(call, name)] = f"timing raised {type(exc).__name__}: {first}"
                logger.warning("attnpatch.calibrate: timing %s on %s failed: %s", name, call.describe(),
                               failed[(call, name)])
    return times, failed


# -- choosing --------------------------------------------------------------------------------------------

def _choose(capture: Capture, times, timing_failed, site_max_error: float, min_gain: float) -> List[SiteChoice]:
    choices = []
    order = {id(s): i for i, s in enumerate(dict.fromkeys(r.site for r in capture.records.values()))}
    recs = sorted(capture.records.values(),
                  key=lambda r: (order[id(r.site)], (-1, -1) if r.bucket is None else r.bucket))
    for rec in recs:
        choices.append(_choose_one(rec, capture, times, timing_failed, site_max_error, min_gain))
    return choices


def _choose_one(rec: SiteRecord, capture: Capture, times, timing_failed, site_max_error, min_gain) -> SiteChoice:
    """The fastest qualifying backend for one site and step bucket (see the module docstring, step 3)."""
    infos = [(capture.infos[call], n) for call, n in rec.calls.most_common()]
    total = sum(n for _, n in infos)
    refs = tuple(dict.fromkeys(info.reference for info, _ in infos))
    reference = refs[0]
    names = set(infos[0][0].candidates).intersection(*(set(i.candidates) for i, _ in infos[1:])) - set(refs)

    def mean_ms(pick) -> Optional[float]:
        """Mean ms per call over this record's calls of the backend ``pick(info)`` names."""
        acc = 0.0
        for info, n in infos:
            t = times.get((info.call, pick(info)))
            if t is None:
                return None
            acc += t * n
        return acc / total

    times_ms: Dict[str, float] = {}
    t_ref = mean_ms(lambda info: info.reference)
    if t_ref is not None:
        times_ms[reference] = t_ref
    why: List[str] = []
    best, best_t = reference, t_ref
    for name in sorted(names):
        t = mean_ms(lambda info: name)
        if t is not None:
            times_ms[name] = t
        err = rec.errors.get(name)
        lossy = registry.get_backend(name).LOSSY
        if name in rec.failed:
            why.append(f"{name}: {rec.failed[name]}")
        elif t is None or t_ref is None:
            missing = [timing_failed.get((i.call, n)) for i, _ in infos for n in (name, i.reference)]
            why.append(next((m for m in missing if m), "not timed"))
        elif lossy and err is None:
            why.append(f"{name}: no sample measured ({'; '.join(rec.not_sampled) or 'not sampled'})")
        elif lossy and not err.rel_l2 <= site_max_error:
            why.append(f"{name}: rel L2 {err.rel_l2:.3g} > {site_max_error:g}")
        elif best_t is None or t < best_t:
            best, best_t = name, t
    if best != reference and best_t > t_ref * (1 - min_gain):
        why.append(f"{best}: {best_t:.4g} vs {t_ref:.4g} ms, not {min_gain:.0%} faster than the reference")
        best = reference
    if best != reference:
        why = []
    elif not names:
        why = [f"{n}: {r}" for n, r in sorted(infos[0][0].refused.items())][:3] or ["no other candidate"]
    why = list(dict.fromkeys(why))
    status = "exact" if best == reference else ("lossy" if registry.get_backend(best).LOSSY else "exact, faster")
    site = rec.site
    return SiteChoice(
        path=site.path, component=site.component, pattern=recipes.relative_path(site), kind=site.kind,
        steps=rec.bucket, calls=total, reference=reference, references=refs, backend=best,
        errors=dict(rec.errors), times_ms=times_ms, samples=rec.samples, sample_bytes=rec.sample_bytes,
        status=status, why="; ".join(why), initial=best)


# -- recipes ---------------------------------------------------------------------------------------------

def _rule_name(prefix: str, backends: Sequence[str], component: str, multi_component: bool, used: set) -> str:
    base = f"{prefix}-{backends[0]}" + (f"-{component}" if multi_component and component else "")
    base = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in base.lower())
    name, i = base, 2
    while name in used:
        name, i = f"{base}-{i}", i + 1
    used.add(name)
    return name


def _rules(choices: List[SiteChoice]) -> List[Tuple[Dict[str, Any], List[SiteChoice]]]:
    """Recipe rules, each with the choices it stands for (for the comments).

    Per site: the backends it gets outside its measured step ranges (its choice for calls with no
    known step, else its reference; or, when every measured range chose the same, that) go in a rule
    without ``steps``; every step range that chose differently gets a ``steps`` rule, placed before
    it. Sites with the same component, step range and backends share a rule (a list of patterns)."""
    by_site: Dict[Tuple[str, str], List[SiteChoice]] = {}
    for c in choices:
        by_site.setdefault((c.component, c.pattern), []).append(c)
    step_groups: Dict[Tuple, List[SiteChoice]] = {}
    plain_groups: Dict[Tuple, Tuple[List[str], List[SiteChoice]]] = {}
    for (component, pattern), cs in by_site.items():
        outside = next((c for c in cs if c.steps is None), None)
        stepped = [c for c in cs if c.steps is not None]
        distinct = {tuple(c.backends) for c in stepped}
        if outside is not None:
            fallback = tuple(outside.backends)
        elif len(distinct) == 1:
            fallback = distinct.pop()
        else:
            fallback = tuple(stepped[0].references)
        for c in stepped:
            if tuple(c.backends) != fallback:
                step_groups.setdefault((c.steps, component, tuple(c.backends)), []).append(c)
        patterns, covered = plain_groups.setdefault((component, fallback), ([], []))
        patterns.append(pattern)
        covered.extend(c for c in cs if tuple(c.backends) == fallback)
    multi = len({c.component for c in choices}) > 1
    used: set = set()
    out = []
    for (steps, component, backends), cs in sorted(step_groups.items(), key=lambda kv: kv[0]):
        rule: Dict[str, Any] = {"name": _rule_name(f"steps-{steps[0]}-{steps[1]}", backends, component, multi, used)}
        if component:
            rule["components"] = [component]
        _set_patterns(rule, [c.pattern for c in cs])
        rule.update(steps={"from": steps[0], "to": steps[1]}, backend=list(backends))
        out.append((rule, cs))
    for (component, backends), (patterns, covered) in plain_groups.items():
        rule = {"name": _rule_name("all-steps", backends, component, multi, used)}
        if component:
            rule["components"] = [component]
        _set_patterns(rule, patterns)
        rule["backend"] = list(backends)
        out.append((rule, covered))
    return out


def _set_patterns(rule: Dict[str, Any], patterns: Sequence[str]) -> None:
    """A rule's ``pattern``: the sites' paths inside their component. A target that is itself the
    only site (path "") gets no pattern (the rule then selects every site, i.e. that one)."""
    patterns = list(dict.fromkeys(patterns))
    if patterns != [""]:
        rule["pattern"] = patterns


def _recipe_dict(choices: List[SiteChoice], exclude, name: str, bound: Bound) -> Dict[str, Any]:
    lossy = sorted({c.backend for c in choices if registry.get_backend(c.backend).LOSSY})
    desc = ("LOSSY. " if lossy else "") + (
        f"Calibrated by attnpatch.calibrate on this model's own activations: per site and step range the fastest "
        f"backend within the bound ({bound.describe()})"
        + (f"; lossy kernels: {', '.join(lossy)}" if lossy else "; no lossy kernel qualified")
        + ". Each rule names its backend, then the exact reference for calls it cannot serve; nothing is "
          "measured when it runs. Step ranges are those of the calibration run's step count.")
    rec: Dict[str, Any] = {"version": 1, "name": name, "description": desc, "default_backend": "auto"}
    if exclude:
        rec["exclude"] = {k: list(v) for k, v in exclude.items()}
    rec["rules"] = [rule for rule, _ in _rules(choices)]
    return rec


def _floor_recipe(capture: Capture, choices: List[SiteChoice], exclude) -> Optional[Dict[str, Any]]:
    """Every measured site on another exact backend than its reference (the exact-kernel floor): the
    first of the call's exact alternatives whose sample output differed from the reference's. None
    when no site has one."""
    per_site: Dict[Tuple[str, str], Tuple[str, ...]] = {}
    records = sorted(capture.records.values(), key=lambda r: -r.total_calls)
    for rec in records:
        key = (rec.site.component, recipes.relative_path(rec.site))
        if key in per_site:
            continue
        call = rec.calls.most_common(1)[0][0]
        info = capture.infos[call]
        options = [n for n in info.floor_options if n not in rec.same_as_reference]
        if options:
            per_site[key] = (options[0], info.reference)
    if not per_site:
        return None
    groups: Dict[Tuple[str, Tuple[str, ...]], List[str]] = {}
    for (component, pattern), backends in per_site.items():
        groups.setdefault((component, backends), []).append(pattern)
    used: set = set()
    multi = len({c for c, _ in groups}) > 1
    rules = []
    for (component, backends), patterns in groups.items():
        rule: Dict[str, Any] = {"name": _rule_name("floor", backends, component, multi, used)}
        if component:
            rule["components"] = [component]
        _set_patterns(rule, patterns)
        rule["backend"] = list(backends)
        rules.append(rule)
    rec = {"version": 1, "name": "calibrate-floor", "default_backend": "auto", "rules": rules}
    if exclude:
        rec["exclude"] = exclude
    return rec


# -- validation and back-off -----------------------------------------------------------------------------

def _validate_and_back_off(runner: _Runner, choices: List[SiteChoice], bound: Bound, exact_out, exact_trace,
                           can_force: bool, exclude, name: str, backoff_fraction: float):
    movable = sorted((c for c in choices if c.backend != c.reference),
                     key=lambda c: (-(c.error.rel_l2 if c.error else 0.0), c.steps or (-1, -1), c.path))
    per_round = max(1, math.ceil(len(movable) * backoff_fraction))
    backoff: List[BackoffRound] = []
    validation = Validation()
    while True:
        if not any(c.backend != c.reference for c in choices):
            validation = Validation(note="not run: every site runs its exact reference backend, as in the exact run")
            validation.free_running = quality.OutputMetrics(math.inf, 0.0, 0.0, 1.0, None, tuple(exact_out.shape))
            return validation, backoff, True
        recipe = _recipe_dict(choices, exclude, name, bound)
        round_no = len(backoff)
        if bound.on == "step":
            runner.phase(f"calibrated recipe: teacher-forced{f' (back-off round {round_no})' if round_no else ''}")
            _, tr = runner(recipe, feed=exact_trace)
            steps = step_errors(tr, exact_trace)
            worst = max(steps, key=lambda e: e.rel_l2) if steps else None
            psnr_db = min((e.psnr_db for e in steps), default=math.inf)
            rel = worst.rel_l2 if worst else 0.0
            measured = Validation(teacher_forced=steps)
        else:
            runner.phase(f"calibrated recipe: free-running{f' (back-off round {round_no})' if round_no else ''}")
            out, _ = runner(recipe)
            metrics = quality.compare(out, exact_out)
            psnr_db, rel = metrics.psnr_db, metrics.rel_l2
            measured = Validation(free_running=metrics)
        if bound.holds(psnr_db, rel):
            validation = measured
            break
        revert = [c for c in movable if c.backend != c.reference][:per_round]
        for c in revert:
            c.backend = c.reference
            c.status = "back to exact"
            c.why = f"back-off round {round_no + 1}" + (f"; {c.why}" if c.why else "")
        reverted = [f"{c.path or '<root>'} steps {c.steps_label()} ({c.initial})" for c in revert]
        backoff.append(BackoffRound(round_no + 1, psnr_db, rel, reverted))
        runner.total += 1
        logger.info("attnpatch.calibrate: the bound was missed (PSNR %s, rel L2 %.3g); %d site-steps back to exact",
                    quality.format_db(psnr_db), rel, len(revert))
    if can_force:
        if bound.on == "step":
            runner.phase("calibrated recipe: free-running")
            out, _ = runner(_recipe_dict(choices, exclude, name, bound))
            validation.free_running = quality.compare(out, exact_out)
        else:
            runner.phase("calibrated recipe: teacher-forced")
            _, tr = runner(_recipe_dict(choices, exclude, name, bound), feed=exact_trace)
            validation.teacher_forced = step_errors(tr, exact_trace)
    return validation, backoff, True


def _machine(capture: Capture) -> Dict[str, Any]:
    from . import __version__

    info: Dict[str, Any] = {"attnpatch": __version__, "torch": torch.__version__, "python": platform.python_version(),
                            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    calls = list(capture.infos)
    if calls:
        c = calls[0]
        info["device"] = c.device_type
        info["dtype"] = str(c.dtype).replace("torch.", "")
        if c.device_type == "cuda":
            index = c.device_index if c.device_index is not None else torch.cuda.current_device()
            info["gpu"] = torch.cuda.get_device_name(index)
            info["capability"] = ".".join(str(x) for x in (c.capability or ()))
    return info


# -- YAML ------------------------------------------------------------------------------------------------

def _q(value) -> str:
    """A YAML scalar (JSON strings and numbers are valid YAML)."""
    return json.dumps(value)


def _comment(text: str) -> str:
    return "# " + " ".join(str(text).split())


def _choice_comment(c: SiteChoice) -> str:
    e = c.error
    ref = c.errors.get(c.reference)
    tr, tc = c.times_ms.get(c.reference), c.times_ms.get(c.backend)
    parts = [f"{c.path or '<root>'} steps {c.steps_label()}: {c.backend}"]
    if e is not None:
        parts.append(f"rel L2 {e.rel_l2:.2e}, cosine {e.cosine:.5f}")
    if c.backend != c.reference and ref is not None:
        parts.append(f"(exact {c.reference}: rel L2 {ref.rel_l2:.1e})")
    if tr is not None and tc is not None and c.backend != c.reference:
        parts.append(f"{tc:.3f} vs {tr:.3f} ms per call, saves {c.saved_ms:.1f} ms over {_calls(c.calls)}")
    elif tr is not None:
        parts.append(f"{tr:.3f} ms per call, {_calls(c.calls)}")
    if c.why:
        parts.append(f"[{c.why}]")
    return _comment("; ".join(parts))


def _calls(n: int) -> str:
    return f"{n} call" + ("" if n == 1 else "s")


def _recipe_yaml(cal: Calibration) -> str:
    r = cal.recipe
    m = cal.machine
    lines = [_comment(f"attnpatch calibrated recipe, written by attnpatch.calibrate ({m.get('date', '')})."),
             _comment(f"machine: {m.get('gpu') or m.get('device', '?')}"
                      + (f" (sm {m['capability']})" if m.get("capability") else "")
                      + f", {m.get('dtype', '?')}, torch {m.get('torch')}, attnpatch {m.get('attnpatch')}"
                      + ". Backends are named for this machine; calibrate again on another."),
             _comment(f"bound: {cal.bound.describe()}: {'met' if cal.bound_met else 'MISSED'}.")]
    v, f = cal.validation, cal.floor
    if v.note:
        lines.append(_comment(f"validation {v.note}"))
    elif v.free_running is not None:
        lines.append(_comment(f"output, free-running: {v.free_running.describe()}"
                              + (f"; exact-kernel floor: {f.free_running.describe()}" if f.free_running else "")))
    if v.teacher_forced:
        lines.append(_comment(f"steps, teacher-forced: {_describe_steps(v.teacher_forced)}"
                              + (f"; exact-kernel floor: {_describe_steps(f.teacher_forced)}"
                                 if f.teacher_forced else "")))
    if cal.buckets:
        lines.append(_comment(f"{cal.total_steps} denoising steps, calibrated in ranges "
                              + ", ".join(f"{a}-{b}" for a, b in cal.buckets)))
    for rnd in cal.backoff:
        lines.append(_comment(f"back-off round {rnd.index}: PSNR {quality.format_db(rnd.psnr_db)}, rel L2 "
                              f"{rnd.rel_l2:.3g} missed the bound; {len(rnd.reverted)} site-steps back to exact"))
    lines.append(_comment(f"attention time saved per run: {cal.saved_ms():.1f} ms. Per rule below: each site's "
                          "error on its own activations (rel L2 and cosine vs a float64/float32 reference) and time."))
    for n in cal.notes:
        lines.append(_comment(f"note: {n}"))
    lines += [f"version: {r['version']}", f"name: {_q(r['name'])}", f"description: {_q(r['description'])}",
              f"default_backend: {_q(r['default_backend'])}"]
    if r.get("exclude"):
        lines.append("exclude:")
        for key, values in r["exclude"].items():
            lines.append(f"  {key}: [{', '.join(_q(x) for x in values)}]")
    rules = _rules(cal.choices)
    lines.append("rules:" if rules else "rules: []")
    for rule, covered in rules:
        for c in covered:
            lines.append("  " + _choice_comment(c))
        lines.append(f"  - name: {_q(rule['name'])}")
        if "components" in rule:
            lines.append(f"    components: [{', '.join(_q(x) for x in rule['components'])}]")
        if "pattern" in rule:
            lines.append(f"    pattern: [{', '.join(_q(x) for x in rule['pattern'])}]")
        if "steps" in rule:
            lines.append(f"    steps: {{from: {rule['steps']['from']}, to: {rule['steps']['to']}}}")
        lines.append(f"    backend: [{', '.join(_q(x) for x in rule['backend'])}]")
    return "\n".join(lines) + "\n"
