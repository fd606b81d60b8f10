"""The diffusers adapter on real diffusers models with tiny configurations and random weights (nothing
is downloaded): every attention site runs through attnpatch, outputs are unchanged (bitwise where the
routed kernel is the one the model used before), masks reach the router, and removal is exact.

Bitwise claim, checked here: on CPU in float32, diffusers' native path calls
``F.scaled_dot_product_attention`` on permuted views (dispatch_attention_fn) or on (b, h, s, d) tensors
(attention_processor.py). attnpatch's ``sdpa`` backend and the recording backend below make the same
SDPA call on views with the same strides and the same mask, so the outputs are bit-identical, not just
close.
"""

from __future__ import annotations

import copy
import logging
import inspect
import os
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

import attnpatch  # noqa: E402
from attnpatch import registry  # noqa: E402
from attnpatch.adapters import diffusers as dadapter  # noqa: E402
from attnpatch.patch import SITE_OF  # noqa: E402
from diffusers.models import attention_dispatch as AD  # noqa: E402
from diffusers.models.attention import AttentionModuleMixin  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


# -- the recording backend --------------------------------------------------------------------------

class Recording(registry.Backend):
    """Records each call (q shape, mask shape/dtype, causal) and computes it with torch's SDPA."""

    NAME = "recording"
    DESCRIPTION = "test backend: records calls, computes with F.scaled_dot_product_attention"
    SUPPORTS_DROPOUT = True
    calls: list = []

    def build(self, call):
        calls = self.calls

        def run(q, k, v, m, c, s, p):
            calls.append({"q": tuple(q.shape), "k": tuple(k.shape),
                          "mask": None if m is None else (tuple(m.shape), m.dtype), "causal": c})
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p, is_causal=c, scale=s,
                                                  enable_gqa=k.shape[1] != q.shape[1])
        return run


@pytest.fixture
def recording():
    b = attnpatch.register_backend(Recording, replace=True)
    Recording.calls.clear()
    yield Recording.calls
    attnpatch.unregister_backend(b.NAME)


def _apply(target, backend="recording", **kw):
    # recipe=False: these tests pin the backend; shipped recipes are tested with the recipes.
    return attnpatch.apply(target, backend=backend, recipe=False, **kw)


# -- tiny models -------------------------------------------------------------------------------------

def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=1):
    return torch.randn(*shape, generator=_g(seed))


def flux():
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    h = w = 4
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    kw = dict(hidden_states=_rand(1, h * w, 4), encoder_hidden_states=_rand(1, 8, 32, seed=2),
              pooled_projections=_rand(1, 32, seed=3), timestep=torch.tensor([1.0]), img_ids=ids.reshape(-1, 3),
              txt_ids=torch.zeros(8, 3), return_dict=False)
    return m, kw


def sd3():
    m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=16)
    kw = dict(hidden_states=_rand(1, 4, 8, 8), encoder_hidden_states=_rand(1, 6, 32, seed=2),
              pooled_projections=_rand(1, 32, seed=3), timestep=torch.tensor([10]), return_dict=False)
    return m, kw


def unet():
    m = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                       block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                       attention_head_dim=(2, 4), norm_num_groups=8)
    kw = dict(sample=_rand(2, 4, 8, 8), timestep=torch.tensor([10]), encoder_hidden_states=_rand(2, 6, 32, seed=2),
              return_dict=False)
    return m, kw


def wan():
    m = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=2, rope_max_seq_len=32)
    kw = dict(hidden_states=_rand(1, 4, 2, 8, 8), timestep=torch.tensor([1]),
              encoder_hidden_states=_rand(1, 8, 32, seed=2), return_dict=False)
    return m, kw


def cogvideox():
    m = diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=32, num_layers=2,
                                              sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=8)
    kw = dict(hidden_states=_rand(1, 2, 4, 8, 8), encoder_hidden_states=_rand(1, 8, 32, seed=2),
              timestep=torch.tensor([3]), return_dict=False)
    return m, kw


def pixart():
    m = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                           out_channels=8, num_layers=2, cross_attention_dim=32, sample_size=8,
                                           patch_size=2, caption_channels=32, norm_num_groups=8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])  # text padding: PixArt turns it into an additive bias
    kw = dict(hidden_states=_rand(1, 4, 8, 8), encoder_hidden_states=_rand(1, 6, 32, seed=2),
              timestep=torch.tensor([10]), encoder_attention_mask=mask,
              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    return m, kw


def hunyuanvideo():
    m = diffusers.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=16, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])  # 5 real text tokens, 3 padding
    kw = dict(hidden_states=_rand(1, 4, 1, 4, 4), timestep=torch.tensor([3]),
              encoder_hidden_states=_rand(1, 8, 32, seed=2), encoder_attention_mask=mask,
              pooled_projections=_rand(1, 32, seed=3), guidance=torch.tensor([3.0]), return_dict=False)
    return m, kw


