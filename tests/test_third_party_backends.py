"""Contract tests of the third-party backends (flash-attn 2/3/4, xformers, SageAttention 1/2/3) on CPU.

The libraries are replaced by stand-ins (tests/standins) that implement their documented Python API in
plain torch and check what they are given. The backends declare ``SUPPORTED_DEVICES = {"cuda"}``; the
tests register a test-only subclass of each that also accepts "cpu" (same NAME, same kernel function,
same custom op), so calls go through the real router, layout handling, decision and compile path.
Every output is compared with ``sdpa_math`` in float64 on the same inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attnpatch
from attnpatch import registry
from attnpatch.backends import BUILTIN
from attnpatch.backends import _custom_ops
from attnpatch.backends._third_party import ThirdPartyBackend, pack_keys
from attnpatch.call import Call

from standins import CALLS, install

THIRD_PARTY = {cls.NAME: cls for cls in BUILTIN if issubclass(cls, ThirdPartyBackend)}
EXACT = ("flash_attn", "flash_attn3", "flash_attn4", "xformers")
SAGE2 = ("sage_fp16_triton", "sage_fp16_cuda", "sage_fp8_cuda", "sage_fp8_cuda_sm90")
#: reachable by name, recipe or calibrate only (see their AUTO_PRIORITY comment)
NEVER_AUTO = ("flash_attn3_fp8",)


def test_every_third_party_backend_is_builtin():
    assert set(THIRD_PARTY) == {"flash_attn", "flash_attn3", "flash_attn3_fp8", "flash_attn4", "xformers", "sage",
                                "sage3", *SAGE2}
    for name, cls in THIRD_PARTY.items():
        assert cls.PACKAGE and cls.MIN_VERSION and (cls.EXTRA in ("flash", "flash4", "xformers", "sage") or cls.INSTALL_HINT), name
        assert cls.SUPPORTED_DEVICES == frozenset({"cuda"}), name
        assert cls.LOSSY == (name.startswith("sage") or name.endswith("_fp8")), name
        assert cls.SUPPORTS_BACKWARD == (not cls.LOSSY), name
        assert cls.TOLERANCE and (cls.AUTO_PRIORITY or name in NEVER_AUTO), name
        assert (cls.CUDA_MIN_CAPABILITY or cls.CUDA_CAPABILITIES), name
        assert name in _custom_ops.OPS  # the custom op exists from import on
    for name in ("sage", "sage3", *SAGE2):
        assert THIRD_PARTY[name].MIN_SEQ_KV == 256


# -- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _as_if_cuda_were_there(monkeypatch):
    """These tests check the packages' probes; on a machine without a GPU the CUDA-only backends would
    first say "no CUDA device" (tested in test_no_cuda_is_a_reason_of_cuda_only_backends)."""
    from attnpatch import registry
    monkeypatch.setattr(registry, "_CUDA_AVAILABLE", [True])
    yield
    for b in registry.all_backends():  # probes cached while CUDA seemed there would outlive the test
        b.reset_probe()


def test_no_cuda_is_a_reason_of_cuda_only_backends(monkeypatch):
    from attnpatch import registry
    monkeypatch.setattr(registry, "_CUDA_AVAILABLE", [False])
    for name in sorted(THIRD_PARTY):
        reasons = THIRD_PARTY[name]().availability()
        assert reasons[0].startswith("no CUDA device in this process"), (name, reasons)


@pytest.fixture
def standin(monkeypatch):
    """standin(name, **options) installs the stand-in library and a CPU-capable twin of the backend."""
    replaced = []

    def use(name, version=None, **options):
        mods = install(monkeypatch, name, version=version, **options)
        cls = THIRD_PARTY[name]
        twin = type(f"Cpu{cls.__name__}", (cls,), {"SUPPORTED_DEVICES": frozenset({"cpu", "cuda"})})
        replaced.append(registry.get_backend(name))
        backend = registry.register_backend(twin, replace=True)
        backend.standin_modules = mods
        CALLS.clear()
        return backend

    yield use
    for original in replaced:
        registry.register_backend(original, replace=True)


def reference(q, k, v, layout="bnsd", **kw):
    out = attnpatch.attention_forward(q.double(), k.double(), v.double(), layout=layout, backend="sdpa_math",
                                      **{n: (m.double() if isinstance(m, torch.Tensor) and m.is_floating_point() else m)
                                         for n, m in kw.items()})
    return out


def qkv(b=2, hq=4, hkv=4, sq=16, skv=16, d=64, dv=None, layout="bnsd", dtype=torch.float16):
    dv = dv or d
    if layout == "bnsd":
        shapes = ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, dv))
    else:
        shapes = ((b, sq, hq, d), (b, skv, hkv, d), (b, skv, hkv, dv))
    return tuple(torch.randn(s).to(dtype) for s in shapes)


def padding_mask(b, skv):
    """Key padding that does not start at position 0: row 0 pads the front, row 1 the middle and the
    end, row 2 (if any) has no key at all."""
    m = torch.ones(b, skv, dtype=torch.bool)
    m[0, :3] = False
    if b > 1:
        m[1, 5:7] = False
        m[1, -2:] = False
    if b > 2:
        m[2] = False
    return m


def close(out, ref, tol=2e-3):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


# -- translation: flash-attn 2 / 3 / 4 ----------------------------------------------------------------

FA_CASES = {
    "plain": dict(),
    "bsnd": dict(layout="bsnd"),
    "scale": dict(scale=0.3),
    "causal": dict(is_causal=True),
    "causal_kv_longer": dict(is_causal=True, sq=6, skv=16),
    "causal_q_longer": dict(is_causal=True, sq=16, skv=6),
    "causal_q_longer_by_less_than_kv": dict(is_causal=True, sq=9, skv=6),
    "gqa": dict(hq=8, hkv=2),
    "gqa_causal_bsnd": dict(hq=6, hkv=3, is_causal=True, layout="bsnd", sq=9, skv=12),
    "key_padding": dict(mask="padding", b=3),
    "key_padding_4d_bsnd_gqa": dict(mask="padding4d", b=3, layout="bsnd", hq=4, hkv=2),
    "key_padding_broadcast": dict(mask="broadcast", b=2),
}


def run_case(name, case, dtype=torch.float16):
    case = dict(case)
    layout = case.pop("layout", "bnsd")
    mask_kind = case.pop("mask", None)
    kw = {k: case.pop(k) for k in ("scale", "is_causal") if k in case}
    q, k, v = qkv(layout=layout, dtype=dtype, **case)
    b, skv = q.shape[0], (k.shape[2] if layout == "bnsd" else k.shape[1])
    if mask_kind == "padding":
        kw["attn_mask"] = padding_mask(b, skv)
    elif mask_kind == "padding4d":
        kw["attn_mask"] = padding_mask(b, skv)[:, None, None, :]
    elif mask_kind == "broadcast":
        m = torch.ones(1, 1, 1, skv, dtype=torch.bool)
        m[..., 2:5] = False
        kw["attn_mask"] = m
    out = attnpatch.attention_forward(q, k, v, layout=layout, backend=name, **kw)
    assert attnpatch.stats().calls == {name: 1}, attnpatch.stats()  # it really ran there (no fallback)
    return out, reference(q, k, v, layout=layout, **kw), kw


@pytest.mark.parametrize("case", list(FA_CASES))
@pytest.mark.parametrize("name,options", [("flash_attn", {}), ("flash_attn3", {}),
                                          ("flash_attn3", {"fa3_returns_lse": True})],
                         ids=["fa2", "fa3", "fa3_tuple"])
def test_flash_attn_translation(standin, name, options, case):
    standin(name, **options)
    out, ref, kw = run_case(name, FA_CASES[case])
    close(out, ref)
    fn, args = CALLS[-1]
    if "attn_mask" in kw:
        assert fn == "flash_attn_varlen_func"
    else:
        assert fn == "flash_attn_func"
    if case == "causal_q_longer":
        # 16 queries, 6 keys: the window's right edge (10) would be >= the key length, which FlashAttention 2
        # drops (H200, 2026-11-30: relative error 0.71 at 384 queries / 128 keys). The first 6 query rows
        # run as a square causal call, the other 10 see every key.
        (f1, a1), (f2, a2) = CALLS[-2:]
        assert a1["causal"] is True and a2["causal"] is False and a2["window_size"] == (-1, -1)
    if case == "causal_q_longer_by_less_than_kv":
        assert args["causal"] is False and args["window_size"] == (-1, 3)  # top-left via a window
    if case == "causal_kv_longer":
        assert args["causal"] is True  # keys no query sees were dropped; the rest is square


def test_flash_attn_padding_rows_with_no_key_are_zero(standin):
    standin("flash_attn")
    out, ref, kw = run_case("flash_attn", FA_CASES["key_padding"])
    assert out[2].abs().max() == 0  # batch row 2 has every key masked
    assert out[:2].abs().sum() > 0


@pytest.mark.parametrize("case", ["plain", "bsnd", "scale", "causal", "causal_kv_longer", "gqa", "gqa_causal_bsnd"])
def test_flash_attn4_translation(standin, case):
    standin("flash_attn4")
    if case == "gqa_causal_bsnd":  # s_q < s_kv is translated; s_q > s_kv is refused (below)
        pass
    out, ref, _ = run_case("flash_attn4", FA_CASES[case])
    close(out, ref)
    assert CALLS[-1][0] == "flash_attn_func"


def test_pack_keys_packs_any_pattern_without_sync():
    keep = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    k = torch.arange(15.0).reshape(3, 5, 1, 1)
    kp, vp, cu, dead = pack_keys(keep, k, k * 10)
    assert cu.tolist() == [0, 3, 4, 9] and cu.dtype == torch.int32
    assert kp[:, 0, 0].tolist()[:9] == [1, 2, 4, 5, 10, 11, 12, 13, 14]  # dead row 2 keeps all keys
    assert dead.tolist() == [False, False, True]
    assert sorted(kp[:, 0, 0].tolist()) == list(range(15))  # a permutation: nothing lost or duplicated
    assert torch.equal(vp, kp * 10)




def test_pack_keys_matches_kept_then_dropped_order_on_random_patterns():
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        b, s = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))
        keep = torch.rand(b, s, generator=gen) > torch.rand(1, generator=gen)
        k = torch.arange(b * s, dtype=torch.float32).reshape(b, s, 1, 1)
        kp, _, cu, dead = pack_keys(keep, k, k)
        used = keep | ~keep.any(1, keepdim=True)  # a row with no key keeps all of them (and is zeroed later)
        flat = used.reshape(-1)
        expected = torch.cat([flat.nonzero().flatten(), (~flat).nonzero().flatten()])
        assert torch.equal(kp.flatten().long(), expected)
        assert cu.tolist() == [0] + used.sum(1).cumsum(0).tolist() and torch.equal(dead, ~keep.any(1))

def _counting_packing_order(monkeypatch):
    from attnpatch.backends import _third_party
    made = []
    real = _third_party.packing_order

    def counted(keep):
        made.append(keep.clone())
        return real(keep)
    monkeypatch.setattr(_third_party, "packing_order", counted)
    _third_party.clear_key_packings()
    return made


def test_key_packing_is_computed_once_per_mask_and_again_after_an_in_place_write(monkeypatch):
    from attnpatch.backends._third_party import key_packing, packing_order
    made = _counting_packing_order(monkeypatch)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    first = key_packing(mask, 2, 6)
    assert key_packing(mask, 2, 6) is first and len(made) == 1
    assert key_packing(mask.view(2, 6)[:, None, None, :], 2, 6) is first  # a view of it: same base, same data
    mask[1, ..., 0] = False  # in place: the version counter moves
    again = key_packing(mask, 2, 6)
    assert len(made) == 2 and again is not first
    expected = packing_order(mask.reshape(2, 6))
    assert all(torch.equal(a, e) for a, e in zip(again, expected))
    other = mask.clone()  # equal values, another tensor: computed for it
    key_packing(other, 2, 6)
    assert len(made) == 3


def test_key_packing_never_serves_another_tensor_from_a_reused_id(monkeypatch):
    from attnpatch.backends import _third_party
    made = _counting_packing_order(monkeypatch)
    a = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    a[..., 0] = True
    _third_party.key_packing(a, 1, 5)
    b = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    # as if ``a`` had been freed and ``b`` had got its id: the entry's weak reference is not ``b``
    _third_party._PACKINGS[id(b)] = _third_party._PACKINGS.pop(id(a))
    source, cu, dead = _third_party.key_packing(b, 1, 5)
    assert len(made) == 2 and cu.tolist() == [0, 5]


def test_key_packing_keeps_a_bounded_number_of_masks_and_skips_inference_tensors(monkeypatch):
    from attnpatch.backends import _third_party
    made = _counting_packing_order(monkeypatch)
    masks = [torch.rand(1, 1, 1, 8) > 0.5 for _ in range(3 * _third_party.PACKINGS_KEPT)]
    for m in masks:
        _third_party.key_packing(m, 1, 8)
    assert len(_third_party._PACKINGS) == _third_party.PACKINGS_KEPT
    with torch.inference_mode():
        m = torch.ones(1, 1, 1, 8, dtype=torch.bool)
        n = len(made)
        _third_party.key_packing(m, 1, 8)
        m[..., :2] = False  # inference tensors have no version counter: never remembered
        _, cu, _ = _third_party.key_packing(m, 1, 8)
    assert len(made) == n + 2 and cu.tolist() == [0, 6]


def test_flash_attn3_packs_a_shared_mask_once_across_layers(standin, monkeypatch):
    """A model passes one key-padding mask to every layer: the packing runs for the first call only, and
    a write into the mask between forwards is seen (H200, 2026-11-30: the packing's host time made the
    masked call host-bound, docs/GPU_BACKENDS.md)."""
    standin("flash_attn3")
    made = _counting_packing_order(monkeypatch)
    mask = padding_mask(3, 12)[:, None, None, :]
    for layer in range(4):
        q, k, v = qkv(b=3, sq=10, skv=12)
        close(attnpatch.attention_forward(q, k, v, attn_mask=mask, backend="flash_attn3"),
              reference(q, k, v, attn_mask=mask))
    assert len(made) == 1
    mask[0, ..., 5] = False  # the next forward's mask, written in place
    q, k, v = qkv(b=3, sq=10, skv=12)
    close(attnpatch.attention_forward(q, k, v, attn_mask=mask, backend="flash_attn3"),
          reference(q, k, v, attn_mask=mask))
    assert len(made) == 2 and torch.equal(made[-1], mask.reshape(3, 12))


# -- FlashAttention 3's C++ forward operator, called directly ------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "causal_q_longer", "key_padding", "window_softcap"])
def test_flash_attn3_calls_its_forward_operator_directly_without_gradients(standin, case):
    """Inference calls skip the interface's autograd Function and Python custom op (0.21-0.38 ms of host per
    masked call on an H200 against 0.42 ms of kernel): the stand-in operator reads every argument by its
    name in FA3's schema, so a misplaced one gives a wrong result here."""
    from standins import FA3_DIRECT_CALLS
    standin("flash_attn3")
    FA3_DIRECT_CALLS.clear()
    sq = 24 if case == "causal_q_longer" else 16
    q, k, v = qkv(b=3, sq=sq, skv=16, d=16)
    kw = dict(plain={}, causal_q_longer=dict(is_causal=True), key_padding=dict(attn_mask=padding_mask(3, 16)),
              window_softcap=dict(window=(3, 2), softcap=5.0, scale=0.3))[case]
    out = attnpatch.attention_forward(q, k, v, backend="flash_attn3", **kw)
    close(out, _eager_reference(q, k, v, "bnsd", **kw))
    assert FA3_DIRECT_CALLS and all(c["varlen"] == (case == "key_padding") for c in FA3_DIRECT_CALLS), FA3_DIRECT_CALLS


