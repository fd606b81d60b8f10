"""Compiled patched models across changing shapes (issue 17): torch.compile with automatic and explicit
dynamic shapes, torch.export with dynamic and data-dependent sizes, and no more graphs or graph breaks
than stock torch on every model family the shipped recipes cover."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import attnpatch
from attnpatch import registry, router
from attnpatch.backends.sdpa import SdpaBackend

from _patch_helpers import SdpaBlock

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    router.clear_compiled_decisions()
    yield
    dynamo.reset()


Block = SdpaBlock  # tests/_patch_helpers.py


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block()).eval()


SHAPES = [(2, 64, 32), (2, 80, 32), (2, 96, 32), (3, 96, 32), (5, 40, 32)]


def _stock_and_patched(model_fn, compile_kw, inputs):
    """Outputs and compile counts of stock and patched compiled models over ``inputs``."""
    out = {}
    for patched in (False, True):
        dynamo.reset()
        model = model_fn()
        patch = attnpatch.apply(model, recipe=False) if patched else None
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter, **compile_kw)
        results = []
        with torch.no_grad():
            for x in inputs:
                results.append(compiled(x))
        out[patched] = (results, counter.frame_count)
        if patch is not None:
            patch.remove()
    return out


# -- the example and its variants ------------------------------------------------------------------

@pytest.mark.parametrize("compile_kw", [dict(fullgraph=True), dict(), dict(fullgraph=True, dynamic=True)],
                         ids=["fullgraph", "plain", "dynamic"])
def test_changing_batch_and_sequence_compile_like_stock(compile_kw):
    inputs = [torch.randn(s) for s in SHAPES]
    eager = _model()
    with torch.no_grad():
        refs = [eager(x) for x in inputs]
    got = _stock_and_patched(_model, compile_kw, inputs)
    for (stock, patched) in zip(got[False][0], got[True][0]):
        torch.testing.assert_close(patched, stock)
    for ref, out in zip(refs, got[True][0]):
        torch.testing.assert_close(out, ref)
    assert got[True][1] == got[False][1], (got[True][1], got[False][1])  # no more graphs than stock


def test_mark_dynamic_compiles_once():
    model = _model()
    attnpatch.apply(model, recipe=False)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for s in SHAPES[:3]:
            x = torch.randn(s)
            dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1


def test_mark_dynamic_with_a_range_does_not_violate_it():
    """The decision must not add guards on a marked dimension (a range spanning a length limit would
    be violated): on the CPU no backend has length limits, so no length is compared."""
    model = _model()
    attnpatch.apply(model, recipe=False)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for n in (40, 300, 1000):
            x = torch.randn(1, n, 32)
            dynamo.mark_dynamic(x, 1, min=2, max=4096)
            torch.testing.assert_close(compiled(x), model(x))


def test_plain_compile_with_a_graph_break_inside_a_patched_forward():
    """Regression: the rebound forward shared its code object with the class's; after a graph break in
    it, the compiled frame looked its helpers up in the wrong globals (NameError '__compiled_fn_...')."""

    class Breaking(Block):
        def forward(self, x):
            if x.shape[1] > 70:
                torch._dynamo.graph_break()
            return super().forward(x)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(Breaking(), Breaking()).eval()

    inputs = [torch.randn(s) for s in SHAPES[:3]]
    got = _stock_and_patched(build, dict(), inputs)
    for stock, patched in zip(got[False][0], got[True][0]):
        torch.testing.assert_close(patched, stock)
    assert got[True][1] == got[False][1]


def test_router_called_directly_under_dynamic_shapes():
    def f(q, k, v, mask):
        return attnpatch.attention_forward(q, k, v, attn_mask=mask, layout="bsnd")

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="eager")
    for b, s, skv in ((1, 8, 12), (2, 16, 20), (3, 24, 40)):
        q, k, v = torch.randn(b, s, 4, 16), torch.randn(b, skv, 2, 16), torch.randn(b, skv, 2, 16)
        mask = torch.rand(b, skv) > 0.2
        mask[:, 0] = True
        torch.testing.assert_close(compiled(q, k, v, mask), f(q, k, v, mask))


class _LengthLimited(SdpaBackend):
    """A CPU backend serving only key lengths >= 64 (like the 8-bit kernels' accuracy floor)."""

    NAME = "len_limited"
    MIN_SEQ_KV = 64
    AUTO_PRIORITY = {"cpu": 1}

    def build(self, call):
        inner = super().build(call)

        def run(*args):
            return inner(*args) + 1000.0  # visible
        return run


def test_a_length_limit_becomes_a_guard_and_each_side_gets_its_backend():
    registry.register_backend(_LengthLimited)
    try:
        def f(q):
            return attnpatch.attention_forward(q, q, q)

        counter = CompileCounter()
        compiled = torch.compile(f, backend=counter, fullgraph=True)
        short = [compiled(torch.randn(1, 2, n, 16)) for n in (8, 16, 32)]  # 2 compiles: static, then dynamic
        assert all(o.abs().max() < 100 for o in short)
        long = [compiled(torch.randn(1, 2, n, 16)) for n in (64, 100, 200)]
        assert all(o.abs().min() > 900 for o in long)  # the limited backend, across the limit: a recompile
        assert counter.frame_count == 3
        assert set(router.compiled_decisions_of(None)) == {"sdpa", "len_limited"}
    finally:
        registry.unregister_backend("len_limited")


def test_export_never_guards_on_lengths_and_explains_why():
    """Under torch.export an exported program must hold for every length of its range: a backend with a
    length limit is not chosen there (its reason says why), and the export succeeds."""
    registry.register_backend(_LengthLimited)
    try:
        class M(nn.Module):
            def forward(self, q):
                return attnpatch.attention_forward(q, q, q)

        ep = torch.export.export(M(), (torch.randn(1, 2, 80, 16),),
                                 dynamic_shapes={"q": {2: torch.export.Dim("s", min=2, max=4096)}})
        q = torch.randn(1, 2, 200, 16)
        torch.testing.assert_close(ep.module()(q), F.scaled_dot_product_attention(q, q, q))
        e = attnpatch.explain(q, q, q)
        assert e.backend == "len_limited"  # eager, with the length known, it would be chosen
    finally:
        registry.unregister_backend("len_limited")


# -- torch.export ------------------------------------------------------------------------------------------

def test_assume_constant_result_mark_is_torchs():
    """attnpatch marks its trace-time functions the way torch._dynamo.assume_constant_result does,
    without importing dynamo when attnpatch is imported."""
    def f():
        return 1
    marked = torch._dynamo.assume_constant_result(f)
    assert marked is f and set(vars(f)) == {"_dynamo_marked_constant"} and f._dynamo_marked_constant is True
    assert router._compile_decision._dynamo_marked_constant is True


def test_export_with_dynamic_dims_runs_without_attnpatch(tmp_path):
    model = _model()
    x = torch.randn(2, 64, 32)
    with attnpatch.patched(model, recipe=False):
        batch, seq = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("seq", min=2, max=512)
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch, 1: seq},))
        y = torch.randn(3, 100, 32)
        torch.testing.assert_close(ep.module()(y), _model()(y))
        torch.export.save(ep, tmp_path / "m.pt2")
    torch.save(y, tmp_path / "y.pt")
    torch.save(_model()(y), tmp_path / "ref.pt")
    code = (
        "import sys, torch\n"
        f"ep = torch.export.load({str(tmp_path / 'm.pt2')!r})\n"
        f"y = torch.load({str(tmp_path / 'y.pt')!r}); ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "torch.testing.assert_close(ep.module()(y), ref)\n"
        "assert 'attnpatch' not in sys.modules\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_export_with_a_data_dependent_size():
    """A key length read from data (unbacked): attnpatch adds no guard on it (torch's own SDPA needs the
    user's ``torch._check`` that it is not 0, patched or not)."""
    class M(nn.Module):
        def forward(self, q, n):
            k = q[:, :, : n.item()]
            torch._check(k.shape[2] > 0)
            return F.scaled_dot_product_attention(q, k, k)

    m = M()
    q = torch.randn(1, 2, 32, 16)
    with attnpatch.patched(m, recipe=False) as patch:
        assert patch.routed_sites
        ep = torch.export.export(m, (q, torch.tensor(20)))
    for n in (5, 20, 32):
        torch.testing.assert_close(ep.module()(q, torch.tensor(n)), m(q, torch.tensor(n)))


def test_compile_with_a_data_dependent_size():
    def f(q, n):
        k = q[:, :, : n.item()]
        torch._check(k.shape[2] > 0)
        return attnpatch.attention_forward(q, k, k)

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(f, fullgraph=True, backend="eager")
        q = torch.randn(1, 2, 32, 16)
        for n in (5, 20):
            torch.testing.assert_close(compiled(q, torch.tensor(n)), f(q, torch.tensor(n)))


# -- every model family of the shipped recipes: graphs and breaks as stock -----------------------------------

def _grow_batch(kw, times, base=None):
    """The inputs with the batch ``times`` larger: every tensor whose first dim is the batch is repeated
    (timesteps included; position ids, whose first dim is a length, are left as they are)."""
    if base is None:
        main = kw.get("hidden_states", kw.get("sample"))
        base = main.shape[0]
    out = {}
    for name, v in kw.items():
        if isinstance(v, dict):
            v = _grow_batch(v, times, base)
        elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == base and not name.endswith("_ids"):
            v = v.repeat(times, *([1] * (v.dim() - 1)))
        out[name] = v
    return out


def _diffusers_family(name):
    pytest.importorskip("diffusers")
    from test_adapter_diffusers import build  # tiny real diffusers models with inputs

    def make():
        model, kw = build(name)
        return model, [kw, _grow_batch(kw, 2), _grow_batch(kw, 3)]
    return make


def _lm_family(name):
    pytest.importorskip("transformers")
    from attnpatch import tiny_models

    def make():
        model = tiny_models.build(name).eval()
        return model, [dict(input_ids=torch.randint(3, 100, (1, n))) for n in (8, 12, 16)]
    return make


FAMILIES = {
    "flux": lambda: _diffusers_family("flux"), "flux2": lambda: _diffusers_family("flux2"),
    "sd3": lambda: _diffusers_family("sd3"), "sdxl/sd15 (UNet)": lambda: _diffusers_family("unet"),
    "wan": lambda: _diffusers_family("wan"), "hunyuanvideo": lambda: _diffusers_family("hunyuanvideo"),
    "cogvideox": lambda: _diffusers_family("cogvideox"), "ltx": lambda: _diffusers_family("ltx"),
    "qwenimage": lambda: _diffusers_family("qwenimage"), "pixart": lambda: _diffusers_family("pixart"),
    "sana": lambda: _diffusers_family("sana"),
    "llama": lambda: _lm_family("tiny-llama"), "qwen2": lambda: _lm_family("tiny-qwen2"),
    "t5": lambda: _lm_family("tiny-t5"), "clip": lambda: _lm_family("tiny-clip"),
}


def _count(model, inputs):
    dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    dynamo.utils.counters.clear()
    outs = []
    with torch.no_grad():
        for kw in inputs:
            outs.append(compiled(**kw))
    breaks = sum(dynamo.utils.counters["graph_break"].values())
    return counter.frame_count, breaks, outs


def _first_tensor(out):
    while not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else next(v for v in out.values() if isinstance(v, torch.Tensor))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_family_compiles_with_stocks_graphs_and_breaks(family):
    model, inputs = FAMILIES[family]()()
    if family == "t5":
        inputs = [dict(kw, decoder_input_ids=kw["input_ids"][:, :5]) for kw in inputs]
    stock = _count(model, inputs)
    patch = attnpatch.apply(model)  # auto, with the shipped recipe that matches
    try:
        patched = _count(model, inputs)
    finally:
        patch.remove()
    assert patched[:2] == stock[:2], f"graphs/breaks patched {patched[:2]} vs stock {stock[:2]}"
    for a, b in zip(patched[2], stock[2]):
        torch.testing.assert_close(_first_tensor(a), _first_tensor(b), atol=1e-4, rtol=1e-4)