def ltx():
    m = diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                             attention_head_dim=16, cross_attention_dim=32, num_layers=2,
                                             caption_channels=32)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    kw = dict(hidden_states=_rand(1, 2 * 4 * 4, 8), encoder_hidden_states=_rand(1, 6, 32, seed=2),
              timestep=torch.tensor([3]), encoder_attention_mask=mask, num_frames=2, height=4, width=4,
              return_dict=False)
    return m, kw


def qwenimage():
    m = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    kw = dict(hidden_states=_rand(1, 16, 16), encoder_hidden_states=_rand(1, 7, 32, seed=2),
              encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5]), img_shapes=[(1, 4, 4)],
              return_dict=False)
    return m, kw


def zimage():
    m = diffusers.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[4, 6, 6], axes_lens=[128, 32, 32])
    # two captions whose lengths round up to different multiples of 32: Z-Image pads them to one
    # length and builds a (batch, seq) bool padding mask
    kw = dict(x=[_rand(4, 1, 8, 8), _rand(4, 1, 8, 8, seed=5)], t=torch.tensor([0.5, 0.5]),
              cap_feats=[_rand(5, 16, seed=2), _rand(40, 16, seed=3)], return_dict=False)
    return m, kw


def vae():
    m = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    kw = dict(sample=_rand(1, 3, 16, 16), return_dict=False)
    return m, kw


def _ids2d(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def chroma():
    m = diffusers.ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
                                           approximator_hidden_dim=32, approximator_layers=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0] + [1] * 16]).bool()  # text padding over the joint sequence
    return m, dict(hidden_states=_rand(1, 16, 4), encoder_hidden_states=_rand(1, 6, 32, seed=2),
                   timestep=torch.tensor([1.0]), img_ids=_ids2d(4, 4), txt_ids=torch.zeros(6, 3),
                   attention_mask=mask, return_dict=False)


def flux2():
    ids = torch.zeros(16, 4)
    ids[:, 2] = torch.arange(4).repeat_interleave(4)
    ids[:, 3] = torch.arange(4).repeat(4)
    m = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
    return m, dict(hidden_states=_rand(1, 16, 4), encoder_hidden_states=_rand(1, 6, 32, seed=2),
                   timestep=torch.tensor([1.0]), img_ids=ids, txt_ids=torch.zeros(6, 4), guidance=torch.tensor([3.0]),
                   return_dict=False)


def sana():
    m = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                         num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                         cross_attention_dim=32, caption_channels=32, sample_size=8)
    return m, dict(hidden_states=_rand(1, 4, 8, 8), encoder_hidden_states=_rand(1, 6, 32, seed=2),
                   timestep=torch.tensor([3]), encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
                   return_dict=False)


def auraflow():
    m = diffusers.AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                             num_single_dit_layers=1, attention_head_dim=16, num_attention_heads=2,
                                             joint_attention_dim=32, caption_projection_dim=32, out_channels=4,
                                             pos_embed_max_size=64)
    return m, dict(hidden_states=_rand(1, 4, 8, 8), encoder_hidden_states=_rand(1, 6, 32, seed=2),
                   timestep=torch.tensor([3]), return_dict=False)


def mochi():
    m = diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                                          pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16)
    return m, dict(hidden_states=_rand(1, 4, 2, 8, 8), encoder_hidden_states=_rand(1, 6, 32, seed=2),
                   timestep=torch.tensor([3]), encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
                   return_dict=False)


def lumina2():
    m = diffusers.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                                            num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                                            axes_dim_rope=(4, 2, 2), axes_lens=(64, 32, 32), cap_feat_dim=16)
    return m, dict(hidden_states=_rand(2, 4, 8, 8), timestep=torch.tensor([0.5, 0.5]),
                   encoder_hidden_states=_rand(2, 6, 16, seed=2),
                   encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]), return_dict=False)


def hunyuandit():
    m = diffusers.HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2,
                                    sample_size=8, hidden_size=32, num_layers=2, cross_attention_dim=32,
                                    cross_attention_dim_t5=32, pooled_projection_dim=16, text_len=6, text_len_t5=6,
                                    use_style_cond_and_image_meta_size=False)
    return m, dict(hidden_states=_rand(1, 4, 8, 8), timestep=torch.tensor([3.0]),
                   encoder_hidden_states=_rand(1, 6, 32, seed=2), text_embedding_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
                   encoder_hidden_states_t5=_rand(1, 6, 32, seed=3),
                   text_embedding_mask_t5=torch.tensor([[1, 1, 1, 1, 1, 0]]), return_dict=False)