def test_flash_attn3_keeps_its_interface_for_gradients(standin):
    from standins import FA3_DIRECT_CALLS
    standin("flash_attn3")
    FA3_DIRECT_CALLS.clear()
    q, k, v = (t.requires_grad_() for t in qkv(b=2, sq=8, skv=8, d=16))
    with torch.no_grad():
        attnpatch.attention_forward(q, k, v, backend="flash_attn3", attn_mask=padding_mask(2, 8))
    assert len(FA3_DIRECT_CALLS) == 1  # no gradient needed under no_grad: direct
    out = attnpatch.attention_forward(q, k, v, backend="flash_attn3", attn_mask=padding_mask(2, 8))
    assert len(FA3_DIRECT_CALLS) == 1 and out.requires_grad  # the interface's autograd Function


def test_flash_attn3_with_another_forward_operator_schema_uses_its_interface(standin):
    """A build whose operator differs from the one attnpatch was written against (an argument renamed,
    added or moved) is called through its Python interface, never positionally."""
    from standins import FA3_DIRECT_CALLS, FA3_FWD_SCHEMA
    from attnpatch.backends import flash_attn3
    for schema in (None, FA3_FWD_SCHEMA.replace("int attention_chunk = 0, ", ""),
                   FA3_FWD_SCHEMA.replace("Tensor q, Tensor k,", "Tensor k, Tensor q,")):
        backend = standin("flash_attn3", fa3_fwd_schema=schema)
        FA3_DIRECT_CALLS.clear()
        module = backend.standin_modules["flash_attn_interface"]
        assert flash_attn3.DirectForward.of(module) is module
        q, k, v = qkv(b=2, sq=8, skv=8, d=16)
        close(attnpatch.attention_forward(q, k, v, backend="flash_attn3"), reference(q, k, v))
        assert FA3_DIRECT_CALLS == [] and CALLS, schema


