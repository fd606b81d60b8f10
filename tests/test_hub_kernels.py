"""The hub-kernel backends (`flash_attn3_hub`, `sage_hub`): loading through the real `kernels` package,
only from what is on this machine unless downloads are allowed, with reasons and versions.

No hub can be reached here and no FA3 / SageAttention binary exists, so the kernels are fakes
(tests/_hub_kernels.py): pure-Python packages with the real entry points and signatures, laid out on
disk as hub builds (``build/<variant>/metadata.json`` + the package) and as the hub cache
(``kernels--org--name/refs/v1`` + ``snapshots/<commit>/...``). Everything from ``LOCAL_KERNELS`` /
``KERNELS_CACHE`` to the imported module is the real `kernels` code (variant resolution, metadata,
import); the kernel computes with tests/standins in float64. The backends declare ``cuda`` only, so
calls on CPU go through a test-only twin (same NAME, same kernel function and custom op) whose
``KERNEL_BACKEND`` is "cpu" and whose devices include "cpu"; probe tests of the real classes fake a GPU.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnpatch
from attnpatch import registry, router
from attnpatch.backends import HUB, _custom_ops
from attnpatch.backends._hub_common import HubKernelBackend, cuda_arch_supports
from attnpatch.backends.flash_attn3_hub import FlashAttn3HubBackend
from attnpatch.backends.sage_hub import SageHubBackend
from attnpatch.call import Call

import _hub_kernels as fake
from standins import CALLS, fake_versions

kernels = pytest.importorskip("kernels", reason="the hub backends need the kernels package (attnpatch[hub], in [test])")

TESTS = Path(__file__).resolve().parent
CLASSES = {"flash_attn3_hub": FlashAttn3HubBackend, "sage_hub": SageHubBackend}
NAMES = {"flash_attn3_hub": "flash-attn3", "sage_hub": "sage-attention"}
CPU = fake.system_variant("cpu")


# -- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (and kernels.get_kernel, the downloading entry point)."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(kernels, "get_kernel", refuse)


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    """Nothing downloaded: kernels' cache points at an empty folder, LOCAL_KERNELS unset."""
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    monkeypatch.setenv("KERNELS_CACHE", str(cache))
    monkeypatch.setattr("kernels.resolver.CACHE_DIR", str(cache))  # kernels reads it at import
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    monkeypatch.delenv("ATTNPATCH_HUB_DOWNLOAD", raising=False)
    return cache


@pytest.fixture
def hub(monkeypatch, tmp_path, empty_cache, request):
    """hub(name, **build_options) writes a fake build of ``name``'s kernel for this CPU into a local kernel
    repository, points LOCAL_KERNELS at it and registers the CPU twin of the backend."""
    replaced = []

    def use(name, kernel_backend="cpu", devices=("cpu", "cuda"), local=True, **options):
        cls = CLASSES[name]
        variant = fake.system_variant(kernel_backend)
        repo = tmp_path / f"{name}-repo"
        fake.write_repo(repo, NAMES[name], [variant, "torch29-cxx11-cu128-aarch64-linux"],
                        kernel_id=f"{name}_{request.node.name}".replace("[", "_").replace("]", "").replace("-", "_"),
                        **options)
        if local:
            monkeypatch.setenv("LOCAL_KERNELS", f"{cls.REPO_ID}={repo}")
        twin = type(f"Twin{cls.__name__}", (cls,), {"KERNEL_BACKEND": kernel_backend,
                                                   "SUPPORTED_DEVICES": frozenset(devices)})
        replaced.append(registry.get_backend(name))
        backend = registry.register_backend(twin, replace=True)
        CALLS.clear()
        return backend

    yield use
    for original in replaced:
        registry.register_backend(original, replace=True)


def fresh(name, **attrs):
    """A new, unregistered instance of the real class (optionally with class attributes changed)."""
    cls = CLASSES[name]
    if attrs:
        cls = type(f"Test{cls.__name__}", (cls,), attrs)
    return cls()


@pytest.fixture(autouse=True)
def _as_if_cuda_were_there(monkeypatch):
    """The probes under test say themselves when there is no CUDA (test_no_cuda_is_a_reason); the
    registry's generic "no CUDA device" reason (test_third_party_backends) would come first here."""
    monkeypatch.setattr(registry, "_CUDA_AVAILABLE", [True])


