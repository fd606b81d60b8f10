"""Per-step error of a diffusers pipeline, measured where it does not compound (teacher forcing).

A free-running pipeline amplifies any change of kernel: after a few steps every change, exact or
lossy, has moved the latents by about the same amount (random weights make this extreme). So
`attnpatch.calibrate` also measures each denoising step on the *exact run's own latents*:

1. the exact run is traced (`trace_steps(pipe)`): at every ``pipe.scheduler.step(model_output,
   timestep, sample, …)`` call the denoiser's output (after classifier-free guidance), and the latents
   the step returned, are kept;
2. a run under test is traced with ``feed=`` that trace: each ``scheduler.step`` still runs (so the
   scheduler's own state advances as usual), its ``model_output`` is kept, and the latents it returns
   are replaced by the exact run's latents of that step. So every step of the run under test starts
   from the exact trajectory;
3. `step_errors` compares the two traces' denoiser outputs step by step.

Only ``pipe.scheduler.step`` is wrapped, for the duration of the block, through an `UndoLog`
(restored on exit, also on error); nothing else is touched. Kept tensors go to ``store`` (the CPU by
default): the exact run's trace costs three latent-sized tensors per scheduler step, a teacher-forced
run's one.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional

import torch

from . import quality
from .patch import UndoLog

logger = logging.getLogger("attnpatch")


class TeacherForcingUnavailable(RuntimeError):
    """The target has no diffusers-style scheduler to follow (no ``scheduler.step``)."""


@dataclass
class StepTrace:
    """What one traced run saw at each ``scheduler.step`` call (index = call number): the denoiser
    outputs; for a run traced without ``feed`` (the exact run) also the latents each step got and
    returned."""

    model_outputs: List[torch.Tensor] = field(default_factory=list)
    samples: List[torch.Tensor] = field(default_factory=list)
    results: List[torch.Tensor] = field(default_factory=list)
    #: teacher-forced runs: steps whose input latents differed from the exact run's (not reproducible)
    diverged_inputs: List[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.model_outputs)


def scheduler_of(target) -> Any:
    """The target's scheduler (``target.scheduler`` with a callable ``step``), or None."""
    sched = getattr(target, "scheduler", None)
    if sched is None or not callable(getattr(sched, "step", None)):
        return None
    return sched


def _arg(args, kwargs, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _replace_sample(result, new: torch.Tensor):
    """``scheduler.step``'s result with its latents (``prev_sample`` or the first item) replaced."""
    if isinstance(result, tuple):
        return (new.to(result[0].device, result[0].dtype),) + tuple(result[1:])
    if hasattr(result, "prev_sample"):
        old = result.prev_sample
        result.prev_sample = new.to(old.device, old.dtype)
        return result
    raise TypeError(f"attnpatch.teacher_forcing: scheduler.step returned {type(result).__name__}; expected a "
                    "tuple or an output with prev_sample")


def _latents_of(result) -> torch.Tensor:
    if isinstance(result, tuple):
        return result[0]
    return result.prev_sample


@contextlib.contextmanager
def trace_steps(target, feed: Optional[StepTrace] = None, store: str = "cpu") -> Iterator[StepTrace]:
    """Trace ``target.scheduler.step`` for the block; with ``feed`` (the exact run's trace), teacher-force
    (see the module docstring). Raises `TeacherForcingUnavailable` for targets without a scheduler."""
    sched = scheduler_of(target)
    if sched is None:
        raise TeacherForcingUnavailable(f"{type(target).__name__} has no scheduler with a step() method "
                                        "(teacher forcing follows a diffusers pipeline's scheduler)")
    trace = StepTrace()
    ref = weakref.ref(sched)
    inst = sched.__dict__.get("step")  # an instance attribute (e.g. attnpatch's step tracking) is called as it is
    cls_step = type(sched).step

    def step(*args, **kwargs):
        i = len(trace.model_outputs)
        model_output = _arg(args, kwargs, 0, "model_output")
        sample = _arg(args, kwargs, 2, "sample")
        if feed is not None and i < len(feed.samples) and isinstance(sample, torch.Tensor):
            want = feed.samples[i]
            if tuple(want.shape) != tuple(sample.shape) or not torch.equal(want, sample.detach().to(store)):
                trace.diverged_inputs.append(i)
        result = inst(*args, **kwargs) if inst is not None else cls_step(ref(), *args, **kwargs)
        if isinstance(model_output, torch.Tensor):
            trace.model_outputs.append(model_output.detach().to(store, copy=True))
        if feed is None:
            if isinstance(sample, torch.Tensor):
                trace.samples.append(sample.detach().to(store, copy=True))
            trace.results.append(_latents_of(result).detach().to(store, copy=True))
        elif i < len(feed.results):
            result = _replace_sample(result, feed.results[i])
        return result

    step.__wrapped__ = inst if inst is not None else cls_step
    undo = UndoLog()
    undo.set_attr(sched, "step", step)
    try:
        yield trace
    finally:
        for problem in undo.undo():
            logger.warning("attnpatch.teacher_forcing: %s", problem)
    if trace.diverged_inputs:
        logger.warning("attnpatch: teacher forcing: the latents entering step(s) %s differ from the exact run's "
                       "although they were fed from it; is the run seeded (same seed, same generator)?",
                       trace.diverged_inputs[:5])


@dataclass
class StepError:
    """The error of one teacher-forced step: the denoiser output against the exact run's."""

    step: int
    rel_l2: float
    psnr_db: float
    cosine: float


def step_errors(trace: StepTrace, exact: StepTrace) -> List[StepError]:
    """Per scheduler step: ``trace``'s denoiser output against ``exact``'s (the same step)."""
    out = []
    for i, (a, b) in enumerate(zip(trace.model_outputs, exact.model_outputs)):
        out.append(StepError(i, quality.rel_l2(a, b), quality.psnr(a, b), quality.cosine(a, b)))
    return out