# -- sliding windows and softcapping on flash-attn 2 / 3 ---------------------------------------------------

def test_window_plan_matches_top_left_windows_exhaustively():
    """Every small shape and window: the plan run with flash-attn's bottom-right window semantics (and the
    edges each API turns into -1) keeps exactly the keys of attnpatch's top-left window."""
    from attnpatch.backends._third_party import window_plan
    from standins import _fa2_window, _fa3_window, _fa_keep
    fa2_wrong = []
    for s_q in range(1, 8):
        for s_kv in range(1, 8):
            for left in (None, 0, 1, 3):
                for right in (None, 0, 1, 3):
                    i, j = torch.arange(s_q)[:, None], torch.arange(s_kv)[None, :]
                    want = torch.ones(s_q, s_kv, dtype=torch.bool)
                    if left is not None:
                        want &= j >= i - left
                    if right is not None:
                        want &= j <= i + right
                    keys, rows, win = window_plan(s_q, s_kv, left, right)
                    assert min(win) >= -1 and (left is None or win[0] >= 0) and (right is None or win[1] >= 0)
                    fa3 = torch.zeros(s_q, s_kv, dtype=torch.bool)
                    fa3[:rows, :keys] = _fa_keep(rows, keys, False, _fa3_window(win, rows, keys), "cpu")[0]
                    assert torch.equal(fa3, want), (s_q, s_kv, left, right, keys, rows, win)
                    fa2 = torch.zeros(s_q, s_kv, dtype=torch.bool)
                    fa2[:rows, :keys] = _fa_keep(rows, keys, False, _fa2_window(win, keys), "cpu")[0]
                    if s_q > s_kv:  # FlashAttention 2 refuses these (window_reasons)
                        if not torch.equal(fa2, want):
                            fa2_wrong.append((s_q, s_kv, left, right))
                        continue
                    assert torch.equal(fa2, want), (s_q, s_kv, left, right, keys, rows, win)
    # the refusal is needed: with more queries than keys FlashAttention 2 gets open right edges wrong too
    assert (7, 3, 3, None) in fa2_wrong and (7, 3, 3, 1) in fa2_wrong, fa2_wrong


WINDOW_CASES = {
    "prefill_causal_left": dict(sq=16, skv=16, is_causal=True, window=(4, None)),
    "prefill_band": dict(sq=16, skv=16, window=(3, 2)),
    "right_only": dict(sq=12, skv=12, window=(None, 1)),
    "kv_longer_causal_left": dict(sq=6, skv=16, is_causal=True, window=(4, None)),
    "kv_longer_band": dict(sq=6, skv=16, window=(3, 5)),
    "q_longer_left_only": dict(sq=16, skv=6, window=(2, None)),
    "q_longer_band": dict(sq=16, skv=6, window=(2, 3)),
    "softcap": dict(sq=12, skv=12, softcap=5.0),
    "softcap_causal_window": dict(sq=12, skv=12, is_causal=True, window=(3, None), softcap=5.0),
    "softcap_key_padding": dict(sq=12, skv=12, softcap=5.0, mask=True),
    "softcap_gqa_bsnd": dict(sq=10, skv=14, hq=4, hkv=2, softcap=2.0, layout="bsnd"),
}


def _eager_reference(q, k, v, layout, **kw):
    return attnpatch.attention_forward(q.double(), k.double(), v.double(), layout=layout, backend="eager", **kw)


