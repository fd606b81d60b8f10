"""Every backend on a real CUDA GPU: accuracy against an fp32 reference over a shape/dtype/mask matrix,
fully masked rows, causal with s_q != s_kv, gradients, torch.compile(fullgraph=True), CUDA-graph
capture, and the true state of `attnpatch.backends()` on the box.

Skipped where no CUDA device exists (tests/conftest.py). With ``ATTNPATCH_GPU_OUT=<dir>`` the tests also
write what they saw (backends(), raw torch kernel behaviour, per-case errors) as JSON there.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import attnpatch
from attnpatch import registry

pytestmark = pytest.mark.gpu

OUT_DIR = os.environ.get("ATTNPATCH_GPU_OUT")
TORCH_BACKENDS = ("sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "eager")


def _dump(name, data):
    if OUT_DIR:
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(os.path.join(OUT_DIR, name), "w") as f:
            json.dump(data, f, indent=1, default=str)


def _available():
    return [b.name for b in attnpatch.backends() if b.available]


def relerr(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference(q, k, v, **kw):
    """fp64 reference through the eager formula (every feature, zeros for fully masked rows)."""
    m = kw.get("attn_mask")
    if m is not None and m.is_floating_point():
        kw = dict(kw, attn_mask=m.double())
    return attnpatch.attention_forward(q.double(), k.double(), v.double(), backend="eager", **kw)


def make_case(name, dtype, device="cuda"):
    g = torch.Generator(device=device).manual_seed(sum(map(ord, name)))
    spec = dict(b=2, hq=8, hkv=8, sq=256, skv=256, d=64)
    kw = {}
    mask = None
    if name == "d128":
        spec["d"] = 128
    elif name == "causal":
        kw["is_causal"] = True
    elif name == "causal_q_shorter":
        spec.update(sq=128, skv=384)
        kw["is_causal"] = True
    elif name == "causal_q_longer":
        spec.update(sq=384, skv=128)
        kw["is_causal"] = True
    elif name == "gqa":
        spec.update(hq=8, hkv=2)
    elif name == "gqa_causal":
        spec.update(hq=8, hkv=2)
        kw["is_causal"] = True
    elif name == "key_padding":
        spec.update(b=3)
        mask = torch.ones(3, spec["skv"], dtype=torch.bool, device=device)
        mask[0, :37] = False       # padding at the front
        mask[1, 100:140] = False   # in the middle
        mask[1, -9:] = False
        mask[2] = False            # a batch row with no key at all
    elif name == "bool_mask":
        mask = torch.rand(2, 1, spec["sq"], spec["skv"], device=device, generator=g) > 0.3
        mask[0, 0, 5] = False      # one fully masked query row
    elif name == "additive_mask":
        mask = torch.randn(2, 8, spec["sq"], spec["skv"], device=device, generator=g).to(dtype)
        mask[1, 3, 7] = float("-inf")
    elif name == "scale":
        kw["scale"] = 0.05
    if mask is not None:
        kw["attn_mask"] = mask
    b, hq, hkv, sq, skv, d = (spec[x] for x in ("b", "hq", "hkv", "sq", "skv", "d"))
    q = torch.randn(b, hq, sq, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, hkv, skv, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, hkv, skv, d, device=device, dtype=dtype, generator=g)
    return q, k, v, kw


CASES = ("plain", "d128", "scale", "causal", "causal_q_shorter", "causal_q_longer", "gqa", "gqa_causal",
         "key_padding", "bool_mask", "additive_mask")
DTYPES = (torch.float16, torch.bfloat16)
ALL_NAMES = [cls.NAME for cls in __import__("attnpatch.backends", fromlist=["BUILTIN"]).BUILTIN]
#: Backends whose declared minimum length (fp8: 16384 keys, where it beats cuDNN) is above every case of
#: the shared accuracy matrix; their GPU accuracy tests live beside their kernel (tests/test_fp8_kernel.py).
LONG_ONLY = {"fp8"}


def _dead_rows(q, kw):
    """(b, h, s_q) bool: query rows with no key to attend, or None."""
    m = kw.get("attn_mask")
    if m is None:
        return None
    keep = m if m.dtype == torch.bool else ~torch.isneginf(m)
    if keep.dim() == 2:
        keep = keep[:, None, None, :]
    if kw.get("is_causal"):
        keep = keep & torch.ones(q.shape[2], keep.shape[-1], dtype=torch.bool, device=q.device).tril()
    return ~keep.expand(q.shape[0], q.shape[1], q.shape[2], keep.shape[-1]).any(-1)


def _strict_or_refused(name, q, k, v, kw, rows, dtype, case):
    """The output of ``name`` alone on the call, or None after recording its refusal in ``rows``."""
    try:
        with attnpatch.use_backend(name, strict=True):
            return attnpatch.attention_forward(q, k, v, **kw)
    except attnpatch.BackendUnsupportedError as exc:
        rows.append(dict(dtype=str(dtype), case=case, refused=str(exc).splitlines()[2:3]))
        return None


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n not in LONG_ONLY])
def test_accuracy_matrix(name):
    """Each backend, where eligible, within 2x the math kernel's error (+ a small absolute term) of the
    fp64 reference; lossy ones within their declared bound. Fully masked rows must be exactly zero."""
    b = registry.get_backend(name)
    if not b.available:
        pytest.skip(f"{name} unavailable: {'; '.join(b.availability())}")
    rows, failures, ran = [], [], 0
    # flex compiles a kernel per shape family: a smaller matrix keeps the run within minutes
    dtypes, cases = ((torch.bfloat16,), ("plain", "causal_q_longer", "key_padding", "bool_mask", "additive_mask")) \
        if name == "flex" else (DTYPES, CASES)
    for dtype in dtypes:
        for case in cases:
            q, k, v, kw = make_case(case, dtype)
            out = _strict_or_refused(name, q, k, v, kw, rows, dtype, case)
            if out is None:
                continue
            ran += 1
            ref = reference(q, k, v, **kw)
            math_out = attnpatch.attention_forward(q, k, v, backend="sdpa_math", **kw)
            err, math_err = relerr(out, ref), relerr(math_out, ref)
            bound = b.TOLERANCE.get(dtype, 5e-2) if b.LOSSY else 2 * math_err + 1e-3
            dead = _dead_rows(q, kw)
            dead_ok = True
            if dead is not None and dead.any():
                dead_ok = bool((out[dead] == 0).all())
            finite = bool(torch.isfinite(out).all())
            rows.append(dict(dtype=str(dtype), case=case, relerr=err, math_relerr=math_err, bound=bound,
                             dead_rows_zero=dead_ok, finite=finite))
            if not (finite and err <= bound and dead_ok):
                failures.append(rows[-1])
    _dump(f"accuracy_{name}.json", rows)
    assert ran > 0, f"{name}: every case was refused: {rows}"
    assert not failures, failures


#: sliding windows and softcap on the flash-attn backends: (s_q, s_kv, kwargs)
FEATURE_CASES = {
    "prefill_causal_window": (256, 256, dict(is_causal=True, window=(64, None))),
    "band": (256, 256, dict(window=(32, 16))),
    "kv_longer_causal_window": (64, 256, dict(is_causal=True, window=(48, None))),
    "q_longer_left_window": (256, 96, dict(window=(40, None))),
    "softcap": (256, 256, dict(softcap=20.0)),
    "softcap_causal_window": (256, 256, dict(is_causal=True, window=(64, None), softcap=20.0)),
}


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn3"])
def test_flash_windows_and_softcap(name):
    """flash-attn's window_size and softcap through attnpatch's translation, against the fp64 eager
    reference within 2x the math path's error (the math path takes windows as a mask, and softcap not)."""
    b = registry.get_backend(name)
    if not b.available:
        pytest.skip(f"{name} unavailable: {'; '.join(b.availability())}")
    rows, failures = [], []
    for dtype in DTYPES:
        for case, (sq, skv, kw) in FEATURE_CASES.items():
            g = torch.Generator(device="cuda").manual_seed(sum(map(ord, case)))
            q = torch.randn(2, 8, sq, 64, device="cuda", dtype=dtype, generator=g)
            k, v = (torch.randn(2, 8, skv, 64, device="cuda", dtype=dtype, generator=g) for _ in range(2))
            out = _strict_or_refused(name, q, k, v, kw, rows, dtype, case)
            if out is None:
                continue
            ref = reference(q, k, v, **kw)
            exact = attnpatch.attention_forward(q, k, v, backend="eager", **kw)  # same rounding of inputs
            err, eager_err = relerr(out, ref), relerr(exact, ref)
            bound = 2 * eager_err + 1e-3
            rows.append(dict(dtype=str(dtype), case=case, relerr=err, eager_relerr=eager_err, bound=bound))
            if not (torch.isfinite(out).all() and err <= bound):
                failures.append(rows[-1])
    _dump(f"features_{name}.json", rows)
    assert not failures, failures


