"""One process of the context-parallel tests (tests/test_context_parallel.py starts 4 of them).

Every case builds a small model with fixed random weights and inputs, runs it unpatched (the
single-process reference), then patched with ``parallel=...`` over 2 or 4 gloo processes, then again
after ``remove()``. Cases of 2 processes run on both halves of the world at once ([0, 1] and [2, 3],
each its own process group: ``mesh=`` a ProcessGroup). Each process writes its results as JSON:
``{case: {"maxdiff", "scale", "restored", "error", "report", ...}}``.

Run by hand: ``python tests/_cp_worker.py --rank R --world 4 --init file:///tmp/x --out DIR [--only CASE]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CASES = {}


def case(name: str, world: int):
    def deco(fn):
        CASES[name] = (world, fn)
        return fn
    return deco


# -- models and inputs --------------------------------------------------------------------------------------

def _tiny(name):
    from attnpatch import tiny_models

    return tiny_models.build(name).eval()


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _wan_inputs(frames=2, h=8, w=8, text=8):
    g = _gen()
    return dict(hidden_states=torch.randn(1, 4, frames, h, w, generator=g), timestep=torch.tensor([1]),
                encoder_hidden_states=torch.randn(1, text, 32, generator=g), return_dict=False)


def _flux_inputs(h=4, w=4, text=8, batch=1):
    g = _gen()
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(batch, h * w, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.tensor([1.0] * batch),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3), return_dict=False)


def _sd3_inputs(text=6):
    g = _gen()
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([3.0]), return_dict=False)


def _hunyuan_inputs(text=8, valid=5, frames=2, h=4, w=4):
    g = _gen()
    mask = torch.zeros(1, text, dtype=torch.bool)
    mask[:, :valid] = True
    return dict(hidden_states=torch.randn(1, 4, frames, h, w, generator=g), timestep=torch.tensor([3]),
                encoder_hidden_states=torch.randn(1, text, 32, generator=g), encoder_attention_mask=mask,
                pooled_projections=torch.randn(1, 32, generator=g), guidance=torch.tensor([3.0]), return_dict=False)


def _unet_inputs(batch=2):
    g = _gen()
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), return_dict=False)


def _sdxl_inputs():
    g = _gen()
    kw = _unet_inputs(batch=1)
    kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(1, 32, generator=g), time_ids=torch.randn(1, 6, generator=g))
    return kw


def _lm_inputs(length=12, pad=0):
    g = _gen()
    ids = torch.randint(0, 128, (2, length), generator=g)
    kw = dict(input_ids=ids)
    if pad:
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, length - pad:] = 0  # right padding: every query keeps a key to attend
        kw["attention_mask"] = mask
    return kw


class ToyAttention(nn.Module):
    """Self-attention calling F.scaled_dot_product_attention (the generic adapter routes it)."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, mask=None, causal=False):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.heads != self.kv_heads)
        return self.o(o.transpose(1, 2).reshape(b, s, -1))


class ToyBlock(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = ToyAttention(**kw)
        self.norm = nn.LayerNorm(32)

    def forward(self, x, mask=None, causal=False):
        return x + self.attn(self.norm(x), mask, causal)


class ToyModel(nn.Module):
    def __init__(self, layers=2, **kw):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(ToyBlock(**kw) for _ in range(layers))
        self.head = nn.Linear(32, 8)

    def forward(self, x, mask=None, causal=False):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x, mask, causal)
        return self.head(x)


def _toy(**kw):
    torch.manual_seed(0)
    return ToyModel(**kw).eval()


def _toy_recipe(split_mask: bool = False, causal: bool = False):
    splits = [{"module": "blocks.0", "input": "x", "dim": 1}]
    if split_mask:
        splits.append({"module": "blocks.*", "input": "mask", "dim": 3})
    return {"version": 1, "name": "toy", "rules": [{"pattern": "**", "backend": "auto"}],
            "parallel": {"causal": causal, "split": splits, "gather": [{"module": "head", "dim": 1}]}}


def _diffsynth_wan():
    from diffsynth.models import wan_video_dit as wan_dit

    torch.manual_seed(0)
    return wan_dit.WanModel(dim=48, in_dim=4, ffn_dim=64, out_dim=2, text_dim=16, freq_dim=16, eps=1e-6,
                            patch_size=(1, 2, 2), num_heads=2, num_layers=2, has_image_input=True).eval()


