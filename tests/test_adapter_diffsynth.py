"""The DiffSynth adapter on real DiffSynth-Studio models (tiny configs, random weights): the Wan DiT's
own attention function and ``diffsynth.core.attention.attention_forward`` are routed for the patched
model only, outputs match, masks arrive, removal is exact."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.patch import Site

pytest.importorskip("diffsynth")
wan_dit = pytest.importorskip("diffsynth.models.wan_video_dit")
from diffsynth.core import attention as ds_attention  # noqa: E402
from diffsynth.core.attention import attention as ds_attention_impl  # noqa: E402
from diffsynth.models import z_image_dit  # noqa: E402
from diffsynth.pipelines.wan_video import model_fn_wan_video  # noqa: E402

from attnpatch.adapters import diffsynth as adapter  # noqa: E402

from _patch_helpers import assert_restored, recording_backend, registered, snapshot  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

Recording = recording_backend("ds_recording")


@pytest.fixture
def rec():
    yield from registered(Recording)


def _apply(model, backend="ds_recording", **kw):
    return attnpatch.apply(model, backend=backend, recipe=False, **kw)


def _wan(image_input=True):
    torch.manual_seed(0)
    # head_dim 24: Wan's 3-D RoPE splits it into 8 + 8 + 8
    return wan_dit.WanModel(dim=48, in_dim=4 if image_input else 2, ffn_dim=64, out_dim=2, text_dim=16,
                            freq_dim=16, eps=1e-6, patch_size=(1, 2, 2), num_heads=2, num_layers=2,
                            has_image_input=image_input).eval()


def _wan_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(latents=torch.randn(1, 2, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                context=torch.randn(1, 5, 16, generator=g), clip_feature=torch.randn(1, 257, 1280, generator=g),
                y=torch.randn(1, 2, 2, 4, 4, generator=g))


def _run_wan(model, inputs):
    with torch.no_grad():
        return model_fn_wan_video(dit=model, **inputs)  # DiffSynth's own Wan forward (as its pipeline runs it)


def test_wan_dit_every_site_routed_bitwise_and_exact_restore(rec):
    model = _wan()
    inputs = _wan_inputs()
    ref = _run_wan(model, inputs)
    before = snapshot(model)
    patch = _apply(model)
    attention_modules = [n for n, m in model.named_modules() if isinstance(m, wan_dit.AttentionModule)]
    image_cross = [n for n, m in model.named_modules()
                   if isinstance(m, wan_dit.CrossAttention) and m.has_image_input]
    assert len(attention_modules) == 4 and len(image_cross) == 2
    assert {s.path for s in patch.routed_sites} == set(attention_modules) | set(image_cross)
    assert all(s.adapter == "diffsynth" for s in patch.sites)
    kinds = {s.path: s.kind for s in patch.sites}
    assert kinds["blocks.0.self_attn.attn"] == "self" and kinds["blocks.0.cross_attn.attn"] == "cross"

    out = _run_wan(model, inputs)
    assert torch.equal(out, ref)  # the SDPA kernel Wan uses on CPU, through attnpatch: bit-identical
    report = {r.site.path: r.calls.get("ds_recording", 0) for r in patch.report().rows}
    assert all(n == 1 for n in report.values()), report
    assert len(rec) == 6
    # self-attention over the 8 latent tokens, text cross-attention (5 tokens), image cross-attention (257)
    # (the recording backend sees its native (b, n, s, d) view of the caller's (b, s, n, d) tensors)
    assert sorted(c["k"][2] for c in rec) == [5, 5, 8, 8, 257, 257]
    assert all(c["layout"] == "bsnd" and c["q"][1] == 2 for c in rec)

    patch.remove()
    assert torch.equal(_run_wan(model, inputs), ref)
    assert_restored(model, before)


def test_wan_patch_is_scoped_to_the_patched_model(rec):
    a, b = _wan(image_input=False), _wan(image_input=False)
    fn, af = wan_dit.flash_attention, ds_attention.attention_forward
    inputs = _wan_inputs()
    inputs.pop("clip_feature"), inputs.pop("y")
    with _apply(a) as patch:
        # CrossAttention names flash_attention in its (here unused) image branch: a site that is not called
        assert len(patch.routed_sites) == 6
        _run_wan(b, inputs)
        assert not rec  # the other Wan model keeps DiffSynth's own attention
        _run_wan(a, inputs)
        assert len(rec) == 4
        assert "blocks.0.cross_attn [diffsynth, cross] -> not called" in str(patch.report())
        # DiffSynth's modules and torch are untouched
        assert wan_dit.flash_attention is fn and ds_attention.attention_forward is af
        assert ds_attention_impl.attention_forward is af
        assert torch.nn.functional.scaled_dot_product_attention is attnpatch.rebind._SDPA


def test_wan_two_models_two_backends(rec):
    a, b = _wan(image_input=False), _wan(image_input=False)
    inputs = _wan_inputs()
    inputs.pop("clip_feature"), inputs.pop("y")
    ref = _run_wan(a, inputs)
    with _apply(a), _apply(b, backend="eager"):
        out_a, out_b = _run_wan(a, inputs), _run_wan(b, inputs)
    assert len(rec) == 4 and attnpatch.stats().calls.get("eager") == 4
    assert torch.equal(out_a, ref)
    torch.testing.assert_close(out_b, ref, atol=1e-5, rtol=1e-4)


def _zimage_attention():
    torch.manual_seed(0)
    return z_image_dit.Attention(q_dim=32, num_heads=4, head_dim=8).eval()


def test_attention_forward_callers_are_routed_with_their_masks(rec):
    """Z-Image's attention calls diffsynth.core.attention.attention_forward with (b, s, n, d) patterns
    and a padding mask: the mask reaches the router and the result equals DiffSynth's own."""
    attn = _zimage_attention()
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., -2:] = False
    with torch.no_grad():
        ref = attn(x, None, mask)
    before = snapshot(attn)
    patch = _apply(attn)
    assert [(s.path, s.adapter, s.heads, s.head_dim) for s in patch.sites] == [("", "diffsynth", 4, 8)]
    with torch.no_grad():
        out = attn(x, None, mask)
    assert torch.equal(out, ref)
    assert len(rec) == 1 and rec[0]["layout"] == "bsnd" and torch.equal(rec[0]["mask"], mask)
    patch.remove()
    assert_restored(attn, before)
    with torch.no_grad():
        assert torch.equal(attn(x, None, mask), ref)


