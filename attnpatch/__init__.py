"""attnpatch: run existing models' attention on the fastest correct kernel on this machine.

Public names only; each lives in the module its name points to:

* `attention_forward`, `explain`, `stats`, `BackendUnsupportedError` — `attnpatch.router`
* `backends`, `register_backend`, `unregister_backend`, `Backend` — `attnpatch.registry`
* `use_backend`, `reload_env`, `Scope` — `attnpatch.controls` (other libraries' backend names: `attnpatch.aliases`)
* `apply`, `patched` — `attnpatch.applying`; `remove`, `Patch`, `Site` — `attnpatch.patch` (adapters: ``attnpatch.adapters``)
* `Report`, `ReportRow` — `attnpatch.report` (what `Patch.report()` returns)
* `step`, `current_step`, `RecipeError` — `attnpatch.recipes` (the recipe format and step schedules)
* `calibrate`, `Calibration` — `attnpatch.calibrate` (calibrated lossy recipes)
* `ContextParallel` — `attnpatch.parallel` (one model's sequence split over several processes)

Note: ``attnpatch.backends`` is the function that lists backends; the backend modules themselves are
imported as ``from attnpatch.backends.sdpa import SdpaBackend``. Likewise ``attnpatch.calibrate`` is
the function; import the module's other names with ``from attnpatch.calibrate import ...``.
"""

from __future__ import annotations

from typing import List

from . import backends as _backends_pkg
from .call import Call
from .controls import Scope, reload_env, use_backend
from .registry import Backend, BackendInfo, register_backend, unregister_backend
from .router import BackendUnsupportedError, Explanation, Stats, attention_forward, clear_cache, explain, stats
from .patch import Patch, Site, remove
from .applying import apply, patched
from .report import Report, ReportRow
from .recipes import RecipeError, current_step, step
from .calibrate import Calibration, calibrate
from .parallel import ContextParallel

_backends_pkg.register_builtin()

__version__ = "0.1.0"


def backends() -> List[BackendInfo]:
    """Every registered backend: available?, why not, version, lossy?, backward?, and why auto leaves an
    available one out on this machine (``auto_note``).

    Probes each backend once (at the first call of this function or of the backend)."""
    from . import controls, registry

    try:
        disabled = set(controls.env_settings().disabled)
    except ValueError:
        disabled = set()
    out = []
    for b in registry.all_backends():
        reasons = tuple(b.availability())
        out.append(BackendInfo(
            name=b.NAME, available=not reasons, reasons=reasons, version=b.version(), lossy=b.LOSSY,
            backward=b.SUPPORTS_BACKWARD, package=b.PACKAGE or "torch", description=b.DESCRIPTION,
            disabled=b.NAME in disabled, auto_note=registry.auto_left_out_here(b) if not reasons else None,
        ))
    return out


__all__ = [
    "attention_forward", "explain", "stats", "backends", "register_backend", "unregister_backend",
    "use_backend", "reload_env", "clear_cache", "apply", "remove", "patched", "Patch", "Site", "Backend", "BackendInfo", "BackendUnsupportedError", "Call",
    "Report", "ReportRow", "Scope",
    "Explanation", "Stats", "step", "current_step", "RecipeError", "calibrate", "Calibration", "ContextParallel", "__version__",
]