DIFFSYNTH_WAN_RECIPE = {
    "version": 1, "name": "diffsynth-wan", "rules": [{"pattern": "**", "backend": "auto"}],
    "parallel": {"split": [{"module": "blocks.0", "input": "x", "dim": 1},
                           {"module": "blocks.*", "input": "freqs", "dim": 0}],
                 "gather": [{"module": "head", "dim": 1}]},
}


def _diffsynth_run(model, h=4, w=4):
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    g = _gen()
    inputs = dict(latents=torch.randn(1, 2, 2, h, w, generator=g), timestep=torch.tensor([500.0]),
                  context=torch.randn(1, 5, 16, generator=g), clip_feature=torch.randn(1, 257, 1280, generator=g),
                  y=torch.randn(1, 2, 2, h, w, generator=g))
    return model_fn_wan_video(dit=model, **inputs)


# -- the comparison ------------------------------------------------------------------------------------------------

def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    for attr in ("logits", "last_hidden_state", "sample"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    raise TypeError(type(out))


def _modules(target):
    comps = getattr(target, "components", None)
    if isinstance(comps, dict):
        return [m for m in comps.values() if isinstance(m, nn.Module)]
    return [target]


def compare(model, run, mesh, parallel, recipe=None, **apply_kw):
    """Reference, parallel and restored outputs of ``run(model)``; returns the result record."""
    import attnpatch
    from _patch_helpers import assert_restored, snapshot

    with torch.no_grad():
        ref = _first(run(model)).clone()
    before = [snapshot(m) for m in _modules(model)]
    spec = dict(parallel, mesh=mesh) if isinstance(parallel, dict) else parallel
    patch = attnpatch.apply(model, recipe=recipe, parallel=spec, **apply_kw)
    try:
        with torch.no_grad():
            out = _first(run(model)).clone()
            again = _first(run(model)).clone()  # cached plans, second forward
        report = str(patch.report())
        counts = {}
        for region in patch.parallel.regions.values():
            counts.update(region.counts)
    finally:
        patch.remove()
    with torch.no_grad():
        restored = _first(run(model))
    try:
        for m, snap in zip(_modules(model), before):
            assert_restored(m, snap)
        restored_vars = "ok"
    except AssertionError as exc:
        restored_vars = str(exc)
    return {"maxdiff": (out - ref).abs().max().item(), "repeat_equal": torch.equal(out, again),
            "restored_vars": restored_vars,
            "scale": ref.abs().max().item(), "restored": torch.equal(restored, ref), "report": report,
            "counts": dict(counts), "shape": list(out.shape)}


def expect_error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test checks the type name and the message
        return {"error_type": type(exc).__name__, "message": str(exc)}
    return {"error_type": None, "message": ""}


# -- cases (name, world size) ----------------------------------------------------------------------------------------

def _model_case(name, tiny, inputs, parallel, world, recipe=None):
    @case(name, world)
    def run_case(mesh):
        model = _tiny(tiny) if isinstance(tiny, str) else tiny()
        kw = inputs()
        return compare(model, lambda m: m(**kw), mesh, parallel, recipe)
    return run_case


U2, R2, U2R2, U4, R4 = {"ulysses": 2}, {"ring": 2}, {"ulysses": 2, "ring": 2}, {"ulysses": 4}, {"ring": 4}

# Wan (diffusers _cp_plan; cross-attention K/V whole)
_model_case("wan-ulysses2", "tiny-wan", _wan_inputs, U2, 2)
_model_case("wan-ring2", "tiny-wan", _wan_inputs, R2, 2)
_model_case("wan-uneven-ulysses2", "tiny-wan", lambda: _wan_inputs(frames=1, h=6, w=6), U2, 2)   # 9 tokens
_model_case("wan-uneven-ring2", "tiny-wan", lambda: _wan_inputs(frames=3, h=6, w=6), R2, 2)      # 27 tokens
_model_case("wan-ulysses2-ring2", "tiny-wan", _wan_inputs, U2R2, 4)
_model_case("wan-ulysses4-heads-fallback", "tiny-wan", _wan_inputs, U4, 4)                        # 2 heads
_model_case("wan-ring4", "tiny-wan", _wan_inputs, R4, 4)
_model_case("wan-uneven-ulysses2-ring2", "tiny-wan", lambda: _wan_inputs(frames=3, h=6, w=6), U2R2, 4)
# Flux (diffusers _cp_plan; joint text + image attention, text split too)
_model_case("flux-ulysses2", "tiny-flux", _flux_inputs, U2, 2)
_model_case("flux-ring2", "tiny-flux", _flux_inputs, R2, 2)
_model_case("flux-uneven-ring2", "tiny-flux", lambda: _flux_inputs(h=3, w=5, text=7), R2, 2)
_model_case("flux-uneven-ulysses2", "tiny-flux", lambda: _flux_inputs(h=3, w=5, text=7, batch=2), U2, 2)
_model_case("flux-ulysses2-ring2", "tiny-flux", _flux_inputs, U2R2, 4)
_model_case("flux-ring4", "tiny-flux", lambda: _flux_inputs(h=3, w=5, text=7), R4, 4)
# SD3 (shipped recipe's plan; joint attention)
_model_case("sd3-ulysses2", "tiny-sd3", _sd3_inputs, U2, 2)
_model_case("sd3-ring2", "tiny-sd3", lambda: _sd3_inputs(text=5), R2, 2)
_model_case("sd3-ulysses2-ring2", "tiny-sd3", _sd3_inputs, U2R2, 4)
# HunyuanVideo (shipped recipe's plan; joint attention with a text key-padding mask)
_model_case("hunyuanvideo-mask-ulysses2", "tiny-hunyuanvideo", _hunyuan_inputs, U2, 2)
_model_case("hunyuanvideo-mask-ring2", "tiny-hunyuanvideo", _hunyuan_inputs, R2, 2)
_model_case("hunyuanvideo-mask-uneven-ring4", "tiny-hunyuanvideo", lambda: _hunyuan_inputs(text=7, valid=3, frames=1, h=3, w=5), R4, 4)
_model_case("hunyuanvideo-mask-ulysses2-ring2", "tiny-hunyuanvideo", _hunyuan_inputs, U2R2, 4)
# UNets (shipped sd15 / sdxl plans: each Transformer2DModel's blocks; cross-attention K/V whole)
_model_case("unet-sd15-ulysses2", "tiny-sd15", _unet_inputs, U2, 2)
_model_case("unet-sd15-ring2", "tiny-sd15", _unet_inputs, R2, 2)
_model_case("unet-sd15-ulysses4-heads-fallback", "tiny-sd15", _unet_inputs, U4, 4)
_model_case("unet-sdxl-ulysses2", "tiny-sdxl", _sdxl_inputs, U2, 2)
# transformers decoders, prefill (shipped llama / qwen2 plans: causal, GQA 4 query / 2 key-value heads)
_model_case("llama-ulysses2", "tiny-llama", _lm_inputs, U2, 2)
_model_case("llama-ring2-causal-zigzag", "tiny-llama", _lm_inputs, R2, 2)
_model_case("llama-padding-ring2", "tiny-llama", lambda: _lm_inputs(pad=3), R2, 2)
_model_case("llama-uneven-ring2", "tiny-llama", lambda: _lm_inputs(length=13), R2, 2)
_model_case("llama-padding-uneven-ulysses2", "tiny-llama", lambda: _lm_inputs(length=13, pad=4), U2, 2)
_model_case("llama-ulysses2-ring2", "tiny-llama", lambda: _lm_inputs(length=16), U2R2, 4)
_model_case("llama-ulysses4-gqa-repeat", "tiny-llama", _lm_inputs, U4, 4)
_model_case("llama-ring4-zigzag", "tiny-llama", lambda: _lm_inputs(length=19), R4, 4)
_model_case("llama-padding-ulysses2-ring2", "tiny-llama", lambda: _lm_inputs(length=16, pad=5), U2R2, 4)
_model_case("qwen2-ring2", "tiny-qwen2", _lm_inputs, R2, 2)
_model_case("qwen2-ulysses2", "tiny-qwen2", lambda: _lm_inputs(length=11, pad=2), U2, 2)
# hand-written model through the generic adapter: masks, causal, GQA
_model_case("toy-keypadding-mask-split-ulysses2", lambda: _toy(),
            lambda: dict(x=torch.randn(2, 10, 8, generator=_gen()), mask=_padding_mask(2, 10)), U2, 2,
            recipe=_toy_recipe(split_mask=True))
_model_case("toy-keypadding-mask-split-ring2", lambda: _toy(),
            lambda: dict(x=torch.randn(2, 11, 8, generator=_gen()), mask=_padding_mask(2, 11)), R2, 2,
            recipe=_toy_recipe(split_mask=True))
_model_case("toy-global-mask-ring2", lambda: _toy(),
            lambda: dict(x=torch.randn(2, 10, 8, generator=_gen()), mask=_random_mask(2, 10)), R2, 2,
            recipe=_toy_recipe())
_model_case("toy-global-mask-ulysses2-ring2", lambda: _toy(),
            lambda: dict(x=torch.randn(2, 12, 8, generator=_gen()), mask=_random_mask(2, 12, additive=True)), U2R2, 4,
            recipe=_toy_recipe())
_model_case("toy-causal-contiguous-ring4", lambda: _toy(),
            lambda: dict(x=torch.randn(1, 13, 8, generator=_gen()), causal=True), R4, 4, recipe=_toy_recipe())
_model_case("toy-causal-zigzag-ulysses2-ring2", lambda: _toy(),
            lambda: dict(x=torch.randn(1, 13, 8, generator=_gen()), causal=True), U2R2, 4,
            recipe=_toy_recipe(causal=True))
_model_case("toy-mqa-ulysses4", lambda: _toy(kv_heads=1),
            lambda: dict(x=torch.randn(1, 12, 8, generator=_gen()), causal=True), U4, 4, recipe=_toy_recipe())


def _padding_mask(b, s):
    m = torch.ones(b, 1, 1, s, dtype=torch.bool)
    m[1, ..., s - 3:] = False
    return m


def _random_mask(b, s, additive=False):
    g = _gen(7)
    m = torch.rand(b, 1, s, s, generator=g) > 0.4
    m[..., torch.arange(s), torch.arange(s)] = True  # every query keeps a key
    if additive:
        return torch.zeros(b, 1, s, s).masked_fill(~m, -1e4)
    return m


@case("diffsynth-wan-ulysses2", 2)
def _ds_u2(mesh):
    return compare(_diffsynth_wan(), _diffsynth_run, mesh, U2, recipe=DIFFSYNTH_WAN_RECIPE)


@case("diffsynth-wan-uneven-ring2", 2)
def _ds_r2(mesh):
    return compare(_diffsynth_wan(), lambda m: _diffsynth_run(m, h=6, w=6), mesh, R2, recipe=DIFFSYNTH_WAN_RECIPE)


@case("pipeline-sd15-ulysses2", 2)
def _pipeline(mesh):
    """A whole (tiny) StableDiffusionPipeline with CFG: only the UNet is parallel."""
    from attnpatch import tiny_models

    pipe = tiny_models.build("tiny-sd15-pipeline")
    out = compare(pipe, lambda p: p(**tiny_models.pipeline_call_kwargs(p, steps=2)).images, mesh, U2)
    out["left_alone_ok"] = "unet" in out["report"]
    return out


@case("pipeline-remove-one-component", 2)
def _pipeline_partial(mesh):
    """Removing the parallel component alone (attnpatch.remove(pipe.unet)) removes the whole patch:
    nothing is left splitting a model whose attention is no longer routed."""
    import attnpatch
    from attnpatch import tiny_models
    from _patch_helpers import assert_restored, snapshot

    pipe = tiny_models.build("tiny-sd15-pipeline")
    before = {n: snapshot(getattr(pipe, n)) for n in ("unet", "vae", "text_encoder")}
    patch = attnpatch.apply(pipe, recipe=False, parallel=dict(U2, mesh=mesh))
    roots = len(patch._roots)
    attnpatch.remove(pipe.unet)
    for n, snap in before.items():
        assert_restored(getattr(pipe, n), snap)
    return {"roots": roots, "removed": patch.removed, "planners": len(__import__("attnpatch").router.SITE_PLANNERS)}


# -- refusals (the same on every process, so no collective is left waiting) ---------------------------------------

@case("refuse-gradients", 2)
def _refuse_grad(mesh):
    import attnpatch

    model = _tiny("tiny-wan")
    kw = _wan_inputs()
    patch = attnpatch.apply(model, parallel=dict(U2, mesh=mesh))
    try:
        return expect_error(lambda: model(**kw))  # parameters require grad and no torch.no_grad()
    finally:
        patch.remove()


@case("refuse-dropout", 2)
def _refuse_dropout(mesh):
    import attnpatch

    class DropoutAttention(ToyAttention):
        def forward(self, x, mask=None, causal=False):
            b, s, _ = x.shape
            q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True)
            return self.o(o.transpose(1, 2).reshape(b, s, -1))

    model = _toy()
    for blk in model.blocks:
        blk.attn.__class__ = DropoutAttention
    patch = attnpatch.apply(model, recipe=_toy_recipe(), parallel=dict(U2, mesh=mesh))
    try:
        with torch.no_grad():
            return expect_error(lambda: model(torch.randn(1, 8, 8)))
    finally:
        patch.remove()