def cogview4():
    m = diffusers.CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, text_embed_dim=32,
                                             time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8,
                                             rope_axes_dim=(16, 16))
    return m, dict(hidden_states=_rand(1, 4, 8, 8), encoder_hidden_states=_rand(1, 6, 32, seed=2),
                   timestep=torch.tensor([3]), original_size=torch.tensor([[8, 8]]), target_size=torch.tensor([[8, 8]]),
                   crop_coords=torch.tensor([[0, 0]]), return_dict=False)


def allegro():
    m = diffusers.AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
                                            in_channels=4, out_channels=4, num_layers=1, cross_attention_dim=32,
                                            sample_height=8, sample_width=8, sample_frames=2, caption_channels=32)
    return m, dict(hidden_states=_rand(1, 4, 2, 8, 8), encoder_hidden_states=_rand(1, 6, 32, seed=2),
                   timestep=torch.tensor([3]), encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
                   return_dict=False)


def svd():
    m = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12, cross_attention_dim=16, num_attention_heads=(2, 4))
    return m, dict(sample=_rand(1, 2, 8, 8, 8), timestep=torch.tensor([3]), encoder_hidden_states=_rand(1, 1, 16, seed=2),
                   added_time_ids=torch.tensor([[1.0, 2.0, 3.0]]), return_dict=False)