def fake_gpu(monkeypatch, cap):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def reference(q, k, v, layout="bnsd", **kw):
    kw = {n: (m.double() if isinstance(m, torch.Tensor) and m.is_floating_point() else m) for n, m in kw.items()}
    return attnpatch.attention_forward(q.double(), k.double(), v.double(), layout=layout, backend="sdpa_math", **kw)


def qkv(b=2, hq=4, hkv=4, sq=16, skv=16, d=64, layout="bnsd", dtype=torch.float16):
    shapes = ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d)) if layout == "bnsd" else \
        ((b, sq, hq, d), (b, skv, hkv, d), (b, skv, hkv, d))
    return tuple(torch.randn(s).to(dtype) for s in shapes)


def _call(**kw):
    base = dict(layout="bnsd", device_type="cuda", device_index=0, capability=(9, 0), dtype=torch.bfloat16,
                batch=2, heads_q=8, heads_kv=8, seq_q=1024, seq_kv=1024, head_dim=128, head_dim_v=128)
    base.update(kw)
    return Call(**base)


# -- declarations -------------------------------------------------------------------------------------

def test_hub_backends_are_registered_declared_and_never_auto():
    assert {cls.NAME for cls in HUB} == set(CLASSES)
    infos = {b.name: b for b in attnpatch.backends()}
    for name, cls in CLASSES.items():
        assert issubclass(cls, HubKernelBackend)
        assert infos[name].package == "kernels" and infos[name].reasons  # never available on this CPU box
        assert cls.AUTO_PRIORITY == {}, "an unmeasured hub binary must not get an auto slot"
        assert cls.REPO_ID and isinstance(cls.REPO_VERSION, int) and cls.REQUIRED_ATTRS
        assert cls.SUPPORTED_DEVICES == frozenset({"cuda"})
        assert name in _custom_ops.OPS
    assert FlashAttn3HubBackend.LOSSY is False and FlashAttn3HubBackend.SUPPORTS_BACKWARD
    assert SageHubBackend.LOSSY is True and not SageHubBackend.SUPPORTS_BACKWARD and SageHubBackend.MIN_SEQ_KV == 256
    # the repositories and versions diffusers 0.42.1 loads for _flash_3_hub and sage_hub
    assert (FlashAttn3HubBackend.REPO_ID, FlashAttn3HubBackend.REPO_VERSION) == ("kernels-community/flash-attn3", 1)
    assert (SageHubBackend.REPO_ID, SageHubBackend.REPO_VERSION) == ("SageAttention/sage-attention", 3)


def test_auto_never_picks_a_hub_backend_even_when_it_is_loaded(hub):
    hub("flash_attn3_hub")
    assert registry.get_backend("flash_attn3_hub").available
    assert "flash_attn3_hub" not in [b.NAME for b in router._auto_candidates(_call(device_type="cpu", capability=None))]
    q, k, v = qkv()
    attnpatch.attention_forward(q, k, v)
    assert "flash_attn3_hub" not in attnpatch.stats().calls


# -- reasons ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLASSES))
def test_kernels_missing_names_the_extra(monkeypatch, name):
    fake_versions(monkeypatch, {"kernels": None})
    assert fresh(name).availability() == ["package kernels is not installed (pip install 'attnpatch[hub]')"]


def test_kernels_too_old(monkeypatch):
    fake_versions(monkeypatch, {"kernels": "0.14.0"})
    assert fresh("flash_attn3_hub").availability() == ["kernels 0.14.0 is older than the minimum 0.17.0"]


