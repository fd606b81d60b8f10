"""The README's guarantees under hostile input and in shared processes (issue 14): no global torch
state, strided/empty/rank-3/5 inputs and CausalBias masks served like torch's SDPA, copies of patched
models unpatched, removal releasing what apply created, bounded recipes and a cache file that never
destroys what it could not read. Each test fails on the code before the fix."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch
from attnpatch import autotune, diskfile, recipes, registry, router
from attnpatch.backends.sdpa import SdpaBackend
from attnpatch.call import Call

from _patch_helpers import SdpaBlock, recording_backend

torch.set_num_threads(min(2, torch.get_num_threads()))


Block = SdpaBlock  # tests/_patch_helpers.py


Rec = recording_backend("hard_recording")


@pytest.fixture
def rec():
    attnpatch.register_backend(Rec, replace=True)
    Rec.calls.clear()
    yield Rec.calls
    attnpatch.unregister_backend(Rec.NAME)


# -- 1. torch.nn.functional is untouched: pinned kernels set no global state ----------------------------

def test_pinned_kernels_leave_torchs_global_sdpa_flags_alone():
    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
             torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.cudnn_sdp_enabled)
    before = [f() for f in flags]
    seen = []

    class Spy(SdpaBackend):  # sees the flags while the pinned kernel runs
        NAME = "flag_spy"

        def build(self, call):
            inner = registry.get_backend("sdpa_flash").build(call)

            def run(*args):
                seen.append([f() for f in flags])
                return inner(*args)
            return run

    attnpatch.register_backend(Spy)
    try:
        q = torch.randn(1, 2, 8, 16)
        attnpatch.attention_forward(q, q, q, backend="flag_spy")
    finally:
        attnpatch.unregister_backend("flag_spy")
    assert seen == [before] and [f() for f in flags] == before


def test_another_threads_plain_sdpa_is_unaffected_by_pinned_calls():
    """A plain F.sdpa on an input only the math kernel accepts, in one thread, while another thread
    loops attnpatch's pinned sdpa_flash: with process-wide flags 184 124 of 187 312 such calls failed."""
    stop = threading.Event()
    errors = []

    def pinned_loop():
        q = torch.randn(1, 2, 8, 16)
        while not stop.is_set():
            attnpatch.attention_forward(q, q, q, backend="sdpa_flash")

    t = threading.Thread(target=pinned_loop)
    t.start()
    try:
        q = torch.randn(1, 2, 64, 64)[..., ::2]  # strided last dim: only the math kernel takes it
        deadline = time.monotonic() + 1.5
        n = 0
        while time.monotonic() < deadline:
            try:
                F.scaled_dot_product_attention(q, q, q)
            except RuntimeError as exc:
                errors.append(str(exc))
            n += 1
    finally:
        stop.set()
        t.join()
    assert n > 50 and not errors, errors[:1]


# -- 2. strided inputs --------------------------------------------------------------------------------------

def test_strided_inputs_run_on_sdpa_flash_like_torch():
    q = torch.randn(1, 2, 8, 64)[..., ::2]
    out = attnpatch.attention_forward(q, q, q, backend="sdpa_flash")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    with attnpatch.use_backend("sdpa_flash", strict=True):  # the CPU flash op takes strides: no refusal
        torch.testing.assert_close(attnpatch.attention_forward(q, q, q), F.scaled_dot_product_attention(q, q, q))


class _UnitStride(SdpaBackend):
    """A CPU kernel that needs stride 1 in the last dim (like torch's fused CUDA kernels)."""

    NAME = "unit_stride"
    NEEDS_UNIT_LAST_DIM_STRIDE = True
    runs = []

    def build(self, call):
        inner = super().build(call)

        def run(q, k, v, *rest):
            assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "strided input reached the kernel"
            self.runs.append(tuple(q.shape))
            return inner(q, k, v, *rest)
        return run


@pytest.fixture
def unit_stride():
    attnpatch.register_backend(_UnitStride)
    _UnitStride.runs = []
    yield
    attnpatch.unregister_backend("unit_stride")