def _raw_sdpa(kernel, q, k, v, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(getattr(SDPBackend, kernel)):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def test_raw_torch_kernels_on_masked_rows_and_cross_causal():
    """What torch's own CUDA kernels do (bypassing attnpatch), recorded for the docs; and attnpatch's
    routed result for the same calls must be right whatever the raw kernel does."""
    report = {}
    dtype = torch.bfloat16
    for case in ("bool_mask", "key_padding", "causal_q_shorter", "causal_q_longer", "additive_mask"):
        q, k, v, kw = make_case(case, dtype)
        ref = reference(q, k, v, **kw)
        raw_kw = dict(kw)
        if raw_kw.get("attn_mask") is not None and raw_kw["attn_mask"].dim() == 2:
            raw_kw["attn_mask"] = raw_kw["attn_mask"][:, None, None, :]
        dead = _dead_rows(q, kw)
        for kernel in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
            try:
                out = _raw_sdpa(kernel, q, k, v, **raw_kw)
                torch.cuda.synchronize()
            except Exception as exc:
                report[f"{case}/{kernel}"] = f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                continue
            nan = int(torch.isnan(out).sum())
            live = ~dead if dead is not None else torch.ones(out.shape[:3], dtype=torch.bool, device=out.device)
            err_live = relerr(out[live], ref[live]) if nan == 0 else float("nan")
            dead_state = None
            if dead is not None and dead.any():
                d = out[dead]
                dead_state = "zeros" if bool((d == 0).all()) else ("nan" if bool(torch.isnan(d).any()) else "nonzero")
            report[f"{case}/{kernel}"] = dict(nan=nan, relerr_live_rows=err_live, dead_rows=dead_state)
    _dump("raw_torch_kernels.json", report)
    print(json.dumps(report, indent=1, default=str))
    assert report  # the routed results are checked in test_accuracy_matrix


@pytest.mark.parametrize("name", ALL_NAMES)
def test_backward_matches_reference(name):
    b = registry.get_backend(name)
    if not b.available or not b.SUPPORTS_BACKWARD:
        pytest.skip(f"{name}: {'forward-only' if b.available else '; '.join(b.availability())}")
    failures, ran, refused = [], 0, []
    for case in ("plain", "causal", "gqa", "key_padding"):
        q, k, v, kw = make_case(case, torch.bfloat16)
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        try:
            with attnpatch.use_backend(name, strict=True):
                out = attnpatch.attention_forward(*ins, **kw)
        except attnpatch.BackendUnsupportedError as exc:
            refused.append(str(exc))
            continue
        ran += 1
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_ins = [t.double().requires_grad_() for t in (q, k, v)]
        reference(*ref_ins, **kw).backward(grad.double())
        math_ins = [t.clone().requires_grad_() for t in (q, k, v)]
        attnpatch.attention_forward(*math_ins, backend="sdpa_math", **kw).backward(grad)
        for label, got, m, want in zip("qkv", ins, math_ins, ref_ins):
            e, em = relerr(got.grad, want.grad), relerr(m.grad, want.grad)
            if not (e <= 2 * em + 2e-3):
                failures.append((case, label, e, em))
    if not ran and all("has no backward kernels" in r for r in refused):
        # a shrunk build (FLASH_ATTENTION_DISABLE_BACKWARD): refused with the reason, not crashed
        pytest.skip(f"{name}: this build has no backward kernels (refused: {refused[0][:200]})")
    assert ran > 0, refused
    assert not failures, failures


@pytest.mark.parametrize("name", ALL_NAMES)
def test_compile_fullgraph(name):
    b = registry.get_backend(name)
    if not b.available:
        pytest.skip(f"{name} unavailable: {'; '.join(b.availability())}")
    torch._dynamo.reset()
    q, k, v, kw = make_case("plain", torch.bfloat16)
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # bsnd, as diffusers calls it

    def f(q, k, v):
        return attnpatch.attention_forward(q, k, v, layout="bsnd", backend=name) + 1

    with attnpatch.use_backend(name, strict=True):
        try:
            expected = attnpatch.attention_forward(q, k, v, layout="bsnd")
        except attnpatch.BackendUnsupportedError as exc:
            pytest.skip(f"{name} refuses the compile case: {exc}")
    out = torch.compile(f, fullgraph=True)(q, k, v)
    if b.LOSSY:
        # an 8-bit kernel's rounding depends on the layout it is handed (the compiled graph may pass
        # another one), so a few elements can move by its quantisation step: hold both the compiled and
        # the eager output to the kernel's own bound against an fp32 reference instead
        ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
        for got in (out - 1, expected):
            rel = ((got.float() - ref).norm() / ref.norm()).item()
            assert rel <= b.TOLERANCE.get(torch.bfloat16, 5e-2) * 2, f"{name}: relative error {rel:.3g}"
        return
    torch.testing.assert_close(out - 1, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flash_attn", "flash_attn3",
                                  "xformers"])
