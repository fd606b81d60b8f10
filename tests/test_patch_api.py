"""The patch API itself (`apply`, `remove`, `patched`, `Patch`), on a timm ViT through the generic
adapter and on hand-written modules: scoping across models and threads, idempotence, updates, exact
undo, copies, reports, unrouted sites, errors and torch.compile."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F

import attnpatch
from attnpatch.patch import SITE_OF, patch_of
from attnpatch.rebind import _SDPA

from _patch_helpers import assert_restored, recording_backend, snapshot

torch.set_num_threads(min(2, torch.get_num_threads()))

Recording = recording_backend("api_recording")


class NoMasks(Recording):
    """Like the recording backend, but refuses calls with a mask (to exercise fallbacks)."""

    NAME = "api_nomask"
    SUPPORTED_MASKS = frozenset({"none"})


@pytest.fixture
def rec():
    attnpatch.register_backend(Recording, replace=True)
    attnpatch.register_backend(NoMasks, replace=True)
    Recording.calls.clear()
    yield Recording.calls
    attnpatch.unregister_backend(Recording.NAME)
    attnpatch.unregister_backend(NoMasks.NAME)


def _apply(model, backend="api_recording", **kw):
    return attnpatch.apply(model, backend=backend, recipe=False, **kw)


# -- models -----------------------------------------------------------------------------------------------

class SelfAttention(torch.nn.Module):
    """Hand-written attention that calls F.scaled_dot_product_attention (optionally waiting on a
    barrier first, so two threads are inside their models at the same time)."""

    def __init__(self, dim=32, heads=4, barrier=None):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.barrier = barrier

    def forward(self, x, mask=None):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.barrier is not None:
            self.barrier.wait(timeout=30)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class ManualAttention(torch.nn.Module):
    """Computes softmax(q·kᵀ)·v itself: attnpatch cannot route it and must say so."""

    def __init__(self, dim=32):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        w = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / q.shape[-1] ** 0.5, dim=-1)
        return torch.matmul(w, v)


class Net(torch.nn.Module):
    def __init__(self, layers=2, barrier=None, manual=False):
        super().__init__()
        self.blocks = torch.nn.ModuleList(SelfAttention(barrier=barrier) for _ in range(layers))
        self.manual = ManualAttention() if manual else None

    def forward(self, x, mask=None):
        for blk in self.blocks:
            x = x + blk(x, mask)
        if self.manual is not None:
            x = x + self.manual(x)
        return x


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw).eval()


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=0).eval()


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


# -- timm through the generic adapter -------------------------------------------------------------------

def test_timm_vit_every_site_routed_bitwise_and_exact_restore(rec):
    from timm.layers.attention import Attention

    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    ref = _no_grad(model, x)
    before = snapshot(model)
    patch = _apply(model)
    attention = [n for n, m in model.named_modules() if isinstance(m, Attention)]
    assert len(attention) == 2
    assert [s.path for s in patch.routed_sites] == attention
    assert all(s.adapter == "torch_sdpa" and s.heads == 3 and s.head_dim == 64 for s in patch.routed_sites)
    out = _no_grad(model, x)
    assert torch.equal(out, ref)
    assert len(rec) == 2 and [r.calls for r in patch.report().rows] == [{"api_recording": 1}] * 2
    patch.remove()
    assert torch.equal(_no_grad(model, x), ref)
    assert_restored(model, before)


# -- scoping ----------------------------------------------------------------------------------------------

def test_two_models_two_settings_interleaved_and_outside_code_untouched(rec):
    a, b = _net(0), _net(1)
    x = torch.randn(2, 5, 32)
    ref_a, ref_b = _no_grad(a, x), _no_grad(b, x)
    with _apply(a), _apply(b, backend="eager"):
        for _ in range(3):
            torch.testing.assert_close(_no_grad(b, x), ref_b, atol=1e-5, rtol=1e-4)
            assert torch.equal(_no_grad(a, x), ref_a)
        assert len(rec) == 6 and attnpatch.stats().calls.get("eager") == 6
        # code outside the models still calls torch's own function, unrouted
        assert F.scaled_dot_product_attention is _SDPA and torch.nn.functional.scaled_dot_product_attention is _SDPA
        q = torch.randn(1, 2, 4, 8)
        F.scaled_dot_product_attention(q, q, q)
        c = _net(2)
        _no_grad(c, x)
        assert len(rec) == 6 and attnpatch.stats().calls.get("eager") == 6
        assert patch_of(c) is None and "forward" not in vars(c.blocks[0])


def test_two_models_two_settings_in_concurrent_threads(rec):
    """Both threads wait on one barrier inside their attention modules, so they are mid-forward at the
    same time; each model's calls go to its own backend."""
    barrier = threading.Barrier(2)
    a, b = _net(0, barrier=barrier), _net(1, barrier=barrier)
    x = torch.randn(2, 5, 32)
    for m in (a, b):
        for blk in m.blocks:
            blk.barrier = None
    ref_a, ref_b = _no_grad(a, x), _no_grad(b, x)
    for m in (a, b):
        for blk in m.blocks:
            blk.barrier = barrier
    results, errors = {}, []

    def run(name, model, reps=5):
        try:
            results[name] = [_no_grad(model, x) for _ in range(reps)]
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            barrier.abort()

    with _apply(a) as pa, _apply(b, backend="eager") as pb:
        threads = [threading.Thread(target=run, args=("a", a)), threading.Thread(target=run, args=("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        calls_a = sum(sum(r.calls.values()) for r in pa.report().rows)
        report_b = [r.calls for r in pb.report().rows]
    assert all(torch.equal(o, ref_a) for o in results["a"])
    for o in results["b"]:
        torch.testing.assert_close(o, ref_b, atol=1e-5, rtol=1e-4)
    assert len(rec) == calls_a == 10
    assert report_b == [{"eager": 5}, {"eager": 5}]


# -- idempotence, update, patched --------------------------------------------------------------------------

def test_apply_twice_never_double_wraps_and_updates_settings(rec):
    model = _net()
    x = torch.randn(1, 4, 32)
    cls = type(model.blocks[0])
    p1 = _apply(model)
    patched_cls = type(model.blocks[0])
    assert patched_cls is not cls and patched_cls.__name__ == cls.__name__ and "forward" not in vars(model.blocks[0])
    p2 = _apply(model, backend="eager")
    assert p2 is p1 and type(model.blocks[0]) is patched_cls  # updated in place, not wrapped again
    assert p1.settings.backend == "eager"
    _no_grad(model, x)
    assert not rec and attnpatch.stats().calls == {"eager": 2}
    p1.remove()
    assert type(model.blocks[0]) is cls and "forward" not in vars(model.blocks[0])


def test_patch_update_switches_backend_and_strict(rec):
    model = _net()
    x = torch.randn(1, 4, 32)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    patch = _apply(model, backend="eager")
    assert patch.update("api_recording") is patch
    _no_grad(model, x)
    assert len(rec) == 2
    patch.update("api_nomask", strict=True)
    with pytest.raises(attnpatch.BackendUnsupportedError, match="mask kind bool"):
        _no_grad(model, x, mask)
    patch.update(strict=False)
    _no_grad(model, x, mask)  # falls back (counted, see the report test)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        patch.update("nope")
    patch.remove()


def test_patched_removes_on_exit_and_on_error(rec):
    model = _net()
    before = snapshot(model)
    with attnpatch.patched(model, backend="api_recording", recipe=False) as patch:
        assert patch_of(model) is patch
    assert patch.removed and patch_of(model) is None
    assert_restored(model, before)
    with pytest.raises(RuntimeError, match="boom"):
        with attnpatch.patched(model, backend="api_recording", recipe=False):
            _no_grad(model, torch.randn(1, 3, 32))
            raise RuntimeError("boom")
    assert patch_of(model) is None and len(rec) == 2
    assert_restored(model, before)


def test_patched_restores_an_earlier_patchs_settings(rec):
    model = _net()
    x = torch.randn(1, 4, 32)
    outer = _apply(model)
    with attnpatch.patched(model, backend="eager", recipe=False) as inner:
        assert inner is outer
        _no_grad(model, x)
        assert attnpatch.stats().calls == {"eager": 2}
    assert patch_of(model) is outer and not outer.removed and outer.settings.backend == "api_recording"
    _no_grad(model, x)
    assert len(rec) == 2
    outer.remove()


def test_remove_by_target(rec):
    model, other = _net(), _net(1)
    before = snapshot(model)
    _apply(model)
    assert attnpatch.remove(other) == 0
    assert attnpatch.remove(model) == 1
    assert attnpatch.remove(model) == 0
    assert_restored(model, before)
    assert all(SITE_OF.get(b) is None for b in model.blocks)
    _no_grad(model, torch.randn(1, 3, 32))
    assert not rec


def test_list_target_patches_each_root(rec):
    a, b = _net(0), _net(1)
    patch = _apply([a, b])
    assert [s.component for s in patch.sites] == ["0", "0", "1", "1"]
    _no_grad(a, torch.randn(1, 3, 32)), _no_grad(b, torch.randn(1, 3, 32))
    assert len(rec) == 4
    patch.remove()
    assert "forward" not in vars(a.blocks[0]) and "forward" not in vars(b.blocks[1])


# -- copies ---------------------------------------------------------------------------------------------------

def test_deepcopy_and_pickle_after_apply_and_after_remove(rec):
    model = _vit()
    x = torch.randn(1, 3, 32, 32)
    ref = _no_grad(model, x)
    patch = _apply(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(_no_grad(clone, x), ref)
    buf = pickle.dumps(model.state_dict())
    assert pickle.loads(buf).keys() == model.state_dict().keys()
    patch.remove()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(_no_grad(clone, x), ref)
        assert "forward" not in vars(clone.blocks[0].attn)


# -- reports --------------------------------------------------------------------------------------------------

def test_report_counts_calls_per_site_and_fallbacks_with_reasons(rec):
    model = _net()
    x = torch.randn(1, 4, 32)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    patch = _apply(model, backend="api_nomask")
    _no_grad(model, x)
    _no_grad(model, x)
    _no_grad(model, x, mask)  # api_nomask refuses masks: falls back to auto (sdpa on CPU)
    rows = patch.report().rows
    assert [r.site.path for r in rows] == ["blocks.0", "blocks.1"]
    assert all(r.calls == {"api_nomask": 2, "sdpa": 1} for r in rows)
    for r in rows:
        (refused, used, why), n = next(iter(r.fallbacks.items()))
        assert (refused, used, n) == ("api_nomask", "sdpa", 1) and "mask kind bool" in why
    text = str(patch.report())
    assert "blocks.0 [torch_sdpa, self] -> api_nomask×2, sdpa×1" in text
    assert "fell back api_nomask -> sdpa ×1: mask kind bool" in text
    d = patch.report().as_dicts()[0]
    assert d["fallbacks"][0]["from"] == "api_nomask" and d["backend"] == "api_nomask"
    patch.remove()


def test_unrouted_attention_is_reported(rec):
    model = _net(manual=True)
    patch = _apply(model)
    unrouted = [s for s in patch.sites if not s.routed]
    assert [(s.path, s.module_class) for s in unrouted] == [("manual", "ManualAttention")]
    assert "softmax" in unrouted[0].note
    assert "manual [torch_sdpa, unknown] -> NOT ROUTED" in str(patch.report())
    assert "forward" not in vars(model.manual)
    patch.remove()


@pytest.mark.parametrize("target,match", [
    ("a string", "target must be a torch.nn.Module"),
    (42, "got int"),
    (type("Pipe", (), {"components": {"tokenizer": object()}})(), "has no torch.nn.Module components"),
])
def test_clear_error_for_a_target_that_is_not_a_module_or_pipeline(target, match):
    with pytest.raises(TypeError, match=match):
        attnpatch.apply(target, backend="sdpa", recipe=False)
    with pytest.raises(TypeError, match=match):
        attnpatch.remove(target)


def test_bad_arguments_are_clear_errors():
    model = _net()
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*valid names"):
        attnpatch.apply(model, backend="nope", recipe=False)
    with pytest.raises(TypeError, match="strict and allow_lossy must be bools"):
        attnpatch.apply(model, backend="sdpa", strict="yes", recipe=False)
    assert patch_of(model) is None and "forward" not in vars(model.blocks[0])


# -- torch.compile ---------------------------------------------------------------------------------------------

def test_compile_fullgraph_of_a_patched_model_has_no_graph_breaks(rec):
    import torch._dynamo

    model = _net()
    x = torch.randn(2, 5, 32)
    ref = _no_grad(model, x)
    patch = _apply(model, backend="sdpa")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    out = _no_grad(compiled, x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert "compiled: sdpa" in str(patch.report())
    patch.remove()
    torch._dynamo.reset()
    assert torch.equal(_no_grad(model, x), ref)


def test_multihead_attention_is_reported_not_routed():
    import attnpatch

    model = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2, batch_first=True))
    patch = attnpatch.apply(model, recipe=False)
    try:
        (site,) = patch.sites
        assert not site.routed and "MultiheadAttention" in site.note
        assert "NOT ROUTED" in str(patch.report())
    finally:
        patch.remove()
