"""Fake hub kernels for tests/test_hub_kernels.py: tiny pure-Python packages laid out on disk the way the
Hugging Face hub (and its local cache) lays out a `kernels` build, so that the real `kernels` package
resolves the build variant, reads ``metadata.json`` and imports the module, and only the kernel itself
is fake.

A build variant directory is ``build/<variant>/`` holding ``metadata.json`` and the Python package
``<python_name>/__init__.py`` (``flash_attn3``, ``sage_attention``); a cached repository is
``<cache>/kernels--<org>--<name>/refs/v<N>`` (the commit of the ``v<N>`` branch) plus
``snapshots/<commit>/build/<variant>/...`` (huggingface_hub's cache layout, repo type "kernel").

The fake modules expose the real kernels' entry points with their signatures (flash-attn3:
``flash_attn_func`` / ``flash_attn_varlen_func`` as in kernels-community's
``flash-attn3/torch-ext/flash_attn3/flash_attn_interface.py``; sage-attention: ``sageattn(q, k, v,
tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs)`` as in
``sage-attention/torch-ext/sage_attention/core.py``) and compute with tests/standins, which record
every call in ``standins.CALLS``.
"""

from __future__ import annotations

import json
import platform
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import torch

FA3_INIT = '''\
"""FAKE kernels-community/flash-attn3 build (attnpatch tests): FA3's entry points in plain torch."""
from . import flash_attn_interface
from .flash_attn_interface import flash_attn_func, flash_attn_varlen_func
'''

FA3_INTERFACE = '''\
from standins import _fa3_module

_impl = _fa3_module(returns_lse=False)
flash_attn_func = _impl.flash_attn_func
flash_attn_varlen_func = _impl.flash_attn_varlen_func
'''

SAGE_INIT = '''\
"""FAKE SageAttention/sage-attention build (attnpatch tests): sageattn in plain torch."""
from . import core
from .core import sageattn
'''

SAGE_CORE = '''\
from standins import _sage_module

_impl = _sage_module(2, mutate_k=False)
SM80_ENABLED = SM89_ENABLED = SM90_ENABLED = {built}


def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
    out = _impl.sageattn(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale)
    return (out, None) if return_lse else out
'''

KERNELS = {
    "flash-attn3": {"package": "flash_attn3", "files": {"__init__.py": FA3_INIT, "flash_attn_interface.py": FA3_INTERFACE},
                    "archs": ["8.0", "9.0a"]},
    "sage-attention": {"package": "sage_attention", "files": {"__init__.py": SAGE_INIT, "core.py": SAGE_CORE},
                       "archs": ["8.0", "8.9", "9.0a", "12.0"]},
}


def system_variant(backend: str) -> str:
    """The build variant name `kernels` picks on this machine for ``backend`` ("cpu", or "cuda" for
    torch's CUDA version), e.g. ``torch214-cxx11-cpu-x86_64-linux``."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    abi = "-cxx11" if torch.compiled_with_cxx11_abi() else "-cxx98"
    if backend == "cpu":
        tag = "cpu"
    else:
        cmaj, cmin = torch.version.cuda.split(".")[:2]
        tag = f"cu{cmaj}{cmin}"
    return f"torch{major}{minor}{abi}-{tag}-{platform.machine()}-{platform.system().lower()}"


def write_build(variant_dir: Path, name: str, *, kernel_id: str, backend_type: str = "cpu",
                archs: Optional[Sequence[str]] = None, built: bool = True, depends: Sequence[str] = (),
                drop: Sequence[str] = (), broken: Optional[str] = None) -> Path:
    """Write one build variant of the fake kernel ``name`` ("flash-attn3" or "sage-attention").

    ``kernel_id`` is metadata.json's ``id`` (kernels imports the module under it: keep it unique per
    test). ``drop`` removes entry points; ``broken`` makes the import raise that message;
    ``built=False`` sets sage's SM*_ENABLED flags to False; ``depends`` lists hub kernels it needs."""
    spec = KERNELS[name]
    pkg = variant_dir / spec["package"]
    pkg.mkdir(parents=True, exist_ok=True)
    for fname, text in spec["files"].items():
        text = text.replace("{built}", str(bool(built)))
        for attr in drop:
            text = text.replace(f", {attr}", "").replace(f"\n{attr} = _impl.{attr}", "")
        (pkg / fname).write_text(text)
    if broken is not None:
        (pkg / "__init__.py").write_text(f"raise ImportError({broken!r})\n")
    meta = {"id": kernel_id, "name": name, "version": 1, "license": "Apache-2.0", "python-depends": [],
            "backend": {"type": backend_type, **({"archs": list(archs if archs is not None else spec["archs"])}
                                                 if backend_type == "cuda" or archs is not None else {})}}
    if depends:
        meta["kernel-depends"] = [{"repo-id": d, "version": 1} for d in depends]
    (variant_dir / "metadata.json").write_text(json.dumps(meta))
    return variant_dir


def write_repo(root: Path, name: str, variants: Sequence[str], **kw) -> Path:
    """A kernel repository at ``root`` with ``build/<variant>`` for each variant (a LOCAL_KERNELS target)."""
    for i, v in enumerate(variants):
        write_build(root / "build" / v, name, **{**kw, "kernel_id": f"{kw['kernel_id']}_{i}"})
    return root


def write_cache(cache: Path, repo_id: str, name: str, version: int, variants: Sequence[str],
                commit: str = "0123456789abcdef0123456789abcdef01234567", **kw) -> Path:
    """The hub cache entry of ``repo_id`` at branch ``v<version>`` = ``commit``, as huggingface_hub
    stores a downloaded repository of type "kernel". Returns the snapshot directory."""
    org, repo = repo_id.split("/")
    base = cache / f"kernels--{org}--{repo}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / f"v{version}").write_text(commit)
    snap = base / "snapshots" / commit
    write_repo(snap, name, variants, **kw)
    return snap


def socket_guard_source() -> str:
    """Python source that makes any network connection attempt raise (for probe tests)."""
    return textwrap.dedent("""
        import socket
        class _NoNetwork(socket.socket):
            def connect(self, *a, **k):
                raise OSError("attnpatch test: network access attempted during a probe")
            connect_ex = connect
        socket.socket = _NoNetwork
        _orig_cc = socket.create_connection
        def _no_cc(*a, **k):
            raise OSError("attnpatch test: network access attempted during a probe")
        socket.create_connection = _no_cc
    """)