def test_no_cuda_is_a_reason(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "built without CUDA" in fresh("flash_attn3_hub").availability()[0]
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in fresh("sage_hub").availability()[0]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_not_downloaded_and_downloads_off_names_the_fixes_without_network(name, empty_cache, no_network):
    b = fresh(name, KERNEL_BACKEND="cpu")
    reasons = b.availability()
    assert len(reasons) == 1, reasons
    r = reasons[0]
    assert f"{CLASSES[name].REPO_ID} (version {CLASSES[name].REPO_VERSION}) is not on this machine" in r
    assert str(empty_cache) in r
    assert "ATTNPATCH_HUB_DOWNLOAD=1" in r and f"get_backend({name!r}).download()" in r and "LOCAL_KERNELS=" in r
    assert b.version() == kernels.__version__ and b.origin == {}


def test_bad_download_variable_names_it(monkeypatch, empty_cache, no_network):
    monkeypatch.setenv("ATTNPATCH_HUB_DOWNLOAD", "maybe")
    reasons = fresh("flash_attn3_hub", KERNEL_BACKEND="cpu").availability()
    assert reasons and "ATTNPATCH_HUB_DOWNLOAD='maybe' is not a boolean" in reasons[0]


def test_load_failure_carries_the_message(hub):
    b = hub("flash_attn3_hub", broken="libcudart.so.13: cannot open shared object file")
    r = b.availability()
    assert len(r) == 1 and "did not load: ImportError: libcudart.so.13: cannot open shared object file" in r[0]
    assert "LOCAL_KERNELS" in r[0]


def test_missing_entry_point(hub):
    b = hub("flash_attn3_hub", drop=("flash_attn_varlen_func",))
    assert b.availability() == ["the kernel loaded from kernels-community/flash-attn3 (LOCAL_KERNELS) has no "
                                "flash_attn_varlen_func; this backend needs a build that provides it"]


def test_kernel_dependencies_are_not_fetched_without_the_opt_in(hub, no_network):
    b = hub("sage_hub", depends=("kernels-community/some-dependency",))
    r = b.availability()
    assert len(r) == 1 and "depends on other hub kernels (kernels-community/some-dependency)" in r[0]
    assert "ATTNPATCH_HUB_DOWNLOAD=1" in r[0]


def test_bad_metadata_is_a_reason(hub, tmp_path):
    b = hub("flash_attn3_hub")
    (tmp_path / "flash_attn3_hub-repo" / "build" / CPU / "metadata.json").write_text("{not json")
    r = b.availability()
    assert len(r) == 1 and "metadata.json does not parse" in r[0]


# -- loading: LOCAL_KERNELS, the cache, a download --------------------------------------------------------

def test_local_kernels_loads_through_kernels_with_version_and_origin(hub, no_network):
    b = hub("flash_attn3_hub")
    assert b.availability() == []
    assert b.version() == "kernels-community/flash-attn3@local"
    o = b.origin
    assert o["source"] == "LOCAL_KERNELS" and o["variant"] == CPU and o["kernels"] == kernels.__version__
    assert o["path"].endswith(f"build/{CPU}")  # kernels picked this system's variant, not the aarch64 one
    loaded = [lk for lk in kernels.get_loaded_kernels() if lk.module is b.kernel_module()]
    assert loaded and str(loaded[0].metadata.name) == "flash-attn3"
    info = {i.name: i for i in attnpatch.backends()}["flash_attn3_hub"]
    assert info.available and info.version == "kernels-community/flash-attn3@local"


CACHE_SCRIPT = """
import sys, json
sys.path[:0] = [{tests!r}, {tests_standins!r}]
import _hub_kernels as fake
exec(fake.socket_guard_source())
import torch, attnpatch
from attnpatch import registry
from attnpatch.backends.{module} import {cls}
twin = type("Twin", ({cls},), {{"KERNEL_BACKEND": "cpu", "SUPPORTED_DEVICES": frozenset({{"cpu", "cuda"}})}})
b = registry.register_backend(twin, replace=True)
print("REASONS", json.dumps(b.availability()))
print("VERSION", b.version())
print("ORIGIN", json.dumps(b.origin))
torch.manual_seed(0)
q, k, v = (torch.randn(1, 300, 2, 64).half() for _ in range(3))
out = attnpatch.attention_forward(q, k, v, layout="bsnd", backend={name!r})
ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).double() for t in (q, k, v))).transpose(1, 2)
print("ERR", float((out.double() - ref).abs().max()))
print("CALLS", json.dumps(attnpatch.stats().calls))
"""


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_cache_loads_in_a_fresh_process_without_network(name, tmp_path):
    """The hub cache as kernels' downloads leave it, found through KERNELS_CACHE set before the process
    starts (kernels reads it at import), with every socket connection refused."""
    cls = CLASSES[name]
    commit = "feedfacecafe0000000000000000000000000000"[:40]
    fake.write_cache(tmp_path / "cache", cls.REPO_ID, NAMES[name], cls.REPO_VERSION,
                     [CPU, "torch29-cxx11-cu128-x86_64-linux"], commit=commit, kernel_id=f"cache_{name}")
    script = CACHE_SCRIPT.format(tests=str(TESTS), tests_standins=str(TESTS), module=name,
                                 cls=cls.__name__, name=name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTNPATCH_", "LOCAL_KERNELS", "HF_"))}
    env["KERNELS_CACHE"] = str(tmp_path / "cache")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines() if " " in line)
    import json
    assert json.loads(out["REASONS"]) == []
    assert out["VERSION"] == f"{cls.REPO_ID}@{commit[:12]}"
    origin = json.loads(out["ORIGIN"])
    assert origin["source"] == "cache" and origin["revision"] == commit and origin["variant"] == CPU
    assert f"snapshots/{commit}/build/{CPU}" in origin["path"]
    assert float(out["ERR"]) < 1e-2
    assert json.loads(out["CALLS"]) == {name: 1}


def _fake_download(monkeypatch, tmp_path, name, calls):
    """kernels.get_kernel replaced by a recorder that 'downloads' by loading a fake build with kernels."""
    repo = fake.write_repo(tmp_path / "downloaded", NAMES[name], [CPU], kernel_id=f"dl_{name}_{len(calls)}")

    def get_kernel(repo_id, **kw):
        calls.append((repo_id, kw))
        return kernels.get_local_kernel(repo, backend=kw.get("backend"))

    monkeypatch.setattr(kernels, "get_kernel", get_kernel)


def test_download_only_with_the_environment_opt_in(monkeypatch, tmp_path, hub):
    b = hub("flash_attn3_hub", local=False)
    calls = []
    _fake_download(monkeypatch, tmp_path, "flash_attn3_hub", calls)
    assert b.availability() and calls == []  # off by default: nothing fetched
    monkeypatch.setenv("ATTNPATCH_HUB_DOWNLOAD", "1")
    b.reset_probe()
    assert b.availability() == []
    assert calls == [("kernels-community/flash-attn3", {"version": 1, "backend": "cpu",
                                                        "user_agent": {"attnpatch": calls[0][1]["user_agent"]["attnpatch"]}})]
    assert b.origin["source"] == "download"


def test_explicit_download_call_makes_routing_use_it(monkeypatch, tmp_path, hub):
    b = hub("flash_attn3_hub", local=False)
    calls = []
    _fake_download(monkeypatch, tmp_path, "flash_attn3_hub", calls)
    q, k, v = qkv()
    attnpatch.attention_forward(q, k, v, backend="flash_attn3_hub")  # not there yet: falls back, with the reason
    fb = attnpatch.stats().fallbacks
    assert fb and all(refused == "flash_attn3_hub" and "downloads are off" in why for refused, _, why in fb)
    assert b.download() == [] and len(calls) == 1
    attnpatch.stats(reset=True)
    out = attnpatch.attention_forward(q, k, v, backend="flash_attn3_hub")
    assert attnpatch.stats().calls == {"flash_attn3_hub": 1}  # the cached fallback decision was dropped
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=2e-3, rtol=2e-3)