@pytest.mark.parametrize("case", list(WINDOW_CASES))
@pytest.mark.parametrize("name", ["flash_attn", "flash_attn3"])
def test_flash_attn_serves_windows_and_softcap(standin, name, case):
    standin(name)
    c = dict(WINDOW_CASES[case])
    layout = c.pop("layout", "bnsd")
    kw = {key: c.pop(key) for key in ("is_causal", "window", "softcap") if key in c}
    q, k, v = qkv(b=3, d=16, layout=layout, **{key: c.pop(key) for key in ("sq", "skv", "hq", "hkv") if key in c})
    if c.pop("mask", False):
        kw["attn_mask"] = padding_mask(3, k.shape[2] if layout == "bnsd" else k.shape[1])
    if name == "flash_attn" and case.startswith("q_longer"):
        e = attnpatch.explain(q, k, v, layout=layout, **kw)
        assert any("hides keys from the first queries" in r for r in e.reasons["flash_attn"]), e.reasons
        return
    out = attnpatch.attention_forward(q, k, v, layout=layout, backend=name, **kw)
    assert attnpatch.stats().calls == {name: 1}, attnpatch.stats()  # served there, not a fallback
    close(out, _eager_reference(q, k, v, layout, **kw))
    if "softcap" in kw:
        assert CALLS[-1][1]["softcap"] == kw["softcap"]
    if "window" in kw:
        assert CALLS[-1][1]["causal"] is False and -1 <= min(CALLS[-1][1]["window_size"])


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn3"])
def test_flash_attn_refuses_a_window_with_a_mask_with_the_reason(standin, name):
    standin(name)
    q, k, v = qkv(b=3, sq=12, skv=12, d=16)
    e = attnpatch.explain(q, k, v, window=(2, None), attn_mask=padding_mask(3, 12))
    assert any("moves their positions" in r for r in e.reasons[name]), e.reasons[name]
    assert not e.reasons["eager"]  # what serves it instead


# The H200 build of benchmarks/build_kernels.sh (2026-11-30): what its flash_attn_config said
SHRUNK_FA3 = ("BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "SOFTCAP", "PACKGQA", "CLUSTER", "HDIM96", "HDIM192",
              "HDIM256", "SM8x")


@pytest.mark.parametrize("disabled,kw,needle", [
    (("SOFTCAP",), dict(softcap=5.0), "softcap=5.0 but this flash_attn_3 build has no softcap kernels"),
    (("BACKWARD",), dict(grad=True), "gradients are needed but this flash_attn_3 build has no backward kernels"),
    (("LOCAL",), dict(window=(2, 2)), "sliding window (2, 2) but this flash_attn_3 build has no local kernels"),
    (("LOCAL",), dict(is_causal=True, skv=8), "causal with more queries (12) than keys (8) runs as a window"),
    (("FP16",), dict(), "float16 but this flash_attn_3 build has no fp16 kernels"),
    (("VARLEN",), dict(mask=True), "a key-padding mask needs varlen kernels"),
    (("HDIM96", "HDIM128", "HDIM192", "HDIM256"), dict(d=128),
     "head_dim 128 is above every head dim this flash_attn_3 build has kernels for (64)"),
])
def test_flash_attn3_refuses_what_its_build_left_out_without_calling_it(standin, disabled, kw, needle):
    """A call into kernels a shrunk FA3 build compiled out crashed the process on an H200 (2026-11-30)
    instead of raising: the build's switches (flash_attn_config) are read, and the call is refused."""
    standin("flash_attn3", fa3_disabled=disabled)
    d, skv = kw.pop("d", 64), kw.pop("skv", 12)
    q, k, v = qkv(b=3, sq=12, skv=skv, d=d)
    if kw.pop("grad", False):
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    if kw.pop("mask", False):
        kw["attn_mask"] = padding_mask(3, 12)
    reasons = attnpatch.explain(q, k, v, **kw).reasons["flash_attn3"]
    assert any(needle in r and "FLASH_ATTENTION_DISABLE_" in r for r in reasons), reasons
    CALLS.clear()
    out = attnpatch.attention_forward(q, k, v, **kw, backend="flash_attn3")  # refused there: served elsewhere
    assert not CALLS and attnpatch.stats().calls.get("flash_attn3") is None
    close(out, reference(q, k, v, **kw))


def test_flash_attn3_serves_what_its_build_kept(standin):
    standin("flash_attn3", fa3_disabled=SHRUNK_FA3)
    q, k, v = qkv(b=3, sq=12, skv=12, d=96)  # rounds up to the 128 kernels the build has
    for kw in (dict(), dict(window=(2, 2)), dict(attn_mask=padding_mask(3, 12)), dict(is_causal=True)):
        assert not attnpatch.explain(q, k, v, **kw).reasons["flash_attn3"], kw
        out = attnpatch.attention_forward(q, k, v, **kw, backend="flash_attn3")
        close(out, reference(q, k, v, **kw))
    assert attnpatch.stats().calls["flash_attn3"] == 4
    assert attnpatch.explain(*qkv(d=256)).reasons["flash_attn3"]  # 256 was left out


def test_flash_attn3_without_a_build_config_assumes_nothing_missing(standin):
    """Builds older than flash_attn_config (or installed another way): no reason is invented."""
    standin("flash_attn3")  # sys.modules["flash_attn_config"] = None: the import fails
    q, k, v = qkv(b=2, sq=8, skv=8, d=16)
    assert not attnpatch.explain(q, k, v, softcap=5.0).reasons["flash_attn3"]


def test_flash_attn3_fp8_reads_its_build_instead_of_trying_an_fp8_call(standin, monkeypatch):
    backend = standin("flash_attn3_fp8", fa3_disabled=("FP8",))
    called = []
    monkeypatch.setattr(backend.standin_modules["flash_attn_interface"], "flash_attn_func",
                        lambda *a, **k: called.append(1))
    reasons = backend.smoke_test(backend.standin_modules["flash_attn_interface"], torch.device("cpu"))
    assert not called and reasons and "FLASH_ATTENTION_DISABLE_FP8" in reasons[0]
    backend = standin("flash_attn3_fp8", fa3_disabled=())
    assert backend.smoke_test(backend.standin_modules["flash_attn_interface"], torch.device("cpu")) == []


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn3"])
def test_compiled_window_decisions_guard_the_length_relation(standin, name):
    """FA2 refuses a bounded right window edge with more queries than keys (it drops the edge), and a FA3
    build without local kernels refuses causal with more queries than keys (served by a window): both
    depend on seq_q vs seq_kv, so a compiled graph traced with fewer queries must not serve more."""
    kw = dict(window=(None, 1)) if name == "flash_attn" else dict(is_causal=True)
    standin(name, **({} if name == "flash_attn" else dict(fa3_disabled=("LOCAL",))))
    torch._dynamo.reset()

    def f(q, k, v):
        return attnpatch.attention_forward(q, k, v, backend=name, **kw)

    compiled = torch.compile(f, dynamic=True, backend="aot_eager", fullgraph=True)
    for sq, skv in ((6, 10), (7, 11), (13, 8), (16, 4)):
        q, k, v = qkv(b=1, hq=2, hkv=2, sq=sq, skv=skv, d=16)
        close(compiled(q, k, v), reference(q, k, v, **kw))
    if name == "flash_attn3":  # its stand-in computes windows whatever the build: the crash is what is modelled
        assert CALLS and all(c[1]["window_size"] == (-1, -1) for c in CALLS), CALLS


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn3"])
def test_windows_and_softcap_compile_and_differentiate_through_the_custom_op(standin, name):
    standin(name)
    torch._dynamo.reset()
    q, k, v = qkv(b=2, hq=4, hkv=2, sq=12, skv=12, d=16)
    kw = dict(is_causal=True, window=(3, None), softcap=5.0)
    grad = torch.randn(2, 4, 12, 16, dtype=torch.float64)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    attnpatch.attention_forward(*ref_in, backend="eager", **kw).backward(grad)

    def f(q, k, v):
        return attnpatch.attention_forward(q, k, v, backend=name, **kw)

    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        close(out, _eager_reference(q, k, v, "bnsd", **kw))
        out.backward(grad.half())
        for got, want in zip(ins, ref_in):
            torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-2, rtol=1e-2)
    from attnpatch.router import compiled_decisions_of
    assert name in compiled_decisions_of(None)