def test_a_kernel_that_needs_unit_stride_declares_it_and_strided_calls_fall_back(unit_stride, caplog):
    full = torch.randn(1, 2, 8, 64)
    dense, strided = full[..., :32].contiguous(), full[..., ::2]
    ref = F.scaled_dot_product_attention(strided, strided, strided)
    assert "strided last dimension" in "; ".join(
        attnpatch.explain(strided, strided, strided).reasons["unit_stride"])
    # the same shapes: the plan built for contiguous inputs must not send strided ones to the kernel
    attnpatch.attention_forward(dense, dense, dense, backend="unit_stride")
    out = attnpatch.attention_forward(strided, strided, strided, backend="unit_stride")
    torch.testing.assert_close(out, ref)
    assert len(_UnitStride.runs) == 1
    stats = attnpatch.stats()
    assert stats.calls["unit_stride"] == 1 and sum(stats.calls.values()) == 2
    assert any(a == "unit_stride" and "strided" in why for (a, _b, why) in stats.fallbacks)
    with pytest.raises(attnpatch.BackendUnsupportedError, match="strided last dimension"):
        with attnpatch.use_backend("unit_stride", strict=True):
            attnpatch.attention_forward(strided, strided, strided)


class _RaisesOnStrides(SdpaBackend):
    """A CPU kernel that refuses a strided last dim itself, with an error, like torch's CUDA flash and
    memory-efficient operators: the router checks strides only when it raised."""

    NAME = "raises_on_strides"
    NEEDS_UNIT_LAST_DIM_STRIDE = True
    runs = []

    def kernel_checks_unit_stride(self, call):
        return True

    def build(self, call):
        inner = super().build(call)

        def run(q, k, v, *rest):
            if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
                raise RuntimeError("Input tensor must have contiguous last dimension")
            if q.shape[-1] == 24:
                raise RuntimeError("an unrelated kernel error")
            self.runs.append(tuple(q.shape))
            return inner(q, k, v, *rest)
        return run


def test_a_kernel_that_refuses_strides_itself_falls_back_and_other_errors_propagate():
    attnpatch.register_backend(_RaisesOnStrides)
    _RaisesOnStrides.runs = []
    try:
        full = torch.randn(1, 2, 8, 64)
        dense, strided = full[..., :32].contiguous(), full[..., ::2]
        attnpatch.attention_forward(dense, dense, dense, backend="raises_on_strides")
        out = attnpatch.attention_forward(strided, strided, strided, backend="raises_on_strides")
        torch.testing.assert_close(out, F.scaled_dot_product_attention(strided, strided, strided))
        assert len(_RaisesOnStrides.runs) == 1
        stats = attnpatch.stats()
        assert stats.calls["raises_on_strides"] == 1 and sum(stats.calls.values()) == 2
        assert any(a == "raises_on_strides" and "strided" in why for (a, _b, why) in stats.fallbacks)
        odd = torch.randn(1, 2, 8, 24)
        with pytest.raises(RuntimeError, match="unrelated kernel error"):  # dense inputs: not a stride problem
            attnpatch.attention_forward(odd, odd, odd, backend="raises_on_strides")
    finally:
        attnpatch.unregister_backend("raises_on_strides")


def test_strided_input_inside_a_model_patched_with_a_unit_stride_kernel(unit_stride):
    class Strided(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    m = Strided()
    q = torch.randn(1, 2, 8, 64)[..., ::2]
    ref = m(q)
    with attnpatch.patched(m, backend="unit_stride"):
        torch.testing.assert_close(m(q), ref)


def test_cuda_kernels_declare_unit_stride():
    call = Call(layout="bnsd", device_type="cuda", device_index=0, capability=(9, 0), dtype=torch.bfloat16,
                batch=1, heads_q=2, heads_kv=2, seq_q=64, seq_kv=64, head_dim=64, head_dim_v=64,
                last_dim_contiguous=False)
    for name in ("sdpa_cudnn", "sdpa_efficient", "sdpa_flash"):
        assert registry.get_backend(name).needs_unit_stride(call), name
    cpu = Call(layout="bnsd", device_type="cpu", device_index=None, capability=None, dtype=torch.float32,
               batch=1, heads_q=2, heads_kv=2, seq_q=64, seq_kv=64, head_dim=64, head_dim_v=64,
               last_dim_contiguous=False)
    assert not registry.get_backend("sdpa_flash").needs_unit_stride(cpu)
    assert not registry.get_backend("sdpa").needs_unit_stride(call)  # torch picks a kernel that takes it


# -- 3. empty inputs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape_q, shape_kv", [
    ((0, 2, 8, 32), (0, 2, 8, 32)),   # empty batch
    ((1, 2, 0, 32), (1, 2, 8, 32)),   # no queries
    ((1, 2, 8, 32), (1, 2, 0, 32)),   # no keys: torch gives zeros
])
@pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
def test_empty_inputs_give_torchs_result(shape_q, shape_kv, layout):
    q, k = torch.randn(shape_q), torch.randn(shape_kv)
    ref = F.scaled_dot_product_attention(q, k, k)
    if layout == "bsnd":
        out = attnpatch.attention_forward(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2),
                                          layout="bsnd").transpose(1, 2)
    else:
        out = attnpatch.attention_forward(q, k, k)
    assert out.shape == ref.shape and torch.equal(out, ref)


