"""`attention_forward` inside `torch.compile(fullgraph=True)`: no graph breaks for the torch backends,
the same numbers as eager mode, and the backend chosen by the controls is the one traced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnpatch
from attnpatch import controls, registry, router
from attnpatch.backends import flex as flex_backend
from attnpatch.backends._sdpa_common import SdpaFamily


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    router.clear_compiled_decisions()
    yield
    torch._dynamo.reset()


class _Marker(SdpaFamily):
    """Traceable and visible: SDPA's output plus 1000, so a test can tell it ran."""

    NAME = "fake_marker"
    KERNEL = None

    def build(self, call):
        inner = super().build(call)

        def run(*args):
            return inner(*args) + 1000.0
        return run


@pytest.fixture
def marker():
    backend = attnpatch.register_backend(_Marker)
    try:
        yield backend
    finally:
        attnpatch.unregister_backend("fake_marker")


def _inputs(layout="bsnd", b=2, h=4, s=24, skv=40, d=32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(b, h, s, d), (b, h, skv, d), (b, h, skv, d)]
    if layout == "bsnd":
        shapes = [(x[0], x[2], x[1], x[3]) for x in shapes]
    q, k, v = (torch.randn(shape, generator=gen) for shape in shapes)
    pad = torch.ones(b, skv, dtype=torch.bool)
    pad[1, :5] = False  # padding that does not start at 0
    pad[0, -7:] = False
    return q, k, v, pad


CASES = {
    "keypad_bool_bsnd": dict(layout="bsnd", mask="keypad", causal=False),
    "additive_bnsd_causal": dict(layout="bnsd", mask="additive", causal=True),
}


def _mask(kind, pad, s, skv):
    if kind == "keypad":
        return pad  # (b, s_kv): a key-padding mask
    bias = torch.randn(1, 1, s, skv, generator=torch.Generator().manual_seed(1))
    return bias.masked_fill(~pad[:1, None, None, :], float("-inf"))


# flex compiles slowly on CPU (inductor): one representative case, bool key padding in bsnd
_PARAMS = [(n, c) for n in ("sdpa", "sdpa_math", "sdpa_flash", "eager", "flex") for c in CASES
           if n != "flex" or c == "keypad_bool_bsnd"]


@pytest.mark.parametrize("name,case", _PARAMS)
def test_fullgraph_compile_matches_eager(name, case):
    cfg = CASES[case]
    q, k, v, pad = _inputs(cfg["layout"])
    s, skv = (q.shape[1], k.shape[1]) if cfg["layout"] == "bsnd" else (q.shape[2], k.shape[2])
    mask = _mask(cfg["mask"], pad, s, skv)
    kw = dict(layout=cfg["layout"], is_causal=cfg["causal"], backend=name)
    assert attnpatch.explain(q, k, v, attn_mask=mask, **kw).reasons[name] == []

    def fn(q, k, v, m):
        return attnpatch.attention_forward(q, k, v, attn_mask=m, **kw) * 2

    expected = fn(q, k, v, mask)
    assert attnpatch.stats().calls == {name: 1}
    explanation = torch._dynamo.explain(fn)(q, k, v, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager" if name != "flex" else "inductor")
    out = compiled(q, k, v, mask)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert name in router.compiled_decisions_of(None)
    assert set(router.compiled_decisions_of(None)) == {name}


def test_inductor_compile_of_a_masked_bsnd_call():
    q, k, v, pad = _inputs("bsnd")
    compiled = torch.compile(lambda q, k, v, m: attnpatch.attention_forward(q, k, v, layout="bsnd", attn_mask=m),
                             fullgraph=True)
    out = compiled(q, k, v, pad)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=pad[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not attnpatch.router._DYNAMO_GUARDS_CONTEXTVARS,
                    reason="torch < 2.14 cannot trace ContextVar.get: use_backend() is read once at trace time "
                           "(test_compile_without_contextvar_tracing_reads_the_setting_at_trace_time covers it)")
@pytest.mark.parametrize("entered_before", [False, True], ids=["first_use_backend_after_compile", "entered_before"])
def test_use_backend_decides_inside_compiled_code(marker, monkeypatch, entered_before):
    # before any use_backend() block compiled code does not read the context variable (a C++ guard on
    # controls.USE_BACKEND_ENTERED instead): the first block must still recompile for its setting
    monkeypatch.setattr(controls, "USE_BACKEND_ENTERED", entered_before)
    q, k, v, _ = _inputs("bnsd")
    compiled = torch.compile(lambda q, k, v: attnpatch.attention_forward(q, k, v), fullgraph=True, backend="eager")
    plain = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(compiled(q, k, v), plain)
    with attnpatch.use_backend("fake_marker"):
        torch.testing.assert_close(compiled(q, k, v), plain + 1000.0)
    with attnpatch.use_backend("sdpa_math"):
        torch.testing.assert_close(compiled(q, k, v), plain, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(compiled(q, k, v), plain)  # and back after the block
    assert set(router.compiled_decisions_of(None)) == {"sdpa", "fake_marker", "sdpa_math"}
    assert attnpatch.explain(q, k, v).backend == "sdpa"


def test_backend_argument_and_environment_inside_compiled_code(marker, monkeypatch):
    q, k, v, _ = _inputs("bnsd")
    plain = F.scaled_dot_product_attention(q, k, v)
    compiled = torch.compile(lambda q, k, v: attnpatch.attention_forward(q, k, v, backend="fake_marker"),
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), plain + 1000.0)
    monkeypatch.setenv("ATTNPATCH_BACKEND", "fake_marker")
    attnpatch.reload_env()
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attnpatch.attention_forward(q, k, v), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), plain + 1000.0)


