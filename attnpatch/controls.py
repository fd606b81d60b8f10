"""What the user controls: `use_backend`, the ``ATTNPATCH_*`` environment variables, and the `Scope`
objects that patches hand to the router for the sites they patched.

State is kept in `contextvars`, so a choice made in one thread or asyncio task never leaks into another,
nested scopes compose, and every scope is restored in ``finally`` (also on exceptions). Environment
variables are read once, at the first routed call, and again only on `reload_env()`.

Authority, highest first: ``backend=`` argument → `use_backend` → a patch's site setting (apply() or a
recipe rule) → ``ATTNPATCH_BACKEND`` → auto.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from . import aliases

logger = logging.getLogger("attnpatch")

BackendSpec = Union[str, Sequence[str], None]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(eq=False)
class Scope:
    """One layer of control. ``backends`` is None for "no opinion", `AUTO` (empty) for auto, else the
    names in priority order.
    ``strict`` and ``allow_lossy`` are None when this layer leaves them to the layer below.
    ``source`` names where it came from, for messages (e.g. "use_backend()").
    Scopes compare by identity: the router caches decisions per scope object, so a Scope is never
    changed after it is made (make a new one instead). ``token`` is a unique int: under
    torch.compile only plain constants may cross into the trace-time decision, so the compiled path
    passes the token and looks the scope up with `scope_by_token`."""

    backends: Optional[Tuple[str, ...]] = None
    strict: Optional[bool] = None
    allow_lossy: Optional[bool] = None
    source: str = ""
    site: object = None  # a patch's site record (adapters pass the Scope to router.route), for reports
    token: int = field(default_factory=lambda: next(_TOKENS), init=False)

    def __post_init__(self) -> None:
        _BY_TOKEN[self.token] = self


_TOKENS = itertools.count(1)
_BY_TOKEN: "weakref.WeakValueDictionary[int, Scope]" = weakref.WeakValueDictionary()


def scope_by_token(token: Optional[int]) -> Optional[Scope]:
    """The live Scope with this token (None for None)."""
    return None if token is None else _BY_TOKEN[token]


#: ``Scope.backends`` value meaning "auto, explicitly" (None means "no opinion: ask the next layer").
AUTO: Tuple[str, ...] = ()

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("attnpatch_context", default=None)

#: True from the first `use_backend` block on (never reset). Until then `_CONTEXT` is None in every thread
#: and task, so compiled code does not read it: dynamo checks this bool in C++ on each compiled call
#: instead of calling a Python guard on the context variable. The first block recompiles once.
USE_BACKEND_ENTERED = False


def normalise_backends(spec: BackendSpec, source: str) -> Optional[Tuple[str, ...]]:
    """Turn a name, a comma-separated string or a list into a tuple of canonical backend names.

    Returns None for "no opinion" (``spec is None``) and `AUTO` (an empty tuple) for ``"auto"``. Names
    are case-insensitive and may be other libraries' names (`attnpatch.aliases`); duplicates are removed
    in order. Unknown names, names with whitespace and empty list entries raise ValueError naming
    ``source``, with the closest valid name."""
    if spec is None:
        return None
    if isinstance(spec, str):
        names = split_names(spec, source)
    elif isinstance(spec, (list, tuple)):
        names = list(spec)
        for s in names:
            if not isinstance(s, str):
                raise TypeError(f"{source}: backend names must be strings, got {type(s).__name__} {s!r}")
    else:
        raise TypeError(f"{source}: backend must be a name, a list of names or None, got {type(spec).__name__}")
    if not names:
        raise ValueError(f"{source}: empty backend list; give a name such as 'sdpa' or 'auto'")
    names = [aliases.canonical(n, source) for n in names]
    if names == ["auto"]:
        return AUTO
    if "auto" in names:
        raise ValueError(f"{source}: 'auto' cannot be combined with other names ({names}); use it alone")
    return tuple(dict.fromkeys(names))


def split_names(text: str, source: str) -> List[str]:
    """The names of a comma-separated string. Spaces next to the commas are list formatting; whitespace
    at either end of the whole string, inside a name, or an empty entry is an error naming ``source``."""
    if text != text.strip():
        fixed = ",".join(p.strip() for p in text.split(","))
        raise aliases.BackendNameError(
            f"{source}: {text!r} has whitespace at its start or end; backend names have none (write {fixed!r})",
            f"{text!r} has whitespace at its start or end (write {fixed!r})", False)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 1 and not all(parts):
        raise aliases.BackendNameError(
            f"{source}: {text!r} has an empty entry; separate backend names with single commas",
            f"{text!r} has an empty entry; separate backend names with single commas", False)
    return [p for p in parts if p] if len(parts) > 1 else parts


_INTERNED: dict = {}


def _interned(names, strict, allow_lossy) -> Scope:
    """One Scope object per distinct use_backend() setting: the router caches decisions per scope
    object (identity hashing keeps the hot path cheap), so re-entering the same block reuses them."""
    key = (names, strict, allow_lossy)
    scope = _INTERNED.get(key)
    if scope is None:
        scope = _INTERNED.setdefault(key, Scope(backends=names, strict=strict, allow_lossy=allow_lossy,
                                                source="use_backend()"))
    return scope


@contextlib.contextmanager
def use_backend(backend: BackendSpec = None, *, strict: Optional[bool] = None,
                allow_lossy: Optional[bool] = None) -> Iterator[Scope]:
    """Route attention calls in this block (this thread / task only) to ``backend``.

    ``backend`` is a name, a list of names meaning "only these, in this order", ``"auto"``, or None to
    keep the outer choice and change only ``strict`` / ``allow_lossy``. With ``strict=True`` a call the
    named backends cannot serve raises `BackendUnsupportedError` instead of falling back.
    ``allow_lossy=True`` lets auto pick lossy (8-bit/fp8) kernels. Nests; restores on exit and on error.
    """
    global USE_BACKEND_ENTERED
    if strict is not None and not isinstance(strict, bool):
        raise TypeError(f"use_backend(strict=...) must be a bool or None, got {strict!r}")
    if allow_lossy is not None and not isinstance(allow_lossy, bool):
        raise TypeError(f"use_backend(allow_lossy=...) must be a bool or None, got {allow_lossy!r}")
    outer = _CONTEXT.get()
    if backend is None:
        names = outer.backends if outer is not None else None
    else:
        names = normalise_backends(backend, "use_backend()")
    scope = _interned(
        names,
        strict if strict is not None else (outer.strict if outer else None),
        allow_lossy if allow_lossy is not None else (outer.allow_lossy if outer else None),
    )
    USE_BACKEND_ENTERED = True
    token = _CONTEXT.set(scope)
    try:
        yield scope
    finally:
        _CONTEXT.reset(token)


# -- environment -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EnvSettings:
    backends: Optional[Tuple[str, ...]] = None
    disabled: Tuple[str, ...] = ()
    strict: bool = False
    allow_lossy: bool = False
    autotune: bool = True
    log: Optional[str] = None


_ENV: Optional[EnvSettings] = None
_ENV_LOCK = threading.Lock()


def _parse_bool(var: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{var}={raw!r} is not a boolean; use one of 1, 0, true, false, yes, no, on, off")


def read_env(environ=None) -> EnvSettings:
    """Parse the ATTNPATCH_* variables; raise ValueError naming the variable for a bad value."""
    env = os.environ if environ is None else environ
    backends = None
    raw = env.get("ATTNPATCH_BACKEND")
    if raw is not None and raw.strip():
        backends = normalise_backends(raw, "environment variable ATTNPATCH_BACKEND")
    disabled: Tuple[str, ...] = ()
    raw = env.get("ATTNPATCH_DISABLE")
    if raw is not None and raw.strip():
        disabled = normalise_backends(raw, "environment variable ATTNPATCH_DISABLE") or ()
        if not disabled:
            raise ValueError("ATTNPATCH_DISABLE=auto: auto cannot be disabled; list backend names")
    log = env.get("ATTNPATCH_LOG")
    if log is not None and log.strip():
        log = log.strip().lower()
        if log not in _LOG_LEVELS:
            raise ValueError(f"ATTNPATCH_LOG={env['ATTNPATCH_LOG']!r} is not a log level; use one of {', '.join(_LOG_LEVELS)}")
    else:
        log = None
    return EnvSettings(
        backends=backends,
        disabled=disabled,
        strict=_parse_bool("ATTNPATCH_STRICT", env.get("ATTNPATCH_STRICT", "0")),
        allow_lossy=_parse_bool("ATTNPATCH_ALLOW_LOSSY", env.get("ATTNPATCH_ALLOW_LOSSY", "0")),
        autotune=_parse_bool("ATTNPATCH_AUTOTUNE", env.get("ATTNPATCH_AUTOTUNE", "1")),
        log=log,
    )


def env_settings() -> EnvSettings:
    """The environment settings, read once (at first use) and cached until `reload_env()`."""
    global _ENV
    if _ENV is None:
        with _ENV_LOCK:
            if _ENV is None:
                settings = read_env()
                if settings.log:
                    logger.setLevel(settings.log.upper())
                    if not logger.handlers:
                        logger.addHandler(logging.StreamHandler())
                _ENV = settings
    return _ENV


_env_listeners = []


def on_env_change(fn) -> None:
    _env_listeners.append(fn)


def reload_env() -> EnvSettings:
    """Re-read the ATTNPATCH_* variables now (they are otherwise read once) and clear cached decisions."""
    global _ENV
    with _ENV_LOCK:
        _ENV = None
    for fn in _env_listeners:
        fn()
    return env_settings()
