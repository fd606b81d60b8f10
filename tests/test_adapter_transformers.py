"""The transformers adapter on real transformers models (small configs, random weights, nothing
downloaded): every attention site runs through attnpatch, outputs match, masks arrive, removal is exact."""

from __future__ import annotations

import copy
import os
import pickle
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import pytest
import torch

import attnpatch
from attnpatch.patch import SITE_ATTR, SITE_OF, Site, extended_class

transformers = pytest.importorskip("transformers")

from attnpatch.adapters import transformers as adapter  # noqa: E402

from _patch_helpers import assert_restored, recording_backend, registered, snapshot  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

Recording = recording_backend("tf_recording")


@pytest.fixture
def rec():
    yield from registered(Recording)


def _apply(model, backend="tf_recording", **kw):
    return attnpatch.apply(model, backend=backend, recipe=False, **kw)


# -- the models ---------------------------------------------------------------------------------------

@dataclass
class Spec:
    build: Callable[[str], torch.nn.Module]  # attn_implementation -> model (eval, fp32)
    inputs: Callable[[], dict]
    output: Callable[[object], torch.Tensor]
    attention_classes: Tuple[str, ...]
    cross: int = 0  # how many of the attention modules are cross-attention
    padded: bool = False  # the inputs contain padding, so some call must carry a mask


def _ids(b, s, vocab=100):
    return torch.randint(3, vocab, (b, s))


def _padding(b, s, pad=3):
    m = torch.ones(b, s, dtype=torch.long)
    m[1, -pad:] = 0
    return m


def _llama(impl):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg).eval()


def _qwen2(impl):
    cfg = transformers.Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
    return transformers.Qwen2Model(cfg).eval()


def _t5(impl):
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                attn_implementation=impl)
    return transformers.T5Model(cfg).eval()


def _bert(impl):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation=impl)
    return transformers.BertModel(cfg).eval()


def _clip(impl):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16, attn_implementation=impl)
    return transformers.CLIPModel(cfg).eval()


def _vit(impl):
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8, attn_implementation=impl)
    return transformers.ViTModel(cfg, add_pooling_layer=False).eval()


def _whisper(impl):
    cfg = transformers.WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                                     max_target_positions=32, pad_token_id=0, attn_implementation=impl)
    return transformers.WhisperModel(cfg).eval()