def wan_vae():
    """Wan's VAE: its attention block calls SDPA in its own forward (a method site, no processor)."""
    m = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                   temperal_downsample=[True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return m, dict(sample=_rand(1, 3, 5, 16, 16), return_dict=False)


MORE_MODELS = {
    "chroma": chroma, "flux2": flux2, "sana": sana, "auraflow": auraflow, "mochi": mochi, "lumina2": lumina2,
    "hunyuandit": hunyuandit, "cogview4": cogview4, "allegro": allegro, "svd": svd, "wan_vae": wan_vae,
}


MODELS = {
    "flux": flux, "sd3": sd3, "unet": unet, "wan": wan, "cogvideox": cogvideox, "pixart": pixart,
    "hunyuanvideo": hunyuanvideo, "ltx": ltx, "qwenimage": qwenimage, "zimage": zimage, "vae": vae,
}
#: models whose forward builds a text-padding mask that must reach the router as a mask
MASKED = {"pixart", "hunyuanvideo", "ltx", "qwenimage", "zimage"}


def build(name):
    torch.manual_seed(0)
    model, kw = {**MODELS, **MORE_MODELS}[name]()
    return model.eval(), kw


def run(model, kw):
    with torch.no_grad():
        out = model(**kw)
    while isinstance(out, (tuple, list)) or hasattr(out, "sample"):
        out = out[0] if isinstance(out, (tuple, list)) else out.sample
    return out


def attention_modules(model):
    """Independent count of attention modules: diffusers' attention classes and anything with a
    processor."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (Attention, AttentionModuleMixin)) or "processor" in m.__dict__
            or "processor" in m._modules]


def snapshot(model):
    """vars() (shallow: the same objects) and type() of every module and processor, and the state_dict."""
    mods = {}
    for name, m in model.named_modules():
        mods[name] = (type(m), dict(vars(m)))
        proc = m.__dict__.get("processor")
        if proc is not None:
            mods[name + "#processor"] = (type(proc), dict(vars(proc)) if hasattr(proc, "__dict__") else None)
    return mods, {k: v.clone() for k, v in model.state_dict().items()}


#: attributes a model re-creates on itself in every forward (Wan VAE's causal-conv caches)
VOLATILE = {"_conv_idx", "_enc_conv_idx", "_feat_map", "_enc_feat_map", "_conv_num", "_enc_conv_num"}


def assert_restored(model, snap):
    mods, sd = snap
    now, sd_now = snapshot(model)
    assert now.keys() == mods.keys()
    for name, (cls, d) in mods.items():
        cls2, d2 = now[name]
        assert cls2 is cls, name
        assert d2.keys() == d.keys(), (name, set(d2) ^ set(d))
        for k in d:
            assert d2[k] is d[k] or k in VOLATILE, (name, k)
    assert sd_now.keys() == sd.keys()
    for k in sd:
        assert torch.equal(sd_now[k], sd[k]), k


# -- every model: routed, same output, exact removal ----------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_site_routed_bitwise_and_removed_exactly(name, recording):
    model, kw = build(name)
    snap = snapshot(model)
    ref = run(model, kw)

    patch = _apply(model)
    expected = attention_modules(model)
    sites = [s for s in patch.sites if s.adapter == "diffusers"]
    assert sorted(s.path for s in sites) == sorted(expected)
    assert all(s.routed for s in sites), [(s.path, s.note) for s in sites if not s.routed]
    out = run(model, kw)
    assert recording, "no call reached the recording backend"
    for s in sites:
        calls, fallbacks = s.counts()
        assert calls.get("recording", 0) >= 1, f"{s.path} did not run through attnpatch"
        assert not fallbacks and not s.bypassed
        assert s.heads and s.head_dim and s.kind in ("self", "cross", "joint")
    assert torch.equal(out, ref), (out - ref).abs().max()
    if name in MASKED:
        assert any(c["mask"] is not None for c in recording), "the model's padding mask did not reach the router"

    patch.update(backend="sdpa")  # the same kernel as diffusers' native path
    assert torch.equal(run(model, kw), ref)

    patch.remove()
    assert_restored(model, snap)
    assert torch.equal(run(model, kw), ref)


@pytest.mark.parametrize("name", sorted(MORE_MODELS))
def test_more_families_routed_bitwise_and_removed(name, recording):
    """Further families: Chroma, Flux2, Sana, AuraFlow, Mochi, Lumina2, HunyuanDiT, CogView4,
    Allegro, SVD's spatio-temporal UNet, and Wan's VAE (attention in the block's own forward)."""
    model, kw = build(name)
    ref = run(model, kw)
    snap = snapshot(model)  # after a forward: Wan's VAE sets its feature caches on itself in forward
    patch = _apply(model)
    methods = [n for n, m in model.named_modules() if type(m).__name__ == "AttentionBlock" or
               (dadapter._from_diffusers(type(m)) and "processor" not in vars(m) and "processor" not in m._modules
                and dadapter.class_plans(dadapter.original_class(type(m))))]
    expected = sorted(attention_modules(model) + methods)
    assert sorted(s.path for s in patch.sites) == expected
    assert all(s.adapter == "diffusers" for s in patch.sites)
    out = run(model, kw)
    for s in patch.sites:
        if s.routed:
            assert s.counts()[0].get("recording", 0) >= 1, s.path
        else:  # only Sana's linear self-attention, which has no softmax kernel to route
            assert name == "sana" and "linear attention" in s.note, (s.path, s.note)
    assert torch.equal(out, ref)
    if name == "wan_vae":
        assert any(s.path.endswith("mid_block.attentions.0") for s in patch.sites)
    patch.remove()
    assert_restored(model, snap)
    assert torch.equal(run(model, kw), ref)


def test_site_kinds_and_shapes(recording):
    model, _ = build("flux")
    sites = {s.path: s for s in _apply(model).sites}
    assert sites["transformer_blocks.0.attn"].kind == "joint"
    assert sites["single_transformer_blocks.0.attn"].kind == "self"
    assert (sites["transformer_blocks.0.attn"].heads, sites["transformer_blocks.0.attn"].head_dim) == (2, 16)
    model, _ = build("unet")
    sites = {s.path: s for s in _apply(model).sites}
    a1, a2 = (sites[f"down_blocks.0.attentions.0.transformer_blocks.0.attn{i}"] for i in (1, 2))
    assert a1.kind == "self" and a2.kind == "cross"
    assert (a1.heads, a1.head_dim) == (2, 8)  # 16 channels, UNet's attention_head_dim=2 is the head count
    model, _ = build("wan")
    sites = {s.path: s for s in _apply(model).sites}
    assert sites["blocks.0.attn1"].kind == "self" and sites["blocks.0.attn2"].kind == "cross"


def test_masks_keep_their_meaning(recording):
    """HunyuanVideo's and QwenImage's text padding: padded tokens really are masked (changing them
    does not change the output), and the recording saw a bool/float mask with the key length."""
    for name in ("hunyuanvideo", "qwenimage", "zimage"):
        model, kw = build(name)
        _apply(model)
        Recording.calls.clear()
        out = run(model, kw)
        masked = [c for c in Recording.calls if c["mask"] is not None]
        assert masked, name
        for c in masked:
            assert c["mask"][0][-1] == c["k"][2]  # the mask's last dim is seq_kv (bnsd)
        if name == "hunyuanvideo":
            kw2 = dict(kw)
            ehs = kw["encoder_hidden_states"].clone()
            ehs[:, 5:] = 100.0  # the padded tokens
            kw2["encoder_hidden_states"] = ehs
            assert torch.allclose(run(model, kw2), out, atol=1e-5)
        attnpatch.remove(model)


# -- the mechanism -----------------------------------------------------------------------------------------

def test_processor_signature_name_and_scope():
    model, kw = build("flux")
    proc = model.transformer_blocks[0].attn.processor
    before = inspect.signature(proc.__call__)
    orig_cls = type(proc)
    patch = _apply(model, backend="sdpa")
    assert inspect.signature(proc.__call__) == before  # diffusers filters kwargs with it
    assert type(proc).__name__ == orig_cls.__name__ and isinstance(proc, orig_cls) and type(proc) is not orig_cls
    # scoped: diffusers' dispatcher, torch.nn.functional and the class itself are untouched
    assert AD.dispatch_attention_fn.__module__ == "diffusers.models.attention_dispatch"
    assert F.scaled_dot_product_attention is dadapter._SDPA
    assert orig_cls.__call__.__globals__["dispatch_attention_fn"] is AD.dispatch_attention_fn
    other, _ = build("flux")
    assert type(other.transformer_blocks[0].attn.processor) is orig_cls
    patch.remove()
    assert type(proc) is orig_cls


def test_two_models_two_settings_interleaved_and_threads(recording):
    a, kw = build("flux")
    b, _ = build("flux")
    ref = run(a, kw)
    pa = _apply(a, backend="recording")
    pb = _apply(b, backend="sdpa")
    for _ in range(2):
        run(a, kw)
        run(b, kw)
    errors = []

    def work(m):
        try:
            for _ in range(3):
                assert torch.equal(run(m, kw), ref)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in pa.sites:
        assert set(s.counts()[0]) == {"recording"}
    for s in pb.sites:
        assert set(s.counts()[0]) == {"sdpa"}
    pa.remove()
    pb.remove()


def test_apply_twice_no_double_wrapping(recording):
    model, kw = build("flux")
    ref = run(model, kw)
    p1 = _apply(model)
    proc = model.transformer_blocks[0].attn.processor
    cls1 = type(proc)
    p2 = _apply(model, backend="sdpa")
    assert p2 is p1 and type(proc) is cls1
    assert dadapter.original_class(cls1).__call__ is cls1.__mro__[1].__call__
    assert torch.equal(run(model, kw), ref)
    # patching a sub-model patched by another patch builds on the original class, not on the wrapper
    block = model.transformer_blocks[0]
    p3 = _apply(block, backend="recording")
    inner = type(block.attn.processor)
    assert inner.__mro__[1] is dadapter.original_class(cls1)
    Recording.calls.clear()
    run(model, kw)
    assert p3.sites[0].counts()[0]["recording"] == 1
    p3.remove()
    assert type(block.attn.processor) is cls1
    p1.remove()
    assert type(proc) is dadapter.original_class(cls1)
    assert torch.equal(run(model, kw), ref)


def test_shared_processor_gets_a_copy_per_module(recording):
    model, kw = build("unet")
    shared = AttnProcessor2_0()
    model.set_attn_processor(shared)
    snap = snapshot(model)
    ref = run(model, kw)
    other = Attention(query_dim=16, heads=2, dim_head=8)
    other.set_processor(shared)  # an unpatched module outside the model shares the processor too
    x = _rand(1, 5, 16)
    with torch.no_grad():
        other_ref = other(x)
    patch = _apply(model)
    procs = [m.processor for m in model.modules() if isinstance(m, Attention)]
    assert len({id(p) for p in procs}) == len(procs)  # one processor object per site
    assert type(shared) is AttnProcessor2_0  # the shared object itself is untouched
    Recording.calls.clear()
    with torch.no_grad():
        assert torch.equal(other(x), other_ref)
    assert not Recording.calls  # the module outside the model is not routed
    assert torch.equal(run(model, kw), ref)
    assert all(s.counts()[0]["recording"] >= 1 for s in patch.sites)
    patch.remove()
    assert_restored(model, snap)
    assert all(m.processor is shared for m in model.modules() if isinstance(m, Attention))


def test_processor_that_computes_attention_itself_is_reported(recording):
    model, kw = build("unet")
    model.set_attn_processor(AttnProcessor())
    patch = _apply(model)
    sites = patch.sites
    assert sites and not any(s.routed for s in sites)
    assert all("AttnProcessor2_0" in s.note for s in sites)
    assert "NOT ROUTED" in str(patch.report())
    patch.remove()


def test_ip_adapter_style_module_processor_keeps_weights_and_state_dict(recording):
    """An nn.Module processor (IP-Adapter) keeps its behaviour and weights; only the kernel changes."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    attn.set_processor(IPAdapterAttnProcessor2_0(hidden_size=16, cross_attention_dim=8, num_tokens=(4,), scale=0.7))
    torch.nn.init.normal_(attn.processor.to_k_ip[0].weight)
    holder = torch.nn.Sequential(attn).eval()
    x, ctx, ip = _rand(1, 6, 16), _rand(1, 3, 8, seed=2), _rand(1, 4, 8, seed=3)
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=(ctx, [ip]))
    snap = snapshot(holder)
    patch = _apply(holder)
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=(ctx, [ip]))
    assert torch.equal(out, ref)
    assert len(Recording.calls) == 2  # text attention + IP-Adapter attention
    assert set(holder.state_dict()) == set(snap[1])
    patch.remove()
    assert_restored(holder, snap)


def test_every_processor_class_in_installed_diffusers_is_classified():
    """Scan of all diffusers.models modules: every processor class and module whose code calls
    dispatch_attention_fn or scaled_dot_product_attention (directly, or through a module-level helper
    such as Flux2's _flux2_kv_causal_attention) gets a plan, and its routed copy no longer sees the
    originals (checked through helpers too)."""
    import importlib
    import pkgutil
    import types

    dispatch = AD.dispatch_attention_fn
    sdpa = F.scaled_dot_product_attention
    found = {}
    for info in pkgutil.walk_packages(diffusers.models.__path__, "diffusers.models."):
        if info.name.endswith("attention_dispatch"):
            continue
        try:
            mod = importlib.import_module(info.name)
        except Exception:  # optional dependencies of a few model files
            continue
        for obj in vars(mod).values():
            if isinstance(obj, type) and obj.__module__ == mod.__name__:
                plans = dadapter.class_plans(obj)
                if plans:
                    found[obj] = plans
    names = {c.__name__ for c in found}
    for expected in ("FluxAttnProcessor", "Flux2KVAttnProcessor", "WanAttnProcessor", "AttnProcessor2_0",
                     "JointAttnProcessor2_0", "HunyuanVideoAttnProcessor2_0", "QwenDoubleStreamAttnProcessor2_0",
                     "CogVideoXAttnProcessor2_0", "LTXVideoAttnProcessor", "ZSingleStreamAttnProcessor",
                     "WanAttentionBlock", "VidTokAttnBlock", "HunyuanVideo15AttnBlock", "HunyuanImageRefinerAttnBlock"):
        assert expected in names, expected
    assert len(found) >= 100, len(found)
    site = attnpatch.Site(path="scan", adapter="diffusers")

    def reaches_original(fn, seen):
        if id(fn) in seen:
            return False
        seen.add(id(fn))
        names = dadapter._names(fn)
        for name in names:
            v = fn.__globals__.get(name)
            if v is dispatch or v is sdpa:
                return True
            if v is F and "scaled_dot_product_attention" in names:
                return True
            if (v is torch or v is torch.nn) and {"functional", "scaled_dot_product_attention"} <= names:
                return True
            if v is AD and "dispatch_attention_fn" in names:
                return True
            if isinstance(v, types.FunctionType) and not (v.__module__ or "").startswith("torch"):
                if reaches_original(v, seen):
                    return True
        return False

    for cls in found:
        routed = dadapter.routed_class(cls, site)
        for name in found[cls]:
            fn = inspect.getattr_static(routed, name)
            fn = getattr(fn, "__func__", fn)
            assert fn is not inspect.getattr_static(cls, name)
            assert not reaches_original(fn, set()), f"{cls.__qualname__}.{name} still reaches the original"


def test_flux2_helper_function_is_routed(recording):
    """Flux2KVAttnProcessor calls dispatch through the module-level helper _flux2_kv_causal_attention."""
    from diffusers.models.transformers import transformer_flux2 as t2

    site = attnpatch.Site(path="x", adapter="diffusers")
    cls = dadapter.routed_class(t2.Flux2KVAttnProcessor, site)
    helper = cls.__call__.__globals__["_flux2_kv_causal_attention"]
    assert helper is not t2._flux2_kv_causal_attention
    assert helper.__globals__["dispatch_attention_fn"] is not AD.dispatch_attention_fn


# -- dispatch_attention_fn replacement: semantics ------------------------------------------------------

def _dispatch_case(mask):
    q, k, v = _rand(2, 5, 2, 8), _rand(2, 7, 2, 8, seed=2), _rand(2, 7, 2, 8, seed=3)
    return q, k, v, mask


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "key_padding_float", "sq_skv", "4d", "3d"])
def test_dispatch_replacement_matches_native_bitwise(mask_kind, recording):
    b, sq, sk = 2, 5, 7
    masks = {
        "none": None,
        "key_padding_bool": torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool),
        "key_padding_float": torch.zeros(b, sk).masked_fill(torch.arange(sk) > 4, float("-inf")),
        "sq_skv": torch.rand(sq, sk, generator=_g(4)) > 0.3,
        "4d": torch.rand(b, 1, sq, sk, generator=_g(5)) > 0.3,
        "3d": torch.randn(2, sq, sk, generator=_g(6)),
    }
    q, k, v, mask = _dispatch_case(masks[mask_kind])
    ref = AD.dispatch_attention_fn(q, k, v, attn_mask=mask, backend="native")
    site = attnpatch.Site(path="d", adapter="diffusers")
    site.scope = attnpatch.controls.Scope(backends=("recording",), source="test", site=site)
    fn = dadapter.dispatch_for_site(site, AD.dispatch_attention_fn)
    out = fn(q, k, v, attn_mask=mask)  # processors pass backend=None unless the user chose one
    if mask_kind == "3d":
        # the router views masks as 4-D; torch's CPU SDPA takes another path for a 3-D mask than for
        # the same mask viewed as 4-D (differences ~1e-7), so this one case is close, not bitwise
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, ref)
    assert len(Recording.calls) == 1
    assert (Recording.calls[0]["mask"] is None) == (mask is None)


def test_dispatch_replacement_passes_through_what_it_cannot_serve(recording, caplog):
    site = attnpatch.Site(path="d", adapter="diffusers")
    site.scope = attnpatch.controls.Scope(backends=("recording",), source="test", site=site)
    seen = []

    def original(*args, **kwargs):
        seen.append((args, kwargs))
        return "original"

    fn = dadapter.dispatch_for_site(site, original)
    q, k, v, _ = _dispatch_case(None)
    assert fn(q, k, v, parallel_config=object()) == "original"
    assert fn(q, k, v, attention_kwargs={"return_lse": True}) == "original"
    assert fn(q, k, v, attn_mask=object()) == "original"  # e.g. a flex BlockMask
    assert fn(q, k, v, attn_mask=object()) == "original"
    assert len(seen) == 4 and not Recording.calls
    assert sum(site.bypassed.values()) == 4 and len(site.bypassed) == 3
    assert any("context parallelism" in r.getMessage() for r in caplog.records)
    # the signature is diffusers' own (plus **kwargs)
    params = inspect.signature(AD.dispatch_attention_fn).parameters
    ours = inspect.signature(dadapter.dispatch_for_site(site, AD.dispatch_attention_fn), follow_wrapped=False).parameters
    assert list(params) == [p for p in ours if p != "kwargs"]
    assert all(params[p].default == ours[p].default and params[p].kind == ours[p].kind for p in params)


# -- copies, files, diffusers' own backend setting ----------------------------------------------------------

def _files(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = fh.read()
    return out


def test_deepcopy_pickle_and_save_pretrained(tmp_path, recording):
    model, kw = build("flux")
    ref = run(model, kw)
    model.save_pretrained(tmp_path / "never")
    patch = _apply(model)
    clone = copy.deepcopy(model)
    unpickled = pickle.loads(pickle.dumps(model))
    for m in (clone, unpickled):
        for mod in m.modules():
            proc = mod.__dict__.get("processor")
            assert proc is None or not dadapter.is_routed_class(type(proc))  # copies are plain diffusers objects
        Recording.calls.clear()
        assert torch.equal(run(m, kw), ref)
        assert not Recording.calls  # ... and not routed
    model.save_pretrained(tmp_path / "patched")
    assert _files(tmp_path / "patched") == _files(tmp_path / "never")
    patch.remove()
    model.save_pretrained(tmp_path / "removed")
    assert _files(tmp_path / "removed") == _files(tmp_path / "never")
    assert torch.equal(run(pickle.loads(pickle.dumps(model)), kw), ref)
    assert torch.equal(run(copy.deepcopy(model), kw), ref)


@pytest.fixture
def restore_diffusers_backend():
    reg = AD._AttentionBackendRegistry
    saved = reg._active_backend
    yield
    reg._active_backend = saved  # set_attention_backend also sets diffusers' process-wide default


def test_set_attention_backend_is_honoured_while_patched(recording, restore_diffusers_backend, caplog):
    """A diffusers backend the user chose (before or after apply, or in an attention_backend block) is
    honoured: mapped to attnpatch's backend for the same kernel, noted on the site with a warning, and
    counted as that backend; a backend with no attnpatch equivalent runs on diffusers' dispatcher,
    counted on the site. After remove() diffusers runs the user's setting itself."""
    model, kw = build("flux")
    model.set_attention_backend("_native_math")
    ref_math = run(model, kw)
    model.set_attention_backend("native")
    ref_native = run(model, kw)
    assert not torch.equal(ref_math, ref_native)  # on CPU the math kernel differs in the last bits
    proc = model.transformer_blocks[0].attn.processor
    model.set_attention_backend("_native_math")
    with caplog.at_level(logging.WARNING, logger="attnpatch"):
        patch = _apply(model)  # recording is attnpatch's own choice for every site
        assert all("honoured as attnpatch backend 'sdpa_math'" in s.note for s in patch.sites)
        assert torch.equal(run(model, kw), ref_math)  # the user's math kernel ran, through attnpatch
    assert not Recording.calls and sum(sum(r.calls.values()) for r in patch.report().rows) == len(patch.sites)
    assert {n for r in patch.report().rows for n in r.calls} == {"sdpa_math"}
    assert any("honoured as attnpatch backend" in r.getMessage() for r in caplog.records)
    patch.remove()
    assert torch.equal(run(model, kw), ref_math)

    model.reset_attention_backend()  # no diffusers choice: attnpatch's decides
    # (set_attention_backend also set diffusers' process-wide active backend, which reset leaves alone)
    AD._AttentionBackendRegistry.set_active_backend(AD.AttentionBackendName.NATIVE)
    patch = _apply(model)
    Recording.calls.clear()
    run(model, kw)
    assert len(Recording.calls) == len(patch.sites)
    with AD.attention_backend("_native_math"):  # the context manager is honoured too
        Recording.calls.clear()
        assert torch.equal(run(model, kw), ref_math) and not Recording.calls
    for m in model.modules():  # a backend with no attnpatch equivalent: diffusers' dispatcher runs it
        if getattr(m, "processor", None) is not None:
            m.processor._attention_backend = AD.AttentionBackendName("_native_xla")
    with pytest.raises(Exception):
        run(model, kw)  # (diffusers' XLA attention cannot run on this machine: its own error)
    assert any("has no attnpatch equivalent" in why for s in patch.sites for why in s.bypassed)
    patch.remove()
    model.set_attention_backend("_native_math")
    Recording.calls.clear()
    assert torch.equal(run(model, kw), ref_math)
    assert not Recording.calls


def test_patched_removes_on_error(recording):
    model, kw = build("flux")
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with attnpatch.patched(model, backend="recording", recipe=False):
            run(model, kw)
            raise RuntimeError("boom")
    assert Recording.calls
    assert_restored(model, snap)


@pytest.mark.parametrize("name", ["flux", "unet", "hunyuanvideo", "wan_vae"])
def test_compile_of_patched_model_has_no_graph_breaks(name):
    """dispatch path (Flux), F.scaled_dot_product_attention path (UNet), a padding mask (HunyuanVideo)
    and a method site (Wan VAE): patching adds no graph break to what dynamo makes of stock diffusers
    (none with the torch CI uses; torch 2.11's dynamo breaks 12 times in stock Wan VAE code,
    benchmarks/wan_vae_graph_breaks.py)."""
    import torch._dynamo as dynamo

    model, kw = build(name)
    ref = run(model, kw)
    dynamo.reset()
    stock = dynamo.explain(model)(**kw)
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14):
        assert stock.graph_break_count == 0, stock.break_reasons
    patch = _apply(model, backend="sdpa")
    dynamo.reset()
    try:
        explanation = dynamo.explain(model)(**kw)
        assert explanation.graph_break_count == stock.graph_break_count, explanation.break_reasons
        if name == "flux":
            compiled = torch.compile(model, backend="eager", fullgraph=True)
            with torch.no_grad():
                out = compiled(**kw)[0]
            torch.testing.assert_close(out, ref)
            assert any(row.traced == ["sdpa"] for row in patch.report().rows)
    finally:
        patch.remove()
        dynamo.reset()


def test_adapter_module_imports_without_diffusers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import attnpatch\n"
            "from attnpatch.adapters import diffusers as d\n"
            "assert not d.ADAPTER().available()\n"
            "import torch\n"
            "p = attnpatch.apply(torch.nn.Linear(2, 2), recipe=False)\n"
            "print('ok', [a.NAME for a in __import__('attnpatch.patch', fromlist=['x']).adapters()])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "diffusers" in out.stdout


# -- a whole pipeline, end to end ---------------------------------------------------------------------

def _tiny_clip_tokenizer(tmp_path):
    import json

    from transformers import CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = ["#version: 0.2"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16,
                         pad_token="<|endoftext|>")


def _tiny_pipeline(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = _tiny_clip_tokenizer(tmp_path)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, projection_dim=32,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet_model, _ = build("unet")
    vae_model, _ = build("vae")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae_model, text_encoder=text, tokenizer=tok, unet=unet_model,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_pipe(pipe):
    return pipe("a cat", negative_prompt="dog", num_inference_steps=2, guidance_scale=2.0, height=16, width=16,
                output_type="pt", generator=torch.Generator().manual_seed(0)).images


def test_pipeline_end_to_end(tmp_path, recording):
    pipe = _tiny_pipeline(tmp_path)
    snaps = {n: snapshot(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    ref = _run_pipe(pipe)
    patch = _apply(pipe)
    diff_sites = [s for s in patch.sites if s.adapter == "diffusers"]
    expected = [f"{c}.{n}" for c in ("unet", "vae") for n in attention_modules(getattr(pipe, c))]
    assert sorted(s.path for s in diff_sites) == sorted(expected)
    assert {s.component for s in diff_sites} == {"unet", "vae"}
    out = _run_pipe(pipe)
    assert torch.equal(out, ref)
    for s in patch.routed_sites:  # every routed site of every component (text encoder too, if an adapter has it)
        if not s.path.startswith("vae.encoder."):  # text-to-image decodes only
            assert s.counts()[0].get("recording", 0) >= 1, s.path
    unet_sites = [s for s in diff_sites if s.component == "unet"]
    # 2 steps × classifier-free guidance batch: each UNet site runs once per step
    assert all(s.counts()[0]["recording"] == 2 for s in unet_sites)
    text = str(patch.report())
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2 [diffusers, cross] -> recording×2" in text
    attnpatch.remove(pipe)
    for n, m in pipe.components.items():
        if isinstance(m, torch.nn.Module):
            assert_restored(m, snaps[n])
    assert torch.equal(_run_pipe(pipe), ref)