def test_empty_batch_through_a_patched_module():
    m = Block()
    x = torch.randn(0, 8, 32)
    ref = m(x)
    with attnpatch.patched(m):
        out = m(x)
    assert out.shape == ref.shape == (0, 8, 32)


# -- 8. a drop-in where torch accepts more ----------------------------------------------------------------

def test_rank_3_and_rank_5_inputs_like_torch():
    q3, k3 = torch.randn(4, 6, 16), torch.randn(2, 9, 16)  # (heads, seq, dim), GQA
    torch.testing.assert_close(attnpatch.attention_forward(q3, k3, k3),
                               F.scaled_dot_product_attention(q3, k3, k3, enable_gqa=True))
    q5, k5 = torch.randn(2, 3, 4, 6, 16), torch.randn(2, 3, 4, 9, 16)
    mask = torch.rand(3, 1, 6, 9) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attnpatch.attention_forward(q5, k5, k5, attn_mask=mask),
                               F.scaled_dot_product_attention(q5, k5, k5, attn_mask=mask))
    m2 = torch.rand(6, 9) > 0.3  # a 2-D mask is (s_q, s_kv) for such inputs, as in torch
    m2[:, 0] = True
    torch.testing.assert_close(attnpatch.attention_forward(q3, k3[:2].repeat(2, 1, 1), k3[:2].repeat(2, 1, 1),
                                                           attn_mask=m2),
                               F.scaled_dot_product_attention(q3, k3[:2].repeat(2, 1, 1), k3[:2].repeat(2, 1, 1),
                                                              attn_mask=m2))


def test_causal_bias_masks_like_torch():
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 7, 16)
    for bias in (causal_upper_left(4, 7), causal_lower_right(4, 7), causal_lower_right(5, 5)):
        qq = q if bias.seq_len_q == 4 else torch.randn(1, 2, 5, 16)
        kk = k if bias.seq_len_kv == 7 else torch.randn(1, 2, 5, 16)
        ref = F.scaled_dot_product_attention(qq, kk, kk, attn_mask=bias)
        torch.testing.assert_close(attnpatch.attention_forward(qq, kk, kk, attn_mask=bias), ref)
        torch.testing.assert_close(attnpatch.attention_forward(qq, kk, kk, attn_mask=bias, backend="eager"), ref)

    class Decoder(nn.Module):
        def forward(self, q, k):
            return F.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))

    m = Decoder()
    ref = m(q, k)
    with attnpatch.patched(m, backend="sdpa_math") as p:
        torch.testing.assert_close(m(q, k), ref)
        assert p.report().rows[0].calls == {"sdpa_math": 1}


def test_errors_have_torchs_exception_type():
    q = torch.randn(1, 2, 8, 16)
    for bad in ((q, q.double(), q), (q, q[..., :8], q)):  # mixed dtype; query/key head dims differ
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(*bad)
        with pytest.raises(RuntimeError):
            attnpatch.attention_forward(*bad)
        with pytest.raises(ValueError):  # and still a ValueError, as before
            attnpatch.attention_forward(*bad)


def test_mask_with_is_causal_is_an_attnpatch_extension():
    q = torch.randn(1, 2, 6, 16)
    mask = torch.rand(1, 1, 6, 6) > 0.2
    mask[..., 0] = True
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=True)  # torch refuses
    ref = F.scaled_dot_product_attention(q, q, q, attn_mask=mask & torch.ones(6, 6, dtype=torch.bool).tril())
    torch.testing.assert_close(attnpatch.attention_forward(q, q, q, attn_mask=mask, is_causal=True), ref)


# -- 4. copies of a patched model are unpatched models ------------------------------------------------------

def test_deepcopy_and_pickle_of_a_generic_patched_model_are_unpatched(rec):
    model = nn.Sequential(Block(), Block())
    x = torch.randn(2, 8, 32)
    patch = attnpatch.apply(model, backend="hard_recording", recipe=False)
    model(x)
    assert len(rec) == 2
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(type(b) is Block for b in clone)
        assert attnpatch.remove(clone) == 0
        rec.clear()
        clone(x)
        assert not rec  # the copy runs torch's own SDPA
    patch.remove()
    rec.clear()
    model(x)
    assert not rec and all(type(b) is Block for b in model)