# -- translation: FlashAttention 3 fp8 ------------------------------------------------------------------

FA3_FP8_CASES = {
    "plain": dict(b=2, hq=4, hkv=4, sq=64, skv=80),
    "bsnd_scale": dict(b=1, hq=2, hkv=2, sq=48, skv=48, layout="bsnd", scale=0.2),
    "gqa": dict(b=2, hq=8, hkv=2, sq=40, skv=72),
    "causal": dict(b=1, hq=2, hkv=2, sq=64, skv=64, is_causal=True),
    "causal_kv_longer": dict(b=1, hq=2, hkv=2, sq=24, skv=64, is_causal=True),
    "causal_q_longer": dict(b=1, hq=2, hkv=1, sq=64, skv=24, is_causal=True),
}


def _fp8_case(case, dtype=torch.bfloat16, key_offset=0.0):
    c = dict(FA3_FP8_CASES[case])
    layout = c.pop("layout", "bnsd")
    kw = {k: c.pop(k) for k in ("scale", "is_causal") if k in c}
    q, k, v = qkv(layout=layout, dtype=dtype, **c)
    return q, (k.float() + key_offset).to(dtype), v, layout, kw


def _relerr(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(FA3_FP8_CASES))
def test_flash_attn3_fp8_translation(standin, case, dtype):
    backend = standin("flash_attn3_fp8")
    q, k, v, layout, kw = _fp8_case(case, dtype)
    k_before = k.clone()
    out = attnpatch.attention_forward(q, k, v, layout=layout, backend="flash_attn3_fp8", **kw)
    assert attnpatch.stats().calls == {"flash_attn3_fp8": 1}
    assert out.dtype == dtype and out.shape == q.shape  # FA3's fp8 path returns bf16: cast back
    err = _relerr(out, reference(q, k, v, layout=layout, **kw))
    assert err < backend.TOLERANCE[dtype], err  # e4m3 q, k, v (no P quantisation in the stand-in): ~4.6e-2
    assert torch.equal(k, k_before), "the caller's key tensor was modified"
    fp8_calls = [a for f, a in CALLS if f == "flash_attn_func fp8"]
    assert fp8_calls and all(a["descales"] == (True, True, True) for a in fp8_calls)
    if case == "causal_q_longer":  # split as for flash_attn (square causal part + unmasked rest)
        assert len(fp8_calls) == 2


def test_flash_attn3_fp8_smooths_the_keys(standin):
    """A large offset shared by every key (common in diffusion models) would take e4m3's range and
    leave the keys' differences a few levels; subtracting the keys' mean first keeps the error at the
    offset-free level (the softmax, hence the exact result, does not change)."""
    standin("flash_attn3_fp8")
    q, k, v, layout, kw = _fp8_case("plain", key_offset=0.0)
    plain = _relerr(attnpatch.attention_forward(q, k, v, backend="flash_attn3_fp8"), reference(q, k, v))
    k_off = (k.float() + 40.0).bfloat16()
    shifted = _relerr(attnpatch.attention_forward(q, k_off, v, backend="flash_attn3_fp8"), reference(q, k_off, v))
    assert shifted < 2 * plain + 1e-3, (plain, shifted)
    from attnpatch.backends.flash_attn3_fp8 import quantize_e4m3
    b, h = k_off.shape[0], k_off.shape[1]
    raw8, d = quantize_e4m3(k_off.transpose(1, 2), h)  # without smoothing: the differences are lost
    raw = raw8.float() * d[:, None, :, None]
    assert _relerr(raw - raw.mean(1, keepdim=True), (k_off.transpose(1, 2).double() - k_off.transpose(1, 2).double().mean(1, keepdim=True))) > 0.2


def test_quantize_e4m3_scales_per_batch_and_kv_head():
    from attnpatch.backends.flash_attn3_fp8 import E4M3_MAX, quantize_e4m3
    x = torch.randn(2, 50, 4, 32).bfloat16()
    x[1, :, 2:] *= 1000  # group 1 (heads 2, 3) of batch row 1 is large
    x[0, :, :2] = 0  # group 0 of batch row 0 is all zero
    x8, descale = quantize_e4m3(x, heads_kv=2)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and descale.shape == (2, 2)
    assert descale.dtype == torch.float32 and torch.isfinite(descale).all()
    assert x8.float().abs().amax(dim=(1, 3)).view(2, 2, 2).amax(-1)[1, 1] == E4M3_MAX  # amax -> 448
    assert x8[0, :, :2].float().abs().max() == 0
    back = x8.float() * descale.repeat_interleave(2, dim=1)[:, None, :, None]
    for bi, g in ((0, 1), (1, 0), (1, 1)):
        part = x[bi, :, 2 * g:2 * g + 2].float()
        assert ((back[bi, :, 2 * g:2 * g + 2] - part).norm() / part.norm()) < 0.04


def test_flash_attn3_fp8_probe_names_a_build_without_fp8(standin):
    backend = standin("flash_attn3_fp8")
    module = backend.standin_modules["flash_attn_interface"]
    assert backend.smoke_test(module, torch.device("cpu")) == []

    class NoFp8:
        @staticmethod
        def flash_attn_func(q, *a, **kw):
            raise RuntimeError("This flash attention build does not support FP8.")

    reasons = backend.smoke_test(NoFp8, torch.device("cpu"))
    assert len(reasons) == 1 and "does not support FP8" in reasons[0] and "FLASH_ATTENTION_DISABLE_FP8" in reasons[0]

# -- translation: xformers ------------------------------------------------------------------------------

def _bool_mask(b, h, sq, skv, dead_row=True):
    m = torch.rand(b, h, sq, skv) > 0.4
    m[..., 0] = True
    if dead_row:
        m[0, 1, 2] = False  # one query row with no key
    return m


XF_CASES = {
    "plain": dict(),
    "bsnd_scale": dict(layout="bsnd", scale=0.2),
    "causal": dict(is_causal=True),
    "causal_kv_longer": dict(is_causal=True, sq=5, skv=13),
    "causal_q_longer": dict(is_causal=True, sq=13, skv=5),
    "gqa_5d": dict(hq=8, hkv=2),
    "gqa_causal": dict(hq=8, hkv=4, is_causal=True),
    "dv_differs": dict(d=32, dv=48),
    "fp32": dict(dtype=torch.float32),
}