# -- arch rules (the real classes, a faked GPU, a CUDA build variant for this torch) -----------------------

needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="kernels resolves CUDA variants only on a CUDA build of torch")


@needs_cuda_torch
def test_build_archs_from_metadata_refuse_other_gpus(hub, monkeypatch):
    b = hub("flash_attn3_hub", kernel_backend="cuda", devices=("cuda",), backend_type="cuda", archs=["9.0a"])
    fake_gpu(monkeypatch, (8, 6))
    r = b.availability()
    assert r == ["GPU sm86 is not among the archs of the loaded kernels-community/flash-attn3 build (9.0a)"]
    b.reset_probe()
    fake_gpu(monkeypatch, (9, 0))
    assert b.availability() == [] and b.origin["archs"] == ("9.0a",)
    assert b.not_supported_reasons(_call(capability=(8, 0))) == \
        ["GPU sm80 is not among the archs of the loaded kernels-community/flash-attn3 build (9.0a)"]
    assert b.not_supported_reasons(_call(capability=(9, 0))) == []


@needs_cuda_torch
def test_declared_arch_rules(hub, monkeypatch):
    fake_gpu(monkeypatch, (10, 0))
    b = hub("flash_attn3_hub", kernel_backend="cuda", devices=("cuda",), backend_type="cuda")
    assert b.availability() == ["GPU sm100 is outside kernels-community/flash-attn3's range sm80 to sm90 "
                                f"({FlashAttn3HubBackend.ARCH_NOTE})"]
    fake_gpu(monkeypatch, (8, 6))
    s = hub("sage_hub", kernel_backend="cuda", devices=("cuda",), backend_type="cuda")
    r = s.availability()
    assert len(r) == 1 and r[0].startswith("GPU sm86 is not supported by SageAttention/sage-attention "
                                           "(supported: sm80, sm89, sm90, sm120)")