def test_strict_refusal_raises_while_tracing():
    """use_backend() goes around the compiled call (dynamo cannot trace ContextVar.set inside it)."""
    q, k, v, _ = _inputs("bnsd")
    v = v[..., :16]  # sdpa_flash refuses value head_dim != head_dim
    compiled = torch.compile(lambda q, k, v: attnpatch.attention_forward(q, k, v), fullgraph=True, backend="eager")
    with attnpatch.use_backend("sdpa_flash", strict=True):
        with pytest.raises(Exception, match=r"sdpa_flash: value head_dim 16 != query head_dim 32"):
            compiled(q, k, v)
    with attnpatch.use_backend("sdpa_flash"):  # not strict: falls back inside the graph
        torch.testing.assert_close(compiled(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert set(router.compiled_decisions_of(None)) == {"sdpa"}


def test_flex_compiles_one_copy_per_shape_family():
    """Regression: one torch.compile for every flex call hit dynamo's recompile limit (8) after a few
    dtypes and head dims, and flex then ran unfused without a word."""
    a = flex_backend._compiled(flex_backend._flex, ("cpu", None, torch.float32, 64, 64, False, False))
    b = flex_backend._compiled(flex_backend._flex, ("cpu", None, torch.bfloat16, 64, 64, False, False))
    again = flex_backend._compiled(flex_backend._flex, ("cpu", None, torch.float32, 64, 64, False, False))
    assert a is again and a is not b
    code_a = getattr(a, "_torchdynamo_orig_callable", a).__code__
    code_b = getattr(b, "_torchdynamo_orig_callable", b).__code__
    assert code_a is not code_b and code_a.co_code == flex_backend._flex.__code__.co_code
    assert registry.get_backend("flex").NAME == "flex"


def test_compile_without_contextvar_tracing_reads_the_setting_at_trace_time(monkeypatch):
    # torch < 2.14 (the GPU box has 2.11) cannot trace ContextVar.get: the router then reads the
    # use_backend() state eagerly at trace time. Simulate that path on this torch.
    import torch._dynamo

    from attnpatch import router

    monkeypatch.setattr(router, "_DYNAMO_GUARDS_CONTEXTVARS", False)
    torch._dynamo.reset()
    q = torch.randn(1, 2, 9, 16)

    def f(x):
        return attnpatch.attention_forward(x, x, x) + 1

    router.clear_compiled_decisions()
    with attnpatch.use_backend("sdpa_math"):
        out = torch.compile(f, fullgraph=True)(q)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q) + 1)
    assert "sdpa_math" in router.compiled_decisions_of(None)
    torch._dynamo.reset()