@pytest.mark.parametrize("case", list(XF_CASES))
def test_xformers_translation(standin, case):
    standin("xformers")
    c = dict(XF_CASES[case])
    dtype = c.pop("dtype", torch.float16)
    out, ref, _ = run_case("xformers", c, dtype=dtype)
    close(out, ref, tol=2e-3 if dtype == torch.float16 else 1e-5)
    fn, args = CALLS[-1]
    assert args["five"] == case.startswith("gqa")  # no grad, no bias: the 5-D form, no copy
    assert args["bias"] == ("LowerTriangularMask" if "causal" in case else "NoneType")


@pytest.mark.parametrize("kind", ["bool", "additive", "key_padding", "bool_causal", "additive_causal_cross", "gqa_bool"])
def test_xformers_masks(standin, kind):
    standin("xformers")
    b, h, sq, skv = 2, 4, 7, 13  # 13: not a multiple of 8, the bias needs padding for alignment
    hkv = 2 if kind == "gqa_bool" else h
    q, k, v = qkv(b, h, hkv, sq, skv, d=32)
    kw = {}
    if kind in ("bool", "bool_causal", "gqa_bool"):
        kw["attn_mask"] = _bool_mask(b, h, sq, skv)
    elif kind == "key_padding":
        kw["attn_mask"] = padding_mask(b, skv)
    else:
        m = torch.randn(b, 1, sq, skv)
        m[1, 0, 3] = float("-inf")  # a row with every key at -inf
        m[0, 0, :, 4] = float("-inf")
        kw["attn_mask"] = m.half()
    if "causal" in kind:
        kw["is_causal"] = True
    if kind == "additive_causal_cross":
        q, k, v = qkv(b, h, h, skv, sq, d=32)  # s_q=13 > s_kv=7
        m = torch.randn(b, 1, skv, sq)
        m[1, 0, 3] = float("-inf")
        kw["attn_mask"] = m.half()
    out = attnpatch.attention_forward(q, k, v, backend="xformers", **kw)
    ref = reference(q, k, v, **kw)
    close(out, ref)  # finite everywhere: the stand-in returns NaN for an all -inf bias row
    assert CALLS[-1][1]["bias"] == "Tensor"


# -- translation: SageAttention -------------------------------------------------------------------------

SAGE_CASES = {
    "plain": dict(sq=300, skv=300, b=1, hq=2, hkv=2),
    "bsnd_scale": dict(sq=260, skv=280, b=1, hq=2, hkv=2, layout="bsnd", scale=0.1),
    "gqa": dict(sq=256, skv=300, b=1, hq=4, hkv=2),
    "causal": dict(sq=256, skv=256, b=1, hq=2, hkv=2, is_causal=True),
}


@pytest.mark.parametrize("case", list(SAGE_CASES))
@pytest.mark.parametrize("name,options", [("sage", {}), ("sage", {"sage_version": 2})] + [(n, {}) for n in SAGE2] + [("sage3", {})],
                         ids=["sage_v1", "sage_v2"] + list(SAGE2) + ["sage3"])
def test_sage_translation(standin, name, options, case):
    standin(name, **options)
    c = dict(SAGE_CASES[case])
    layout = c.pop("layout", "bnsd")
    kw = {k: c.pop(k) for k in ("scale", "is_causal") if k in c}
    q, k, v = qkv(layout=layout, **c)
    k_before = k.clone()
    out = attnpatch.attention_forward(q, k, v, layout=layout, backend=name, **kw)
    assert attnpatch.stats().calls == {name: 1}
    close(out, reference(q, k, v, layout=layout, **kw))
    assert torch.equal(k, k_before), "the caller's key tensor was modified"
    fn, args = CALLS[-1]
    assert args["is_causal"] == kw.get("is_causal", False)
    if name != "sage3":
        assert args["tensor_layout"] == "HND"
        expected = {"sage": "sageattn"}.get(name, THIRD_PARTY[name].kernel.__name__[len("sage_"):-len("_kernel")])
        assert fn == expected


# -- refusals: what a kernel cannot express is a reason, never a silent drop ----------------------------

def _call(**kw):
    base = dict(layout="bnsd", device_type="cuda", device_index=0, capability=(9, 0), dtype=torch.bfloat16,
                batch=2, heads_q=8, heads_kv=8, seq_q=1024, seq_kv=1024, head_dim=128, head_dim_v=128)
    base.update(kw)
    return Call(**base)


REFUSALS = [
    ("flash_attn", dict(mask_kind="additive", mask_shape=(2, 1, 1, 1024), key_padding=True), "mask kind additive"),
    ("flash_attn", dict(mask_kind="bool", mask_shape=(2, 1, 1024, 1024)), "not a key-padding mask"),
    ("flash_attn", dict(mask_kind="bool", mask_shape=(2, 1, 1, 1024), key_padding=True, is_causal=True), "causal together"),
    ("flash_attn", dict(head_dim=512, head_dim_v=512), "head_dim=512"),
    ("flash_attn", dict(dtype=torch.float32), "dtype=float32"),
    ("flash_attn", dict(capability=(7, 5)), "below the minimum 8.0"),
    ("flash_attn", dict(dropout_p=0.1, needs_grad=True, compiling=True), "recompute backward cannot replay"),
    ("flash_attn3", dict(dropout_p=0.1), "no dropout"),
    ("flash_attn3", dict(capability=(8, 0)), "below the minimum 9.0"),
    ("flash_attn3_fp8", dict(mask_kind="bool", mask_shape=(2, 1, 1, 1024), key_padding=True), "mask kind bool"),
    ("flash_attn3_fp8", dict(head_dim=72, head_dim_v=72), "not a multiple of 16"),
    ("flash_attn3_fp8", dict(needs_grad=True), "forward-only"),
    ("flash_attn3_fp8", dict(dropout_p=0.1), "dropout"),
    ("flash_attn3_fp8", dict(capability=(8, 9)), "below the minimum 9.0"),
    ("flash_attn4", dict(is_causal=True, seq_q=2048), "not translate"),
    ("flash_attn4", dict(capability=(12, 0)), "sm120 is not supported"),
    ("xformers", dict(head_dim=512, head_dim_v=512), "head_dim=512"),
    ("sage", dict(seq_q=197, seq_kv=197), "seq_kv=197 is below 256"),
    ("sage", dict(needs_grad=True), "forward-only"),
    ("sage", dict(is_causal=True, seq_q=512), "qo_len == kv_len"),
    ("sage", dict(mask_kind="bool", mask_shape=(2, 1, 1, 1024), key_padding=True), "mask kind bool"),
    ("sage", dict(head_dim=80, head_dim_v=80), "not a multiple of 32"),
    ("sage_fp8_cuda_sm90", dict(capability=(8, 9)), "below the minimum 9.0"),
    ("sage_fp8_cuda", dict(capability=(9, 0)), "sm90 is not supported"),
    ("sage_fp16_triton", dict(capability=(12, 0)), "above"),
    ("sage3", dict(capability=(9, 0)), "below the minimum 10.0"),
    ("sage3", dict(capability=(10, 3)), "sm103 is not supported"),
    ("sage3", dict(head_dim=256, head_dim_v=256), "head_dim=256"),
]