SPECS: Dict[str, Spec] = {
    "llama": Spec(_llama, lambda: {"input_ids": _ids(2, 9), "attention_mask": _padding(2, 9)},
                  lambda o: o.logits, ("LlamaAttention",), padded=True),
    "qwen2": Spec(_qwen2, lambda: {"input_ids": _ids(2, 9), "attention_mask": _padding(2, 9)},
                  lambda o: o.last_hidden_state, ("Qwen2Attention",), padded=True),
    "t5": Spec(_t5, lambda: {"input_ids": _ids(2, 7), "attention_mask": _padding(2, 7, 2),
                             "decoder_input_ids": _ids(2, 5)},
               lambda o: o.last_hidden_state, ("T5Attention",), cross=2, padded=True),
    "bert": Spec(_bert, lambda: {"input_ids": _ids(2, 8), "attention_mask": _padding(2, 8)},
                 lambda o: o.last_hidden_state, ("BertSelfAttention",), padded=True),
    "clip": Spec(_clip, lambda: {"input_ids": _ids(2, 7), "attention_mask": _padding(2, 7, 2),
                                 "pixel_values": torch.randn(2, 3, 32, 32)},
                 lambda o: torch.cat([o.text_embeds, o.image_embeds], -1), ("CLIPAttention",), padded=True),
    "vit": Spec(_vit, lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
                lambda o: o.last_hidden_state, ("ViTSelfAttention", "ViTAttention")),
    "whisper": Spec(_whisper, lambda: {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": _ids(2, 6)},
                    lambda o: o.last_hidden_state, ("WhisperAttention",), cross=2),
}


def _attention_modules(model, spec):
    """The modules that compute attention (for ViT only the innermost class that calls the interface)."""
    mods = [(n, m) for n, m in model.named_modules() if type(m).__name__ in spec.attention_classes]
    return [(n, m) for n, m in mods if adapter.uses_attention_interface(type(m))]


def _run(model, spec, inputs):
    with torch.no_grad():
        return spec.output(model(**inputs))


def _configs(model):
    out = {}
    for _, m in model.named_modules():
        c = getattr(m, "config", None)
        if c is not None:
            out[id(c)] = c
            for key in getattr(c, "sub_configs", {}):
                sub = getattr(c, key, None)
                if sub is not None:
                    out[id(sub)] = sub
    return {k: (c, c._attn_implementation) for k, c in out.items()}


# -- every model ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SPECS))
def test_every_site_routed_bitwise_and_exact_restore(name, rec):
    """Model configured for SDPA, attnpatch backend = SDPA's own kernel: bit-identical outputs; every
    attention module is a routed site that ran; remove() restores everything exactly."""
    spec = SPECS[name]
    torch.manual_seed(0)
    model = spec.build("sdpa")
    torch.manual_seed(1)
    inputs = spec.inputs()
    ref = _run(model, spec, inputs)
    before = snapshot(model)
    impls = _configs(model)

    patch = _apply(model)
    attention = _attention_modules(model, spec)
    routed = patch.routed_sites
    assert len(attention) > 0
    assert {s.path for s in routed} == {n for n, _ in attention}
    assert all(s.adapter == "transformers" for s in routed)
    assert sum(s.kind == "cross" for s in routed) == spec.cross
    assert all(s.heads and s.head_dim for s in routed)
    for c, _ in impls.values():
        if any(getattr(m, "config", None) is c for _, m in attention):
            assert c._attn_implementation == adapter.IMPLEMENTATION

    out = _run(model, spec, inputs)
    assert torch.equal(out, ref), (out - ref).abs().max()
    report = {r.site.path: r.calls for r in patch.report().rows}
    assert all(report[s.path].get("tf_recording", 0) >= 1 for s in routed), report
    assert len(rec) == sum(sum(c.values()) for c in report.values())
    if spec.padded:
        masked = [c for c in rec if c["mask"] is not None]
        assert masked, "the padding mask never reached the router"
        # the padded keys of batch row 1 are masked out in some call
        assert any((c["mask"].dtype == torch.bool and not c["mask"][1].all())
                   or (c["mask"].dtype != torch.bool and c["mask"][1].min() < -1e30) for c in masked)

    patch.remove()
    assert torch.equal(_run(model, spec, inputs), ref)
    assert_restored(model, before)
    assert {k: v[1] for k, v in _configs(model).items()} == {k: v[1] for k, v in impls.items()}
    assert all(SITE_OF.get(m) is None for _, m in attention)


@pytest.mark.parametrize("name", ["llama", "t5", "bert", "whisper"])
def test_eager_configured_model_matches_within_fp32_tolerance(name, rec):
    """A model configured for eager attention, routed to SDPA: equal within fp32 tolerance; removal
    brings back 'eager' and bit-identical eager outputs."""
    spec = SPECS[name]
    torch.manual_seed(0)
    model = spec.build("eager")
    inputs = spec.inputs()
    ref = _run(model, spec, inputs)
    with _apply(model) as patch:
        assert patch.routed_sites
        out = _run(model, spec, inputs)
        assert rec
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(_run(model, spec, inputs), ref)


def test_bf16_matches_fp32_reference_within_bf16_tolerance(rec):
    torch.manual_seed(0)
    model = _llama("sdpa")
    inputs = SPECS["llama"].inputs()
    ref = _run(model, SPECS["llama"], inputs)
    model = model.to(torch.bfloat16)
    with _apply(model, backend="eager"):  # attnpatch's reference kernel, not the one the model used
        out = _run(model, SPECS["llama"], inputs).float()
    torch.testing.assert_close(out, ref, atol=0.15, rtol=0.05)
    assert attnpatch.stats().calls.get("eager", 0) == 2  # two layers, one forward


# -- what each family needs --------------------------------------------------------------------------

def test_qwen2_gqa_reaches_the_router_unrepeated(rec):
    model = _qwen2("sdpa")
    patch = _apply(model)
    assert {(s.heads, s.kv_heads) for s in patch.routed_sites} == {(4, 2)}
    _run(model, SPECS["qwen2"], {"input_ids": _ids(1, 6)})
    assert rec and all(c["q"][1] == 4 and c["k"][1] == 2 for c in rec)
    assert all(c["causal"] and c["mask"] is None for c in rec)  # no padding: SDPA's is_causal path
    patch.remove()


def test_t5_relative_position_bias_is_an_additive_mask(rec):
    model = _t5("sdpa")
    spec = SPECS["t5"]
    with _apply(model) as patch:
        kinds = {s.path: s.kind for s in patch.sites}
        assert kinds["decoder.block.0.layer.1.EncDecAttention"] == "cross"
        assert kinds["encoder.block.0.layer.0.SelfAttention"] == "self"
        _run(model, spec, {"input_ids": _ids(1, 7), "decoder_input_ids": _ids(1, 5)})
    # every call carries the position bias as a float mask (T5 has no scaling: scale=1.0)
    assert len(rec) == 6 and all(c["mask"] is not None and c["mask"].is_floating_point() for c in rec)
    assert all(c["scale"] == 1.0 and not c["causal"] for c in rec)
    enc_self = [c for c in rec if c["q"][2] == 7 and c["k"][2] == 7]
    assert enc_self and enc_self[0]["mask"].shape[1] == 4  # per-head bias
    dec_self = [c for c in rec if c["q"][2] == 5 and c["k"][2] == 5]
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert dec_self and (dec_self[0]["mask"][0, 0][future] < -1e30).all()  # causal folded in
    assert (dec_self[0]["mask"][0, 0][~future] > -1e30).all()


def test_whisper_decoder_self_attention_is_causal_cross_is_not(rec):
    model = _whisper("sdpa")
    with _apply(model) as patch:
        assert sum(s.kind == "cross" for s in patch.sites) == 2
        _run(model, SPECS["whisper"], SPECS["whisper"].inputs())
    enc = [c for c in rec if c["q"][2] == 16]
    dec_self = [c for c in rec if c["q"][2] == 6 and c["k"][2] == 6]
    cross = [c for c in rec if c["q"][2] == 6 and c["k"][2] == 16]
    assert len(enc) == len(dec_self) == len(cross) == 2
    assert not any(c["causal"] for c in enc + cross)
    assert all(c["causal"] and c["mask"] is None for c in dec_self)


def test_clip_patches_text_and_vision_towers_and_restores_sub_configs(rec):
    model = _clip("sdpa")
    cfgs = (model.config, model.config.text_config, model.config.vision_config)
    before = [c._attn_implementation for c in cfgs]
    patch = _apply(model)
    paths = [s.path for s in patch.routed_sites]
    assert sum(p.startswith("text_model.") for p in paths) == 2
    assert sum(p.startswith("vision_model.") for p in paths) == 2
    assert model.text_model.config._attn_implementation == "attnpatch"
    assert model.vision_model.config._attn_implementation == "attnpatch"
    _run(model, SPECS["clip"], SPECS["clip"].inputs())
    text = [c for c in rec if c["q"][2] == 7]
    assert text and all(c["mask"] is not None for c in text)  # causal + padding, as a mask
    patch.remove()
    assert [c._attn_implementation for c in cfgs] == before


def test_sub_model_alone_can_be_patched(rec):
    model = _clip("sdpa")
    patch = _apply(model.text_model)
    assert len(patch.routed_sites) == 2
    assert model.config.vision_config._attn_implementation == "sdpa"
    _run(model, SPECS["clip"], SPECS["clip"].inputs())
    assert rec and all(c["q"][2] == 7 for c in rec)  # the vision tower was not routed
    patch.remove()
    assert model.config.text_config._attn_implementation == "sdpa"


def test_dropout_only_in_training(rec):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, attention_dropout=0.25, attn_implementation="sdpa")
    model = transformers.LlamaModel(cfg).eval()
    with _apply(model):
        model(_ids(1, 5))
        model.train()
        model(_ids(1, 5))
    assert [c["dropout"] for c in rec] == [0.0, 0.25]