@case("refuse-no-plan", 2)
def _refuse_no_plan(mesh):
    import attnpatch

    model = _toy()
    before = {k: v for k, v in vars(model).items()}
    res = expect_error(lambda: attnpatch.apply(model, recipe=False, parallel=dict(U2, mesh=mesh)))
    res["unpatched"] = attnpatch.patch.patch_of(model) is None and type(model) is ToyModel and vars(model) == before
    return res


@case("refuse-unrouted-site", 2)
def _refuse_unrouted(mesh):
    import attnpatch
    from diffusers.models.attention_processor import AttnProcessor

    model = _tiny("tiny-sd15")
    model.set_attn_processor(AttnProcessor())  # baddbmm + softmax: attnpatch cannot route it
    return expect_error(lambda: attnpatch.apply(model, parallel=dict(U2, mesh=mesh)))


@case("refuse-plan-module-missing", 2)
def _refuse_missing_module(mesh):
    import attnpatch

    recipe = _toy_recipe()
    recipe["parallel"]["gather"] = [{"module": "haed", "dim": 1}]
    return expect_error(lambda: attnpatch.apply(_toy(), recipe=recipe, parallel=dict(U2, mesh=mesh)))


@case("refuse-bad-degrees", 2)
def _refuse_degrees(mesh):
    import attnpatch

    return expect_error(lambda: attnpatch.apply(_tiny("tiny-wan"), parallel=dict(ulysses=3, mesh=mesh)))