@pytest.mark.parametrize("name,fields,expected", REFUSALS, ids=[f"{r[0]}-{r[2][:20]}" for r in REFUSALS])
def test_refusal_reasons(standin, name, fields, expected):
    backend = standin(name)
    good = {"capability": GOOD_CAPABILITY.get(name, (9, 0))}
    reasons = backend.not_supported_reasons(_call(**{**good, **fields}))
    assert any(expected in r for r in reasons), reasons
    assert backend.not_supported_reasons(_call(**good)) == [], "the baseline call must be supported"


GOOD_CAPABILITY = {"sage_fp8_cuda": (8, 9), "sage3": (10, 0)}


def test_forward_only_backend_is_skipped_when_gradients_are_needed(standin):
    standin("sage")
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 256, 256))
    with attnpatch.use_backend("sage"):
        out = attnpatch.attention_forward(q, k, v)
    assert attnpatch.stats().fallbacks and all(refused == "sage" and "forward-only" in why
                                               for (refused, _, why) in attnpatch.stats().fallbacks)
    out.float().sum().backward()
    assert q.grad is not None


def test_lossy_backends_need_the_opt_in_for_auto(standin, monkeypatch):
    from attnpatch import controls
    from attnpatch.router import decide
    backend = standin("sage_fp8_cuda_sm90")
    call = _call()  # sm90, bf16, 1024 tokens: where SageAttention 2 picks this kernel itself
    # the torch CUDA backends are disabled here (there is no GPU to ask torch about them)
    others = [n for n in registry.backend_names() if n != backend.NAME]
    monkeypatch.setenv("ATTNPATCH_DISABLE", ",".join(others))
    controls.reload_env()
    with pytest.raises(attnpatch.BackendUnsupportedError) as err:
        decide(call, None, None, None)
    assert any("lossy" in r for r in err.value.reasons[backend.NAME])
    with attnpatch.use_backend(allow_lossy=True) as scope:
        assert decide(call, None, scope, None).backend is backend


def test_flash_attn3_fp8_is_never_picked_by_auto_even_with_the_lossy_opt_in(standin, monkeypatch):
    from attnpatch import controls
    from attnpatch.router import decide
    backend = standin("flash_attn3_fp8")
    call = _call()
    assert backend.not_supported_reasons(call) == []  # it could serve the call ...
    others = [n for n in registry.backend_names() if n != backend.NAME]
    monkeypatch.setenv("ATTNPATCH_DISABLE", ",".join(others))
    controls.reload_env()
    with attnpatch.use_backend(allow_lossy=True) as scope:
        with pytest.raises(attnpatch.BackendUnsupportedError):  # ... but auto never takes it
            decide(call, None, scope, None)
        assert decide(call, ("flash_attn3_fp8",), scope, None).backend is backend  # named: it runs


def test_exact_backends_rank_after_cudnn_on_hopper():
    from attnpatch.backends.sdpa_cudnn import SdpaCudnnBackend
    for name in EXACT:
        cls = THIRD_PARTY[name]
        if "cuda_sm90" in cls.AUTO_LEFT_OUT:  # FlashAttention 4: auto leaves it out there (and says why)
            assert "cuda_sm90" not in cls.AUTO_PRIORITY and "cuda" not in cls.AUTO_PRIORITY, name
            continue
        assert cls.AUTO_PRIORITY["cuda_sm90"] > SdpaCudnnBackend.AUTO_PRIORITY["cuda_sm90"]


# -- probing --------------------------------------------------------------------------------------------

def fresh(name):
    return THIRD_PARTY[name]()


@pytest.mark.parametrize("name", sorted(THIRD_PARTY))
def test_probe_missing_package_names_the_extra(monkeypatch, name):
    from standins import LIBRARIES, fake_versions
    fake_versions(monkeypatch, {LIBRARIES[name][0]: None})
    reasons = fresh(name).availability()
    assert len(reasons) == 1 and "is not installed" in reasons[0]
    cls = THIRD_PARTY[name]
    if cls.INSTALL_HINT:  # not on PyPI: the message says how to build it
        assert cls.EXTRA is None and cls.INSTALL_HINT in reasons[0]
    else:
        assert f"attnpatch[{cls.EXTRA}]" in reasons[0]


def test_probe_old_version(standin):
    install_ver = "2.5.9"
    standin("flash_attn", version=install_ver)
    reasons = fresh("flash_attn").availability()
    assert reasons == ["flash-attn 2.5.9 is older than the minimum 2.6.0"]


def test_probe_sage2_kernels_need_sageattention_2(standin):
    standin("sage_fp16_cuda", version="1.0.6", sage_version=1)
    reasons = fresh("sage_fp16_cuda").availability()
    assert reasons == ["sageattention 1.0.6 is older than the minimum 2.0.0"]


def test_probe_missing_entry_point(standin, monkeypatch):
    mods = standin("flash_attn").standin_modules
    monkeypatch.delattr(mods["flash_attn"], "flash_attn_varlen_func")
    reasons = fresh("flash_attn").availability()
    assert "has no flash_attn_varlen_func" in reasons[0]


def test_probe_sage2_kernel_not_built(standin, monkeypatch):
    mods = standin("sage_fp8_cuda_sm90").standin_modules
    monkeypatch.setattr(mods["sageattention.core"], "SM90_ENABLED", False)
    reasons = fresh("sage_fp8_cuda_sm90").availability()
    assert "SM90_ENABLED is False" in reasons[0]
    assert fresh("sage_fp16_triton").availability() == []  # the Triton kernel needs no compiled extension


BROKEN_FA2 = '''raise ImportError("/site/flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")'''


def _broken_package(tmp_path, name, body):
    pkg = tmp_path / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body + "\n")
    return tmp_path


def test_probe_abi_mismatch_is_a_reason(monkeypatch, tmp_path):
    from standins import fake_versions
    monkeypatch.syspath_prepend(str(_broken_package(tmp_path, "flash_attn", BROKEN_FA2)))
    for m in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, m)
    fake_versions(monkeypatch, {"flash-attn": "2.8.3"})
    reasons = fresh("flash_attn").availability()
    assert len(reasons) == 1
    assert "ABI mismatch" in reasons[0] and "undefined symbol: _ZN3c104cuda9SetDeviceEi" in reasons[0]


def test_probe_never_raises(standin, monkeypatch):
    mods = standin("xformers").standin_modules

    class Boom:
        def __getattr__(self, item):
            raise RuntimeError("weird failure inside the package")

    monkeypatch.setitem(sys.modules, "xformers.ops", Boom())
    reasons = fresh("xformers").availability()
    assert reasons and "weird failure" in reasons[0]


def test_probe_extension_not_loadable_from_xformers_record(standin, monkeypatch):
    import types
    mods = standin("xformers").standin_modules
    cpp = types.SimpleNamespace(_cpp_library_load_exception=RuntimeError(
        "xFormers can't load C++/CUDA extensions. xFormers was built for:\n    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.11.0+cu130)"))
    monkeypatch.setattr(mods["xformers"], "_cpp_lib", cpp, raising=False)
    reasons = fresh("xformers").availability()
    assert "did not load" in reasons[0] and "PyTorch 2.10.0+cu128" in reasons[0]