def _site(backend="ds_recording"):
    site = Site(path="test", adapter="diffsynth")
    site.scope = attnpatch.controls.Scope(backends=(backend,), source="test", site=site)
    return site


@pytest.mark.parametrize("patterns,dims", [
    (("b n s d", "b n s d", "b n s d", "b n s d"), None),
    (("b s n d", "b s n d", "b s n d", "b s (n d)"), {"n": 4}),
    (("b s (n d)", "b s (n d)", "b s (n d)", "b n s d"), {"n": 4}),
])
def test_attention_forward_replacement_keeps_diffsynth_semantics(rec, patterns, dims):
    site = _site()
    fn = adapter.make_attention_forward(site, ds_attention.attention_forward)
    shapes = {"b n s d": (2, 4, 7, 8), "b s n d": (2, 7, 4, 8), "b s (n d)": (2, 7, 32)}
    q, k, v = (torch.randn(shapes[p]) for p in patterns[:3])
    kw = dict(zip(("q_pattern", "k_pattern", "v_pattern", "out_pattern"), patterns), dims=dims)
    for extra in ({}, {"is_causal": True}, {"scale": 0.2}, {"attn_mask": torch.randn(7, 7)}):
        rec.clear()
        out = fn(q, k, v, **kw, **extra)
        ref = ds_attention.attention_forward(q, k, v, **kw, **extra)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        assert len(rec) == 1 and rec[0]["causal"] == extra.get("is_causal", False)
    assert not site.bypassed


def test_sliding_window_is_a_mask_and_flex_is_a_counted_bypass(rec):
    site = _site()
    fn = adapter.make_attention_forward(site, ds_attention.attention_forward)
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    out = fn(q, k, v, window_size=3)
    torch.testing.assert_close(out, ds_attention.attention_forward(q, k, v, window_size=3), atol=1e-6, rtol=1e-5)
    assert len(rec) == 1 and rec[0]["mask"].dtype == torch.bool
    assert rec[0]["mask"][0, 0, 0].tolist() == [True] * 4 + [False] * 8
    seen = []

    def original(*args, **kw):  # stands in for DiffSynth's flex path (compiled flex is slow to build on CPU)
        seen.append(kw)
        return torch.zeros(1)

    fn = adapter.make_attention_forward(site, original)
    fn(q, k, v, use_flex=True, attn_mask="block-mask")
    assert seen and seen[0]["use_flex"] and seen[0]["attn_mask"] == "block-mask"
    assert len(rec) == 1 and sum(site.bypassed.values()) == 1 and "flex" in next(iter(site.bypassed))


def test_wan_flash_attention_replacement(rec):
    site = _site()
    fn = adapter.make_wan_flash_attention(site, wan_dit.flash_attention)
    q, k, v = torch.randn(2, 9, 24), torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    assert torch.equal(fn(q, k, v, num_heads=3), wan_dit.flash_attention(q, k, v, num_heads=3))
    assert rec[0]["q"] == (2, 3, 9, 8) and rec[0]["k"] == (2, 3, 5, 8)  # router view: bnsd


def test_helper_functions_are_followed():
    """A method that reaches attention_forward through a module-level DiffSynth helper is a site."""
    known = adapter._known()
    from diffsynth.models import moss_image_dit

    helpers = [v for v in vars(moss_image_dit).values()
               if callable(v) and getattr(v, "__module__", "") == moss_image_dit.__name__
               and adapter.plan_function(v, known) and not isinstance(v, type)]
    assert helpers, "moss_image_dit has a helper that calls attention_forward"
    plan = adapter.plan_function(helpers[0], known)
    assert any(entry[0] == "known" and entry[1] == "attention_forward" for entry in plan.values())
