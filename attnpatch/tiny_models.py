"""Small, randomly initialised versions of the models attnpatch ships recipes for.

They are built from the real diffusers / transformers classes with tiny configurations, offline (no
weights are downloaded), so that recipes can be checked against the real module structure of each
model, and so that ``attnpatch demo`` / ``attnpatch inspect tiny-flux`` have something to run.

`build(name)` returns the model (or, for ``*-pipeline`` names, a diffusers pipeline); `NAMES` lists
them; `example_inputs(name, model)` gives keyword arguments for one forward pass (models only).
Every builder imports its library lazily; a missing library is a `ModuleNotFoundError` naming the
``attnpatch[...]`` extra to install.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

_BUILDERS: Dict[str, Callable[[], Any]] = {}
_INPUTS: Dict[str, Callable[[Any], Dict[str, Any]]] = {}
_DESCRIPTIONS: Dict[str, str] = {}


def _builder(name: str, description: str):
    def deco(fn):
        _BUILDERS[name] = fn
        _DESCRIPTIONS[name] = description
        return fn
    return deco


def _inputs(name: str):
    def deco(fn):
        _INPUTS[name] = fn
        return fn
    return deco


def _diffusers():
    try:
        import diffusers
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("this tiny model needs diffusers: pip install 'attnpatch[diffusers]'") from exc
    return diffusers


def _transformers():
    try:
        import transformers
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("this tiny model needs transformers: pip install 'attnpatch[transformers]'") from exc
    return transformers


# -- diffusion transformers and UNets -------------------------------------------------------------

@_builder("tiny-flux", "FluxTransformer2DModel: 2 joint + 2 single blocks, 2 heads x 16")
def _flux():
    d = _diffusers()
    return d.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


@_inputs("tiny-flux")
def _flux_inputs(model):
    h = w = 4
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(1, h * w, 4), encoder_hidden_states=torch.randn(1, 8, 32),
                pooled_projections=torch.randn(1, 32), timestep=torch.tensor([1.0]),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(8, 3), return_dict=False)


@_builder("tiny-flux2", "Flux2Transformer2DModel: 1 joint + 2 single blocks, 2 heads x 16")
def _flux2():
    d = _diffusers()
    return d.Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))


@_builder("tiny-sd3", "SD3Transformer2DModel: 2 joint blocks, 2 heads x 16")
def _sd3():
    d = _diffusers()
    return d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
                                   pos_embed_max_size=16)


def _unet(sdxl: bool):
    d = _diffusers()
    kw = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
              attention_head_dim=(2, 4), norm_num_groups=8)
    if sdxl:
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=(1, 2),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return d.UNet2DConditionModel(**kw)


@_builder("tiny-sdxl", "UNet2DConditionModel with SDXL's text_time conditioning")
def _sdxl():
    return _unet(sdxl=True)


@_builder("tiny-sd15", "UNet2DConditionModel in the SD 1.x / 2.x layout")
def _sd15():
    return _unet(sdxl=False)


@_inputs("tiny-sd15")
def _sd15_inputs(model):
    return dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 6, 32), return_dict=False)


@_builder("tiny-wan", "WanTransformer3DModel (Wan 2.1 / 2.2): 2 blocks, 2 heads x 16")
def _wan():
    d = _diffusers()
    return d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                   in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                   num_layers=2, rope_max_seq_len=32)


@_inputs("tiny-wan")
def _wan_inputs(model):
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([1]),
                encoder_hidden_states=torch.randn(1, 8, 32), return_dict=False)


@_builder("tiny-hunyuanvideo", "HunyuanVideoTransformer3DModel: 1 dual + 1 single + 1 refiner block")
def _hunyuan():
    d = _diffusers()
    return d.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                            attention_head_dim=16, num_layers=1, num_single_layers=1,
                                            num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                            text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6))


@_builder("tiny-cogvideox", "CogVideoXTransformer3DModel: 2 blocks, 2 heads x 16")
def _cogvideox():
    d = _diffusers()
    return d.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                         out_channels=4, time_embed_dim=8, text_embed_dim=32, num_layers=2,
                                         sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                                         temporal_compression_ratio=4, max_text_seq_length=8)


@_builder("tiny-ltx", "LTXVideoTransformer3DModel: 2 blocks, 2 heads x 16")
def _ltx():
    d = _diffusers()
    return d.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                        attention_head_dim=16, cross_attention_dim=32, num_layers=2,
                                        caption_channels=32)


@_builder("tiny-qwenimage", "QwenImageTransformer2DModel: 2 blocks, 2 heads x 16")
def _qwenimage():
    d = _diffusers()
    return d.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         axes_dims_rope=(4, 6, 6))


@_builder("tiny-pixart", "PixArtTransformer2DModel: 2 blocks, 2 heads x 16")
def _pixart():
    d = _diffusers()
    return d.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                      out_channels=8, num_layers=2, cross_attention_dim=32, sample_size=8,
                                      patch_size=2, caption_channels=32, norm_num_groups=8)


@_builder("tiny-sana", "SanaTransformer2DModel: 2 blocks (linear self-attention, SDPA cross-attention)")
def _sana():
    d = _diffusers()
    return d.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                    num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                    cross_attention_dim=32, caption_channels=32, sample_size=8)


@_builder("tiny-vae", "AutoencoderKL with a mid-block attention")
def _vae():
    d = _diffusers()
    return d.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                           layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)


# -- transformers models ---------------------------------------------------------------------------

@_builder("tiny-llama", "LlamaForCausalLM: 2 layers, GQA 4 query / 2 kv heads")
def _llama():
    t = _transformers()
    cfg = t.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return t.LlamaForCausalLM(cfg).eval()


@_inputs("tiny-llama")
def _lm_inputs(model):
    return dict(input_ids=torch.randint(0, 128, (1, 12)))


@_builder("tiny-qwen2", "Qwen2ForCausalLM: 2 layers, GQA 4 query / 2 kv heads")
def _qwen2():
    t = _transformers()
    cfg = t.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return t.Qwen2ForCausalLM(cfg).eval()


_inputs("tiny-qwen2")(_lm_inputs)


@_builder("tiny-t5", "T5EncoderModel: 2 layers, 2 heads x 8")
def _t5():
    t = _transformers()
    cfg = t.T5Config(vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    return t.T5EncoderModel(cfg).eval()


_inputs("tiny-t5")(_lm_inputs)


@_builder("tiny-clip", "CLIPTextModel: 2 layers, 2 heads x 16")
def _clip():
    t = _transformers()
    cfg = t.CLIPTextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=32, projection_dim=32,
                           bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return t.CLIPTextModel(cfg).eval()


_inputs("tiny-clip")(_lm_inputs)


# -- a whole pipeline --------------------------------------------------------------------------------

@_builder("tiny-sd15-pipeline", "StableDiffusionPipeline: tiny UNet + tiny VAE + tiny CLIP text encoder "
                                "(prompts are given as embeddings; no tokenizer)")
def _sd15_pipeline():
    d = _diffusers()
    unet = _unet(sdxl=False)
    vae = _vae()
    text_encoder = _clip()
    scheduler = d.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = d.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                     scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call_kwargs(pipe, steps: int = 4, seed: int = 0) -> Dict[str, Any]:
    """Keyword arguments that run the tiny SD pipeline offline: the prompt is given as embeddings
    computed by its text encoder from fixed token ids (there is no tokenizer)."""
    device = next(pipe.unet.parameters()).device
    dtype = next(pipe.unet.parameters()).dtype
    g = torch.Generator("cpu").manual_seed(seed)
    ids = torch.randint(0, 128, (1, 6), generator=g).to(device)
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0].to(dtype)
        negative = pipe.text_encoder(torch.zeros_like(ids))[0].to(dtype)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps,
                guidance_scale=2.0, height=16, width=16, output_type="pt",
                generator=torch.Generator("cpu").manual_seed(seed))


NAMES: List[str] = sorted(_BUILDERS)


def describe(name: str) -> str:
    return _DESCRIPTIONS[name]


def build(name: str, seed: int = 0):
    """Build the tiny model ``name`` (see `NAMES`) with random weights drawn from ``seed``."""
    if name not in _BUILDERS:
        raise KeyError(f"no tiny model named {name!r}; known: {', '.join(NAMES)}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return _BUILDERS[name]()
    finally:
        torch.random.set_rng_state(state)


def example_inputs(name: str, model=None, seed: int = 0) -> Dict[str, Any]:
    """Keyword arguments for one forward pass of tiny model ``name``, drawn from ``seed`` (KeyError when
    there are none)."""
    if name not in _INPUTS:
        raise KeyError(f"no example inputs for {name!r}; have: {', '.join(sorted(_INPUTS))}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same inputs every time
    try:
        return _INPUTS[name](model)
    finally:
        torch.random.set_rng_state(state)
