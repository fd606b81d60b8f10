"""What the hub-kernel backends share (`flash_attn3_hub`, `sage_hub`): finding a prebuilt kernel that
the `kernels` package (Hugging Face) can load, loading it only on request, and running it with the
kernel function of the matching locally installed backend (`flash_attn3`, the Sage backends).

diffusers (``_flash_3_hub``, ``sage_hub`` in ``models/attention_dispatch.py``) and transformers
(``kernels-community/...`` attention implementations) load the same binaries through
``kernels.get_kernel``, which *downloads* them from the hub the first time. attnpatch never downloads
to answer "is this backend available?": probing (``attnpatch.backends()``, ``attnpatch info``, auto,
``explain``) only looks at what is already on this machine. Where a hub kernel comes from, in order:

1. ``LOCAL_KERNELS`` — the `kernels` package's own override, ``repo_id=path[:repo_id=path...]``: the
   kernel repository (or one build variant of it) at that path.
2. The local hub cache (``KERNELS_CACHE``, else ``HF_HUB_CACHE``): the build of ``REPO_VERSION`` for this
   system that `kernels` downloaded earlier, found with ``kernels.install_kernel(...,
   local_files_only=True)``, which never touches the network.
3. A download through ``kernels.get_kernel`` (with its trusted-publisher check), **only** when the user
   opted in: ``ATTNPATCH_HUB_DOWNLOAD=1`` (read when the backend is first probed), or an explicit
   ``attnpatch.registry.get_backend("flash_attn3_hub").download()``.

Anything else is a reason, never an exception: `kernels` not installed or too old, a torch without
CUDA or no CUDA device, a kernel that is not on this machine and downloads are off, a build that does
not load (with its message), a module without the entry points, a GPU that the build's archs (its
``metadata.json``) do not cover. Once loaded, the backend's version is ``<repo id>@<revision>``.

The loaded module is reached by name from the custom op (torch.compile) through `loaded_module`, so
the op needs no module that ``import`` could find.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from .. import registry
from ..call import Call
from ..registry import Backend
from ._third_party import ThirdPartyBackend, _first_line, describe_import_error

#: The environment variable that lets a hub backend's probe download its kernel.
DOWNLOAD_ENV = "ATTNPATCH_HUB_DOWNLOAD"


def download_allowed(environ=None) -> bool:
    """``ATTNPATCH_HUB_DOWNLOAD`` as a bool (unset = False); a bad value raises ValueError naming it."""
    from ..controls import _parse_bool

    env = os.environ if environ is None else environ
    return _parse_bool(DOWNLOAD_ENV, env.get(DOWNLOAD_ENV, "0"))


def local_kernels_path(repo_id: str, environ=None) -> Optional[Path]:
    """The path ``LOCAL_KERNELS`` gives for ``repo_id`` (the `kernels` package's format:
    ``repo_id=path`` entries separated by ``:``), or None."""
    env = os.environ if environ is None else environ
    raw = env.get("LOCAL_KERNELS")
    if not raw:
        return None
    for entry in raw.split(":"):
        if "=" not in entry:
            raise ValueError(f"LOCAL_KERNELS entry {entry!r} is not repo_id=path "
                             "(the kernels package's format: repo_id_1=path_1:repo_id_2=path_2)")
        rid, path = entry.split("=", 1)
        if rid == repo_id:
            return Path(path)
    return None


def cuda_arch_supports(arch: str, cap: Tuple[int, int]) -> Optional[bool]:
    """Whether a CUDA arch string of a kernel build (``"8.0"``, ``"9.0a"``, ``"10.0f"``, ``"8.0+PTX"``)
    runs on compute capability ``cap``; None for a string in no known format. Plain builds run on the
    same major version with an equal or newer minor, ``a`` builds on that exact capability, ``f``
    builds on the same family from that minor on, ``+PTX`` on any newer capability (nvcc's rules)."""
    ptx = arch.endswith("+PTX")
    if ptx:
        arch = arch[:-4]
    suffix = arch[-1] if arch[-1:] in ("a", "f") else ""
    if suffix:
        arch = arch[:-1]
    major, sep, minor = arch.partition(".")
    if not sep or not major.isdigit() or not minor.isdigit():
        return None
    want = (int(major), int(minor))
    cap = tuple(cap)
    if suffix == "a":
        return cap == want
    if ptx:
        return cap >= want
    return cap[0] == want[0] and cap[1] >= want[1]


def loaded_module(name: str):
    """The kernel module that the registered hub backend ``name`` loaded (loading it now if the
    backend is available but was not probed yet). The custom ops call this at run time."""
    backend = registry.get_backend(name)
    module = backend.kernel_module()
    if module is None:
        raise RuntimeError(f"attnpatch: backend {name!r} is not available: {backend.why_not()} "
                           "(the router never routes to it; this was a direct call of its op)")
    return module


def make_hub_kernel(name: str, kernel: Callable) -> Callable:
    """The kernel function of a hub backend for its custom op: ``kernel`` (a local backend's kernel
    function) run on the module the backend loaded. Its first argument is this module (``MODULE``)."""

    def hub_kernel(hub_common, q, k, v, mask, is_causal, scale, dropout_p):
        return kernel(hub_common.loaded_module(name), q, k, v, mask, is_causal, scale, dropout_p)

    hub_kernel.__name__ = f"{name}_kernel"
    return hub_kernel


class HubKernelBackend(ThirdPartyBackend):
    """Base of the backends whose kernel comes from the Hugging Face hub through `kernels`.

    Subclasses set ``REPO_ID``, ``REPO_VERSION`` (the kernel's major version: the ``v<N>`` branch that
    ``kernels.get_kernel(version=N)`` resolves), ``REQUIRED_ATTRS`` (entry points the loaded module
    must have), ``KERNEL_FN`` (the local backend's kernel function, run on the loaded module) and
    ``kernel = staticmethod(make_hub_kernel(NAME, KERNEL_FN))``, plus the usual declared limits."""

    PACKAGE = "kernels"
    MIN_VERSION = "0.17.0"  # install_kernel(local_files_only=...) -> Path, get_local_kernel(path): read in 0.17.0-0.17.2
    EXTRA = "hub"
    INSTALL_HINT = None
    MODULE = __name__  # the custom op imports this module and calls loaded_module(NAME)
    #: The hub repository and the kernel's major version (``version=`` of kernels.get_kernel).
    REPO_ID: str = ""
    REPO_VERSION: int = 1
    #: The `kernels` backend whose builds this repository ships ("cuda"; tests use "cpu").
    KERNEL_BACKEND: str = "cuda"
    KERNEL_FN: Callable = None

    def __init__(self) -> None:
        super().__init__()
        self._module = None
        self._origin: dict = {}
        self._archs: Optional[Tuple[str, ...]] = None
        self._download_requested = False
        self._load_lock = threading.Lock()

    # -- what the user sees ------------------------------------------------------------------------
    @property
    def origin(self) -> dict:
        """Where the loaded kernel came from: ``source`` (LOCAL_KERNELS, cache, download), ``repo_id``,
        ``revision``, ``path`` (the build variant), ``variant``, ``archs``, ``kernels`` (its version).
        Empty until the backend is available."""
        self.availability()
        return dict(self._origin)

    def why_not(self) -> str:
        return "; ".join(self.availability()) or "available"

    def kernel_module(self):
        """The loaded kernel module, or None when the backend is not available."""
        self.availability()
        return self._module

    def download(self) -> List[str]:
        """Download the kernel now through ``kernels.get_kernel`` (an explicit opt-in, like
        ``ATTNPATCH_HUB_DOWNLOAD=1``) and probe again. Returns the reasons it is still unavailable
        (empty: available). Cached routing decisions are dropped so that calls can use it."""
        from ..router import clear_cache

        with self._load_lock:
            self._download_requested = True
            self.reset_probe()
        reasons = self.availability()
        clear_cache()
        return reasons

    def reset_probe(self) -> None:
        super().reset_probe()
        self._module = None
        self._origin = {}
        self._archs = None

    # -- probing -----------------------------------------------------------------------------------
    def probe(self) -> List[str]:
        reasons = Backend.probe(self)  # `kernels` installed, at MIN_VERSION or newer
        if reasons:
            return reasons
        kernels_version = self._version
        if self.KERNEL_BACKEND == "cuda":
            if torch.version.cuda is None:
                return [f"torch {torch.__version__} is built without CUDA; {self.REPO_ID} ships CUDA builds only"]
            if not torch.cuda.is_available():
                return [f"no CUDA device (torch.cuda.is_available() is False); {self.REPO_ID} ships CUDA builds only"]
        try:
            kernels = importlib.import_module("kernels")
        except Exception as exc:
            return [describe_import_error("kernels", "kernels", exc)]
        try:
            allow = self._download_requested or download_allowed()
            local = local_kernels_path(self.REPO_ID)
        except ValueError as exc:
            return [str(exc)]
        if local is not None:
            source, path = "LOCAL_KERNELS", local
        else:
            source = "cache"
            path, why = self._find_in_cache(kernels)
            if path is None and not allow:
                return [f"{self.REPO_ID} (version {self.REPO_VERSION}) is not on this machine: {why}; downloads "
                        f"are off: set {DOWNLOAD_ENV}=1, or call attnpatch.registry.get_backend({self.NAME!r})"
                        f".download(), or point LOCAL_KERNELS={self.REPO_ID}=<path> at a local build"]
        if path is not None:
            if not allow:
                try:
                    deps = _declared_kernel_deps(kernels, Path(path))
                except Exception as exc:
                    return [f"{self.REPO_ID} ({source}: {path}): metadata.json does not parse: {_first_line(exc)}"]
                if deps:
                    return [f"{self.REPO_ID} ({source}: {path}) depends on other hub kernels ({', '.join(deps)}), "
                            f"which kernels would download; set {DOWNLOAD_ENV}=1 to allow it"]
            try:
                module = kernels.get_local_kernel(Path(path), backend=self.KERNEL_BACKEND)
            except Exception as exc:
                return [f"{self.REPO_ID} ({source}: {path}) did not load: {type(exc).__name__}: {_kernels_message(exc)}"]
        else:
            source = "download"
            try:
                module = kernels.get_kernel(self.REPO_ID, version=self.REPO_VERSION, backend=self.KERNEL_BACKEND,
                                            user_agent={"attnpatch": _attnpatch_version()})
            except Exception as exc:
                return [f"downloading {self.REPO_ID} (version {self.REPO_VERSION}) through kernels failed: "
                        f"{type(exc).__name__}: {_kernels_message(exc)}"]
        variant, metadata, revision = _loaded_info(kernels, module)
        if revision is None:
            revision = _revision_of(variant) if variant is not None else None
        if revision is None and source == "LOCAL_KERNELS":
            revision = "local"
        missing = [a for a in self.REQUIRED_ATTRS if not hasattr(module, a)]
        if missing:
            return [f"the kernel loaded from {self.REPO_ID} ({source}) has no {', '.join(missing)}; this backend "
                    f"needs a build that provides {'them' if len(missing) > 1 else 'it'}"]
        archs = getattr(getattr(metadata, "backend", None), "archs", None)
        self._archs = tuple(archs) if archs else None
        if torch.cuda.is_available():
            caps = sorted({tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
            if caps and not any(self.capability_reason(c) is None for c in caps):
                return [self.capability_reason(caps[0])]
            reasons = self.check_loaded(module, caps)
            if reasons:
                return reasons
        self._module = module
        self._origin = {"source": source, "repo_id": self.REPO_ID, "version": self.REPO_VERSION,
                        "revision": revision, "path": None if variant is None else str(variant),
                        "variant": None if variant is None else variant.name, "archs": self._archs,
                        "kernels": kernels_version}
        self._version = f"{self.REPO_ID}@{(revision or 'unknown')[:12]}"
        return []

    def _find_in_cache(self, kernels):
        """(variant path, None) for a build of this system in the local hub cache, else (None, why)."""
        try:
            path = kernels.install_kernel(self.REPO_ID, version=self.REPO_VERSION, backend=self.KERNEL_BACKEND,
                                          local_files_only=True, trust_remote_code=[self.REPO_ID])
        except Exception as exc:
            msg = _kernels_message(exc)
            if "not available in the local cache" in msg or "Cannot find a local snapshot" in msg:
                return None, f"not in the local hub cache {_cache_dir()} nor in LOCAL_KERNELS"
            return None, f"{type(exc).__name__}: {msg}"
        return Path(path), None

    def check_loaded(self, module, caps) -> List[str]:
        """Reasons the loaded module cannot run on the GPUs ``caps`` (subclasses)."""
        return []

    # -- per call ----------------------------------------------------------------------------------
    def capability_reason(self, cap: tuple) -> Optional[str]:
        """Why GPU ``cap`` cannot run this kernel: the declared rule (``CUDA_CAPABILITIES``,
        ``CUDA_MIN/MAX_CAPABILITY``), then the archs of the loaded build's metadata.json."""
        cap = tuple(cap)
        name = f"sm{cap[0]}{cap[1]}"
        note = f" ({self.ARCH_NOTE})" if self.ARCH_NOTE else ""
        if self.CUDA_CAPABILITIES is not None and cap not in self.CUDA_CAPABILITIES:
            allowed = ", ".join(f"sm{a}{b}" for a, b in sorted(self.CUDA_CAPABILITIES))
            return f"GPU {name} is not supported by {self.REPO_ID} (supported: {allowed}){note}"
        lo, hi = self.CUDA_MIN_CAPABILITY, self.CUDA_MAX_CAPABILITY
        if (lo and cap < tuple(lo)) or (hi and cap > tuple(hi)):
            rng = f"sm{lo[0]}{lo[1]}" + (f" to sm{hi[0]}{hi[1]}" if hi else " and newer")
            return f"GPU {name} is outside {self.REPO_ID}'s range {rng}{note}"
        if self._archs:
            verdicts = [cuda_arch_supports(a, cap) for a in self._archs]
            if any(v is not None for v in verdicts) and not any(verdicts):
                return (f"GPU {name} is not among the archs of the loaded {self.REPO_ID} build "
                        f"({', '.join(self._archs)})")
        return None

    def call_reasons(self, call: Call) -> List[str]:
        reasons = super().call_reasons(call)
        if call.device_type == "cuda" and call.capability is not None and self.CUDA_CAPABILITIES is None:
            r = self.capability_reason(call.capability)  # the build's archs (CUDA_CAPABILITIES: checked already)
            if r:
                reasons.append(r)
        return reasons

    # -- running -----------------------------------------------------------------------------------
    def build(self, call: Call):
        if call.compiling:
            return super().build(call)  # the custom op, which reaches the module through loaded_module()
        module = self.kernel_module()
        kernel = type(self).KERNEL_FN

        def run(q, k, v, m, c, s, p):
            return kernel(module, q, k, v, m, c, s, p)
        return run


def _declared_kernel_deps(kernels, path: Path) -> List[str]:
    """The hub kernels that the build(s) at ``path`` declare as dependencies (``kernel_depends`` in their
    metadata.json): ``path`` is a build variant, or a repository whose ``build/`` holds variants (then
    every variant is read, which is conservative)."""
    files = [path / "metadata.json"] if (path / "metadata.json").exists() else []
    for base in (path, path / "build"):
        if not files and base.is_dir():
            files = sorted(base.glob("*/metadata.json"))
    deps = []
    for f in files:
        for d in kernels.Metadata.read_from_file(f).kernel_depends:
            name = getattr(d, "repo_id", str(d))
            if name not in deps:
                deps.append(name)
    return deps


def _loaded_info(kernels, module):
    """(build variant directory, metadata, revision or None) of a module that kernels loaded."""
    metadata = revision = None
    for lk in kernels.get_loaded_kernels():
        if lk.module is module:
            metadata = lk.metadata
            revision = getattr(lk.repo_info, "revision", None)
            break
    variant = None
    init = getattr(module, "__file__", None)
    if init:
        for d in (Path(init).parent, Path(init).parent.parent):  # variant/__init__.py or variant/<pkg>/__init__.py
            if (d / "metadata.json").exists():
                variant = d
                break
    return variant, metadata, revision


def _revision_of(variant: Path) -> Optional[str]:
    """The commit of a build in the hub cache: ``.../snapshots/<commit>/build/<variant>``."""
    parts = Path(variant).parts
    if len(parts) >= 4 and parts[-2] == "build" and parts[-4] == "snapshots":
        return parts[-3]
    return None


def _kernels_message(exc: BaseException, limit: int = 400) -> str:
    """A `kernels` error on one line (its variant traces span several)."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + "…"


def _cache_dir() -> str:
    """Where `kernels` looks for downloaded kernels: KERNELS_CACHE, else huggingface_hub's cache."""
    if os.environ.get("KERNELS_CACHE"):
        return os.environ["KERNELS_CACHE"]
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:
        return "the Hugging Face cache"


def _attnpatch_version() -> str:
    try:
        return importlib.metadata.version("attnpatch")
    except Exception:
        return "unknown"

__all__ = ["HubKernelBackend", "make_hub_kernel", "loaded_module", "download_allowed", "local_kernels_path",
           "cuda_arch_supports", "DOWNLOAD_ENV"]