@needs_cuda_torch
def test_sage_build_without_the_kernels_of_this_gpu(hub, monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    s = hub("sage_hub", kernel_backend="cuda", devices=("cuda",), backend_type="cuda", built=False)
    assert s.availability() == ["the SageAttention/sage-attention build loaded without its kernels for sm90 "
                                "(core.SM90_ENABLED is False)"]


@pytest.mark.parametrize("arch,cap,ok", [("8.0", (8, 0), True), ("8.0", (8, 6), True), ("8.0", (9, 0), False),
                                         ("9.0a", (9, 0), True), ("9.0a", (10, 0), False), ("10.0f", (10, 3), True),
                                         ("8.0+PTX", (12, 0), True), ("sm_90", (9, 0), None)])
def test_cuda_arch_strings(arch, cap, ok):
    assert cuda_arch_supports(arch, cap) is ok


# -- running the loaded kernel --------------------------------------------------------------------------

FA_CASES = {
    "plain": dict(),
    "bsnd": dict(layout="bsnd"),
    "scale": dict(scale=0.3),
    "causal_kv_longer": dict(is_causal=True, sq=6, skv=16),
    "causal_q_longer": dict(is_causal=True, sq=16, skv=6),
    "gqa_bsnd": dict(hq=8, hkv=2, layout="bsnd"),
    "key_padding": dict(mask=True, b=3),
}


@pytest.mark.parametrize("case", list(FA_CASES))
def test_flash_attn3_hub_runs_flash_attn3s_translation(hub, case):
    hub("flash_attn3_hub")
    c = dict(FA_CASES[case])
    layout = c.pop("layout", "bnsd")
    mask = c.pop("mask", False)
    kw = {n: c.pop(n) for n in ("scale", "is_causal") if n in c}
    q, k, v = qkv(layout=layout, **c)
    if mask:
        m = torch.ones(q.shape[0], k.shape[2 if layout == "bnsd" else 1], dtype=torch.bool)
        m[0, :3] = False
        m[1, 5:9] = False
        m[2] = False
        kw["attn_mask"] = m
    out = attnpatch.attention_forward(q, k, v, layout=layout, backend="flash_attn3_hub", **kw)
    assert attnpatch.stats().calls == {"flash_attn3_hub": 1}
    torch.testing.assert_close(out.double(), reference(q, k, v, layout=layout, **kw), atol=2e-3, rtol=2e-3)
    assert CALLS[-1][0] == ("flash_attn_varlen_func" if mask else "flash_attn_func")
    if case == "causal_q_longer":  # 16 queries, 6 keys: a square causal call, then the rest unmasked
        assert CALLS[-2][1]["causal"] is True
        assert CALLS[-1][1]["window_size"] == (-1, -1) and CALLS[-1][1]["causal"] is False


@pytest.mark.parametrize("case", [dict(), dict(layout="bsnd", scale=0.1, sq=260, skv=280), dict(hq=4, hkv=2),
                                  dict(is_causal=True)], ids=["plain", "bsnd_scale", "gqa", "causal"])
def test_sage_hub_runs_sageattn_without_touching_the_keys(hub, case):
    hub("sage_hub")
    c = {**dict(b=1, hq=2, hkv=2, sq=300, skv=300), **case}
    layout = c.pop("layout", "bnsd")
    kw = {n: c.pop(n) for n in ("scale", "is_causal") if n in c}
    q, k, v = qkv(layout=layout, **c)
    k0 = k.clone()
    out = attnpatch.attention_forward(q, k, v, layout=layout, backend="sage_hub", **kw)
    assert attnpatch.stats().calls == {"sage_hub": 1}
    torch.testing.assert_close(out.double(), reference(q, k, v, layout=layout, **kw), atol=2e-3, rtol=2e-3)
    assert torch.equal(k, k0)
    fn, args = CALLS[-1]
    assert fn == "sageattn" and args["tensor_layout"] == "HND" and args["is_causal"] == kw.get("is_causal", False)


def test_sage_hub_refuses_what_sage_refuses(hub):
    b = hub("sage_hub", devices=("cuda",))
    assert any("seq_kv=200 is below 256" in r for r in b.not_supported_reasons(_call(seq_q=200, seq_kv=200)))
    assert any("forward-only" in r for r in b.not_supported_reasons(_call(needs_grad=True)))
    assert any("mask kind bool" in r for r in b.not_supported_reasons(
        _call(mask_kind="bool", mask_shape=(2, 1, 1, 1024), key_padding=True)))


def test_compile_fullgraph_through_the_hub_custom_op(hub):
    hub("flash_attn3_hub")
    torch._dynamo.reset()
    q, k, v = qkv(2, 4, 4, 64, 64, layout="bsnd")

    def f(q, k, v):
        return attnpatch.attention_forward(q, k, v, layout="bsnd", backend="flash_attn3_hub") * 2

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out.double(), 2 * reference(q, k, v, layout="bsnd"), atol=4e-3, rtol=4e-3)
    assert "flash_attn3_hub" in router.compiled_decisions_of(None)


