"""Every backend available on CPU against an independent fp64 reference (tests/_attention_cases.py).

Criterion (flash-attn's): a backend's max error against fp64 is at most twice the error of torch's
math kernel in the same dtype, plus twice the error of storing the reference in that dtype. A backend
that refuses a case is skipped with its stated reasons; `test_backends_serve_most_of_the_matrix`
makes sure those skips stay a minority. flex compiles per shape family (seconds each), so it gets a
smaller representative subset.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnpatch
from attnpatch import registry

from _attention_cases import (
    DTYPES, MASK_FORMS, Case, _mask_4d, dead_rows, make_inputs, max_err, reference, refusal, rounding_atol,
    score_rounding,
)

CPU_BACKENDS = [
    b.name for b in attnpatch.backends()
    if b.available and "cpu" in registry.get_backend(b.name).SUPPORTED_DEVICES
]
#: Cheap backends: the full matrix. flex: a subset (it compiles per shape family).
MATRIX_BACKENDS = [n for n in CPU_BACKENDS if n != "flex"]


def test_cpu_backend_list_is_the_expected_one():
    assert set(CPU_BACKENDS) == {"sdpa", "sdpa_flash", "sdpa_math", "flex", "eager"}
    infos = {b.name: b for b in attnpatch.backends()}
    for name in ("sdpa_cudnn", "sdpa_efficient"):
        q = torch.randn(1, 1, 4, 16)
        reasons = refusal(name, q, q, q)
        assert any("device cpu (supported: cuda)" in r for r in reasons), reasons
        # CUDA-only kernels are not available in a process without a GPU (attnpatch info says so)
        assert infos[name].available == torch.cuda.is_available()
        if not torch.cuda.is_available():
            assert "no CUDA device in this process" in infos[name].why_not


# -- the matrix ---------------------------------------------------------------------------------------

_BASE = [
    Case(),  # self-attention, no mask
    Case(sq=7, skv=65, d=72, dv=72),  # cross
    Case(hq=8, hkv=2, sq=100, skv=100, d=80, dv=80),  # GQA
    Case(b=1, hq=6, hkv=1, sq=1, skv=257, d=128, dv=128),  # MQA, decode-like
    Case(b=1, hq=2, hkv=2, sq=1, skv=1, d=16, dv=16),
    Case(b=1, hq=2, hkv=2, sq=64, skv=64, d=256, dv=256),
    Case(b=3, hq=2, hkv=2, sq=9, skv=40, d=24, dv=24),
    Case(sq=17, skv=33, d=64, dv=32),  # value head dim != query head dim
    Case(b=1, sq=20, skv=20, d=72, dv=128),
    Case(b=1, hq=3, hkv=3, sq=300, skv=129, d=96, dv=96),
    Case(scale=0.37),
    Case(sq=65, skv=65, causal=True),
    Case(sq=16, skv=80, causal=True, d=80, dv=80),  # top-left causal, s_q < s_kv
    Case(sq=80, skv=16, causal=True),  # s_q > s_kv: late rows see every key
    Case(b=1, hq=4, hkv=1, sq=1, skv=50, causal=True),
    Case(sq=31, skv=31, causal=True, scale=0.2, hq=4, hkv=2),
]
_MASKED = [
    Case(b=2, hq=4, hkv=4, sq=37, skv=45, d=64, dv=64, mask=m)
    for m in MASK_FORMS if m != "none"
]
_MASKED += [
    Case(b=2, hq=4, hkv=2, sq=9, skv=130, d=80, dv=80, mask="bool_keypad_2d"),  # GQA + key padding
    Case(b=1, hq=2, hkv=2, sq=1, skv=70, d=72, dv=72, mask="add_full"),
    Case(b=2, hq=8, hkv=1, sq=50, skv=50, d=32, dv=32, mask="bool_full", scale=0.3),
    Case(b=2, sq=33, skv=33, d=64, dv=32, mask="add_b11k"),
    Case(b=2, sq=40, skv=40, mask="bool_keypad_2d", causal=True),  # causal + mask, padding at the front
    Case(b=2, sq=24, skv=56, mask="add_full", causal=True, hkv=2),
    Case(b=2, sq=33, skv=33, mask="bool_dead_rows", causal=True),
    Case(b=1, sq=48, skv=48, mask="add_qk_2d", causal=True, d=80, dv=80),
]


def _matrix():
    cases = []
    for base in _BASE + _MASKED:
        for dtype, layout in itertools.product(("fp32", "bf16", "fp16"), ("bnsd", "bsnd")):
            # every dtype in bnsd; bsnd for fp32 and bf16 (layout handling is dtype-independent)
            if layout == "bsnd" and dtype == "fp16":
                continue
            if base.mask in ("add_fp32_keypad",) and dtype == "fp32":
                continue
            cases.append(replace(base, dtype=dtype, layout=layout))
    cases += [replace(c, dtype="fp64") for c in (_BASE[0], _BASE[2], _MASKED[6], _BASE[11])]
    assert all(c.valid() for c in cases)
    return cases


MATRIX = _matrix()

_MATH_ERR: dict = {}


def math_error(case: Case, q, k, v, mask, ref) -> float:
    """Error of torch's math kernel in the case's dtype, called directly (not through attnpatch)."""
    err = _MATH_ERR.get(case)
    if err is None:
        qb, kb, vb = (t.transpose(1, 2) if case.layout == "bsnd" else t for t in (q, k, v))
        m = None
        if mask is not None:
            m = _mask_4d(mask, case.b, case.hq, case.sq, case.skv)
            if m.dtype != torch.bool:
                m = m.to(qb.dtype)
        if case.causal:
            tri = torch.ones(case.sq, case.skv, dtype=torch.bool).tril()
            m = tri if m is None else (m & tri if m.dtype == torch.bool else m.masked_fill(~tri, float("-inf")))
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=m, scale=case.scale,
                                                 enable_gqa=case.hq != case.hkv)
        if case.layout == "bsnd":
            out = out.transpose(1, 2)
        out = torch.nan_to_num(out)  # some torch versions give NaN on dead rows; the error elsewhere counts
        err = _MATH_ERR[case] = max_err(out, ref)
    return err


def check_forward(name: str, case: Case, seed: int = 0) -> None:
    q, k, v, mask = make_inputs(case, seed=seed)
    kw = dict(layout=case.layout, attn_mask=mask, is_causal=case.causal, scale=case.scale)
    reasons = refusal(name, q, k, v, **kw)
    if reasons:
        assert all(isinstance(r, str) and r for r in reasons)
        pytest.skip(f"{name} refuses {case.id}: " + "; ".join(reasons))
    ref = reference(q, k, v, mask, case.causal, case.scale, case.layout)
    attnpatch.stats(reset=True)
    out = attnpatch.attention_forward(q, k, v, backend=name, **kw)
    assert attnpatch.stats().calls == {name: 1}, "the named backend must be the one that ran"
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    err = max_err(out, ref)
    bound = (2 * math_error(case, q, k, v, mask, ref) + rounding_atol(ref, q.dtype)
             + score_rounding(q, k, v, case.scale, case.layout))
    assert err <= bound, f"{name} {case.id}: max error {err:.3g} > bound {bound:.3g}"
    dead = dead_rows(case, mask)
    if dead is not None:
        o = out.transpose(1, 2) if case.layout == "bsnd" else out
        assert o[dead].abs().max().item() == 0.0, "rows with every key masked must be zeros"


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.id)
@pytest.mark.parametrize("name", MATRIX_BACKENDS)
def test_forward_matches_fp64_reference(name, case):
    check_forward(name, case)


FLEX_CASES = [
    Case(),
    Case(dtype="bf16", layout="bsnd", sq=16, skv=80, causal=True, d=80, dv=80),
    Case(hq=8, hkv=2, sq=37, skv=45, d=72, dv=72, mask="add_full"),
    Case(sq=37, skv=45, mask="bool_dead_rows"),
    Case(sq=40, skv=40, mask="bool_keypad_2d", causal=True),
    Case(b=1, hq=2, hkv=1, sq=1, skv=130, d=64, dv=32, mask="add_b11k"),
    Case(dtype="fp16", b=1, hq=2, hkv=2, sq=65, skv=65, d=64, dv=64, mask="bool_qk_2d", scale=0.3),
]


@pytest.mark.parametrize("case", FLEX_CASES, ids=lambda c: c.id)
def test_flex_matches_fp64_reference(case):
    if "flex" not in CPU_BACKENDS:
        pytest.fail("flex is not available on this CPU torch: " + "; ".join(
            next(b for b in attnpatch.backends() if b.name == "flex").reasons))
    check_forward("flex", case)


def test_backends_serve_most_of_the_matrix():
    """Skips are refusals with reasons; make sure each backend still runs on most of the matrix."""
    for name in MATRIX_BACKENDS:
        served = 0
        for case in MATRIX:
            q, k, v, mask = make_inputs(case)
            served += not refusal(name, q, k, v, layout=case.layout, attn_mask=mask, is_causal=case.causal,
                                  scale=case.scale)
        assert served >= 0.8 * len(MATRIX), f"{name} serves only {served}/{len(MATRIX)} matrix cases"
    for case in FLEX_CASES:
        q, k, v, mask = make_inputs(case)
        assert not refusal("flex", q, k, v, layout=case.layout, attn_mask=mask, is_causal=case.causal), case.id


def test_matrix_covers_the_space():
    assert {c.dtype for c in MATRIX} >= {"fp32", "bf16", "fp16"}
    assert {c.layout for c in MATRIX} == {"bnsd", "bsnd"}
    assert {c.mask for c in MATRIX} == set(MASK_FORMS)
    assert {c.d for c in MATRIX} >= {16, 72, 80, 256}
    assert any(c.dv != c.d for c in MATRIX) and any(c.hkv == 1 < c.hq for c in MATRIX)
    assert any(c.hkv not in (1, c.hq) for c in MATRIX)
    assert {1, 257, 300} <= {c.skv for c in MATRIX} | {c.sq for c in MATRIX}
    assert any(c.causal and c.sq != c.skv for c in MATRIX) and any(c.causal and c.mask != "none" for c in MATRIX)


# -- property-based fuzzing -----------------------------------------------------------------------------

@st.composite
def cases(draw):
    hkv = draw(st.sampled_from([1, 2, 3]))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([8, 16, 24, 32, 40, 64, 72, 80, 96, 128, 160, 256]))
    dv = draw(st.sampled_from([d, d, d, 16, 48, 128]))
    case = Case(
        dtype=draw(st.sampled_from(["fp32", "fp32", "bf16", "fp16"])),
        layout=draw(st.sampled_from(["bnsd", "bsnd"])),
        b=draw(st.integers(1, 3)), hq=hq, hkv=hkv,
        sq=draw(st.integers(1, 140)), skv=draw(st.integers(1, 140)), d=d, dv=dv,
        mask=draw(st.sampled_from(sorted(MASK_FORMS))),
        causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
    )
    if not case.valid():  # ambiguous 2-D mask: attnpatch refuses it (tested in test_router_controls)
        case = replace(case, b=case.b + 1 if case.b < 3 else 1)
    return case


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), name=st.sampled_from(MATRIX_BACKENDS), seed=st.integers(0, 2**16))
def test_fuzz_forward(case, name, seed):
    assert case.valid()
    q, k, v, mask = make_inputs(case, seed=seed)
    reasons = refusal(name, q, k, v, layout=case.layout, attn_mask=mask, is_causal=case.causal, scale=case.scale)
    if reasons:  # a refusal must be a stated reason, and the one documented limit of these backends
        assert reasons == [f"value head_dim {case.dv} != query head_dim {case.d} (not supported)"], reasons
        return
    _MATH_ERR.pop(case, None)  # the cache is per (case, seed 0); recompute for this seed
    try:
        check_forward(name, case, seed=seed)
    finally:
        _MATH_ERR.pop(case, None)


# -- backward ---------------------------------------------------------------------------------------------

GRAD_CASES = [
    Case(b=1, sq=17, skv=17, d=64, dv=64),
    Case(dtype="bf16", layout="bsnd", b=2, hq=4, hkv=2, sq=9, skv=33, d=72, dv=72, causal=True),
    Case(b=2, hq=2, hkv=2, sq=20, skv=28, d=80, dv=80, mask="add_full"),
    Case(b=2, hq=4, hkv=1, sq=33, skv=33, mask="bool_keypad_2d", causal=True),
    Case(b=1, hq=2, hkv=2, sq=12, skv=12, d=32, dv=16, mask="bool_dead_rows"),
    Case(dtype="fp16", b=1, hq=2, hkv=2, sq=16, skv=24, d=64, dv=64, mask="bool_b1qk", scale=0.5),
]
FLEX_GRAD_CASES = [GRAD_CASES[0], GRAD_CASES[3]]


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out, (q.grad, k.grad, v.grad)


def check_backward(name: str, case: Case) -> None:
    assert registry.get_backend(name).SUPPORTS_BACKWARD
    q, k, v, mask = make_inputs(case, requires_grad=True)
    kw = dict(layout=case.layout, attn_mask=mask, is_causal=case.causal, scale=case.scale)
    reasons = refusal(name, q, k, v, **kw)
    if reasons:
        pytest.skip(f"{name} refuses {case.id} with gradients: " + "; ".join(reasons))
    assert attnpatch.explain(q, k, v, backend=name, **kw).call.needs_grad
    gen = torch.Generator().manual_seed(1)
    dout_shape = (case.b, case.hq, case.sq, case.dv) if case.layout == "bnsd" else (case.b, case.sq, case.hq, case.dv)
    dout = torch.randn(dout_shape, generator=gen)
    _, ref = _grads(lambda a, b, c: reference(a, b, c, mask, case.causal, case.scale, case.layout),
                    q.double(), k.double(), v.double(), dout.double())

    def math_fn(a, b, c):
        if case.layout == "bsnd":
            a, b, c = a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2)
        m = None if mask is None else _mask_4d(mask, case.b, case.hq, case.sq, case.skv)
        if case.causal:
            tri = torch.ones(case.sq, case.skv, dtype=torch.bool).tril()
            m = tri if m is None else (m & tri if m.dtype == torch.bool else m.masked_fill(~tri, float("-inf")))
        if m is not None and m.dtype != torch.bool:
            m = m.to(a.dtype)
        with sdpa_kernel(SDPBackend.MATH):
            o = F.scaled_dot_product_attention(a, b, c, attn_mask=m, scale=case.scale, enable_gqa=case.hq != case.hkv)
        return o.transpose(1, 2) if case.layout == "bsnd" else o

    _, math_grads = _grads(math_fn, q, k, v, dout.to(q.dtype))
    attnpatch.stats(reset=True)
    _, grads = _grads(lambda a, b, c: attnpatch.attention_forward(a, b, c, backend=name, **kw),
                      q, k, v, dout.to(q.dtype))
    assert attnpatch.stats().calls == {name: 1}
    for label, g, gm, gr in zip("qkv", grads, math_grads, ref):
        assert g is not None and g.shape == gr.shape
        assert torch.isfinite(g).all(), f"d{label} has NaN/inf"
        err = max_err(g, gr)
        bound = (2 * max_err(torch.nan_to_num(gm), gr) + rounding_atol(gr, q.dtype)
                 + score_rounding(q, k, v, case.scale, case.layout) * gr.abs().max().item())
        assert err <= bound, f"{name} {case.id}: d{label} max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", [n for n in MATRIX_BACKENDS if registry.get_backend(n).SUPPORTS_BACKWARD])
def test_backward_matches_fp64_reference(name, case):
    check_backward(name, case)


def test_flex_backward_on_cpu_is_refused_and_falls_back():
    """torch's flex_attention has no CPU backward: flex must refuse such calls with a reason (not crash),
    and a call that names it must fall back to a backend whose gradients are right."""
    case = FLEX_GRAD_CASES[1]
    q, k, v, mask = make_inputs(case, requires_grad=True)
    kw = dict(layout=case.layout, attn_mask=mask, is_causal=case.causal)
    assert refusal("flex", q, k, v, **kw) == [
        "gradients are needed but flex on CPU is forward-only (torch has no CPU backward)"]
    with torch.no_grad():
        assert refusal("flex", q, k, v, **kw) == []
    out = attnpatch.attention_forward(q, k, v, backend="flex", **kw)
    out.sum().backward()
    s = attnpatch.stats()
    assert "flex" not in s.calls and sum(s.calls.values()) == 1
    assert [key[0] for key in s.fallbacks] == ["flex"]
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    reference(qd, kd, vd, mask, case.causal, None, case.layout).sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_a_length_bucket_plan_never_serves_values_of_another_length():
    """Decoding reuses the plan of a length bucket for every new key length; values whose length
    differs from the keys' must still be refused by attnpatch's own check, naming both lengths."""
    q = torch.randn(1, 8, 1, 64)
    k = torch.randn(1, 2, 300, 64)
    attnpatch.attention_forward(q, k, k)  # plans the bucket [256, 320)
    torch.testing.assert_close(attnpatch.attention_forward(q, k[:, :, :299], k[:, :, :299]),
                               F.scaled_dot_product_attention(q, k[:, :, :299], k[:, :, :299], enable_gqa=True))
    with pytest.raises(ValueError, match="30[01]"):  # attnpatch.call.AttentionInputError
        attnpatch.attention_forward(q, torch.randn(1, 2, 301, 64), torch.randn(1, 2, 300, 64))


def test_a_bucket_hit_is_kept_under_its_exact_key_and_the_plan_cache_stays_bounded(monkeypatch):
    """A decoding step's first layer finds its length bucket's plan; the step's other layers then find
    it by the exact key (one lookup). The plan cache never grows past MAX_PLANS for it, and no decision
    is made after the bucket's first call."""
    from attnpatch import router

    router.clear_cache()
    monkeypatch.setattr(router, "MAX_PLANS", 8)
    q = torch.randn(1, 8, 1, 64)
    before = router.DECISIONS_MADE[0]
    for n in range(260, 300):  # one bucket, [256, 320)
        kv = torch.randn(1, 2, n, 64)
        for _layer in range(3):
            torch.testing.assert_close(attnpatch.attention_forward(q, kv, kv),
                                       F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True))
        assert len(router._PLANS) == min(n - 259, 8)  # one exact key per length, up to the bound
    assert router.DECISIONS_MADE[0] - before == 1
    assert len(router._BUCKETS) == 1
    plans = {id(p) for p in router._PLANS.values()}
    assert plans == {id(p) for p in router._BUCKETS.values()}