def test_torch_save_of_a_patched_transformers_model_loads_without_attnpatch(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    with attnpatch.patched(model, backend="sdpa_math", recipe=False):
        assert model.config._attn_implementation == "attnpatch"
        torch.save(model, tmp_path / "m.pt")
        torch.save(ids, tmp_path / "ids.pt")
        clone = copy.deepcopy(model)
        assert clone.config._attn_implementation == "sdpa" and attnpatch.remove(clone) == 0
    torch.save(ref, tmp_path / "ref.pt")
    code = (
        "import sys, torch\n"
        f"m = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}); ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.no_grad(): out = m(ids).logits\n"
        "assert 'attnpatch' not in sys.modules, 'the pickle needed attnpatch'\n"
        "assert m.config._attn_implementation == 'sdpa', m.config._attn_implementation\n"
        "torch.testing.assert_close(out, ref)\n"
        "print('ok')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = ""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_deepcopy_of_a_diffusers_patched_model_is_unpatched():
    from attnpatch import tiny_models
    model = tiny_models.build("tiny-flux")
    kw = tiny_models.example_inputs("tiny-flux", model)
    patch = attnpatch.apply(model, backend="sdpa_math", recipe=False)
    clone = copy.deepcopy(model)
    assert attnpatch.remove(clone) == 0
    attnpatch.stats(reset=True)
    with torch.no_grad():
        clone(**kw)
    assert attnpatch.stats().calls == {}
    patch.remove()


# -- 5. memory: removal releases what apply created -----------------------------------------------------------

def test_apply_remove_cycles_do_not_grow_memory():
    from attnpatch import tiny_models
    model = tiny_models.build("tiny-flux")
    kw = tiny_models.example_inputs("tiny-flux", model)

    def cycle():
        with attnpatch.patched(model):
            with torch.no_grad():
                model(**kw)

    def sizes():
        gc.collect()
        return (len(sys.modules), len(router._PLANS), len(router._BUCKETS), len(router._DECISIONS),
                len(router._TRACED_DECISIONS))

    for _ in range(5):
        cycle()
    first = sizes()
    for _ in range(60):
        cycle()
    assert sizes() == first


def test_decision_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(router, "MAX_DECISIONS", 8)
    for n in range(1, 40):
        q = torch.randn(1, 1, 1, 8 * n)  # a new head dim: a new decision each time
        attnpatch.attention_forward(q, q, q)
    assert len(router._DECISIONS) <= 8


# -- 6. the autotune cache never destroys what it could not read ---------------------------------------------

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_CACHE_DIR", str(tmp_path))
    autotune.reset_memory()
    yield tmp_path
    autotune.reset_memory()


def _tune_once():
    """One measured choice on the CPU with an injected timer (writes the cache when it can)."""
    from test_autotune import FakeTimer, cpu_call, eligible_for
    call = cpu_call()
    with autotune.override_timer(FakeTimer({"sdpa_math": 1.0})):
        return autotune.choose(call, eligible_for(call))


def _in_thread(fn, timeout=10.0):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung"
    return out[0]


def test_a_fifo_at_the_cache_path_does_not_hang(cache_dir):
    os.mkfifo(cache_dir / "autotune.json")
    backend, how = _in_thread(_tune_once)
    assert how.startswith("measured")  # measured, kept in memory
    assert stat.S_ISFIFO(os.lstat(cache_dir / "autotune.json").st_mode)  # left alone


def test_a_link_to_dev_zero_does_not_hang_and_is_left_alone(cache_dir):
    (cache_dir / "autotune.json").symlink_to("/dev/zero")
    _in_thread(_tune_once)
    assert os.readlink(cache_dir / "autotune.json") == "/dev/zero"


@pytest.mark.parametrize("text", [
    '{"format": "attnpatch-autotune", "version": 99, "machines": {}}',  # a newer attnpatch's file
    '{"some": "other program"}',  # a foreign JSON file
])
def test_files_it_cannot_read_are_never_overwritten(cache_dir, text):
    (cache_dir / "autotune.json").write_text(text)
    _tune_once()
    assert (cache_dir / "autotune.json").read_text() == text


def test_a_file_over_the_size_cap_is_refused(cache_dir, monkeypatch):
    monkeypatch.setattr(diskfile, "MAX_BYTES", 100)
    (cache_dir / "autotune.json").write_text("x" * 200)
    with pytest.raises(diskfile.Refused, match="over attnpatch's limit"):
        diskfile.read_text(cache_dir / "autotune.json", 100)
    _tune_once()
    assert (cache_dir / "autotune.json").read_text() == "x" * 200


def test_another_users_file_is_not_replaced(cache_dir, monkeypatch):
    _tune_once()  # a valid file of "ours"
    before = (cache_dir / "autotune.json").read_bytes()
    autotune.reset_memory()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(cache_dir / "autotune.json").st_uid + 1)
    from test_autotune import FakeTimer, cpu_call, eligible_for
    call = cpu_call(seq=300)
    with autotune.override_timer(FakeTimer({"sdpa_math": 1.0})):
        autotune.choose(call, eligible_for(call))
    assert (cache_dir / "autotune.json").read_bytes() == before


def test_the_replaced_file_keeps_its_permissions(cache_dir):
    _tune_once()
    path = cache_dir / "autotune.json"
    os.chmod(path, 0o644)
    autotune.reset_memory()
    from test_autotune import FakeTimer, cpu_call, eligible_for
    call = cpu_call(seq=300)
    with autotune.override_timer(FakeTimer({"sdpa_math": 1.0})):
        autotune.choose(call, eligible_for(call))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert len(autotune.cached_choices()) == 2


def test_new_cache_files_follow_the_umask(cache_dir):
    old = os.umask(0o022)
    try:
        _tune_once()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(cache_dir / "autotune.json").st_mode) == 0o644


