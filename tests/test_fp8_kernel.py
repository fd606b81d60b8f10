"""Tests of attnpatch's 8-bit attention: the plain-torch twin on CPU (always), and
the Triton kernel on an sm90 GPU (tests marked ``gpu``; skipped without one).

Accuracy numbers (measured, see docs/FP8_KERNEL.md): with fp8 P.V the relative
error against an exact reference is ~3.5-4% on N(0,1) inputs (flat softmax) --
the floor of rounding both P and V to a 3-bit mantissa (~2.6% rms each) -- so
the issue's 3e-2 target is recorded as a strict xfail for that mode; the
``pv_fp8=False`` mode (int8 Q.K^T, bf16/fp16 P.V) meets 3e-2.
"""
from __future__ import annotations


import pytest
import torch

from attnpatch.kernels import fp8_emulation as E
from attnpatch.kernels.fp8_attention import (
    MIN_SEQ_LEN_KV,
    fp8_attention,
    fp8_not_supported_reasons,
)

FP8_PV_BOUND = 5e-2  # relerr bound of the fp8-P.V design on N(0,1) and outlier inputs
TARGET = 3e-2  # the issue's target
COS_BOUND = 0.998


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def rnd(*shape, dtype=torch.bfloat16, device="cpu", gen=None):
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


