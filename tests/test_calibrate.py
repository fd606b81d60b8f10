"""attnpatch.calibrate on CPU: a test-only lossy backend whose error depends on the site and step, a
small hand-written model with a step loop, and the tiny diffusers SD pipeline (teacher forcing).

The lossy backend (`Quantized`) rounds q, k and v to multiples of a fixed step before exact attention,
so its relative error is small where activations are O(1) and total where they are tiny: the test
model scales some layers' activations (and every layer's at the first steps) down, which makes
exactly those site-steps too lossy. Timings come from a fake timer (no test depends on real speed)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnpatch
from attnpatch import autotune, capture, patch as patch_mod, quality, recipes, registry, tiny_models
from attnpatch.backends.sdpa import SdpaBackend
from attnpatch.calibrate import Calibration
from attnpatch.call import build_call

from _patch_helpers import assert_restored, snapshot

QUANT_STEP = 0.02


class Quantized(SdpaBackend):
    """Test-only lossy backend: exact attention of q, k, v rounded to multiples of QUANT_STEP."""

    NAME = "test_quantized"
    DESCRIPTION = "test: rounds q, k, v to a fixed step (lossy where activations are small)"
    LOSSY = True
    AUTO_PRIORITY: dict = {}

    def build(self, call):
        run = super().build(call)

        def rounded(x):
            return torch.round(x / QUANT_STEP) * QUANT_STEP

        def lossy(q, k, v, m, c, s, p):
            return run(rounded(q), rounded(k), rounded(v), m, c, s, p)
        return lossy


#: fake times per call: the lossy backend twice as fast as the exact ones
TIMES = {"sdpa": 2.0, "sdpa_flash": 2.0, Quantized.NAME: 1.0}


def fake_timer(backend, call):
    return TIMES.get(backend.NAME, 3.0)


@pytest.fixture(autouse=True)
def _lossy_backend():
    registry.register_backend(Quantized, replace=True)
    yield
    registry.unregister_backend(Quantized.NAME)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny CPU models run several times faster on one thread than on two busy ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Layer(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (the generic adapter routes it); its
    activations are multiplied by ``amp`` (no biases: they scale exactly)."""

    def __init__(self, dim: int, heads: int, amp: float):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.heads = heads
        self.amp = amp

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = (self.qkv(x) * self.amp).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(o.transpose(1, 2).reshape(b, s, dim)) / self.amp


class Net(nn.Module):
    def __init__(self, amps=(1.0, 0.01, 1.0, 1.0), dim: int = 64, heads: int = 4):
        super().__init__()
        self.layers = nn.ModuleList([Layer(dim, heads, a) for a in amps])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


STEPS = 6
QUIET_STEPS = 2  # the first steps' inputs are scaled down: every site is too lossy there


def make_net(seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw).eval()


def step_loop(seq: int = 300, dim: int = 64, steps: int = STEPS, on_step=None):
    """A denoising-like loop over a bare model: attnpatch.step(i, total) tells patched models the step."""
    x0 = torch.randn(1, seq, dim, generator=torch.Generator().manual_seed(1))

    def run(model):
        outs = []
        y = torch.zeros_like(x0)
        with torch.no_grad():
            for i in range(steps):
                with attnpatch.step(i, total=steps):
                    y = model((x0 + 0.5 * y) * (0.01 if i < QUIET_STEPS else 1.0))
                if on_step is not None:
                    on_step(i)
                outs.append(y)
        return torch.stack(outs)
    return run