def test_probe_smoke_call_catches_kernels_that_refuse_every_call(standin, monkeypatch):
    mods = standin("xformers").standin_modules

    def refuse(*a, **k):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs: ... "
                                  "`cutlassF-pt` is not supported because: operator wasn't built")

    monkeypatch.setattr(mods["xformers.ops"], "memory_efficient_attention", refuse)
    b = fresh("xformers")
    b.availability()
    reasons = b.smoke_test(mods["xformers.ops"], torch.device("cpu"))
    assert "NotImplementedError" in reasons[0] and "operator wasn't built" in reasons[0]


def _fake_gpu(monkeypatch, cap):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("name,cap,expected", [
    ("flash_attn", (7, 5), "sm75 is below flash-attn's minimum sm80"),
    ("flash_attn3", (8, 0), "sm80 is below flash_attn_3's minimum sm90"),
    ("flash_attn3", (10, 0), "sm100 is above flash_attn_3's maximum sm90"),
    ("sage3", (9, 0), "sm90 is not supported by sageattn3 kernels"),
    ("xformers", (5, 2), "sm52 is below xformers' minimum"),
])
def test_probe_unsupported_gpu(standin, monkeypatch, name, cap, expected):
    standin(name)
    _fake_gpu(monkeypatch, cap)
    reasons = fresh(name).availability()
    assert len(reasons) == 1 and expected.replace("xformers'", "xformers's") in reasons[0], reasons


def test_import_attnpatch_with_broken_packages_is_safe_and_lazy(tmp_path):
    _broken_package(tmp_path, "flash_attn", BROKEN_FA2)
    _broken_package(tmp_path, "xformers", "import warnings; warnings.warn('WARNING[XFORMERS]: xFormers can\\'t load C++/CUDA extensions')\n"
                                          "raise NotImplementedError('no kernels')")
    _broken_package(tmp_path, "sageattention", "raise OSError('libcuda.so.1: cannot open shared object file')")
    for dist in ("flash_attn-2.8.3", "xformers-0.0.35", "sageattention-1.0.6"):
        info = tmp_path / f"{dist}.dist-info"
        info.mkdir()
        name, ver = dist.split("-")
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
    script = textwrap.dedent("""
        import sys, time
        t0 = time.perf_counter()
        import attnpatch
        took = time.perf_counter() - t0
        third = [m for m in sys.modules if m.split('.')[0] in ('flash_attn', 'xformers', 'sageattention', 'sageattn3', 'flash_attn_interface')]
        print('IMPORTED', third)
        info = {b.name: b for b in attnpatch.backends()}
        print('FA2', info['flash_attn'].why_not)
        print('XF', info['xformers'].why_not)
        print('SAGE', info['sage'].why_not)
        print('SDPA', info['sdpa'].available)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    assert lines["IMPORTED"] == "[]"  # import attnpatch imports none of them
    assert "ABI mismatch" in lines["FA2"] and "undefined symbol" in lines["FA2"]
    assert "NotImplementedError: no kernels" in lines["XF"]
    assert "OSError: libcuda.so.1" in lines["SAGE"]
    assert lines["SDPA"] == "True"


# -- torch.compile, custom ops, gradients ------------------------------------------------------------

def test_custom_op_fake_shapes_and_dtypes(standin):
    from torch._subclasses.fake_tensor import FakeTensorMode
    standin("xformers")
    op = _custom_ops.OPS["xformers"]
    with FakeTensorMode():
        q = torch.empty(2, 7, 8, 32, dtype=torch.bfloat16)
        k = torch.empty(2, 9, 2, 32, dtype=torch.bfloat16)
        v = torch.empty(2, 9, 2, 48, dtype=torch.bfloat16)
        out = op(q, k, v, None, True, 0.5, 0.0)
        assert out.shape == (2, 7, 8, 48) and out.dtype == torch.bfloat16 and out.is_contiguous()
        bwd = torch.ops.attnpatch.xformers_backward.default
        dq, dk, dv = bwd(out, q, k, v, None, True, 0.5)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert not hasattr(torch.ops.attnpatch, "sage_backward")  # forward-only: no backward op


@pytest.mark.parametrize("name", ["flash_attn", "xformers"])
def test_custom_op_passes_opcheck(standin, name):
    standin(name)
    q, k, v = qkv(2, 4, 2, 8, 8, d=16, layout="bsnd")
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(_custom_ops.OPS[name], (q, k, v, None, False, None, 0.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("name,mask", [("flash_attn", "padding"), ("flash_attn3", None), ("xformers", "bool"),
                                       ("flash_attn4", None), ("sage", None), ("sage3", None)])
def test_compile_fullgraph_through_the_router(standin, name, mask):
    standin(name)
    torch._dynamo.reset()
    b, h, s, d = 2, 4, 256, 64
    q, k, v = qkv(b, h, h, s, s, d=d, layout="bsnd")
    m = None
    if mask == "padding":
        m = padding_mask(b, s)
    elif mask == "bool":
        m = _bool_mask(b, h, s, s)

    def f(q, k, v, m):
        return attnpatch.attention_forward(q, k, v, layout="bsnd", attn_mask=m, backend=name) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, m)
    kw = {} if m is None else {"attn_mask": m}
    close(out, 2 * reference(q, k, v, layout="bsnd", **kw), tol=4e-3)
    from attnpatch.router import compiled_decisions_of
    assert name in compiled_decisions_of(None)


@pytest.mark.parametrize("name,mask", [("flash_attn", None), ("flash_attn", "padding"), ("xformers", "bool"),
                                       ("flash_attn3", None)])
def test_gradients_match_the_reference_eager_and_compiled(standin, name, mask):
    standin(name)
    torch._dynamo.reset()
    b, hq, hkv, s, d = 3, 4, 2, 12, 16
    q, k, v = qkv(b, hq, hkv, s, s, d=d)
    m = padding_mask(b, s) if mask == "padding" else (_bool_mask(b, hq, s, s) if mask == "bool" else None)
    kw = {} if m is None else {"attn_mask": m}
    grad = torch.randn(b, hq, s, d, dtype=torch.float64)

    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    attnpatch.attention_forward(*ref_in, backend="sdpa_math", is_causal=m is None, **kw).backward(grad)

    def f(q, k, v):
        return attnpatch.attention_forward(q, k, v, backend=name, is_causal=m is None, **kw)

    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*ins).backward(grad.half())
        for got, want in zip(ins, ref_in):
            torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-2, rtol=1e-2)


def test_compile_with_inductor_respects_custom_op_strides(standin):
    import shutil
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("inductor's CPU code generation needs a C++ compiler, none on PATH")
    standin("xformers")
    torch._dynamo.reset()
    q, k, v = qkv(1, 2, 2, 16, 16, d=32, layout="bsnd", dtype=torch.float16)

    def f(q, k, v):
        return attnpatch.attention_forward(q, k, v, layout="bsnd", backend="xformers").transpose(1, 2).float().sum(-1)

    out = torch.compile(f, fullgraph=True)(q, k, v)
    ref = reference(q, k, v, layout="bsnd").transpose(1, 2).float().sum(-1)
    torch.testing.assert_close(out, ref.float(), atol=5e-3, rtol=5e-3)
