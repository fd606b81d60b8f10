"""The extras in pyproject.toml give what their names promise, and `attnpatch info` says how to get
every backend no extra can give (`attnpatch.installs`)."""

from __future__ import annotations

import pathlib
import re

import pytest

import attnpatch
from attnpatch import installs, registry

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def extras():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def package(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()


def test_every_extra_is_described_and_every_described_extra_exists():
    assert set(installs.EXTRAS) == set(extras())
    assert {"plot", "diffsynth", "sage", "flash", "xformers", "hub", "all"} <= set(extras())


def test_plot_and_diffsynth_extras_install_what_their_names_say():
    e = extras()
    assert [package(r) for r in e["plot"]] == ["matplotlib"]
    assert [package(r) for r in e["diffsynth"]] == ["diffsynth"]
    assert [package(r) for r in e["sage"]] == ["sageattention"]


def test_all_pulls_no_source_build_and_nothing_that_pins_torch():
    e = extras()
    pkgs = {package(r) for r in e["all"]}
    # flash-attn: a source build; xformers: each wheel requires one torch version; flash-attn-4: a
    # pre-release CuTe DSL stack; diffsynth: its torchvision can replace torch
    assert not pkgs & {"flash-attn", "xformers", "flash-attn-4", "diffsynth", "torchvision", "torch"}
    assert {"diffusers", "transformers", "sageattention", "kernels", "matplotlib"} <= pkgs


def test_every_shipped_backend_says_how_to_get_it():
    from attnpatch.backends import BUILTIN, HUB

    for cls in BUILTIN + HUB:
        assert installs.HOW_TO_GET.get(cls.NAME), cls.NAME
        assert installs.how_to_get(registry.get_backend(cls.NAME)) == installs.HOW_TO_GET[cls.NAME]
    assert "--no-build-isolation" in installs.HOW_TO_GET["sage_fp16_cuda"]
    assert "1.0.6" in installs.EXTRAS["sage"] and "`sage` backend only" in installs.EXTRAS["sage"]
    assert "download.pytorch.org" in installs.HOW_TO_GET["xformers"]


def test_info_shows_how_to_get_unavailable_backends_and_the_extras(capsys):
    from attnpatch import cli

    rc = cli.main(["info"])
    out = capsys.readouterr().out
    assert rc == 0
    missing = [b.name for b in attnpatch.backends() if not b.available]
    if missing:
        assert "how to get the backends that are not available here:" in out
        for name in missing:
            assert re.search(rf"^  {re.escape(name)}\s+\S", out.split("how to get the backends")[1], re.M), name
    assert re.search(r"^  plot\s+matplotlib", out, re.M) and re.search(r"^  sage\s+sageattention 1\.0\.6", out, re.M)
    rc = cli.main(["info", "--json"])
    import json

    doc = json.loads(capsys.readouterr().out)
    b = {x["name"]: x for x in doc["backends"]}
    assert b["sage_fp8_cuda"]["how_to_get"].startswith("SageAttention 2 is not on PyPI")
    assert b["sdpa"]["why_not"] is None and "_native_math" in b["sdpa_math"]["aliases"]
    assert doc["extras"]["plot"].startswith("matplotlib") and doc["schema_version"] == 1
