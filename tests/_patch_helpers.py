"""Shared helpers of the adapter and patch-API tests: a recording backend and exact-restore checks.

`recording_backend(name)` makes a backend that records every call it runs (shapes, mask, causal,
scale, dropout) and computes it exactly as attnpatch's ``sdpa`` backend does, so a model configured
for SDPA gives bit-identical outputs through it. Auto never picks it: tests name it.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

import torch
import torch.nn.functional as F

import attnpatch

from attnpatch.backends.sdpa import SdpaBackend


def recording_backend(name: str):
    """A new `SdpaBackend` subclass named ``name`` whose runner appends one dict per call to
    ``cls.calls``."""

    class Recording(SdpaBackend):
        NAME = name
        DESCRIPTION = "test backend: records each call, computes it like the sdpa backend"
        AUTO_PRIORITY: Dict[str, int] = {}
        calls: List[dict] = []

        def build(self, call):
            run = super().build(call)
            calls = self.calls

            def record(q, k, v, m, c, s, p):
                calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape),
                              "mask": None if m is None else m.detach().clone(), "causal": c, "scale": s,
                              "dropout": p, "layout": call.layout})
                return run(q, k, v, m, c, s, p)
            return record

    return Recording


def registered(backend) -> Iterator[List[dict]]:
    """For a fixture: register a `recording_backend` class, yield its (cleared) call list, unregister."""
    attnpatch.register_backend(backend, replace=True)
    backend.calls.clear()
    yield backend.calls
    attnpatch.unregister_backend(backend.NAME)


class SdpaBlock(torch.nn.Module):
    """A module whose forward calls F.scaled_dot_product_attention (the generic adapter's case)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.heads = heads

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


def snapshot(model: torch.nn.Module) -> dict:
    """What exact restore compares: every module's type and ``vars()`` (values by identity), and a copy
    of the state dict."""
    return {
        "modules": {name: (type(m), dict(vars(m))) for name, m in model.named_modules()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def assert_restored(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"].keys() == before["modules"].keys()
    for name, (cls, attrs) in before["modules"].items():
        cls2, attrs2 = after["modules"][name]
        assert cls2 is cls, f"type of {name!r} changed: {cls} -> {cls2}"
        assert attrs2.keys() == attrs.keys(), f"vars({name!r}) keys changed: {set(attrs2) ^ set(attrs)}"
        for key, value in attrs.items():
            assert attrs2[key] is value or (type(value) in (bool, int, float, str) and attrs2[key] == value), \
                f"vars({name!r})[{key!r}] changed"
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"state_dict[{k!r}] changed"
