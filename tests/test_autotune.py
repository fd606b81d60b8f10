"""Measured auto (attnpatch.autotune) on CPU, with an injected fake timer: the choice, caching in memory
and on disk, length buckets, compile/capture behaviour, corrupt and stale cache files, concurrent
writers, ATTNPATCH_AUTOTUNE=0 and clear_cache(). No test depends on real timings."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attnpatch
from attnpatch import autotune, controls, router
from attnpatch.call import build_call

# CPU auto candidates in static order: sdpa (10), sdpa_flash (20), sdpa_math (30), eager (90).


class FakeTimer:
    """Returns fixed ms per backend name; counts what it was asked to time. A value that is an
    exception instance is raised."""

    def __init__(self, times, default=5.0):
        self.times = dict(times)
        self.default = default
        self.asked = []

    def __call__(self, backend, call):
        self.asked.append((backend.NAME, call.seq_q))
        t = self.times.get(backend.NAME, self.default)
        if isinstance(t, BaseException):
            raise t
        return t


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_CACHE_DIR", str(tmp_path / "cache"))
    # eager and sdpa_math declare AUTOTUNE_TIMED = False (never worth timing on a GPU); these tests
    # exercise the machinery with all four CPU candidates, so they are timed here.
    for name in ("eager", "sdpa_math"):
        monkeypatch.setattr(attnpatch.registry.get_backend(name), "AUTOTUNE_TIMED", True)
    autotune.reset_memory()
    router.clear_cache()
    yield
    autotune.reset_memory()
    router.clear_cache()


def qkv(seq=64, b=1, h=2, d=16, dtype=torch.float32):
    return tuple(torch.randn(b, h, seq, d, dtype=dtype) for _ in range(3))


def cpu_call(seq=64, **kw):
    q, k, v = qkv(seq, **kw)
    call, _ = build_call(q, k, v, "bnsd", None, False, None, 0.0, False)
    return call


def eligible_for(call):
    env = controls.env_settings()
    reasons = {}
    out = []
    for b in router._auto_candidates(call):
        r = router._reasons_for(b, call, env)
        reasons[b.NAME] = r
        if not r and not b.LOSSY:
            out.append(b)
    return out


def read_file():
    return json.loads(autotune.cache_path().read_text())


def entries_on_disk():
    return {(m, s): e for m, sec in read_file()["machines"].items() for s, e in sec["entries"].items()}


# -- the choice ---------------------------------------------------------------------------------------

def test_router_takes_the_fastest_measured_backend_and_says_so():
    fake = FakeTimer({"sdpa": 3.0, "sdpa_flash": 1.0, "sdpa_math": 2.0})
    q, k, v = qkv()
    with autotune.override_timer(fake):
        out = attnpatch.attention_forward(q, k, v)
        e = attnpatch.explain(q, k, v)
    assert attnpatch.stats().calls == {"sdpa_flash": 1}
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert e.backend == "sdpa_flash"
    assert e.source.startswith("auto (measured 20"), e.source
    assert "measured" in str(e)
    # The four CPU candidates were each timed once (explain reused the measurement).
    assert sorted(n for n, _ in fake.asked) == ["eager", "sdpa", "sdpa_flash", "sdpa_math"]


def test_ties_within_margin_go_to_the_static_order():
    fake = FakeTimer({"sdpa": 1.005, "sdpa_flash": 1.0})
    with autotune.override_timer(fake):
        backend, how = autotune.choose(cpu_call(), eligible_for(cpu_call()))
    assert backend.NAME == "sdpa"
    assert how.startswith("measured")


def test_only_the_first_max_timed_candidates_are_timed(monkeypatch):
    monkeypatch.setattr(autotune, "MAX_TIMED", 2)
    fake = FakeTimer({"sdpa": 2.0, "sdpa_flash": 1.0, "sdpa_math": 0.1, "eager": 0.1})
    with autotune.override_timer(fake):
        backend, _ = autotune.choose(cpu_call(), eligible_for(cpu_call()))
    assert backend.NAME == "sdpa_flash"
    assert sorted(n for n, _ in fake.asked) == ["sdpa", "sdpa_flash"]


def test_the_stock_backend_is_timed_even_past_max_timed(monkeypatch):
    """torch's own dispatch (what runs without attnpatch) is always a candidate: with more kernels
    installed ahead of it in the static order, auto must still see it when it is the fastest."""
    monkeypatch.setattr(autotune, "MAX_TIMED", 2)
    monkeypatch.setattr(autotune, "STOCK_BACKEND", "sdpa_math")  # on the CPU, third in the static order
    fake = FakeTimer({"sdpa": 2.0, "sdpa_flash": 1.0, "sdpa_math": 0.5, "eager": 0.1})
    with autotune.override_timer(fake):
        backend, _ = autotune.choose(cpu_call(), eligible_for(cpu_call()))
    assert backend.NAME == "sdpa_math"
    assert sorted(n for n, _ in fake.asked) == ["sdpa", "sdpa_flash", "sdpa_math"]


def test_a_backend_declaring_autotune_timed_false_is_not_timed(monkeypatch):
    flash = attnpatch.registry.get_backend("sdpa_flash")
    monkeypatch.setattr(flash, "AUTOTUNE_TIMED", False, raising=False)
    fake = FakeTimer({"sdpa_flash": 0.1, "sdpa": 2.0, "sdpa_math": 1.0})
    with autotune.override_timer(fake):
        backend, _ = autotune.choose(cpu_call(), eligible_for(cpu_call()))
    assert "sdpa_flash" not in [n for n, _ in fake.asked]
    assert backend.NAME == "sdpa_math"


def test_a_candidate_that_raises_is_dropped_with_a_logged_reason(caplog):
    fake = FakeTimer({"sdpa": RuntimeError("kernel exploded"), "sdpa_flash": 2.0, "sdpa_math": 1.5})
    with caplog.at_level(logging.WARNING, logger="attnpatch"), autotune.override_timer(fake):
        backend, _ = autotune.choose(cpu_call(), eligible_for(cpu_call()))
    assert backend.NAME == "sdpa_math"
    assert any("dropped 'sdpa'" in r.getMessage() and "kernel exploded" in r.getMessage() for r in caplog.records)
    (entry,) = entries_on_disk().values()
    assert entry["failed"]["sdpa"].startswith("RuntimeError: kernel exploded")
    assert "sdpa" not in entry["times_ms"]


def test_every_candidate_failing_leaves_the_static_table():
    fake = FakeTimer({}, default=RuntimeError("no"))
    q, k, v = qkv()
    with autotune.override_timer(fake):
        attnpatch.attention_forward(q, k, v)
        e = attnpatch.explain(q, k, v)
    assert attnpatch.stats().calls == {"sdpa": 1}
    assert e.source == "auto (static table)"


def test_a_single_eligible_backend_is_never_timed():
    fake = FakeTimer({})
    with autotune.override_timer(fake):
        assert autotune.choose(cpu_call(), eligible_for(cpu_call())[:1]) is None
    assert fake.asked == []


def test_the_real_measure_function_runs_each_runner_on_cpu():
    # Not a speed test: it only checks that the timing machinery runs kernels and returns a time.
    call = cpu_call(seq=32)
    for b in eligible_for(call):
        ms = autotune.measure(b, call)
        assert ms > 0 and ms == ms
    q, k, v = qkv(seq=32)
    with autotune.override_timer(autotune.measure, devices=("cpu",)):
        out = attnpatch.attention_forward(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert len(entries_on_disk()) == 1


class _SimulatedGPU:
    """A host clock and a GPU queue (ms): a launch costs the host ``host_ms`` (plus ``hiccups[i]`` on
    call i) and then queues ``gpu_ms`` of kernel; ``hold`` queues GPU work at no host cost; an event
    completes when the GPU reaches it."""

    def __init__(self, host_ms, gpu_ms, hiccups=None):
        self.host_ms, self.gpu_ms, self.hiccups = host_ms, gpu_ms, hiccups or {}
        self.host = self.gpu = 0.0
        self.calls = self.syncs = 0

    def launch(self):
        self.host += self.host_ms + self.hiccups.get(self.calls, 0.0)
        self.calls += 1
        self.gpu = max(self.gpu, self.host) + self.gpu_ms

    def hold(self, ms):
        self.gpu = max(self.gpu, self.host) + ms

    def event(self):
        sim = self

        class Event:
            def record(self):
                self.t = max(sim.gpu, sim.host)

            def synchronize(self):
                sim.syncs += 1
                sim.host = max(sim.host, self.t)

            def elapsed_time(self, other):
                return other.t - self.t

        return Event()


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def test_cuda_samples_run_in_one_stream_so_a_host_hiccup_is_not_timed():
    """FlashAttention 3 at HunyuanVideo's key-padding shape (H200, 2026-11-30): 0.21-0.38 ms of host per call
    against 0.42 ms of kernel. Timed one synchronised sample at a time behind a single queued call, a
    host stall longer than that call read as kernel time (3 of 20 timings 0.55-0.62 ms, once losing to
    cuDNN's 0.61). In one stream behind a GPU-side lead, the host's lead grows from call to call and
    absorbs it."""
    hiccups = {2 * k + 1: 0.5 for k in range(9) if k % 3}  # a burst: 0.5 ms stalls on 6 of the first 18 launches
    sim = _SimulatedGPU(0.23, 0.42, hiccups)
    times = autotune._stream_ms(sim.launch, 9, 1, 0.65, sim.hold, sim.event)
    assert len(times) == 9 and sim.calls == 9 and sim.syncs == 1
    assert abs(_median(times) - 0.42) < 0.01, times
    # without the stream (a synchronised sample behind one queued call, the earlier method) the same host
    # reads slow on most samples: the case the stream is for
    sim = _SimulatedGPU(0.23, 0.42, hiccups)

    def old_sample():
        sim.launch()  # the queued call
        return autotune._stream_ms(sim.launch, 1, 1, 0.0, sim.hold, sim.event)[0]

    assert _median([old_sample() for _ in range(9)]) > 0.5


def test_a_slow_stretch_of_the_host_is_absorbed_by_the_gpu_side_lead():
    """Near host-bound: the host launches the first 6 calls in 0.50 ms each (a slow stretch), then 0.36,
    against 0.42 ms of kernel. The lead (one first estimate, 0.65 ms) covers the stretch's 0.48 ms
    deficit; without it the stretch reads as kernel time on most samples."""
    hiccups = {i: 0.14 for i in range(6)}
    sim = _SimulatedGPU(0.36, 0.42, hiccups)
    assert abs(_median(autotune._stream_ms(sim.launch, 9, 1, 0.65, sim.hold, sim.event)) - 0.42) < 0.01
    sim = _SimulatedGPU(0.36, 0.42, hiccups)
    assert _median(autotune._stream_ms(sim.launch, 9, 1, 0.0, sim.hold, sim.event)) > 0.45


def test_a_host_bound_call_measures_its_launch_cost():
    """Decoding: 0.03 ms of launch per call against 0.01 ms of kernel; the lead (one first estimate) is
    spent within a few calls, and the samples read the launch cost, which is what such a call costs."""
    sim = _SimulatedGPU(0.03, 0.01)
    times = autotune._stream_ms(sim.launch, 9, 8, 0.04, sim.hold, sim.event)
    assert abs(_median(times) - 0.03) < 0.002, times


def test_a_torch_without_its_spin_kernel_times_without_a_lead(monkeypatch, caplog):
    monkeypatch.delattr(torch.cuda, "_sleep", raising=False)
    monkeypatch.setattr(autotune, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="attnpatch"):
        assert autotune._hold_gpu(torch.device("cuda", 0), 1.0) is None
        autotune._hold_gpu(torch.device("cuda", 0), 1.0)
    assert [r.getMessage() for r in caplog.records].count(
        f"attnpatch: torch.cuda._sleep is missing in torch {torch.__version__}; autotune times short calls "
        "without a GPU-side lead") == 1


def test_measure_leaves_the_global_rng_alone():
    call = cpu_call(seq=16)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    autotune.measure(attnpatch.registry.get_backend("sdpa"), call)
    assert torch.equal(torch.rand(3), expected)


def test_measure_times_backward_when_the_call_needs_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(seq=16))
    call, _ = build_call(q, k, v, "bnsd", None, False, None, 0.0, True)
    seen = []
    sdpa = attnpatch.registry.get_backend("sdpa")

    class Spy:
        NAME = "spy"
        NATIVE_LAYOUT = "bnsd"

        def build(self, c):
            run = sdpa.build(c)

            def spy(q, k, v, m, causal, s, p):
                seen.append(q.requires_grad)
                return run(q, k, v, m, causal, s, p)
            return spy

    assert autotune.measure(Spy(), call) > 0
    assert seen and all(seen)


# -- caching ----------------------------------------------------------------------------------------

def test_choice_is_cached_in_memory_and_on_disk():
    fake = FakeTimer({"sdpa_math": 1.0})
    call = cpu_call()
    with autotune.override_timer(fake):
        first = autotune.choose(call, eligible_for(call))
        n = len(fake.asked)
        second = autotune.choose(call, eligible_for(call))
    assert first[0].NAME == second[0].NAME == "sdpa_math"
    assert len(fake.asked) == n == 4  # the second choice timed nothing
    data = read_file()
    assert data["format"] == autotune.FILE_FORMAT and data["version"] == autotune.FILE_VERSION
    (entry,) = entries_on_disk().values()
    assert entry["backend"] == "sdpa_math"
    assert entry["times_ms"]["sdpa_math"] == 1.0
    assert entry["versions"]["sdpa"] == torch.__version__
    # A new process (simulated: memory forgotten) reads the file, times nothing, and says "cached".
    autotune.reset_memory()
    fresh = FakeTimer({"sdpa": 0.5})
    with autotune.override_timer(fresh):
        backend, how = autotune.choose(call, eligible_for(call))
    assert backend.NAME == "sdpa_math" and how.startswith("cached ")
    assert fresh.asked == []


def test_bucket_separation_4096_vs_197():
    fake = FakeTimer({"sdpa_flash": 1.0})
    c4096, c4000, c197 = cpu_call(4096, h=1, d=8), cpu_call(4500, h=1, d=8), cpu_call(197, h=1, d=8)
    assert autotune.signature_key(c4096) == autotune.signature_key(c4000)
    assert autotune.signature_key(c4096) != autotune.signature_key(c197)
    with autotune.override_timer(fake):
        assert autotune.choose(c4096, eligible_for(c4096))[0].NAME == "sdpa_flash"
        fake.times = {"sdpa_math": 1.0}
        assert autotune.choose(c4000, eligible_for(c4000))[0].NAME == "sdpa_flash"  # same bucket: reused
        assert autotune.choose(c197, eligible_for(c197))[0].NAME == "sdpa_math"  # 197 measured on its own
    assert {s for _, s in fake.asked} == {4096, 197}
    assert len(entries_on_disk()) == 2


def test_explain_shows_static_table_when_autotune_is_off(monkeypatch):
    monkeypatch.setenv("ATTNPATCH_AUTOTUNE", "0")
    controls.reload_env()
    fake = FakeTimer({"sdpa_math": 0.1})
    q, k, v = qkv()
    with autotune.override_timer(fake):
        attnpatch.attention_forward(q, k, v)
        e = attnpatch.explain(q, k, v)
    assert fake.asked == []
    assert attnpatch.stats().calls == {"sdpa": 1}
    assert e.source == "auto (static table)"
    assert not autotune.cache_path().exists()


def test_cpu_without_an_injected_timer_keeps_the_static_table():
    q, k, v = qkv()
    attnpatch.attention_forward(q, k, v)
    assert attnpatch.explain(q, k, v).source == "auto (static table)"
    assert not autotune.cache_path().exists()


# -- compile and capture: never time ---------------------------------------------------------------------

def test_compiling_call_is_never_timed_and_uses_the_cache():
    call = cpu_call()
    compiling = build_call(*qkv(), "bnsd", None, False, None, 0.0, False, compiling=True)[0]
    fake = FakeTimer({"sdpa_flash": 1.0})
    with autotune.override_timer(fake):
        backend, how = autotune.choose(compiling, eligible_for(call))
        assert fake.asked == []
        assert backend.NAME == "sdpa" and "not measured during torch.compile" in how
        autotune.choose(call, eligible_for(call))  # eager: measures
        n = len(fake.asked)
        backend, how = autotune.choose(compiling, eligible_for(call))
    assert len(fake.asked) == n
    assert backend.NAME == "sdpa_flash" and how.startswith("measured")


def test_torch_compile_trace_does_not_time():
    fake = FakeTimer({"sdpa_flash": 1.0})
    q, k, v = qkv(seq=24)

    def f(q, k, v):
        return attnpatch.attention_forward(q, k, v) * 2

    torch._dynamo.reset()
    with autotune.override_timer(fake):
        out = torch.compile(f, backend="eager", fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    assert fake.asked == []
    torch.testing.assert_close(out, 2 * torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert ("sdpa" in set(router.compiled_decisions_of(None)))


def test_cuda_graph_capture_is_never_timed(monkeypatch):
    # A CUDA call is simulated by a Call with device_type "cuda"; capture is reported by torch.
    # (8, 0): a card with no shipped decision table, so the measurement machinery is what decides
    cuda_call = cpu_call().__class__(**{**cpu_call().__dict__, "device_type": "cuda", "capability": (8, 0)})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(autotune, "machine_info", lambda call: {"device": "cuda", "gpu": "Fake GPU", "torch": "x"})
    fake = FakeTimer({"sdpa_flash": 1.0})
    cands = eligible_for(cpu_call())
    with autotune.override_timer(fake, devices=("cuda",)):
        backend, how = autotune.choose(cuda_call, cands)
        assert fake.asked == [] and backend.NAME == "sdpa" and "CUDA graph capture" in how
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        assert autotune.choose(cuda_call, cands)[0].NAME == "sdpa_flash"
        n = len(fake.asked)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert autotune.choose(cuda_call, cands)[0].NAME == "sdpa_flash"  # cached measurement is used
    assert len(fake.asked) == n == 4


# -- a hostile, corrupt or stale file ------------------------------------------------------------------

def _write(text):
    p = autotune.cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _entry(times, versions=None, backend=None, failed=None):
    versions = versions or {n: torch.__version__ for n in ("sdpa", "sdpa_flash", "sdpa_math", "eager")}
    return {"backend": backend or min(times, key=times.get), "times_ms": times, "failed": failed or {},
            "versions": versions, "measured": "2026-01-01T00:00:00Z", "method": autotune.TIMING_METHOD}


def _file_with(entry, call, machine=None):
    machine = machine or autotune.machine_info(call)
    return json.dumps({"format": autotune.FILE_FORMAT, "version": autotune.FILE_VERSION, "machines": {
        autotune.machine_key(machine): {"machine": machine, "updated": "", "entries": {
            autotune.signature_key(call): entry}}}})


@pytest.mark.parametrize("text", [
    "{not json", "", "[]", '{"format": "something else"}',
    json.dumps({"format": "attnpatch-autotune", "version": 999, "machines": {}}),
    json.dumps({"format": "attnpatch-autotune", "version": 1, "machines": []}),
    "\x00\x01binary",
])
def test_corrupt_or_foreign_file_is_ignored_with_a_warning_and_never_overwritten(text, caplog):
    _write(text)
    fake = FakeTimer({"sdpa_math": 1.0})
    call = cpu_call()
    with caplog.at_level(logging.WARNING, logger="attnpatch"), autotune.override_timer(fake):
        backend, how = autotune.choose(call, eligible_for(call))
        again, how2 = autotune.choose(call, eligible_for(call))
    assert backend.NAME == again.NAME == "sdpa_math" and how.startswith("measured")
    assert len(fake.asked) == 4  # the choice is kept in memory: measured once
    assert any("not using the autotune cache" in r.getMessage() for r in caplog.records)
    assert any("not writing the autotune cache" in r.getMessage() for r in caplog.records)
    assert autotune.cache_path().read_text() == text  # the file it could not read is left as it was


@pytest.mark.parametrize("bad", [
    {"times_ms": "fast"},
    {"times_ms": {"sdpa": "1.0"}},
    {"times_ms": {"sdpa": -1.0}},
    {"times_ms": {"sdpa": float("nan")}},
    {"times_ms": {"sdpa": True}},
    {"times_ms": {}, "failed": {}},
    {"versions": None},
    "a string",
])
def test_entries_of_the_wrong_type_are_ignored(bad, caplog):
    call = cpu_call()
    entry = _entry({"sdpa_math": 0.1, "sdpa": 1.0, "sdpa_flash": 1.0, "eager": 1.0})
    entry = {**entry, **bad} if isinstance(bad, dict) else bad
    _write(_file_with(entry, call).replace("NaN", "NaN"))
    fake = FakeTimer({"sdpa_flash": 1.0})
    with caplog.at_level(logging.WARNING, logger="attnpatch"), autotune.override_timer(fake):
        backend, how = autotune.choose(call, eligible_for(call))
    assert backend.NAME == "sdpa_flash" and how.startswith("measured")
    assert any("malformed" in r.getMessage() for r in caplog.records)


def test_a_valid_file_is_used_and_unknown_backend_names_are_ignored():
    call = cpu_call()
    times = {"sdpa": 2.0, "sdpa_flash": 1.5, "sdpa_math": 1.0, "eager": 3.0, "no_such_backend": 0.001}
    _write(_file_with(_entry(times, backend="no_such_backend"), call))
    fake = FakeTimer({"sdpa": 0.1})
    with autotune.override_timer(fake):
        backend, how = autotune.choose(call, eligible_for(call))
    assert fake.asked == []
    assert backend.NAME == "sdpa_math" and how.startswith("cached")


def test_an_entry_timed_by_an_earlier_method_is_measured_again():
    """Entries written before `measure` queued a call ahead of its start event (no "method") held the
    host's launch cost in short calls: they are timed again, and the new entry replaces them."""
    call = cpu_call()
    old = _entry({"sdpa": 2.0, "sdpa_flash": 1.5, "sdpa_math": 1.0, "eager": 3.0})
    del old["method"]
    _write(_file_with(old, call))
    fake = FakeTimer({"sdpa": 0.1, "sdpa_flash": 1.0, "sdpa_math": 1.0, "eager": 1.0})
    with autotune.override_timer(fake):
        backend, how = autotune.choose(call, eligible_for(call))
    assert backend.NAME == "sdpa" and how.startswith("measured")
    assert len(fake.asked) == 4
    (entry,) = entries_on_disk().values()
    assert entry["method"] == autotune.TIMING_METHOD and entry["times_ms"]["sdpa"] == 0.1


def test_an_entry_naming_an_ineligible_backend_never_makes_it_run(monkeypatch):
    call = cpu_call()
    times = {"sdpa": 2.0, "sdpa_flash": 1.5, "sdpa_math": 0.001, "eager": 3.0}
    _write(_file_with(_entry(times, backend="sdpa_math"), call))
    monkeypatch.setenv("ATTNPATCH_DISABLE", "sdpa_math")
    controls.reload_env()
    fake = FakeTimer({})
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    with autotune.override_timer(fake):
        attnpatch.attention_forward(q, k, v)
        e = attnpatch.explain(q, k, v)
    assert fake.asked == []  # the entry covers every eligible candidate
    assert attnpatch.stats().calls == {"sdpa_flash": 1}
    assert e.backend == "sdpa_flash" and e.source.startswith("auto (cached")
    assert e.reasons["sdpa_math"] == ["disabled by ATTNPATCH_DISABLE"]


def test_an_entry_for_other_backend_versions_is_measured_again():
    call = cpu_call()
    versions = {n: "0.0.1" for n in ("sdpa", "sdpa_flash", "sdpa_math", "eager")}
    _write(_file_with(_entry({"sdpa": 2.0, "sdpa_flash": 1.5, "sdpa_math": 0.5, "eager": 3.0}, versions), call))
    fake = FakeTimer({"sdpa_flash": 1.0})
    with autotune.override_timer(fake):
        backend, how = autotune.choose(call, eligible_for(call))
    assert backend.NAME == "sdpa_flash" and how.startswith("measured") and len(fake.asked) == 4
    (entry,) = entries_on_disk().values()
    assert entry["versions"]["sdpa"] == torch.__version__


def test_an_entry_that_did_not_time_a_newly_eligible_backend_is_measured_again():
    call = cpu_call()
    _write(_file_with(_entry({"sdpa": 2.0, "sdpa_math": 0.5}), call))
    fake = FakeTimer({"sdpa_flash": 1.0, "sdpa_math": 2.0})
    with autotune.override_timer(fake):
        backend, _ = autotune.choose(call, eligible_for(call))
    assert backend.NAME == "sdpa_flash" and len(fake.asked) == 4


@pytest.mark.parametrize("field,value", [("torch", "1.0.0"), ("cpu", "some-other-cpu")])
def test_entries_for_another_machine_or_torch_are_ignored_and_kept(field, value):
    call = cpu_call()
    other = {**autotune.machine_info(call), field: value}
    _write(_file_with(_entry({"sdpa": 2.0, "sdpa_flash": 1.5, "sdpa_math": 0.5, "eager": 3.0}), call, other))
    fake = FakeTimer({"sdpa_flash": 1.0})
    with autotune.override_timer(fake):
        backend, how = autotune.choose(call, eligible_for(call))
    assert backend.NAME == "sdpa_flash" and how.startswith("measured")
    machines = read_file()["machines"]
    assert set(machines) == {autotune.machine_key(other), autotune.machine_key(autotune.machine_info(call))}


def test_an_unwritable_cache_dir_is_not_fatal(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("ATTNPATCH_CACHE_DIR", str(blocker / "sub"))  # a path under a regular file
    autotune.reset_memory()
    fake = FakeTimer({"sdpa_math": 1.0})
    call = cpu_call()
    with caplog.at_level(logging.WARNING, logger="attnpatch"), autotune.override_timer(fake):
        assert autotune.choose(call, eligible_for(call))[0].NAME == "sdpa_math"
        assert autotune.choose(call, eligible_for(call))[0].NAME == "sdpa_math"
    assert len(fake.asked) == 4  # kept in memory
    assert any("not writing the autotune cache" in r.getMessage() for r in caplog.records)


def test_choose_never_raises(monkeypatch):
    monkeypatch.setattr(autotune, "signature_key", lambda call: 1 / 0)
    with autotune.override_timer(FakeTimer({})):
        assert autotune.choose(cpu_call(), eligible_for(cpu_call())) is None


# -- cache location, clearing, concurrent writers -----------------------------------------------------------

def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNPATCH_CACHE_DIR", str(tmp_path / "x"))
    assert autotune.cache_path() == tmp_path / "x" / "autotune.json"
    monkeypatch.delenv("ATTNPATCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == tmp_path / "xdg" / "attnpatch" / "autotune.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_path() == tmp_path / "home" / ".cache" / "attnpatch" / "autotune.json"


def test_clear_cache_removes_entries_and_router_decisions():
    fake = FakeTimer({"sdpa_flash": 1.0})
    q, k, v = qkv()
    with autotune.override_timer(fake):
        attnpatch.attention_forward(q, k, v)
        autotune.choose(cpu_call(197), eligible_for(cpu_call(197)))
        assert autotune.cache_path().exists()
        assert autotune.clear_cache() == 2
        assert not autotune.cache_path().exists()
        assert autotune.clear_cache() == 0
        fake.times = {"sdpa_math": 1.0}
        attnpatch.attention_forward(q, k, v)  # decided and measured again
    assert attnpatch.stats().calls == {"sdpa_flash": 1, "sdpa_math": 1}


_WRITER = textwrap.dedent("""
    import os, sys, time
    from attnpatch import autotune
    path = autotune.cache_path()
    tag, n, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    while not os.path.exists(go):
        time.sleep(0.001)
    for i in range(n):
        autotune.persist(path, "machine", {"device": "test"}, f"{tag}-{i}",
                         {"backend": "sdpa", "times_ms": {"sdpa": 1.0 + i}, "failed": {},
                          "versions": {"sdpa": "x"}, "measured": "2026-01-01T00:00:00Z"})
""")


def test_two_processes_writing_at_once_keep_every_entry(tmp_path):
    go = tmp_path / "go"
    n = 30
    env = {**os.environ, "ATTNPATCH_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, tag, str(n), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for tag in ("a", "b")]
    go.write_text("")
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    data = json.loads((tmp_path / "cache" / "autotune.json").read_text())
    entries = data["machines"]["machine"]["entries"]
    assert set(entries) == {f"{t}-{i}" for t in "ab" for i in range(n)}
    leftovers = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".tmp")]
    assert leftovers == []


def test_machine_key_names_gpu_driver_and_versions():
    info = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "driver": "570.1", "torch": "2.11.0",
            "cuda": "13.0", "cudnn": "91900", "capability": "9.0"}
    key = autotune.machine_key(info)
    for v in info.values():
        assert v in key
    assert key != autotune.machine_key({**info, "driver": "575.0"})


# -- shipped decision tables (measured cards: no timing in a fresh process) ------------------------------

def _cuda_call(capability):
    return cpu_call().__class__(**{**cpu_call().__dict__, "device_type": "cuda", "capability": capability})


@pytest.fixture
def measured_torch(monkeypatch):
    """This torch counts as the one the shipped rules were measured with."""
    from attnpatch import shipped_tables

    monkeypatch.setattr(shipped_tables, "_TORCH", shipped_tables.RULES[0].torch_versions[0])


def test_a_shipped_table_answers_on_a_measured_card_without_timing(monkeypatch, measured_torch):
    monkeypatch.setattr(autotune, "machine_info", lambda call: {"device": "cuda", "gpu": "Fake H100", "torch": "x"})
    fake = FakeTimer({"sdpa_flash": 1.0})
    cands = eligible_for(cpu_call())  # sdpa, sdpa_flash, sdpa_math, eager: all torch kernels
    with autotune.override_timer(fake, devices=("cuda",)):
        backend, how = autotune.choose(_cuda_call((9, 0)), cands)
        assert backend.NAME == "sdpa" and "shipped table (cuda_sm90" in how and fake.asked == []
        # another card: no rule, so the candidates are timed as before
        assert autotune.choose(_cuda_call((8, 0)), cands)[0].NAME == "sdpa_flash" and fake.asked


def test_a_shipped_table_is_unsure_when_another_kind_of_backend_is_eligible(monkeypatch, measured_torch):
    monkeypatch.setattr(autotune, "machine_info", lambda call: {"device": "cuda", "gpu": "Fake H100", "torch": "x"})

    class Other:  # e.g. an installed third-party kernel or a lossy one under the opt-in
        NAME = "fp8"
        AUTOTUNE_TIMED = True

        @staticmethod
        def version():
            return "1"

    cands = [Other()] + eligible_for(cpu_call())
    fake = FakeTimer({"fp8": 0.5})
    with autotune.override_timer(fake, devices=("cuda",)):
        backend, how = autotune.choose(_cuda_call((9, 0)), cands)
    assert backend.NAME == "fp8" and "measured" in how and {n for n, _ in fake.asked} >= {"fp8", "sdpa"}


def test_this_machines_measurement_wins_over_the_shipped_table(monkeypatch, measured_torch):
    monkeypatch.setattr(autotune, "machine_info", lambda call: {"device": "cuda", "gpu": "Fake H100", "torch": "x"})
    call = _cuda_call((9, 0))
    cands = eligible_for(cpu_call())
    times = {"sdpa": 3.0, "sdpa_flash": 1.0, "sdpa_math": 5.0, "eager": 9.0}
    _write(_file_with(_entry(times, versions={b.NAME: autotune._versions([b])[b.NAME] for b in cands}), call))
    autotune.reset_memory()
    with autotune.override_timer(FakeTimer({}), devices=("cuda",)):
        backend, how = autotune.choose(call, cands)
    assert backend.NAME == "sdpa_flash" and "cached" in how


def test_a_decoding_step_takes_flash_from_the_shipped_table(monkeypatch, measured_torch):
    """sm90 decoding (one query token): flash, not torch's dispatch, whose cuDNN kernel builds a graph
    for every new key length; a decoding step flash cannot serve falls to the general rule."""
    import dataclasses

    from attnpatch import shipped_tables

    monkeypatch.setattr(autotune, "machine_info", lambda call: {"device": "cuda", "gpu": "Fake H200", "torch": "x"})
    cands = eligible_for(cpu_call())
    decode = dataclasses.replace(_cuda_call((9, 0)), seq_q=1)
    fake = FakeTimer({"sdpa": 1.0})
    with autotune.override_timer(fake, devices=("cuda",)):
        backend, how = autotune.choose(decode, cands)
        assert backend.NAME == "sdpa_flash" and "decode" in how and fake.asked == []
        without_flash = [b for b in cands if b.NAME != "sdpa_flash"]  # e.g. a masked step
        assert autotune.choose(decode, without_flash)[0].NAME == "sdpa"
        assert autotune.choose(_cuda_call((9, 0)), cands)[0].NAME == "sdpa"  # prefill: the general rule
    assert fake.asked == []
    assert set(shipped_tables.CALL_KINDS) >= {r.calls for r in shipped_tables.RULES}


def test_the_decode_rule_wins_over_an_earlier_measurement_of_a_decoding_step(monkeypatch, measured_torch):
    """A machine's entry timed at one key length says cuDNN (torch's dispatch) is fastest per call; it
    cannot see the graph cuDNN builds for every new length, so the decode rule still takes flash. The
    general rule keeps losing to a measurement."""
    import dataclasses

    monkeypatch.setattr(autotune, "machine_info", lambda call: {"device": "cuda", "gpu": "Fake H200", "torch": "x"})
    cands = eligible_for(cpu_call())
    times = {"sdpa": 1.0, "sdpa_flash": 3.0, "sdpa_math": 5.0, "eager": 9.0}
    versions = {b.NAME: autotune._versions([b])[b.NAME] for b in cands}
    decode = dataclasses.replace(_cuda_call((9, 0)), seq_q=1)
    prefill = dataclasses.replace(_cuda_call((9, 0)), seq_q=64)
    _write(_file_with(_entry(times, versions=versions), decode))
    autotune.reset_memory()
    with autotune.override_timer(FakeTimer({}), devices=("cuda",)):
        backend, how = autotune.choose(decode, cands)
        assert backend.NAME == "sdpa_flash" and "decode" in how
    _write(_file_with(_entry({"sdpa": 3.0, "sdpa_flash": 1.0, "sdpa_math": 5.0, "eager": 9.0},
                             versions=versions), prefill))
    autotune.reset_memory()
    with autotune.override_timer(FakeTimer({}), devices=("cuda",)):
        assert autotune.choose(prefill, cands)[0].NAME == "sdpa_flash"  # the machine's entry, not the rule


def test_the_shipped_rules_prefer_a_backend_they_cover_and_rank_lossy_ones_only_at_video_lengths():
    from attnpatch import registry, shipped_tables

    for rule in shipped_tables.RULES:
        assert rule.prefer in rule.covers and rule.evidence and rule.calls in shipped_tables.CALL_KINDS
        lossy = {n for n in rule.covers if registry.get_backend(n).LOSSY}
        assert not lossy or rule.calls == "video", (rule.prefer, lossy)
        assert "flash_attn3_fp8" not in rule.covers  # never auto's: its error on real activations


def _named(*names):
    return [type(n, (), {"NAME": n})() for n in names]


@pytest.mark.parametrize("shape,names,expected", [
    # Wan 480p self-attention, the lossy opt-in: SageAttention 2's sm90 kernel, else fp8
    (dict(seq_q=32760, seq_kv=32760), ("sdpa", "sdpa_cudnn", "flash_attn3", "fp8", "sage", "sage_fp8_cuda_sm90"),
     "sage_fp8_cuda_sm90"),
    (dict(seq_q=32760, seq_kv=32760), ("sdpa", "sdpa_cudnn", "flash_attn3", "fp8", "sage"), "fp8"),
    # no opt-in (no lossy backend eligible): FlashAttention 3 from 4608 tokens, causal too
    (dict(seq_q=32760, seq_kv=32760), ("sdpa", "sdpa_cudnn", "flash_attn", "flash_attn3"), "flash_attn3"),
    (dict(seq_q=4608, seq_kv=4608), ("sdpa", "sdpa_cudnn", "flash_attn3"), "flash_attn3"),
    (dict(seq_q=4608, seq_kv=4608), ("sdpa", "sdpa_cudnn", "xformers", "flash_attn3"), "flash_attn3"),
    (dict(seq_q=8192, seq_kv=8192, is_causal=True, heads_kv=2), ("sdpa", "sdpa_cudnn", "flash_attn3"), "flash_attn3"),
    # lossy opt-in below video lengths, or causal: the lossy kernels were not ranked there, so auto times
    (dict(seq_q=4608, seq_kv=4608), ("sdpa", "flash_attn3", "sage_fp8_cuda_sm90"), None),
    (dict(seq_q=32760, seq_kv=32760, is_causal=True), ("sdpa", "flash_attn3", "sage_fp8_cuda_sm90"), None),
    # outside what was measured: shorter, another head dim, a mask, a kernel no rule covers
    (dict(seq_q=4096, seq_kv=4096), ("sdpa", "sdpa_cudnn", "flash_attn3"), None),
    (dict(seq_q=32760, seq_kv=32760, head_dim=64, head_dim_v=64), ("sdpa", "flash_attn3"), None),
    (dict(seq_q=4608, seq_kv=4608, mask_kind="bool", mask_shape=(1, 1, 1, 4608), key_padding=True),
     ("sdpa", "sdpa_cudnn", "flash_attn3"), None),
    (dict(seq_q=32760, seq_kv=32760), ("sdpa", "flash_attn3", "flash_attn4"), None),
    (dict(seq_q=4608, seq_kv=4608, needs_grad=True), ("sdpa", "sdpa_cudnn", "flash_attn3"), None),  # training
    # only torch's kernels: the general rule, torch's own dispatch
    (dict(seq_q=32760, seq_kv=32760), ("sdpa", "sdpa_cudnn", "sdpa_flash"), "sdpa"),
])
def test_the_sm90_table_for_long_sequences_and_video(measured_torch, shape, names, expected):
    import dataclasses

    from attnpatch import shipped_tables

    base = dict(dtype=torch.bfloat16, batch=1, heads_q=8, heads_kv=8, head_dim=128, head_dim_v=128)
    call = dataclasses.replace(_cuda_call((9, 0)), **{**base, **shape})
    got = shipped_tables.choice(call, _named(*names))
    if expected is None:
        assert got is None, got
    else:
        assert got is not None and got[0].NAME == expected and got[1].startswith("shipped table (cuda_sm90")
        assert shipped_tables.choice(dataclasses.replace(call, capability=(8, 0)), _named(*names)) is None


def test_with_measuring_off_a_shipped_decision_still_beats_the_static_order(monkeypatch):
    """ATTNPATCH_AUTOTUNE=0 on a measured card: the shipped decision (torch's own dispatch), not the
    static table's first backend; on a torch the rule was not measured with, the static table."""
    from attnpatch import shipped_tables

    call = _cuda_call((9, 0))
    cands = eligible_for(cpu_call())
    order = [cands[1]] + [b for b in cands if b is not cands[1]]  # the static order puts sdpa second here
    monkeypatch.setattr(router, "_auto_candidates", lambda c: order)
    monkeypatch.setattr(router, "_reasons_for", lambda b, c, env: [])
    monkeypatch.setattr(autotune, "applies", lambda c, env: False)
    monkeypatch.setattr(shipped_tables, "_TORCH", shipped_tables.RULES[0].torch_versions[0])
    backend, how = router._auto_choose(call, controls.env_settings(), False, {}, False)
    assert backend.NAME == "sdpa" and how.startswith("shipped table")
    monkeypatch.setattr(shipped_tables, "_TORCH", "1.0")
    backend, how = router._auto_choose(call, controls.env_settings(), False, {}, False)
    assert backend is order[0] and how == "static table"
