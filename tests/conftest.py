import os

import pytest
import torch

import attnpatch
from attnpatch import controls, router


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_attnpatch_state(monkeypatch):
    """Each test starts with no ATTNPATCH_* variables, fresh caches and zeroed counters."""
    for var in list(os.environ):
        if var.startswith("ATTNPATCH_"):
            monkeypatch.delenv(var, raising=False)
    controls.reload_env()
    attnpatch.stats(reset=True)
    router._WARNED.clear()  # "warn once per (backend, reason)" is per process; tests each start fresh
    torch.manual_seed(0)
    yield
    for var in list(os.environ):
        if var.startswith("ATTNPATCH_"):
            monkeypatch.delenv(var, raising=False)
    controls.reload_env()