def test_scaling_reaches_the_router(rec):
    model = _llama("sdpa")
    with _apply(model):
        _run(model, SPECS["llama"], {"input_ids": _ids(1, 4)})
    assert rec and all(c["scale"] == pytest.approx(16 ** -0.5) for c in rec)


def test_models_that_declare_no_sdpa_support_for_an_unknown_reason_are_reported_not_switched(rec):
    """A model that declares _supports_sdpa=False for a reason attnpatch does not know stays on its own
    implementation, each site is reported with the reason, and outputs are unchanged."""
    cfg = transformers.Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = transformers.Gemma2Model(cfg).eval()
    model.config.model_type = "not_a_known_family"  # what attnpatch keys SERVED_WITHOUT_SDPA on
    ids = _ids(1, 6)
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    impl = model.config._attn_implementation
    with _apply(model) as patch:
        assert len(patch.sites) == 2 and not patch.routed_sites
        assert all("_supports_sdpa=False" in s.note for s in patch.sites)
        assert "NOT ROUTED" in str(patch.report())
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            assert torch.equal(model(ids).last_hidden_state, ref)
    assert not rec


def test_softcap_call_is_routed_to_a_backend_that_serves_softcap(rec):
    """A call that carries softcap is never run without it: the router picks a backend that serves
    softcap (the recording backend does not: the fallback is counted)."""
    cfg = transformers.Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    attn = transformers.Gemma2Model(cfg).layers[0].self_attn.eval()
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma_eager

    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    site = Site(path="layers.0.self_attn", adapter="transformers", scope=attnpatch.controls.Scope(
        backends=("tf_recording",), source="test"))
    site.scope.site = site
    attn.__class__ = extended_class(type(attn), {SITE_ATTR: weakref.ref(site)})
    out, _ = adapter.attention_forward(attn, q, k, v, None, scaling=0.3, softcap=2.0)
    causal = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    ref, _ = gemma_eager(attn, q, k, v, causal[None, None], scaling=0.3, softcap=2.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not rec and not site.bypassed
    calls, fallbacks = site.counts()
    assert calls == {"eager": 1}
    ((refused, used, why),) = fallbacks
    assert refused == "tf_recording" and used == "eager" and "softcap=2.0 is not supported" in why


def test_deepcopy_pickle_and_save_pretrained(rec, tmp_path):
    torch.manual_seed(0)
    model = _bert("sdpa")
    spec = SPECS["bert"]
    inputs = spec.inputs()
    ref = _run(model, spec, inputs)
    model.save_pretrained(tmp_path / "before")
    patch = _apply(model)
    model.save_pretrained(tmp_path / "during")
    clone = copy.deepcopy(model)
    loaded = pickle.loads(pickle.dumps(model))
    for m in (clone, loaded):  # copies are unpatched models: stock implementation, same outputs
        assert m.config._attn_implementation == "sdpa" and type(m.config) is type(model.config).__mro__[1]
        assert attnpatch.remove(m) == 0
        rec.clear()
        assert torch.equal(_run(m, spec, inputs), ref) and not rec
    patch.remove()
    model.save_pretrained(tmp_path / "after")
    for d in ("during", "after"):
        for f in os.listdir(tmp_path / "before"):
            assert (tmp_path / d / f).read_bytes() == (tmp_path / "before" / f).read_bytes(), (d, f)
    assert b"attnpatch" not in (tmp_path / "during" / "config.json").read_bytes()
    assert torch.equal(_run(copy.deepcopy(model), spec, inputs), ref)
    assert model.config._attn_implementation == "sdpa"


def test_two_models_two_backends_do_not_leak(rec):
    a, b = _llama("sdpa"), _llama("sdpa")
    inputs = {"input_ids": _ids(1, 5)}
    with _apply(a, backend="tf_recording"), _apply(b, backend="eager"):
        _run(a, SPECS["llama"], inputs)
        n = len(rec)
        _run(b, SPECS["llama"], inputs)
        assert len(rec) == n == 2
        assert attnpatch.stats().calls.get("eager") == 2
    c = _llama("sdpa")  # an unpatched model in the same process is untouched
    assert c.config._attn_implementation == "sdpa"
    _run(c, SPECS["llama"], inputs)
    assert len(rec) == 2


def test_apply_twice_updates_settings_without_rewrapping(rec):
    model = _llama("sdpa")
    p1 = _apply(model)
    before = snapshot(model)
    p2 = _apply(model, backend="eager")
    assert p2 is p1
    assert_restored(model, before)  # nothing new was written on the modules
    _run(model, SPECS["llama"], {"input_ids": _ids(1, 5)})
    assert not rec and attnpatch.stats().calls.get("eager") == 2
    p1.remove()
    assert model.config._attn_implementation == "sdpa"


def test_registered_name_is_inert_for_other_models_and_unregistered_by_the_last_remove():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert "attnpatch" not in ALL_ATTENTION_FUNCTIONS
    a, b = _llama("sdpa"), _llama("sdpa")
    pa = _apply(a, backend="eager")
    pb = _apply(b, backend="eager")
    assert ALL_ATTENTION_FUNCTIONS["attnpatch"] is adapter.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["attnpatch"] is sdpa_mask  # masks are built, never dropped
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward  # other names untouched
    pa.remove()
    assert "attnpatch" in ALL_ATTENTION_FUNCTIONS  # b still uses it
    pb.remove()
    assert "attnpatch" not in ALL_ATTENTION_FUNCTIONS and "attnpatch" not in ALL_MASK_ATTENTION_FUNCTIONS


# -- models that do not use the interface ---------------------------------------------------------------

def test_model_calling_sdpa_itself_falls_to_the_generic_adapter(rec):
    """Falcon (5.24) calls F.scaled_dot_product_attention in its own forward, not the interface."""
    cfg = transformers.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, multi_query=True, attn_implementation="sdpa")
    model = transformers.FalconModel(cfg).eval()
    ids, mask = _ids(2, 6), _padding(2, 6, 2)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
    before = snapshot(model)
    with _apply(model) as patch:
        assert [(s.path, s.adapter) for s in patch.routed_sites] == [("h.0.self_attention", "torch_sdpa"),
                                                                     ("h.1.self_attention", "torch_sdpa")]
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, ref)
    assert len(rec) == 2 and all(c["mask"] is not None for c in rec)
    assert_restored(model, before)


def test_model_computing_attention_itself_is_reported_not_routed(rec):
    """Bloom (5.24) computes softmax(q·kᵀ + alibi) itself: reported per site, outputs unchanged."""
    model = transformers.BloomModel(transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2,
                                                             n_head=4)).eval()
    ids = _ids(1, 6)
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    with _apply(model) as patch:
        assert len(patch.sites) == 2 and not patch.routed_sites
        assert all("softmax" in s.note for s in patch.sites)
        with torch.no_grad():
            assert torch.equal(model(ids).last_hidden_state, ref)
    assert not rec


def test_compile_fullgraph_of_a_patched_llama(rec):
    import torch._dynamo

    model = _llama("sdpa")
    ids = _ids(1, 6)
    with torch.no_grad():
        ref = model(ids).logits
    patch = _apply(model, backend="sdpa")
    torch._dynamo.reset()
    fn = torch.compile(lambda x: model(x).logits, fullgraph=True, backend="eager")  # raises on a graph break
    with torch.no_grad():
        out = fn(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert "compiled: sdpa" in str(patch.report())
    patch.remove()
    torch._dynamo.reset()