def test_cuda_graph_capture(name):
    b = registry.get_backend(name)
    if not b.available:
        pytest.skip(f"{name} unavailable: {'; '.join(b.availability())}")
    q, k, v, kw = make_case("key_padding" if name in ("flash_attn", "flash_attn3", "xformers") else "plain",
                            torch.bfloat16)
    static = [t.clone() for t in (q, k, v)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: decide, build, first kernels
            attnpatch.attention_forward(*static, backend=name, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attnpatch.attention_forward(*static, backend=name, **kw)
    fresh = [torch.randn_like(t) for t in (q, k, v)]
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    expected = attnpatch.attention_forward(*fresh, backend=name, **kw)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)
    assert attnpatch.stats().fallbacks == {}


def test_backends_state_on_the_box():
    infos = attnpatch.backends()
    state = [dict(name=i.name, available=i.available, version=i.version, lossy=i.lossy, backward=i.backward,
                  why_not=i.why_not) for i in infos]
    _dump("backends.json", state)
    print(json.dumps(state, indent=1))
    by = {i.name: i for i in infos}
    for name in ("sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "eager"):
        assert by[name].available, (name, by[name].why_not)
    for i in infos:
        assert i.available or i.reasons, i.name  # unavailable always says why


def test_xformers_built_for_another_torch_is_unavailable_with_the_real_reason():
    """An xformers whose extension was built for another torch (PyPI's 0.0.35 wheel: torch 2.10 + CUDA 12.8)
    is unavailable with xformers' own message; one built for this torch (benchmarks/build_kernels.sh
    xformers, H200 2026-11-30) is available."""
    import importlib.metadata
    try:
        importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("xformers is not installed on this machine")
    info = {i.name: i for i in attnpatch.backends()}["xformers"]
    from xformers import _cpp_lib
    meta = getattr(_cpp_lib, "_build_metadata", None)
    built_for = getattr(meta, "metadata", {}).get("version", {}).get("torch") if meta is not None else None
    if built_for is not None and built_for.split("+")[0] == torch.__version__.split("+")[0]:
        assert info.available, info.why_not
    elif built_for is not None:
        assert not info.available
        assert "NotImplementedError" in info.why_not or "did not load" in info.why_not, info.why_not
    else:
        pytest.skip(f"xformers' build metadata is not readable here ({meta!r})")


def test_sage_accuracy_floor():
    """sage (1.x): refused below 256 keys with the reason; within its bound from 256 up."""
    b = registry.get_backend("sage")
    if not b.available:
        pytest.skip(f"sage unavailable: {'; '.join(b.availability())}")
    q = torch.randn(4, 12, 197, 64, device="cuda", dtype=torch.float16)
    expl = attnpatch.explain(q, q, q, backend="sage")
    assert expl.backend != "sage" and any("below 256" in r for r in expl.reasons["sage"])
    errs = {}
    for s in (256, 1024, 4096):
        q, k, v = (torch.randn(1, 8, s, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        with attnpatch.use_backend("sage", strict=True):
            out = attnpatch.attention_forward(q, k, v)
        errs[s] = relerr(out, reference(q, k, v))
    _dump("sage_floor.json", errs)
    assert all(e <= b.TOLERANCE[torch.float16] for e in errs.values()), errs


THIRD_PARTY_NAMES = [cls.NAME for cls in __import__("attnpatch.backends", fromlist=["BUILTIN"]).BUILTIN
                     if getattr(cls, "MODULE", "")]


@pytest.mark.parametrize("name", THIRD_PARTY_NAMES)
def test_custom_op_compiles_fullgraph_with_inductor(name):
    """The backend's attnpatch::<name> op under torch.compile(fullgraph=True) with inductor on CUDA,
    against the library called directly (independent of the router's compile path)."""
    import importlib
    b = registry.get_backend(name)
    if not b.available:
        pytest.skip(f"{name} unavailable: {'; '.join(b.availability())}")
    torch._dynamo.reset()
    shape = (1, 8, 1024, 64) if b.NATIVE_LAYOUT == "bnsd" else (1, 1024, 8, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(3))
    op = b.op()
    compiled = torch.compile(lambda q, k, v: op(q, k, v, None, False, None, 0.0) * 2, fullgraph=True)
    out = compiled(q, k, v)
    expected = type(b).kernel(importlib.import_module(b.MODULE), q, k, v, None, False, None, 0.0)
    torch.testing.assert_close(out, 2 * expected, atol=1e-2, rtol=1e-2)


def test_key_packing_is_reused_per_mask_and_kept_apart_per_stream():
    """The key-padding packing cache (backends/_third_party.key_packing) on real CUDA tensors: reused for
    the same mask on the same stream, computed afresh on another stream (its tensors would otherwise be
    read across streams). Inside a CUDA-graph capture: test_cuda_graph_capture[flash_attn3] (key padding)."""
    from attnpatch.backends import _third_party as tp
    tp.clear_key_packings()
    m = torch.ones(2, 1, 1, 64, dtype=torch.bool, device="cuda")
    m[0, ..., 60:] = False
    a = tp.key_packing(m, 2, 64)
    assert tp.key_packing(m, 2, 64) is a
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        b = tp.key_packing(m, 2, 64)
    torch.cuda.current_stream().wait_stream(side)
    assert b is not a and all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[1].tolist() == [0, 60, 124]
