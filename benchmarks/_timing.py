"""Timing helpers shared by the benchmark scripts (imported as ``_timing`` from the scripts' folder)."""

from __future__ import annotations

import time
from typing import Any, Callable, List, Tuple

import torch


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_tensor(out):
    """The tensor a model call returned: the first item of tuples/lists, a diffusers output's ``sample``."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.sample if hasattr(out, "sample") else out


def timed_repeats(fn: Callable[[], Any], device, repeats: int) -> Tuple[List[float], Any]:
    """``repeats`` calls of ``fn``, each timed in ms (CUDA events on a GPU, wall clock elsewhere);
    returns the times and the last output."""
    times: List[float] = []
    out = None
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, out