def test_gradients_through_the_loaded_kernel(hub):
    hub("flash_attn3_hub")
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 8, 8, d=16))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    grad = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    attnpatch.attention_forward(q, k, v, backend="flash_attn3_hub", is_causal=True).backward(grad.half())
    attnpatch.attention_forward(*ref_in, backend="sdpa_math", is_causal=True).backward(grad)
    assert attnpatch.stats().calls.get("flash_attn3_hub") == 1
    for got, want in zip((q, k, v), ref_in):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-2, rtol=1e-2)


# -- what users see --------------------------------------------------------------------------------------

def test_attnpatch_info_lists_them_with_reasons(capsys, empty_cache):
    from attnpatch import cli

    for cls in HUB:
        registry.get_backend(cls.NAME).reset_probe()
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in CLASSES:
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert " no " in line and ("CUDA" in line or "kernels" in line), line


def test_fake_entry_points_match_the_real_signatures(hub):
    """The fakes keep the parameter lists of the real kernels (kernels-community flash-attn3
    flash_attn_interface.py at 5f632e25, sage-attention core.py at 18ac39f2)."""
    fa = hub("flash_attn3_hub").kernel_module()
    assert list(inspect.signature(fa.flash_attn_func).parameters) == [
        "q", "k", "v", "softmax_scale", "causal", "qv", "q_descale", "k_descale", "v_descale", "window_size",
        "attention_chunk", "softcap", "num_splits", "pack_gqa", "deterministic", "sm_margin", "return_attn_probs"]
    assert list(inspect.signature(fa.flash_attn_varlen_func).parameters) == [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "seqused_q", "seqused_k",
        "softmax_scale", "causal", "qv", "q_descale", "k_descale", "v_descale", "window_size", "attention_chunk",
        "softcap", "num_splits", "pack_gqa", "deterministic", "sm_margin", "return_attn_probs"]
    sage = hub("sage_hub").kernel_module()
    assert list(inspect.signature(sage.sageattn).parameters) == [
        "q", "k", "v", "tensor_layout", "is_causal", "sm_scale", "return_lse", "kwargs"]