def make(b, hq, hkv, sq, skv, d, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (rnd(b, hq, sq, d, dtype=dtype, device=device, gen=g),
            rnd(b, hkv, skv, d, dtype=dtype, device=device, gen=g),
            rnd(b, hkv, skv, d, dtype=dtype, device=device, gen=g))


def outliers(q, k, v, seed=1):
    g = torch.Generator(device=q.device).manual_seed(seed)
    q, k = q.float().clone(), k.float().clone()
    ch = torch.randperm(k.shape[-1], generator=torch.Generator().manual_seed(seed))[:4].to(q.device)
    k[..., ch] += 20.0  # a few K channels with a large mean
    rows = torch.randint(0, q.shape[2], (max(1, q.shape[2] // 64),), generator=g, device=q.device)
    q[:, :, rows] *= 8.0  # a few large Q rows
    return q.to(v.dtype), k.to(v.dtype), v


# ============================================================== CPU: the twin
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulation_random_normal(d, dtype):
    q, k, v = make(2, 4, 4, 300, 300, d, dtype)
    o = E.emulate_fp8_attention(q, k, v)
    r = E.reference_attention(q, k, v)
    assert o.dtype == dtype and o.shape == q.shape
    e, c = rel(o, r), cos(o, r)
    print(f"d={d} {dtype}: relerr={e:.4f} cos={c:.5f}")
    assert e <= FP8_PV_BOUND and c >= COS_BOUND


@pytest.mark.xfail(strict=True, reason="fp8 P.V floor on flat N(0,1) attention is ~3.7% (> 3e-2 target)")
def test_emulation_random_normal_meets_issue_target():
    q, k, v = make(1, 4, 4, 512, 512, 128)
    assert rel(E.emulate_fp8_attention(q, k, v), E.reference_attention(q, k, v)) <= TARGET


@pytest.mark.parametrize("d", [64, 128])
def test_emulation_accurate_mode_meets_target(d):
    q, k, v = make(2, 4, 4, 300, 300, d)
    r = E.reference_attention(q, k, v)
    assert rel(E.emulate_fp8_attention(q, k, v, pv_fp8=False), r) <= TARGET
    # outlier rows (8x larger Q) magnify the int8 Q.K^T error in the exponent
    qo, ko, vo = outliers(q, k, v)
    e = rel(E.emulate_fp8_attention(qo, ko, vo, pv_fp8=False), E.reference_attention(qo, ko, vo))
    print(f"accurate mode, outliers d={d}: relerr={e:.4f}")
    assert e <= 3.5e-2


@pytest.mark.parametrize("d", [64, 128])
def test_emulation_outliers(d):
    q, k, v = outliers(*make(1, 4, 4, 512, 512, d, seed=3))
    o = E.emulate_fp8_attention(q, k, v)
    r = E.reference_attention(q, k, v)
    e, c = rel(o, r), cos(o, r)
    print(f"outliers d={d}: relerr={e:.4f} cos={c:.5f}")
    assert e <= FP8_PV_BOUND and c >= COS_BOUND
    assert torch.isfinite(o).all()


def test_smoothing_does_not_change_softmax():
    q, k, _ = make(2, 3, 3, 50, 70, 64, dtype=torch.float64)
    k = k + 5.0 * torch.randn(1, 1, 1, 64, dtype=torch.float64)
    km = k.mean(dim=2, keepdim=True)
    p1 = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    p2 = torch.softmax(q @ (k - km).transpose(-1, -2), dim=-1)
    assert torch.allclose(p1, p2, rtol=1e-10, atol=1e-13)
    # and the bf16-rounded mean used by the kernel is just as valid
    km16 = km.to(torch.bfloat16).double()
    p3 = torch.softmax(q @ (k - km16).transpose(-1, -2), dim=-1)
    assert torch.allclose(p1, p3, rtol=1e-10, atol=1e-13)


def test_quantization_scales_reconstruct():
    q, k, v = make(2, 3, 3, 150, 300, 128)
    k = (k.float() + 10 * torch.randn(128)).bfloat16()
    sc = 0.1
    q8, qs = E.quantize_q(q, sc)
    assert q8.dtype == torch.int8 and q8.abs().max() <= 127
    qd = E.dequantize_q(q8, qs, sc)
    # int8 per token: error <= half a step (+ fp32 slack)
    step = (qs / (sc * E.LOG2E))[..., None]
    assert ((qd - q.float()).abs() <= 0.5 * step + 1e-6 * (q.float().abs() + step)).all()
    assert torch.allclose((q8.abs().amax(-1)).float(), torch.full_like(qs, 127.0))
    km, vm = E.kv_means(k, v)
    k8, ks, _ = E.quantize_k(k, km)
    assert k8.shape[2] == 384 and (k8[:, :, 300:] == 0).all()
    kd = E.dequantize_k(k8, ks, km, 300)
    kstep = ks.repeat_interleave(E.KV_BLOCK, dim=2)[:, :, :300, None]
    assert ((kd - k.float()).abs() <= 0.5 * kstep + 1e-6 * (k.float().abs() + kstep)).all()
    v8, vs, _ = E.quantize_v(v, vm)
    assert v8.dtype == E.FP8_DTYPE and v8.float().abs().max() <= 448
    vd = E.dequantize_v(v8, vs, vm, 300)
    vc = (v.float() - vm[:, :, None])
    # fp8 e4m3: relative error <= 2**-4 for normals; absolute <= 2**-10 * scale below
    tol = torch.maximum(vc.abs() * 2.0 ** -4, vs[:, :, None] * 2.0 ** -10) * (1 + 1e-5)
    assert ((vd - v.float()).abs() <= tol + 1e-6).all()
    # smoothing: the smoothed K has (up to the bf16 rounding of the mean) zero mean
    resid = (k.float() - km[:, :, None]).mean(dim=2).abs()
    assert (resid <= km.abs() * 2.0 ** -8 + 1e-6).all()


@pytest.mark.parametrize("sq,skv", [(1, 1), (7, 7), (63, 63), (65, 65), (197, 197), (1000, 1000),
                                    (7, 65), (65, 7), (1, 1000), (197, 63)])
def test_lengths(sq, skv):
    q, k, v = make(1, 2, 2, sq, skv, 64, seed=sq * 1000 + skv)
    for causal in (False, True):
        o = E.emulate_fp8_attention(q, k, v, is_causal=causal)
        r = E.reference_attention(q, k, v, is_causal=causal)
        assert torch.isfinite(o).all()
        # single-key rows are exact up to V's fp8 rounding; average over all rows
        assert rel(o, r) <= FP8_PV_BOUND, (sq, skv, causal, rel(o, r))


def test_no_nan_any_length():
    for n in list(range(1, 40)) + [127, 128, 129, 255, 257]:
        q, k, v = make(1, 1, 1, n, n, 64, seed=n)
        for causal in (False, True):
            o = E.emulate_fp8_attention(q, k, v, is_causal=causal)
            assert torch.isfinite(o).all(), n


def test_key_padding_not_at_start_and_fully_masked_rows():
    q, k, v = make(3, 2, 2, 70, 200, 64, seed=5)
    kp = torch.ones(3, 200, dtype=torch.bool)
    kp[0, :50] = False          # left padding
    kp[0, 150:] = False
    kp[1, ::3] = False          # scattered
    kp[2, :] = False            # batch 2: every key masked -> zeros
    o = E.emulate_fp8_attention(q, k, v, key_padding=kp)
    r = E.reference_attention(q, k, v, key_padding=kp)
    assert torch.isfinite(o).all()
    assert (o[2] == 0).all()
    assert rel(o[:2], r[:2]) <= FP8_PV_BOUND
    # masked keys really are ignored: change them, output doesn't move
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :50] = 100.0
    v2[0, :, :50] = -100.0
    o2 = E.emulate_fp8_attention(q, k2, v2, key_padding=kp)
    assert rel(o2[0], r[0]) <= FP8_PV_BOUND
    # causal + padding that masks the first keys -> the first rows see nothing
    kp3 = torch.ones(1, 200, dtype=torch.bool)
    kp3[0, :10] = False
    q3, k3, v3 = make(1, 2, 2, 70, 200, 64, seed=6)
    o3 = E.emulate_fp8_attention(q3, k3, v3, key_padding=kp3, is_causal=True)
    r3 = E.reference_attention(q3, k3, v3, key_padding=kp3, is_causal=True)
    assert torch.isfinite(o3).all() and (o3[:, :, :10] == 0).all()
    assert rel(o3, r3) <= FP8_PV_BOUND


def test_gqa_cross_and_bsnd():
    q, k, v = make(2, 8, 2, 100, 333, 128, seed=7)
    o = E.emulate_fp8_attention(q, k, v)
    r = E.reference_attention(q, k, v)
    assert rel(o, r) <= FP8_PV_BOUND
    # GQA equals explicit head repetition
    o_rep = E.emulate_fp8_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
    assert torch.equal(o, o_rep)
    # bsnd layout gives the same numbers, in bsnd
    ob = E.emulate_fp8_attention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                 v.transpose(1, 2).contiguous(), layout="bsnd")
    assert ob.shape == (2, 100, 8, 128)
    assert torch.equal(ob.transpose(1, 2), o)


def test_causal_is_top_left():
    q, k, v = make(1, 2, 2, 50, 120, 64, seed=8)
    o = E.emulate_fp8_attention(q, k, v, is_causal=True)
    r = E.reference_attention(q, k, v, is_causal=True)
    ref_sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True)
    assert torch.allclose(r, ref_sdpa, atol=1e-10)
    assert rel(o, r) <= FP8_PV_BOUND


def test_scale_argument():
    q, k, v = make(1, 2, 2, 64, 200, 64, seed=9)
    for sc in (0.05, 0.3):
        assert rel(E.emulate_fp8_attention(q, k, v, scale=sc),
                   E.reference_attention(q, k, v, scale=sc)) <= FP8_PV_BOUND


def test_public_op_on_cpu_and_compile():
    q, k, v = make(1, 2, 2, 70, 90, 64, seed=10)
    kp = torch.ones(1, 90, dtype=torch.bool)
    kp[0, :5] = False
    o = fp8_attention(q, k, v, key_padding=kp, is_causal=True)
    from attnpatch.kernels.fp8_attention import _EXP_F16
    e = E.emulate_fp8_attention(q, k, v, key_padding=kp, is_causal=True, exp_f16=_EXP_F16)
    assert torch.equal(o, e)

    def f(q, k, v):
        return fp8_attention(q, k, v, key_padding=kp, is_causal=True) * 2

    torch._dynamo.reset()
    oc = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.equal(oc, 2 * o)


def test_opcheck():
    q, k, v = make(1, 2, 1, 20, 30, 64, seed=11)
    torch.library.opcheck(torch.ops.attnpatch.fp8_attention.default,
                          (q, k, v, None, 0.125, False, "bnsd", True),
                          test_utils=("test_schema", "test_faketensor"))


def test_reasons():
    q, k, v = make(1, 2, 2, 16, 16, 80)
    rs = fp8_not_supported_reasons(q, k, v)
    assert "head_dim=80 (supported: 64, 128)" in rs
    assert "device cpu (supported: cuda)" in rs
    assert any("MIN_SEQ_LEN_KV" in r for r in rs)
    q32 = torch.randn(1, 2, 16, 64)
    rs = fp8_not_supported_reasons(q32, q32, q32, check_device=False, check_speed=False)
    assert rs == ["q.dtype=float32 (supported: bfloat16, float16)",
                  "k.dtype=float32 (supported: bfloat16, float16)",
                  "v.dtype=float32 (supported: bfloat16, float16)"]
    q, k, v = make(1, 6, 4, 16, 16, 64)
    assert any("heads q=6, kv=4" in r for r in fp8_not_supported_reasons(q, k, v))
    q = torch.empty(1, 2, 16384, 128, dtype=torch.bfloat16)
    assert fp8_not_supported_reasons(q, q, q, check_device=False) == []
    q, k, v = make(1, 2, 2, 2048, 2048, 64)
    assert fp8_not_supported_reasons(q, k, v, check_device=False, check_speed=False) == []
    assert any("head_dim=64 is correct but not faster" in r
               for r in fp8_not_supported_reasons(q, k, v, check_device=False))
    assert any("layout=" in r for r in fp8_not_supported_reasons(q, k, v, layout="nsd"))
    kp = torch.ones(1, 7, dtype=torch.bool)
    assert any("key_padding shape" in r for r in fp8_not_supported_reasons(q, k, v, key_padding=kp, check_device=False))
    assert MIN_SEQ_LEN_KV >= 1
    with pytest.raises(ValueError, match="head_dim=80"):
        fp8_attention(*make(1, 2, 2, 16, 16, 80))


def test_import_is_light():
    import subprocess
    import sys
    code = ("import sys, attnpatch.kernels.fp8_attention as m; "
            "assert 'attnpatch.kernels._fp8_triton' not in sys.modules, 'kernels imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_measured_config_skips_autotuning_on_measured_cards(monkeypatch):
    """On a card with a measured best config the fp8 kernel launches it directly (one compile, no timing:
    the cold-start cost of a fresh process); ATTNPATCH_FP8_AUTOTUNE=1 brings the autotuner back."""
    T = pytest.importorskip("attnpatch.kernels._fp8_triton", reason="needs triton")
    monkeypatch.delenv("ATTNPATCH_FP8_AUTOTUNE", raising=False)
    assert T.measured_config((9, 0)) == (64, 4, 3)
    assert T.measured_config((8, 0)) is None  # not measured: autotune
    monkeypatch.setenv("ATTNPATCH_FP8_AUTOTUNE", "1")
    assert T.measured_config((9, 0)) is None


# ============================================================== GPU: the kernel
def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


gpu = pytest.mark.gpu
needs_sm90 = pytest.mark.skipif(not _sm90(), reason="needs a CUDA GPU with compute capability 9.0 (Hopper)")
# measured bound between kernel and twin (same quantized tensors; differences come
# from exp2.approx, fp32 FMA contraction, summation order and the fp8 tensor-core
# accumulator): see docs/FP8_KERNEL.md
KERNEL_VS_TWIN = 1e-2


def _kernel(*a, **kw):
    from attnpatch.kernels.fp8_attention import _triton_forward
    return _triton_forward(*a, **kw)


@gpu
@needs_sm90
def test_gpu_quantized_tensors_match_twin():
    from attnpatch.kernels.fp8_attention import _triton_forward
    q, k, v = make(2, 4, 2, 333, 517, 128, device="cuda", seed=20)
    k = (k.float() + 3).bfloat16()
    Q = _triton_forward(q, k, v, 0.088, False, None, "bnsd", return_quant=True)
    q8, qs = E.quantize_q(q, 0.088)
    km, vm = E.kv_means(k, v)
    k8, ks, _ = E.quantize_k(k, km)
    v8, vs, _ = E.quantize_v(v, vm)
    assert (Q["q8"] == q8).all() and torch.equal(Q["qs"], qs)
    # km/vm: fp32 sums in a different order may flip a bf16 rounding (rare)
    assert (Q["vm"] == vm).float().mean() > 0.99
    assert (Q["k8"] == k8).float().mean() > 0.999
    assert (Q["vt8"].transpose(-1, -2).float() == v8.float()).float().mean() > 0.999


GPU_CASES = [
    # b, hq, hkv, sq, skv, d, dtype, causal, kp, layout
    (1, 4, 4, 1, 1, 64, torch.bfloat16, False, False, "bnsd"),
    (1, 4, 4, 7, 7, 128, torch.bfloat16, True, False, "bnsd"),
    (2, 4, 4, 63, 65, 64, torch.float16, False, True, "bnsd"),
    (1, 4, 2, 197, 197, 64, torch.bfloat16, False, False, "bsnd"),
    (2, 8, 2, 1000, 1000, 128, torch.bfloat16, True, False, "bnsd"),
    (1, 8, 8, 129, 2000, 128, torch.float16, False, True, "bsnd"),
    (1, 6, 3, 1500, 300, 128, torch.bfloat16, True, True, "bnsd"),
    (2, 4, 4, 4096, 4096, 128, torch.bfloat16, False, False, "bnsd"),
    (1, 4, 4, 2048, 2048, 64, torch.float16, True, False, "bsnd"),
]


@gpu
@needs_sm90
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}-c{int(c[7])}-kp{int(c[8])}-{c[9]}")
def test_gpu_kernel_vs_twin_and_reference(case):
    from attnpatch.kernels.fp8_attention import _EXP_F16
    b, hq, hkv, sq, skv, d, dtype, causal, haskp, layout = case
    q, k, v = make(b, hq, hkv, sq, skv, d, dtype, device="cuda", seed=sq + skv)
    kp = None
    if haskp:
        kp = torch.rand(b, skv, device="cuda") > 0.3
        kp[0, : skv // 3] = False
        if b > 1:
            kp[1] = False  # fully masked batch
    if layout == "bsnd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    o = fp8_attention(q, k, v, is_causal=causal, key_padding=kp, layout=layout)
    torch.cuda.synchronize()
    assert o.shape == q.shape and o.dtype == dtype
    assert torch.isfinite(o).all()
    e = E.emulate_fp8_attention(q, k, v, is_causal=causal, key_padding=kp, layout=layout, exp_f16=_EXP_F16)
    r = E.reference_attention(q, k, v, is_causal=causal, key_padding=kp, layout=layout, dtype=torch.float32)
    if kp is not None and b > 1:
        zero = o[1] if layout == "bnsd" else o[1]
        assert (zero == 0).all()
    ek, er, eer = rel(o, e), rel(o, r), rel(e, r)
    print(f"{case}: kernel-vs-twin={ek:.2e} kernel-vs-fp32={er:.4f} twin-vs-fp32={eer:.4f} cos={cos(o, r):.5f}")
    assert ek <= KERNEL_VS_TWIN
    assert er <= FP8_PV_BOUND
    # accurate mode
    o2 = fp8_attention(q, k, v, is_causal=causal, key_padding=kp, layout=layout, pv_fp8=False)
    assert rel(o2, r) <= TARGET


@gpu
@needs_sm90
def test_gpu_outliers():
    q, k, v = outliers(*make(1, 8, 8, 2048, 2048, 128, device="cuda", seed=30))
    o = fp8_attention(q, k, v)
    r = E.reference_attention(q, k, v, dtype=torch.float32)
    print(f"outliers: relerr={rel(o, r):.4f} cos={cos(o, r):.5f}")
    assert rel(o, r) <= FP8_PV_BOUND and torch.isfinite(o).all()


@gpu
@needs_sm90
def test_gpu_no_nan_many_lengths():
    for n in (1, 2, 3, 15, 16, 17, 100, 127, 128, 129, 255, 256, 257, 511, 1023):
        q, k, v = make(1, 2, 2, n, n, 64, device="cuda", seed=n)
        for causal in (False, True):
            o = fp8_attention(q, k, v, is_causal=causal)
            assert torch.isfinite(o).all(), (n, causal)


@gpu
@needs_sm90
def test_gpu_compile_fullgraph():
    q, k, v = make(1, 4, 4, 1024, 1024, 128, device="cuda", seed=40)

    def f(q, k, v):
        return fp8_attention(q, k, v, is_causal=True).float().sum(-1)

    torch._dynamo.reset()
    fc = torch.compile(f, fullgraph=True)
    assert torch.allclose(fc(q, k, v), f(q, k, v), atol=1e-2, rtol=1e-2)


@gpu
@needs_sm90
def test_gpu_reasons_accept_hopper():
    q, k, v = make(1, 4, 4, 16384, 16384, 128, device="cuda")
    assert fp8_not_supported_reasons(q, k, v) == []


# ============================================ CPU: the Triton kernels, interpreted
_INTERPRETED = r'''
import os, sys, torch
os.environ["TRITON_INTERPRET"] = "1"
from attnpatch.kernels import fp8_emulation as E
from attnpatch.kernels.fp8_attention import _triton_forward
g = torch.Generator().manual_seed(3)
b, hq, hkv, sq, skv, d = 2, 4, 2, 70, 150, 64
q, k, v = (torch.randn(*s, generator=g).bfloat16() for s in
           ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d)))
k = (k.float() + 3).bfloat16()
kp = torch.ones(b, skv, dtype=torch.bool); kp[1, 100:] = False; kp[0, :5] = False
Q = _triton_forward(q, k, v, 0.1, False, kp, "bnsd", return_quant=True)
q8, qs = E.quantize_q(q, 0.1)
km, vm = E.kv_means(k, v, key_padding=kp)
k8, ks, _ = E.quantize_k(k, km, key_padding=kp)
assert torch.equal(Q["q8"], q8) and torch.equal(Q["qs"], qs), "Q quantization differs from the twin"
assert torch.equal(Q["vm"].float(), vm.float()), "V means differ from the twin"
assert Q["k8"].shape == k8.shape and (Q["k8"] == k8).float().mean() > 0.999, "K quantization differs from the twin"
for causal in (False, True):
    o = _triton_forward(q, k, v, 0.1, causal, kp, "bnsd", fixed_config=(64, 4, 1))
    ref = E.reference_attention(q, k, v, scale=0.1, is_causal=causal, key_padding=kp)
    assert o.shape == q.shape and o.dtype == q.dtype and bool(torch.isfinite(o).all())
    rel = ((o.double() - ref.double()).norm() / ref.double().norm()).item()
    # the interpreter's fp8 conversion is not the GPU's, so only a coarse bound here;
    # the GPU tests compare the compiled kernel with the twin tightly
    assert rel < 0.2, f"causal={causal}: relerr {rel}"
print("OK")
'''


def test_triton_kernels_run_in_interpreter():
    """The real Triton kernels and their launcher, run by Triton's CPU interpreter:
    catches a launcher/kernel argument mismatch and checks the int8 quantization
    against the twin exactly (the GPU is not needed)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