# -- 7. recipes are bounded ------------------------------------------------------------------------------------

_LAUGHS = "version: 1\nname: lol\n" + "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]\n"
    for i in range(1, 9))


def test_billion_laughs_is_refused_fast():
    assert len(_LAUGHS) < 700
    t0 = time.monotonic()
    with pytest.raises(attnpatch.RecipeError, match="expands to more than"):
        recipes.loads(_LAUGHS)
    assert time.monotonic() - t0 < 5


def test_recursive_alias_is_a_recipe_error():
    with pytest.raises(attnpatch.RecipeError, match="recursive alias"):
        recipes.loads("version: 1\nname: r\nrules: &r [*r]\n")


@pytest.mark.parametrize("regex", [r"(a+)+$", r"([\w.]+)+Z", r"(a|aa)+", r"(x{1,4})+y"])
def test_catastrophic_regexes_are_refused_fast(regex):
    t0 = time.monotonic()
    with pytest.raises(attnpatch.RecipeError, match="exponential time"):
        recipes.loads(f"version: 1\nname: r\nrules:\n  - pattern: 're:{regex}'\n    backend: sdpa\n")
    assert time.monotonic() - t0 < 2


def test_recipe_size_and_special_files_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\nname: big\ndescription: " + "x" * (recipes.MAX_RECIPE_BYTES + 10) + "\n")
    with pytest.raises(attnpatch.RecipeError, match="over attnpatch's limit"):
        recipes.load(str(big))
    with pytest.raises(attnpatch.RecipeError, match="not a regular file"):
        recipes.load("/dev/urandom")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)

    def load_fifo():
        try:
            recipes.load(str(fifo))
        except attnpatch.RecipeError as exc:
            return str(exc)
        return "loaded"
    assert "not a regular file" in _in_thread(load_fifo)  # and it did not hang


@pytest.mark.parametrize("text, line, needle", [
    ('version: 1\nname: "flux\\n"\n', 2, "not a valid name"),
    ("version: 1\nname: t\ndefault_backend: []\n", 3, "empty list"),
    ("version: 1\nname: t\nbase: &b {x: 1}\nmatch:\n  <<: *b\n", 5, "merge keys"),
    ("version: 1\nname: t\ndescription: 2026-11-29\n", 3, "date"),
    ("version: 1\nname: t\ndescription: a\x00b\n", 3, "NUL byte"),
])
def test_recipe_messages_name_the_problem_and_the_line(text, line, needle):
    with pytest.raises(attnpatch.RecipeError) as e:
        recipes.loads(text, "r.yaml")
    assert needle in str(e.value) and e.value.line == line, str(e.value)


def test_non_utf8_recipe_names_the_line(tmp_path):
    p = tmp_path / "latin.yaml"
    p.write_bytes(b"version: 1\nname: t\ndescription: caf\xe9\n")
    with pytest.raises(attnpatch.RecipeError) as e:
        recipes.load(str(p))
    assert "not UTF-8" in str(e.value) and e.value.line == 3
