"""The user's controls over the router and every refusal path: input validation, unknown names from
each source, strict mode, fallback warnings and counts, disabled and lossy backends, dropout,
explain(), authority order, priority lists, scoping across threads and asyncio tasks, cache
invalidation and register_backend's validation."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import attnpatch
from attnpatch import controls, registry, router
from attnpatch.backends._sdpa_common import SdpaFamily


def qkv(b=1, h=2, s=8, d=16, dv=None, hkv=None, skv=None, dtype=torch.float32, layout="bnsd"):
    hkv = h if hkv is None else hkv
    skv = s if skv is None else skv
    dv = d if dv is None else dv
    shapes = [(b, h, s, d), (b, hkv, skv, d), (b, hkv, skv, dv)]
    if layout == "bsnd":
        shapes = [(x[0], x[2], x[1], x[3]) for x in shapes]
    return tuple(torch.randn(shape, dtype=dtype) for shape in shapes)


def valid_names_listed(message: str) -> None:
    listed = message.split("valid names:")[1]
    for name in ("auto", "sdpa", "sdpa_math", "sdpa_flash", "flex", "eager"):
        assert re.search(rf"\b{name}\b", listed), (name, message)


def _raises(exc, match, q, k, v, **kw):
    with pytest.raises(exc, match=match):
        attnpatch.attention_forward(q, k, v, **kw)
    with pytest.raises(exc, match=match):  # explain() refuses the same way
        attnpatch.explain(q, k, v, **kw)


# -- input validation ----------------------------------------------------------------------------------

def test_mixed_ranks_name_the_shapes_and_layout():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"query, key and value must have the same rank, 3 or more \(…, heads, seq, "
                       r"head_dim\) for layout='bnsd'; got shapes \(2, 8, 16\), \(1, 2, 8, 16\)"):
        attnpatch.attention_forward(q[0], k, v)
    with pytest.raises(ValueError, match=r"\(…, seq, heads, head_dim\) for layout='bsnd'"):
        attnpatch.attention_forward(q, k[None], v, layout="bsnd")
    with pytest.raises(ValueError, match=r"same rank, 3 or more"):
        attnpatch.attention_forward(q[0, 0], k[0, 0], v[0, 0])  # 2-D: torch refuses too
    with pytest.raises(RuntimeError, match=r"same rank"):  # torch raises RuntimeError for such calls
        attnpatch.attention_forward(q, k, v[0, 0])


def test_mismatched_sizes():
    q, k, v = qkv(b=2)
    _raises(ValueError, r"batch sizes differ: query 2, key 1, value 2", q, k[:1], v)
    _raises(ValueError, r"key and value must have the same number of heads, got 2 and 1", q, k, v[:, :1])
    q3, k3, v3 = qkv(h=3, hkv=2)
    _raises(ValueError, r"query heads \(3\) must be a multiple of key/value heads \(2\)", q3, k3, v3)
    _raises(ValueError, r"query and key must have the same head_dim, got 16 and 8", q, k[..., :8], v)
    _raises(ValueError, r"key and value must have the same sequence length, got 8 and 5", q, k, v[:, :, :5])
    _raises(ValueError, r"must share a dtype", q, k.double(), v)
    _raises(ValueError, r"layout='nbsd' is not known", q, k, v, layout="nbsd")
    _raises(ValueError, r"query has dtype torch.int64; attention needs a floating dtype", q.long(), k.long(), v.long())


def test_bad_arguments():
    q, k, v = qkv()
    _raises(ValueError, r"dropout_p must be a float in \[0, 1\), got 1.5", q, k, v, dropout_p=1.5)
    _raises(ValueError, r"scale must be None \(meaning 1/sqrt\(head_dim\)\) or a finite float, got inf", q, k, v,
            scale=float("inf"))
    _raises(TypeError, r"is_causal must be a bool, got str", q, k, v, is_causal="yes")
    with pytest.raises(TypeError, match=r"attn_mask must be a torch.Tensor or None|query must be a torch.Tensor"):
        attnpatch.explain(q, k, v, attn_mask=[[True]])


def test_mask_that_does_not_broadcast():
    q, k, v = qkv(b=2, h=4, s=6, skv=10)
    _raises(ValueError, r"attn_mask of shape \(2, 3, 6, 10\) does not broadcast to \(b, h, s_q, s_kv\) = "
            r"\(2, 4, 6, 10\): its heads dim is 3, expected 1 or 4", q, k, v,
            attn_mask=torch.ones(2, 3, 6, 10, dtype=torch.bool))
    _raises(ValueError, r"attn_mask of shape \(2, 9\) does not broadcast.*its seq_q dim is 2", q, k, v, attn_mask=torch.ones(2, 9, dtype=torch.bool))
    _raises(ValueError, r"key-padding mask is \(b, s_kv\) = \(2, 10\)", q, k, v, attn_mask=torch.ones(7, 10))
    _raises(ValueError, r"attn_mask must have 1 to 4 dims", q, k, v, attn_mask=torch.ones(1, 2, 1, 6, 10))


def test_mask_of_integer_dtype_is_refused_with_the_fix():
    q, k, v = qkv(s=6)
    _raises(ValueError, r"attn_mask has dtype torch.int64; use torch.bool \(True = attend\).*mask.bool\(\)", q, k, v,
            attn_mask=torch.ones(6, 6, dtype=torch.int64))
    _raises(ValueError, r"dtype torch.uint8", q, k, v, attn_mask=torch.ones(1, 6, dtype=torch.uint8))


def test_ambiguous_2d_mask_is_refused_and_4d_forms_work():
    q, k, v = qkv(b=3, s=3, skv=5)  # batch == seq_q == 3: (3, 5) reads as key padding or per-query
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    _raises(ValueError, r"attn_mask of shape \(3, 5\) is ambiguous.*mask\[:, None, None, :\].*mask\[None, None\]",
            q, k, v, attn_mask=mask)
    pad = attnpatch.attention_forward(q, k, v, attn_mask=mask[:, None, None, :])
    per_query = attnpatch.attention_forward(q, k, v, attn_mask=mask[None, None])
    torch.testing.assert_close(pad, F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]))
    torch.testing.assert_close(per_query, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert not torch.allclose(pad, per_query)
    # batch != seq_q: a (b, s_kv) mask is a key-padding mask
    q2, k2, v2 = qkv(b=2, s=3, skv=5)
    out = attnpatch.attention_forward(q2, k2, v2, attn_mask=mask[:2])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask[:2, None, None, :]))


def test_non_tensor_inputs_raise_type_error():
    q, k, v = qkv()
    for args in ((None, k, v), (q, [1.0], v), (q, k, 3)):
        with pytest.raises(TypeError, match=r"must be a torch.Tensor"):
            attnpatch.attention_forward(*args)
    with pytest.raises(TypeError, match=r"attn_mask must be a torch.Tensor or None, got list"):
        attnpatch.attention_forward(q, k, v, attn_mask=[[True]])


# -- unknown names from each source ------------------------------------------------------------------------

def test_unknown_name_from_argument():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope' from backend= argument") as e:
        attnpatch.attention_forward(q, k, v, backend="nope")
    valid_names_listed(str(e.value))
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope' from backend= argument"):
        attnpatch.attention_forward(q, k, v, backend=["sdpa", "nope"])
    with pytest.raises(ValueError, match=r"'auto' cannot be combined"):
        attnpatch.attention_forward(q, k, v, backend=["auto", "sdpa"])
    with pytest.raises(TypeError, match=r"backend must be a name, a list of names or None"):
        attnpatch.attention_forward(q, k, v, backend=3)


def test_unknown_name_from_use_backend():
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope' from use_backend\(\)") as e:
        with attnpatch.use_backend("nope"):
            pass
    valid_names_listed(str(e.value))
    with pytest.raises(ValueError, match=r"use_backend\(\): empty backend list"):
        with attnpatch.use_backend([]):
            pass
    with pytest.raises(TypeError, match=r"strict=.*must be a bool"):
        with attnpatch.use_backend("sdpa", strict="yes"):
            pass
    assert controls._CONTEXT.get() is None  # a refused use_backend changes nothing


@pytest.mark.parametrize("var", ["ATTNPATCH_BACKEND", "ATTNPATCH_DISABLE"])
def test_unknown_name_from_environment(monkeypatch, var):
    monkeypatch.setenv(var, "sdpa, nope")
    with pytest.raises(ValueError, match=rf"unknown attention backend 'nope' from environment variable {var}") as e:
        attnpatch.reload_env()
    valid_names_listed(str(e.value))
    q, k, v = qkv()
    with pytest.raises(ValueError, match=var):  # every call keeps saying what is wrong
        attnpatch.attention_forward(q, k, v)


@pytest.mark.parametrize("var", ["ATTNPATCH_STRICT", "ATTNPATCH_ALLOW_LOSSY", "ATTNPATCH_AUTOTUNE"])
def test_bad_boolean_environment_value(monkeypatch, var):
    monkeypatch.setenv(var, "maybe")
    with pytest.raises(ValueError, match=rf"{var}='maybe' is not a boolean; use one of 1, 0, true, false"):
        attnpatch.reload_env()
    monkeypatch.setenv(var, " Yes ")
    assert attnpatch.reload_env() is not None


def test_bad_log_level(monkeypatch):
    monkeypatch.setenv("ATTNPATCH_LOG", "loud")
    with pytest.raises(ValueError, match=r"ATTNPATCH_LOG='loud' is not a log level; use one of debug, info"):
        attnpatch.reload_env()


# -- strict mode, fallback, disabled -------------------------------------------------------------------------

def _dv_call():
    return qkv(d=16, dv=8)  # sdpa_flash refuses value head_dim != head_dim


_FLASH_DV = "value head_dim 8 != query head_dim 16 (not supported)"


def test_strict_use_backend_lists_every_backend_tried():
    q, k, v = _dv_call()
    with attnpatch.use_backend(["sdpa_flash", "sdpa_cudnn"], strict=True):
        with pytest.raises(attnpatch.BackendUnsupportedError) as e:
            attnpatch.attention_forward(q, k, v)
    msg = str(e.value)
    assert "attnpatch (strict): the backends requested by use_backend() cannot serve this call." in msg
    assert "call: q=(b=1, h=2, s=8, d=16) kv=(h=2, s=8, d_v=8) float32 on cpu" in msg
    assert f"sdpa_flash: {_FLASH_DV}" in msg
    assert "sdpa_cudnn: no CUDA device in this process (torch.cuda.is_available() is False)" in msg
    assert set(e.value.reasons) == {"sdpa_flash", "sdpa_cudnn"}
    assert attnpatch.stats().calls == {}


def test_strict_from_environment(monkeypatch):
    monkeypatch.setenv("ATTNPATCH_STRICT", "1")
    monkeypatch.setenv("ATTNPATCH_BACKEND", "sdpa_flash")
    attnpatch.reload_env()
    q, k, v = _dv_call()
    with pytest.raises(attnpatch.BackendUnsupportedError, match=r"requested by ATTNPATCH_BACKEND[\s\S]*" + re.escape(_FLASH_DV)):
        attnpatch.attention_forward(q, k, v)
    with pytest.raises(attnpatch.BackendUnsupportedError, match=r"requested by backend= argument"):
        attnpatch.attention_forward(q, k, v, backend="sdpa_flash")
    # strict=False in a scope overrides the environment
    with attnpatch.use_backend(strict=False):
        out = attnpatch.attention_forward(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    # and a call the backend can serve is fine in strict mode
    q2, k2, v2 = qkv()
    attnpatch.attention_forward(q2, k2, v2)
    assert attnpatch.stats().calls.get("sdpa_flash") == 1


def test_fallback_warns_once_per_backend_and_reason_and_counts(caplog):
    caplog.set_level(logging.WARNING, logger="attnpatch")
    q, k, v = _dv_call()
    for _ in range(3):
        out = attnpatch.attention_forward(q, k, v, backend="sdpa_flash")
    q2, k2, v2 = qkv(s=5, d=16, dv=8)  # another shape, the same reason: no new warning
    attnpatch.attention_forward(q2, k2, v2, backend="sdpa_flash")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    text = warnings[0].getMessage()
    assert "backend 'sdpa_flash' (from backend= argument) cannot serve this call" in text and _FLASH_DV in text
    s = attnpatch.stats()
    fell = [key for key in s.fallbacks if key[0] == "sdpa_flash"]
    assert len(fell) == 1 and s.fallbacks[fell[0]] == 4 and fell[0][2] == _FLASH_DV
    assert sum(s.calls.values()) == 4 and "sdpa_flash" not in s.calls
    assert "fallbacks:" in str(s) and "sdpa_flash ->" in str(s)
    # a different reason warns again
    q3, k3, v3 = qkv(d=16, dv=32)
    attnpatch.attention_forward(q3, k3, v3, backend="sdpa_flash")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_stats_counts_and_reset():
    q, k, v = qkv()
    for _ in range(3):
        attnpatch.attention_forward(q, k, v, backend="sdpa_math")
    attnpatch.attention_forward(q, k, v, backend="eager")
    assert attnpatch.stats().calls == {"sdpa_math": 3, "eager": 1}
    attnpatch.register_backend(router.registry.get_backend("eager"), replace=True)  # clears caches: counts stay
    assert attnpatch.stats().calls == {"sdpa_math": 3, "eager": 1}
    assert attnpatch.stats(reset=True).calls == {"sdpa_math": 3, "eager": 1}
    assert attnpatch.stats().calls == {}
    attnpatch.attention_forward(q, k, v, backend="sdpa_math")
    assert attnpatch.stats().calls == {"sdpa_math": 1}


def test_disabled_backend_is_never_used(monkeypatch):
    monkeypatch.setenv("ATTNPATCH_DISABLE", "sdpa,sdpa_flash")
    attnpatch.reload_env()
    q, k, v = qkv()
    e = attnpatch.explain(q, k, v)
    assert e.reasons["sdpa"] == ["disabled by ATTNPATCH_DISABLE"]
    assert e.reasons["sdpa_flash"] == ["disabled by ATTNPATCH_DISABLE"]
    assert e.backend == "sdpa_math"
    attnpatch.attention_forward(q, k, v)
    attnpatch.attention_forward(q, k, v, backend="sdpa")  # falls back, with the reason
    s = attnpatch.stats()
    assert s.calls == {"sdpa_math": 2}
    assert list(s.fallbacks) == [("sdpa", "sdpa_math", "disabled by ATTNPATCH_DISABLE")]
    infos = {b.name: b for b in attnpatch.backends()}
    assert infos["sdpa"].disabled and infos["sdpa_flash"].disabled and not infos["eager"].disabled
    monkeypatch.setenv("ATTNPATCH_STRICT", "1")
    attnpatch.reload_env()
    with pytest.raises(attnpatch.BackendUnsupportedError, match=r"sdpa: disabled by ATTNPATCH_DISABLE"):
        attnpatch.attention_forward(q, k, v, backend="sdpa")


# -- registering fake backends ------------------------------------------------------------------------------

CALLS: Counter = Counter()  # runner calls per fake backend name


class _Recording(SdpaFamily):
    """A correct, traceable backend that counts the calls its runner gets."""

    NAME = "fake_recording"
    KERNEL = None

    def build(self, call):
        inner = super().build(call)

        def run(*args):
            CALLS[self.NAME] += 1
            return inner(*args)
        return run


class _Lossy(_Recording):
    NAME = "fake_lossy"
    LOSSY = True
    AUTO_PRIORITY = {"cpu": -100, "cuda": -100}


@pytest.fixture
def fake(request):
    """Register the given fake backend class for one test; always unregister it."""
    cls = request.param
    CALLS.clear()
    backend = attnpatch.register_backend(cls)
    try:
        yield backend
    finally:
        if cls.NAME in registry.backend_names():
            attnpatch.unregister_backend(cls.NAME)


class _CountsProbes:
    """Counts how often the router asks the backend what it supports (for a real kernel: its package's
    import; SageAttention 2's took 0.28 s of a fresh process on an H200)."""

    def not_supported_reasons(self, call):
        CALLS["probe:" + self.NAME] += 1
        return super().not_supported_reasons(call)


class _ProbedLossy(_CountsProbes, _Lossy):
    NAME = "fake_probed_lossy"


@pytest.mark.parametrize("fake", [_ProbedLossy], indirect=True)
def test_auto_without_the_lossy_opt_in_never_probes_a_lossy_backend(fake):
    q, k, v = qkv()
    with attnpatch.use_backend("auto"):
        attnpatch.attention_forward(q, k, v)
    assert CALLS["probe:fake_probed_lossy"] == 0 and CALLS["fake_probed_lossy"] == 0
    # explain() still says everything, and the opt-in probes it as before
    assert attnpatch.explain(q, k, v).reasons["fake_probed_lossy"] == [
        "lossy kernel: auto picks it only with allow_lossy=True (use_backend, apply) or ATTNPATCH_ALLOW_LOSSY=1"]
    assert CALLS["probe:fake_probed_lossy"] == 1
    with attnpatch.use_backend(allow_lossy=True):
        attnpatch.attention_forward(q, k, v)
    assert CALLS["fake_probed_lossy"] == 1


class _LeftOut(_CountsProbes, _Recording):
    """Exact and fast once running, but too costly for a fresh process on this device class (as
    FlashAttention 4 on Hopper: ~5 s to import, ~2 s to compile each kernel, H200 2026-11-30)."""

    NAME = "fake_left_out"
    AUTO_PRIORITY = {"cuda": -100}  # first everywhere else, so only AUTO_LEFT_OUT keeps auto off it
    AUTO_LEFT_OUT = {"cpu": "it costs a fresh process more than it gains"}


@pytest.mark.parametrize("fake", [_LeftOut], indirect=True)
def test_auto_leaves_out_what_its_device_class_declares_and_says_why(fake):
    q, k, v = qkv()
    with attnpatch.use_backend("auto"):
        attnpatch.attention_forward(q, k, v)
    assert CALLS["probe:fake_left_out"] == 0 and CALLS["fake_left_out"] == 0  # never probed (never imported)
    assert attnpatch.explain(q, k, v).reasons["fake_left_out"] == [
        "auto leaves it out on cpu: it costs a fresh process more than it gains; name it (backend=, use_backend, "
        "a recipe) to use it"]
    attnpatch.attention_forward(q, k, v, backend="fake_left_out")  # naming it is the way in
    assert CALLS["fake_left_out"] == 1
    e = attnpatch.explain(q, k, v, backend="fake_left_out")
    assert e.backend == "fake_left_out" and e.reasons["fake_left_out"] == []
    # attnpatch.backends() and `attnpatch info` say it too, for this machine's devices
    info = {b.name: b for b in attnpatch.backends()}
    assert info["fake_left_out"].available and info["fake_left_out"].auto_note.startswith("auto leaves it out on cpu")
    assert info["eager"].auto_note is None


@pytest.mark.parametrize("fake", [_LeftOut], indirect=True)
def test_attnpatch_info_shows_why_auto_leaves_a_backend_out(fake, capsys):
    import json

    from attnpatch import cli

    assert cli.main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fake_left_out"))
    assert "auto leaves it out on cpu: it costs a fresh process more than it gains" in line
    assert cli.main(["info", "--json"]) == 0
    rows = {b["name"]: b for b in json.loads(capsys.readouterr().out)["backends"]}
    assert rows["fake_left_out"]["auto_note"].startswith("auto leaves it out on cpu") and rows["sdpa"]["auto_note"] is None


def test_flash_attn4_is_left_out_of_auto_on_hopper_only():
    """Measured on an H200 (2026-11-30): FA4 as fast as FA3 but ~5 s to import and ~2 s per new kernel
    in a fresh process. Auto must not consider it on sm90; Blackwell keeps its (estimated) place."""
    import dataclasses

    fa4 = registry.get_backend("flash_attn4")
    call = dataclasses.replace(router.build_call(*qkv(), "bnsd", None, False, None, 0.0, False, False,
                                                 router.NO_FEATURES)[0], device_type="cuda", capability=(9, 0))
    assert registry.auto_priority(fa4, call) is None
    assert "import" in registry.auto_left_out(fa4, call)
    blackwell = dataclasses.replace(call, capability=(10, 0))
    assert registry.auto_priority(fa4, blackwell) is not None and registry.auto_left_out(fa4, blackwell) is None


@pytest.mark.parametrize("fake", [_Lossy], indirect=True)
def test_lossy_backend_needs_opt_in(fake, monkeypatch):
    q, k, v = qkv()
    e = attnpatch.explain(q, k, v)
    assert e.backend != "fake_lossy"
    assert e.reasons["fake_lossy"] == [
        "lossy kernel: auto picks it only with allow_lossy=True (use_backend, apply) or ATTNPATCH_ALLOW_LOSSY=1"]
    attnpatch.attention_forward(q, k, v)
    assert CALLS['fake_lossy'] == 0
    with attnpatch.use_backend(allow_lossy=True):
        assert attnpatch.explain(q, k, v).backend == "fake_lossy"
        out = attnpatch.attention_forward(q, k, v)
    assert CALLS['fake_lossy'] == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    attnpatch.attention_forward(q, k, v)  # the opt-in ended with the block
    assert CALLS['fake_lossy'] == 1
    attnpatch.attention_forward(q, k, v, backend="fake_lossy")  # naming it is an opt-in
    assert CALLS['fake_lossy'] == 2
    with attnpatch.use_backend("fake_lossy"):
        attnpatch.attention_forward(q, k, v)
    assert CALLS['fake_lossy'] == 3
    monkeypatch.setenv("ATTNPATCH_ALLOW_LOSSY", "1")
    attnpatch.reload_env()
    attnpatch.attention_forward(q, k, v)
    assert CALLS['fake_lossy'] == 4
    with attnpatch.use_backend(allow_lossy=False):  # a scope can take the opt-in back
        attnpatch.attention_forward(q, k, v)
    assert CALLS['fake_lossy'] == 4
    assert {b.name: b for b in attnpatch.backends()}["fake_lossy"].lossy


@pytest.mark.parametrize("fake", [_Recording], indirect=True)
def test_register_and_unregister_invalidate_the_cache(fake):
    q, k, v = qkv()
    attnpatch.attention_forward(q, k, v)
    assert CALLS['fake_recording'] == 0

    class Preferred(_Recording):
        AUTO_PRIORITY = {"cpu": -50}

    attnpatch.register_backend(Preferred, replace=True)
    attnpatch.attention_forward(q, k, v)  # same shape: the cached plan must not survive the change
    assert CALLS['fake_recording'] == 1
    attnpatch.unregister_backend("fake_recording")
    attnpatch.attention_forward(q, k, v)
    assert CALLS['fake_recording'] == 1
    assert attnpatch.explain(q, k, v).backend != "fake_recording"


def test_reload_env_invalidates_the_cache(monkeypatch):
    q, k, v = qkv()
    attnpatch.attention_forward(q, k, v)
    monkeypatch.setenv("ATTNPATCH_BACKEND", "eager")
    attnpatch.attention_forward(q, k, v)  # read once: no change without reload_env()
    assert "eager" not in attnpatch.stats().calls
    attnpatch.reload_env()
    attnpatch.attention_forward(q, k, v)
    assert attnpatch.stats().calls["eager"] == 1


def test_register_backend_validation():
    with pytest.raises(TypeError, match=r"expects a Backend subclass or instance"):
        attnpatch.register_backend(int)
    with pytest.raises(TypeError, match=r"expects a Backend subclass or instance, got str"):
        attnpatch.register_backend("sdpa")
    for bad in ("", "auto", "has-dash", "two,names", "a b"):
        cls = type("Bad", (attnpatch.Backend,), {"NAME": bad})
        with pytest.raises(ValueError, match=r"backend NAME must be a non-empty identifier other than 'auto'"):
            attnpatch.register_backend(cls)
    cls = type("BadLayout", (attnpatch.Backend,), {"NAME": "fake_layout", "NATIVE_LAYOUT": "sbhd"})
    with pytest.raises(ValueError, match=r"NATIVE_LAYOUT must be 'bnsd' or 'bsnd', got 'sbhd'"):
        attnpatch.register_backend(cls)
    dup = type("Dup", (attnpatch.Backend,), {"NAME": "sdpa"})
    with pytest.raises(ValueError, match=r"a backend named 'sdpa' is already registered; pass replace=True"):
        attnpatch.register_backend(dup)
    with pytest.raises(ValueError, match=r"no backend named 'fake_never'; registered: .*sdpa"):
        attnpatch.unregister_backend("fake_never")
    assert "fake_layout" not in registry.backend_names() and "auto" not in registry.backend_names()
    assert isinstance(registry.get_backend("sdpa"), SdpaFamily)  # the failed duplicate replaced nothing


# -- dropout -------------------------------------------------------------------------------------------------

def test_dropout_only_on_dropout_capable_backends():
    q, k, v = qkv()
    e = attnpatch.explain(q, k, v, dropout_p=0.1)
    assert e.reasons["sdpa_flash"] == ["dropout_p=0.1 (the CPU flash kernel has no dropout)"]
    assert e.reasons["flex"] == ["dropout_p=0.1 (this backend has no dropout)"]
    assert e.reasons["sdpa"] == [] and e.reasons["eager"] == []
    attnpatch.attention_forward(q, k, v, dropout_p=0.1, backend="flex")  # falls back to one with dropout
    s = attnpatch.stats()
    assert list(s.fallbacks) == [("flex", "sdpa", "dropout_p=0.1 (this backend has no dropout)")]
    with attnpatch.use_backend("flex", strict=True):
        with pytest.raises(attnpatch.BackendUnsupportedError, match=r"flex: dropout_p=0.1 \(this backend has no dropout\)"):
            attnpatch.attention_forward(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("name", ["sdpa", "sdpa_math", "eager"])
def test_dropout_really_applies(name):
    p, s = 0.25, 4096
    q = torch.zeros(1, 2, 64, 16)  # uniform attention weights 1/s
    k = torch.randn(1, 2, s, 16)
    v = torch.ones(1, 2, s, 8)
    plain = attnpatch.attention_forward(q, k, v, backend=name)
    torch.testing.assert_close(plain, torch.ones_like(plain))
    torch.manual_seed(1)
    out = attnpatch.attention_forward(q, k, v, dropout_p=p, backend=name)
    assert attnpatch.stats().calls == {name: 2}
    assert not torch.allclose(out, plain)
    # each output is (kept keys) / (s (1 - p)): mean 1, std sqrt(p / ((1 - p) s)) ~ 0.009
    std = (p / ((1 - p) * s)) ** 0.5
    assert abs(out.mean().item() - 1) < 4 * std / (out[..., 0].numel() ** 0.5) + 1e-3
    assert 0.5 * std < out[..., 0].std().item() < 1.5 * std
    torch.manual_seed(1)
    again = attnpatch.attention_forward(q, k, v, dropout_p=p, backend=name)
    torch.testing.assert_close(out, again)  # follows torch's RNG


# -- explain, authority, priority lists ---------------------------------------------------------------------

def test_explain_output():
    q, k, v = _dv_call()
    e = attnpatch.explain(q, k, v, backend="sdpa_flash")
    assert e.backend != "sdpa_flash" and e.source == "backend= argument"
    assert e.requested == ("sdpa_flash",) and e.fallback == (("sdpa_flash", _FLASH_DV),)
    assert set(e.reasons) == set(registry.backend_names())  # every backend, with its reasons
    assert e.reasons[e.backend] == []
    text = str(e)
    assert text.startswith("call: q=(b=1, h=2, s=8, d=16) kv=(h=2, s=8, d_v=8) float32 on cpu, layout=bnsd")
    assert f"chosen: {e.backend} (decided by backend= argument)" in text
    assert f"fell back from sdpa_flash: {_FLASH_DV}" in text
    assert re.search(rf"^ \* {e.backend}\s+eligible$", text, re.M)
    assert re.search(r"^   sdpa_cudnn\s+no CUDA device in this process.*device cpu \(supported: cuda\)", text, re.M)
    assert attnpatch.stats().calls == {}  # explain runs nothing


def test_authority_order(monkeypatch):
    monkeypatch.setenv("ATTNPATCH_BACKEND", "eager")
    attnpatch.reload_env()
    q, k, v = qkv()
    assert attnpatch.explain(q, k, v).backend == "eager"
    assert attnpatch.explain(q, k, v).source == "ATTNPATCH_BACKEND"
    with attnpatch.use_backend("sdpa_math"):
        e = attnpatch.explain(q, k, v)
        assert (e.backend, e.source) == ("sdpa_math", "use_backend()")
        e = attnpatch.explain(q, k, v, backend="sdpa_flash")
        assert (e.backend, e.source) == ("sdpa_flash", "backend= argument")
        attnpatch.attention_forward(q, k, v)
        attnpatch.attention_forward(q, k, v, backend="sdpa_flash")
        with attnpatch.use_backend("auto"):
            e = attnpatch.explain(q, k, v)  # explicit auto in a scope beats the environment
            assert e.source.startswith("use_backend()") and e.backend == "sdpa"
    attnpatch.attention_forward(q, k, v)
    assert attnpatch.stats().calls == {"sdpa_math": 1, "sdpa_flash": 1, "eager": 1}
    monkeypatch.delenv("ATTNPATCH_BACKEND")
    attnpatch.reload_env()
    e = attnpatch.explain(q, k, v)
    assert e.source.startswith("auto") and e.backend == "sdpa"


def test_priority_lists():
    q, k, v = _dv_call()
    e = attnpatch.explain(q, k, v, backend=["sdpa_flash", "eager", "sdpa_math"])
    assert e.backend == "eager" and e.fallback == () and e.reasons["sdpa_flash"] == [_FLASH_DV]
    with attnpatch.use_backend("sdpa_flash, sdpa_math"):  # comma-separated string, like the env var
        assert attnpatch.explain(q, k, v).backend == "sdpa_math"
        attnpatch.attention_forward(q, k, v)
    assert attnpatch.stats().calls == {"sdpa_math": 1}
    assert attnpatch.stats().fallbacks == {}  # a list is "only these, in this order": no fallback
    with attnpatch.use_backend(["sdpa_flash", "sdpa_cudnn"]) as scope:
        assert scope.backends == ("sdpa_flash", "sdpa_cudnn")
        e = attnpatch.explain(q, k, v)  # none of the list can: fall back to auto, saying so
        assert [n for n, _ in e.fallback] == ["sdpa_flash", "sdpa_cudnn"] and e.backend == "sdpa"
    with attnpatch.use_backend(["eager", "eager", "sdpa"]) as scope:
        assert scope.backends == ("eager", "sdpa")


def test_use_backend_nests_and_restores_after_an_exception():
    q, k, v = qkv()
    assert controls._CONTEXT.get() is None
    with attnpatch.use_backend("eager"):
        with attnpatch.use_backend("sdpa_math", strict=True):
            assert attnpatch.explain(q, k, v).backend == "sdpa_math"
            with attnpatch.use_backend(allow_lossy=True) as inner:  # keeps the outer backend and strict
                assert inner.backends == ("sdpa_math",) and inner.strict is True and inner.allow_lossy
        assert attnpatch.explain(q, k, v).backend == "eager"
        with pytest.raises(RuntimeError, match="boom"):
            with attnpatch.use_backend("sdpa_flash"):
                assert attnpatch.explain(q, k, v).backend == "sdpa_flash"
                raise RuntimeError("boom")
        assert attnpatch.explain(q, k, v).backend == "eager"
        assert controls._CONTEXT.get().backends == ("eager",)
    assert controls._CONTEXT.get() is None
    assert attnpatch.explain(q, k, v).source.startswith("auto")


# -- isolation across threads and tasks -------------------------------------------------------------------

def test_use_backend_is_isolated_across_threads():
    q, k, v = qkv()
    barrier = threading.Barrier(3, timeout=30)
    seen, errors = {}, []

    def worker(name):
        try:
            with attnpatch.use_backend(name):
                barrier.wait()  # both threads are inside their blocks now
                seen[name] = [attnpatch.explain(q, k, v).backend]
                attnpatch.attention_forward(q, k, v)
                barrier.wait()
                seen[name].append(attnpatch.explain(q, k, v).backend)
            seen[name].append(controls._CONTEXT.get())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("sdpa_math", "eager")]
    for t in threads:
        t.start()
    barrier.wait()  # main thread (no scope) runs while both are inside theirs
    main_choice = attnpatch.explain(q, k, v).backend
    barrier.wait()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert seen == {"sdpa_math": ["sdpa_math", "sdpa_math", None], "eager": ["eager", "eager", None]}
    assert main_choice == "sdpa"
    assert attnpatch.stats().calls == {"sdpa_math": 1, "eager": 1}


def test_use_backend_is_isolated_across_asyncio_tasks():
    q, k, v = qkv()

    async def task(name, ready, go):
        with attnpatch.use_backend(name):
            ready.set()
            await go.wait()  # the other task enters its own block meanwhile
            out = [attnpatch.explain(q, k, v).backend]
            attnpatch.attention_forward(q, k, v)
            await asyncio.sleep(0)
            out.append(attnpatch.explain(q, k, v).backend)
        return out

    async def main():
        ready = [asyncio.Event(), asyncio.Event()]
        go = asyncio.Event()
        tasks = [asyncio.create_task(task(n, r, go)) for n, r in zip(("sdpa_math", "eager"), ready)]
        await asyncio.gather(*(r.wait() for r in ready))
        outside = attnpatch.explain(q, k, v).backend
        go.set()
        return outside, await asyncio.gather(*tasks)

    outside, results = asyncio.run(main())
    assert outside == "sdpa"
    assert results == [["sdpa_math", "sdpa_math"], ["eager", "eager"]]
    assert attnpatch.stats().calls == {"sdpa_math": 1, "eager": 1}


@pytest.mark.parametrize("fake", [_Recording], indirect=True)
def test_backend_unregistered_while_named_by_a_scope(fake):
    q, k, v = qkv()
    with attnpatch.use_backend("fake_recording"):
        attnpatch.attention_forward(q, k, v)
        assert CALLS["fake_recording"] == 1
        attnpatch.unregister_backend("fake_recording")
        with pytest.raises(ValueError, match=r"unknown attention backend 'fake_recording' from use_backend\(\); "
                                             r"valid names: auto, "):
            attnpatch.attention_forward(q, k, v)
    attnpatch.attention_forward(q, k, v)  # outside the scope, auto still works
    assert attnpatch.stats().calls.get("sdpa") == 1


def test_pinned_kernels_in_threads_restore_torch_flags():
    # Pinning sets torch's process-wide SDPA flags around the call; concurrent pinned calls must not
    # leave them changed (the set/restore steps are serialised).
    import threading

    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled())
    q = torch.randn(1, 2, 8, 16)
    barrier = threading.Barrier(2)
    errors = []

    def work(name):
        try:
            barrier.wait()
            for _ in range(300):
                out = attnpatch.attention_forward(q, q, q, backend=name)
                assert torch.isfinite(out).all()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("sdpa_math", "sdpa_flash")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    after = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled())
    assert after == before