@case("ring-needs-lse-backends", 2)
def _ring_lse(mesh):
    """A backend without a log-sum-exp cannot serve ring steps: strict raises the router's reason, the
    default falls back (counted in the report) and stays exact."""
    import attnpatch

    model = _tiny("tiny-wan")
    kw = _wan_inputs()
    patch = attnpatch.apply(model, backend="sdpa", strict=True, recipe=False, parallel=dict(R2, mesh=mesh))
    try:
        with torch.no_grad():
            strict = expect_error(lambda: model(**kw))
    finally:
        patch.remove()
    out = compare(model, lambda m: m(**kw), mesh, R2, recipe=False, backend="sdpa")
    out.update(strict)
    return out


@case("reapply-and-switch", 2)
def _reapply(mesh):
    """Applying again with the same setting (no recipe) updates the patch in place; another parallel
    setting, or none, starts over."""
    import attnpatch

    model = _tiny("tiny-wan")
    kw = _wan_inputs()
    with torch.no_grad():
        ref = model(**kw)[0]
    p1 = attnpatch.apply(model, recipe=False, parallel=dict(U2, mesh=mesh))
    p2 = attnpatch.apply(model, recipe=False, parallel=dict(U2, mesh=mesh))  # updated in place, still parallel
    same = p1 is p2 and p2.parallel is not None
    p3 = attnpatch.apply(model, parallel=dict(R2, mesh=mesh))
    with torch.no_grad():
        ring = model(**kw)[0]
    p4 = attnpatch.apply(model)  # no parallel: a plain patch
    plain = p4.parallel is None and p3.removed
    with torch.no_grad():
        out = model(**kw)[0]
    p4.remove()
    with torch.no_grad():
        restored = model(**kw)[0]
    return {"same_patch": same, "switched": p1.removed and p3 is not p1, "plain": plain,
            "maxdiff": max((ring - ref).abs().max().item(), (out - ref).abs().max().item()),
            "scale": ref.abs().max().item(), "restored": torch.equal(restored, ref)}


# -- main -------------------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", action="append")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # here, not at import: the test module imports this file for CASES
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=120))
    halves, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]]) if args.world == 4 else (None, None)
    results = {}
    names = args.only or list(CASES)
    for name in names:
        world, fn = CASES[name]
        if world > args.world:
            continue
        mesh = halves if world == 2 and args.world == 4 else None
        try:
            results[name] = fn(mesh)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to show
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        dist.barrier()
    with open(os.path.join(args.out, f"rank{args.rank}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