def _python_guard_calls(fn, *args) -> int:
    """Python functions of dynamo's guards module run per call of compiled ``fn`` (lambda guards, e.g.
    on a context variable); dynamo's C++ guards do not show in the profile."""
    import cProfile
    import pstats

    fn(*args)
    fn(*args)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        fn(*args)
    prof.disable()
    calls = sum(stat[1] for (path, _line, _name), stat in pstats.Stats(prof).stats.items()
                if path.replace("\\", "/").endswith("torch/_dynamo/guards.py"))
    return calls // 10


def test_compiled_call_runs_no_python_guard_beyond_stock(monkeypatch):
    """Issue 15: a guard on use_backend()'s context variable is a Python call in every compiled call
    (torch >= 2.14 guards ContextVar.get through a lambda); until a block was entered it is not read."""
    monkeypatch.setattr(controls, "USE_BACKEND_ENTERED", False)
    q, k, v, _ = _inputs("bnsd")
    stock = _python_guard_calls(torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                                              fullgraph=True, backend="eager"), q, k, v)
    torch._dynamo.reset()
    routed = _python_guard_calls(torch.compile(lambda q, k, v: attnpatch.attention_forward(q, k, v),
                                               fullgraph=True, backend="eager"), q, k, v)
    assert routed <= stock


@pytest.mark.parametrize("backend", [None, "eager", "sdpa"])
def test_window_and_softcap_held_in_variables_compile_with_dynamic_shapes(backend):
    """With dynamic=True dynamo holds ints and floats that are not literals in the traced code (a
    closure's, a config's) as symbolic: the window edges and softcap must be specialised into the
    decision's static key (it failed with "assume_constant_result argument conversion failed")."""
    torch._dynamo.reset()
    kw = dict(window=(2, 1), softcap=4.0)

    def f(q, k, v):
        return attnpatch.attention_forward(q, k, v, backend=backend, **kw)

    compiled = torch.compile(f, dynamic=True, backend="aot_eager", fullgraph=True)
    for sq, skv in ((6, 10), (9, 13)):
        q, k, v = (torch.randn(1, 2, s, 16) for s in (sq, skv, skv))
        ref = attnpatch.attention_forward(q.double(), k.double(), v.double(), backend="eager", **kw)
        torch.testing.assert_close(compiled(q, k, v).double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strict", [False, True])
def test_export_takes_the_traced_path(strict):
    """`route` tells tracing from eager calls without `torch.compiler.is_compiling()` (cheaper per call):
    dynamo's tracing (strict export, torch.compile) and torch.export's non-strict tracing (the flag that
    `is_compiling()` reads) must both decide at trace time, never cache an eager plan of fake tensors."""
    class M(torch.nn.Module):
        def forward(self, q, kv):
            return attnpatch.attention_forward(q, kv, kv)

    q, kv = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    plans_before = len(router._PLANS)
    ep = torch.export.export(M(), (q, kv), strict=strict)
    assert router.compiled_decisions_of(None), "the export was not routed through the traced path"
    assert len(router._PLANS) == plans_before
    q2, kv2 = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    torch.testing.assert_close(ep.module()(q2, kv2), F.scaled_dot_product_attention(q2, kv2, kv2, enable_gqa=True))


def test_pinned_operators_are_called_through_torchs_generated_bindings():
    """The eager runners call torch's generated binding of each pinned operator (``torch.<name>``: the
    cheapest entry, ~2.6 µs per call less than the OpOverload's ``_op`` on the CPU), and the OpOverload
    while tracing (what dynamo traces); an operator torch lacks is None."""
    from attnpatch.backends._sdpa_common import aten_op

    name = "_scaled_dot_product_flash_attention_for_cpu"
    assert aten_op(name, False) is getattr(torch, name)
    assert aten_op(name, True) is getattr(torch.ops.aten, name).default
    assert aten_op("_no_such_attention_operator", False) is None
    q = torch.randn(1, 2, 8, 16)
    out = attnpatch.attention_forward(q, q, q, backend="sdpa_flash")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