def run_calibrate(target, run, **kw):
    kw.setdefault("candidates", [Quantized.NAME])
    kw.setdefault("timer", fake_timer)
    kw.setdefault("step_buckets", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", recipes.RecipeWarning)  # every written rule must match a site
        return attnpatch.calibrate(target, run, **kw)


def lossy_set(cal: Calibration):
    return {(c.path, c.steps) for c in cal.choices if c.backend == Quantized.NAME}


# -- the choice -------------------------------------------------------------------------------------------

def test_keeps_exactly_the_sensitive_sites_exact():
    net = make_net()
    cal = run_calibrate(net, step_loop(), min_psnr=0.0)
    buckets = [(0, 1), (2, 3), (4, 5)]
    assert cal.buckets == buckets and cal.total_steps == STEPS
    assert {(c.path, c.steps) for c in cal.choices} == {(f"layers.{i}", b) for i in range(4) for b in buckets}
    # layer 1 is scaled down at every step, and every layer at the first two steps: those stay exact
    expected = {(f"layers.{i}", b) for i in (0, 2, 3) for b in buckets[1:]}
    assert lossy_set(cal) == expected
    for c in cal.choices:
        e = c.errors[Quantized.NAME]
        if (c.path, c.steps) in expected:
            assert c.status == "lossy" and e.rel_l2 <= 0.1 and c.saved_ms == pytest.approx(c.calls * 1.0)
        else:
            assert c.backend == c.reference == "sdpa" and c.status == "exact"
            assert e.rel_l2 > 0.1 and "rel L2" in c.why and c.saved_ms == 0.0
        assert c.errors["sdpa"].rel_l2 < 1e-5  # the exact reference measured on the same samples
    assert cal.backoff == [] and cal.bound_met
    report = cal.report()
    assert "layers.1" in report and "back-off: none needed" in report and "exact-kernel floor" in report


def test_written_yaml_loads_and_reproduces_the_choice(tmp_path):
    net = make_net()
    cal = run_calibrate(net, step_loop(), min_psnr=0.0)
    path = cal.save(tmp_path / "cal.yaml")
    text = open(path, encoding="utf-8").read()
    assert text.startswith("# attnpatch calibrated recipe") and "rel L2" in text
    loaded = recipes.load(path)
    strip = lambda r: [dataclass_without(rule, "line") for rule in r.rules]  # noqa: E731
    assert strip(loaded) == strip(recipes.from_dict(cal.recipe))
    assert loaded.lossy and loaded.name == "calibrated"

    # run it: at every step each site runs the backend the calibration chose for that step
    seen = {}
    p = attnpatch.apply(net, recipe=path)
    try:
        before = {}

        def on_step(i):
            for s in p.sites:
                calls, _ = s.counts()
                delta = {n: c - before.get((s.path, n), 0) for n, c in calls.items()}
                seen[(s.path, i)] = {n for n, c in delta.items() if c}
                for n, c in calls.items():
                    before[(s.path, n)] = c
        step_loop(on_step=on_step)(net)
    finally:
        p.remove()
    for c in cal.choices:
        for i in range(c.steps[0], c.steps[1] + 1):
            assert seen[(c.path, i)] == {c.backend}, (c.path, i)


def dataclass_without(obj, field):
    import dataclasses

    return dataclasses.replace(obj, **{field: None})


def test_backoff_enforces_the_bound():
    net = make_net()
    loose = run_calibrate(net, step_loop(), min_psnr=0.0)
    p0 = loose.validation.free_running.psnr_db
    assert math.isfinite(p0) and not loose.backoff
    tight = run_calibrate(net, step_loop(), min_psnr=p0 + 6.0, backoff_fraction=0.25)
    assert tight.backoff, "the first choice misses the bound: back-off must happen"
    assert tight.bound_met
    final = tight.validation.free_running
    assert final.psnr_db >= p0 + 6.0
    # round 1 sent back the site-steps with the largest errors on their samples
    errs = sorted(((c.errors[Quantized.NAME].rel_l2, c.path, c.steps) for c in loose.lossy_choices), reverse=True)
    first = tight.backoff[0]
    assert first.psnr_db == pytest.approx(p0)
    n = len(first.reverted)
    assert n == math.ceil(len(errs) * 0.25)
    want = {f"{path} steps {a}-{b} ({Quantized.NAME})" for _, path, (a, b) in errs[:n]}
    assert set(first.reverted) == want
    reverted = [c for c in tight.choices if c.status == "back to exact"]
    assert reverted and all(c.backend == c.reference and c.initial == Quantized.NAME for c in reverted)
    assert "back-off round 1" in tight.report() and "back-off round 1" in tight.to_yaml()


def test_bound_on_steps_needs_a_scheduler():
    with pytest.raises(ValueError, match="bound_on='step' needs a diffusers pipeline"):
        run_calibrate(make_net(), step_loop(), bound_on="step")


# -- memory -----------------------------------------------------------------------------------------------

class OneLayer(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.layer = Layer(dim, heads, 1.0)

    def forward(self, x):
        return self.layer(x)


def one_layer_run(seq):
    torch.manual_seed(0)
    model = OneLayer().eval()
    x = torch.randn(1, seq, 32)

    def run(m):
        with torch.no_grad():
            return m(x)
    return model, run


D, ROWS = 16, 128  # head_dim of OneLayer (32 / 2 heads); query rows sampled


@pytest.mark.parametrize("seq", [512, 4096])
def test_sample_memory_is_bounded_for_long_sequences(seq):
    model, run = one_layer_run(seq)
    cal = run_calibrate(model, run, heads=2, query_rows=ROWS, min_psnr=0.0)
    (choice,) = cal.choices
    # the stated bound: heads x (query rows x d + seq_kv x (d + d_v)) x 4 bytes: the query rows and heads
    # are fixed, only the keys and values of the sampled heads follow the sequence
    want = 2 * (ROWS * D + seq * 2 * D) * 4
    assert choice.sample_bytes == want == cal.capture["max_sample_bytes"]
    whole_call = 3 * 2 * seq * D * 4
    assert choice.sample_bytes <= whole_call
    assert choice.samples == 1 and choice.backend == Quantized.NAME


def test_sample_budget_drops_heads_then_skips_the_site():
    seq = 512
    model, run = one_layer_run(seq)
    one_head = (ROWS * D + seq * 2 * D) * 4
    one = run_calibrate(model, run, heads=2, query_rows=ROWS, budget=one_head, min_psnr=0.0)
    assert one.choices[0].sample_bytes == one_head  # two heads did not fit: one was sampled
    # below one head's keys and values: not sampled, kept exact, and said so
    small = run_calibrate(model, run, heads=2, query_rows=ROWS, budget=one_head // 2, min_psnr=0.0)
    (kept,) = small.choices
    assert kept.backend == "sdpa" and kept.samples == 0 and kept.sample_bytes == 0
    assert "over the budget" in kept.why and "raise budget=" in kept.why


def test_sample_takes_the_heads_most_exposed_to_rounding():
    cap = capture.Capture(candidates=[Quantized.NAME], heads=1, query_rows=128)
    q, k, v = (torch.randn(1, 4, 300, 16) for _ in range(3))
    q[:, 2] *= 10  # head 2 has the largest |q|
    call, _ = build_call(q, k, v, "bnsd", None, False, None, 0.0, False)
    info = cap.info_for(call)
    rec = capture.SiteRecord(site=None, bucket=None)
    cap.sample(rec, info, None, q, k, v, None, False, None)
    assert rec.samples == 1 and rec.sample_bytes == (128 * 16 + 300 * 32) * 4
    # the error measured is that of head 2: large |q| makes the rounding error small relative to it
    ref = capture.reference_attention(q[:, 2:3], k[:, 2:3], v[:, 2:3], None, False, None)
    out = Quantized().build(call)(q[:, 2:3], k[:, 2:3], v[:, 2:3], None, False, None, 0.0)
    rows = cap._rows(300, False)
    want = capture.sample_errors(out[:, :, rows], ref[:, :, rows])
    assert rec.errors[Quantized.NAME].rel_l2 == pytest.approx(want.rel_l2, rel=1e-9)
    assert cap._rows(300, True) is None and cap._rows(100, False) is None  # causal: every row


class MaskedLayer(nn.Module):
    """SDPA with a causal flag or a key-padding mask (the sample slices the mask; the reference follows)."""

    def __init__(self, kind: str, dim=32, heads=2):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.kind, self.heads = kind, heads

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        keep = torch.ones(b, 1, 1, s, dtype=torch.bool)
        keep[..., s - s // 5:] = False  # the last fifth of the keys is padding
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("kind", ["causal", "padding"])
def test_samples_of_causal_and_masked_calls_are_measured_right(kind):
    torch.manual_seed(0)
    model = MaskedLayer(kind).eval()
    x = torch.randn(2, 400, 32)

    def run(m):
        with torch.no_grad():
            return m(x)
    cal = run_calibrate(model, run, candidates=[Quantized.NAME, "sdpa_math"], query_rows=128, min_psnr=0.0)
    (c,) = cal.choices
    # an exact kernel matches the float64 reference on the sample: the sample kept the mask semantics
    assert c.errors["sdpa_math"].rel_l2 < 1e-5 and c.errors["sdpa"].rel_l2 < 1e-5
    assert 1e-4 < c.errors[Quantized.NAME].rel_l2 < 0.1
    d = 16
    rows = 400 if kind == "causal" else 128  # causal calls keep every query row
    mask_bytes = 0 if kind == "causal" else 400  # the (1, 1, 1, seq_kv) bool slice of the mask
    assert c.sample_bytes == 2 * (rows * d + 400 * 2 * d) * 4 + mask_bytes


# -- exact undo -------------------------------------------------------------------------------------------

def test_remove_leaves_the_model_as_it_was():
    net = make_net()
    run = step_loop()
    before = snapshot(net)
    ref = run(net)
    n_backends = len(registry.backend_names())
    cal = run_calibrate(net, run, min_psnr=0.0)
    assert cal.lossy_choices
    assert_restored(net, before)
    assert patch_mod.patch_of(net) is None
    assert len(registry.backend_names()) == n_backends  # the capture backend is gone
    assert not [n for n in registry.backend_names() if n.startswith("calibrate_capture")]
    assert torch.equal(run(net), ref)


class LeftOut(SdpaBackend):
    """Test-only exact backend that auto leaves out on this device class (as FlashAttention 4 on sm90:
    as fast as the best, but seconds of import and kernel compilation in every fresh process)."""

    NAME = "test_left_out"
    AUTO_PRIORITY: dict = {}
    AUTO_LEFT_OUT = {"cpu": "a fresh process pays seconds to import it"}


def test_default_candidates_leave_out_what_auto_leaves_out():
    """A calibrated recipe naming such a backend would pay its cold start in every fresh process, which
    a calibrated recipe exists to avoid; naming it in candidates= is the way to measure it anyway."""
    registry.register_backend(LeftOut, replace=True)
    try:
        call = build_call(*(torch.randn(1, 4, 300, 16) for _ in range(3)), "bnsd", None, False, None, 0.0,
                          False, False)[0]
        info = capture.Capture().info_for(call)
        assert LeftOut.NAME not in info.candidates
        assert info.refused[LeftOut.NAME].startswith("auto leaves it out on cpu: a fresh process pays seconds")
        assert Quantized.NAME in info.candidates  # the defaults otherwise unchanged
        named = capture.Capture(candidates=[LeftOut.NAME, Quantized.NAME]).info_for(call)
        assert set(named.candidates) == {LeftOut.NAME, Quantized.NAME}
    finally:
        registry.unregister_backend(LeftOut.NAME)


def test_refuses_a_patched_target_and_use_backend():
    net = make_net()
    p = attnpatch.apply(net)
    try:
        with pytest.raises(ValueError, match="remove"):
            run_calibrate(net, step_loop())
    finally:
        p.remove()
    with attnpatch.use_backend("sdpa"), pytest.raises(ValueError, match="use_backend"):
        run_calibrate(net, step_loop())
    with pytest.raises(ValueError, match="unknown attention backend"):
        run_calibrate(net, step_loop(), candidates=["no_such_backend"])


# -- a diffusers pipeline: teacher forcing, the floor, SSIM ------------------------------------------------

@pytest.fixture(scope="module")
def sd_pipe():
    pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_models.build("tiny-sd15-pipeline")


def test_pipeline_teacher_forced_steps_beside_the_floor(sd_pipe):
    pipe = sd_pipe
    steps = 4
    unet_before = snapshot(pipe.unet)
    sched_before = set(vars(pipe.scheduler))

    def run(p):
        return p(**tiny_models.pipeline_call_kwargs(p, steps=steps)).images

    ref = run(pipe)
    phases = []
    cal = run_calibrate(pipe, run, step_buckets=2, min_psnr=0.0,
                        progress=lambda done, total, what: phases.append((done, total, what)))
    assert cal.recipe["name"] == "sd15-calibrated"
    assert cal.recipe["exclude"]["components"][0] == "vae"  # the shipped sd15 recipe's exclude is kept
    assert cal.total_steps == steps and cal.buckets == [(0, 1), (2, 3)]
    assert all(c.component == "unet" for c in cal.choices) and cal.lossy_choices
    v, f = cal.validation, cal.floor
    assert len(v.teacher_forced) == len(f.teacher_forced) == steps
    # the floor (sdpa vs another exact kernel) is above zero and far below the lossy kernel's error
    assert all(0 < e.rel_l2 < 1e-4 for e in f.teacher_forced)
    assert all(e.rel_l2 > 10 * fe.rel_l2 for e, fe in zip(v.teacher_forced, f.teacher_forced))
    assert v.free_running.ssim is not None and f.free_running.psnr_db > v.free_running.psnr_db
    assert [w for _, _, w in phases][:2] == ["exact run: capturing and measuring samples",
                                            "timing the candidates on the real call shapes"]
    assert phases[-1][0] == phases[-1][1] and len(phases) == 7  # 6 phases, then done
    text = cal.report()
    assert "steps, teacher-forced" in text and "exact-kernel floor" in text
    # everything put back: the UNet, the scheduler (step tracking and tracing), and the output
    assert_restored(pipe.unet, unet_before)
    assert set(vars(pipe.scheduler)) == sched_before and "step" not in vars(pipe.scheduler)
    assert torch.equal(run(pipe), ref)


def test_teacher_forcing_feeds_the_exact_latents(sd_pipe):
    from attnpatch.teacher_forcing import step_errors, trace_steps

    pipe = sd_pipe

    def run():
        return pipe(**tiny_models.pipeline_call_kwargs(pipe, steps=3)).images

    with trace_steps(pipe) as exact:
        run()
    assert len(exact) == 3
    # a run whose first latents differ is put back on the exact trajectory at every later step
    with trace_steps(pipe, feed=exact) as forced:
        kw = tiny_models.pipeline_call_kwargs(pipe, steps=3)
        kw["generator"] = torch.Generator("cpu").manual_seed(5)  # other initial latents, same prompt
        pipe(**kw)
    assert forced.diverged_inputs == [0]  # steps 1 and 2 got the exact run's latents
    errs = step_errors(forced, exact)
    assert errs[0].rel_l2 > 0 and errs[1].rel_l2 == 0 and errs[2].rel_l2 == 0
    assert "step" not in vars(pipe.scheduler)


# -- the CLI ----------------------------------------------------------------------------------------------

def test_cli_calibrate_writes_a_recipe(tmp_path, capsys):
    from attnpatch import cli

    out = tmp_path / "tiny.yaml"
    with autotune.override_timer(fake_timer, devices=("cpu",)):
        rc = cli.main(["calibrate", "tiny-sd15-pipeline", "--out", str(out), "--steps", "2", "--step-buckets", "1",
                       "--candidates", f"{Quantized.NAME},sdpa_flash", "--min-psnr", "20",
                       "--json", str(tmp_path / "cal.json")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rec = recipes.load(out)
    assert rec.name == "sd15-calibrated" and rec.rules
    assert "calibrate [1/" in cap.err and "exact run" in cap.err  # plain progress lines (not a terminal)
    assert "bound: PSNR >= 20 dB" in cap.out and f"wrote {out}" in cap.out
    import json

    doc = json.loads((tmp_path / "cal.json").read_text())
    assert doc["recipe"]["name"] == "sd15-calibrated" and doc["choices"]


def test_cli_calibrate_errors(tmp_path, capsys):
    from attnpatch import cli

    assert cli.main(["calibrate", str(tmp_path / "missing"), "--out", str(tmp_path / "x.yaml")]) == cli.EXIT_USAGE
    assert "no such model folder" in capsys.readouterr().err


# -- metrics ------------------------------------------------------------------------------------------------

def test_quality_metrics():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 32, 32, generator=g)
    m = quality.compare(img, img)
    assert m.psnr_db == math.inf and m.ssim == pytest.approx(1.0) and m.rel_l2 == 0 and m.cosine == 1.0
    noisy = (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    worse = (img + 0.2 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    a, b = quality.compare(noisy, img), quality.compare(worse, img)
    assert 1 > a.ssim > b.ssim and a.psnr_db > b.psnr_db > 0
    mse = ((noisy.double() - img.double()) ** 2).mean().item()
    assert a.psnr_db == pytest.approx(10 * math.log10(1 / mse))  # images in [0, 1]: range 1
    # numpy-style channels-last gives the same SSIM
    cl = quality.compare(noisy.permute(0, 2, 3, 1).numpy(), img.permute(0, 2, 3, 1).numpy())
    assert cl.ssim == pytest.approx(a.ssim, rel=1e-9)
    # SSIM of two constant images: (2ab + C1) / (a^2 + b^2 + C1) (the structure terms are 1)
    x, y = torch.full((1, 1, 16, 16), 0.3), torch.full((1, 1, 16, 16), 0.5)
    c1 = (0.01 * 1.0) ** 2
    assert quality.ssim(x, y, range_=1.0) == pytest.approx((2 * 0.15 + c1) / (0.09 + 0.25 + c1))
    # not an image: no SSIM; latents get the reference's max - min as range
    lat = torch.randn(1, 16, 8, 8, generator=g) * 3
    assert quality.compare(lat + 0.01, lat).ssim is None
    assert quality.data_range(lat) == pytest.approx((lat.max() - lat.min()).item())
    with pytest.raises(TypeError, match="returned None"):
        quality.to_tensor(None)


def test_step_buckets():
    assert capture.step_buckets(20, 4) == [(0, 4), (5, 9), (10, 14), (15, 19)]
    assert capture.step_buckets(3, 4) == [(0, 0), (1, 1), (2, 2)]
    assert capture.step_buckets(10, [0, 2, 8]) == [(0, 1), (2, 7), (8, 9)]
    assert capture.step_buckets(None, 4) == []
