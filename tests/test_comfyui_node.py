"""The ComfyUI custom node (integrations/comfyui): its override against ComfyUI's attention calling
convention, step rules on ComfyUI's sigmas, cloning, errors, the report.

By default the tests run against tests/standins/comfyui.py, a labelled stand-in written from ComfyUI's
source at commit a125cd84 (no PyPI package ships ComfyUI's ``comfy`` modules). With
``ATTNPATCH_COMFYUI=/path/to/ComfyUI`` (a checkout whose requirements are installed) every test marked
``comfyui`` runs again on ComfyUI's real ``comfy.ldm.modules.attention.attention_pytorch`` (through its
real ``wrap_attn``) and ``comfy.model_patcher.ModelPatcher``, and a real KSampler run on a tiny UNet.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

import attnpatch
from attnpatch.recipes import RecipeError

from standins import comfyui as standin

ROOT = Path(__file__).resolve().parent.parent
COMFY_ROOT = os.environ.get("ATTNPATCH_COMFYUI")


def load_node_package():
    """Import integrations/comfyui the way ComfyUI's nodes.load_custom_node does (a module named after
    its path, from its __init__.py)."""
    path = ROOT / "integrations" / "comfyui"
    name = str(path).replace(".", "_x_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


PKG = load_node_package()
NODES = sys.modules[PKG.__name__ + ".nodes"]
OVERRIDE = sys.modules[PKG.__name__ + ".override"]


class Comfy:
    """The ComfyUI pieces a test uses: ``attention_pytorch``, ``ModelPatcher()`` and ``sample``."""

    def __init__(self, kind):
        self.kind = kind
        if kind == "standin":
            self.attention_pytorch = standin.attention_pytorch
            self.model_patcher = lambda: standin.ModelPatcher(torch.nn.Linear(2, 2))
        else:
            if str(COMFY_ROOT) not in sys.path:
                sys.path.insert(0, str(COMFY_ROOT))
            import comfy.cli_args

            comfy.cli_args.args.cpu = not torch.cuda.is_available()
            import comfy.ldm.modules.attention as attention
            import comfy.model_patcher as mp

            self.attention_pytorch = attention.attention_pytorch
            dev = torch.device("cpu")
            self.model_patcher = lambda: mp.ModelPatcher(torch.nn.Linear(2, 2), load_device=dev, offload_device=dev)
        self.sample = standin.sample  # the per-step transformer_options as comfy/samplers.py builds them


@pytest.fixture(params=["standin", pytest.param("comfyui", marks=[
    pytest.mark.comfyui, pytest.mark.skipif(not COMFY_ROOT, reason="set ATTNPATCH_COMFYUI=/path/to/ComfyUI")])])
def comfy(request):
    return Comfy(request.param)


def node_patch(model, **kw):
    return NODES.AttnpatchAttention().patch(model, **kw)[0]


def override_of(model):
    return model.model_options["transformer_options"][OVERRIDE.OVERRIDE_KEY]


# -- the package ------------------------------------------------------------------------------------------

def test_package_maps_the_nodes():
    assert PKG.NODE_DISPLAY_NAME_MAPPINGS == {"AttnpatchAttention": "Attention (attnpatch)",
                                              "AttnpatchReport": "Attention report (attnpatch)"}
    node = PKG.NODE_CLASS_MAPPINGS["AttnpatchAttention"]
    spec = node.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "backend", "allow_lossy", "strict", "exact_first_steps", "exact_last_steps"]
    assert list(spec["optional"]) == ["recipe", "exact_backend"]
    assert spec["required"]["model"] == ("MODEL",) and node.RETURN_TYPES == ("MODEL",)
    assert list(inspect.signature(node.patch).parameters)[1:] == list(spec["required"]) + list(spec["optional"])
    report = PKG.NODE_CLASS_MAPPINGS["AttnpatchReport"]
    assert report.RETURN_TYPES == ("LATENT", "STRING") and report.OUTPUT_NODE


def test_signature_is_comfyuis(comfy):
    """The parameters of ComfyUI's attention functions, as read at commit a125cd84 (and, with
    ATTNPATCH_COMFYUI, as the installed ComfyUI has them)."""
    params = tuple(inspect.signature(inspect.unwrap(comfy.attention_pytorch)).parameters)
    assert params == standin.SIGNATURE
    assert OVERRIDE.COMFY_PARAMS == standin.SIGNATURE[:-1]


# -- outputs equal ComfyUI's own attention_pytorch ----------------------------------------------------------

MASKS = {
    "none": None,
    "bool_qk_2d": lambda b, h, sq, skv: torch.rand(sq, skv) > 0.3,              # (s_q, s_kv): per query
    "add_qk_2d": lambda b, h, sq, skv: torch.randn(sq, skv),
    "bool_bqk_3d": lambda b, h, sq, skv: torch.rand(b, sq, skv) > 0.3,
    "add_11k_3d": lambda b, h, sq, skv: _pad_mask(1, skv),                      # HunyuanVideo's text padding
    "add_b1k_3d": lambda b, h, sq, skv: _pad_mask(b, skv),                      # Lumina's image padding
    "bool_b1qk_4d": lambda b, h, sq, skv: torch.rand(b, 1, sq, skv) > 0.3,
    "add_bhqk_4d": lambda b, h, sq, skv: torch.randn(b, h, sq, skv),
}


def _pad_mask(b, skv):
    m = torch.zeros(b, 1, skv)
    m[..., skv - 3:] = -torch.finfo(torch.float32).max
    return m


def _inputs(b, heads, sq, skv, d, skip_reshape, dtype=torch.float32):
    if skip_reshape:
        return (torch.randn(b, heads, sq, d, dtype=dtype), torch.randn(b, heads, skv, d, dtype=dtype),
                torch.randn(b, heads, skv, d, dtype=dtype))
    return (torch.randn(b, sq, heads * d, dtype=dtype), torch.randn(b, skv, heads * d, dtype=dtype),
            torch.randn(b, skv, heads * d, dtype=dtype))


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("skip_reshape,skip_output_reshape", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("shape", [(2, 4, 12, 12, 16), (4, 1, 4, 9, 32)], ids=["self_h4", "cross_h1_b_eq_sq"])
def test_outputs_equal_comfyuis_attention_pytorch(comfy, mask, skip_reshape, skip_output_reshape, shape):
    b, heads, sq, skv, d = shape
    q, k, v = _inputs(b, heads, sq, skv, d, skip_reshape)
    m = None if MASKS[mask] is None else MASKS[mask](b, heads, sq, skv)
    override = OVERRIDE.ComfyAttention(backend="auto")
    kw = dict(skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    want = comfy.attention_pytorch(q, k, v, heads, mask=m, **kw)
    got = comfy.attention_pytorch(q, k, v, heads, mask=m, transformer_options={OVERRIDE.OVERRIDE_KEY: override}, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert sum(attnpatch.stats().calls.values()) == 1  # the override ran, through the router
    assert override.default.site.counts()[0], "the call was not counted on the node's site"


def test_positional_heads_and_mask_and_bf16(comfy):
    q, k, v = _inputs(2, 3, 10, 10, 8, False, torch.bfloat16)
    m = torch.rand(10, 10) > 0.2
    override = OVERRIDE.ComfyAttention(backend="sdpa_math")
    want = comfy.attention_pytorch(q, k, v, 3, m)
    got = comfy.attention_pytorch(q, k, v, 3, m, transformer_options={OVERRIDE.OVERRIDE_KEY: override})
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert attnpatch.stats().calls == {"sdpa_math": 1}


def test_gqa_in_the_flat_layout():
    """k/v with fewer heads than q, (b, s, h_kv * d): ComfyUI's attention_pytorch cannot view that, the
    override reads the kv head count from k's width (as ComfyUI's flash/sage paths accept GQA)."""
    b, h, hkv, s, d = 2, 4, 2, 6, 8
    q, k, v = torch.randn(b, s, h * d), torch.randn(b, s, hkv * d), torch.randn(b, s, hkv * d)
    override = OVERRIDE.ComfyAttention()
    got = standin.attention_pytorch(q, k, v, h, transformer_options={OVERRIDE.OVERRIDE_KEY: override})
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.view(b, s, h, d).transpose(1, 2), k.view(b, s, hkv, d).transpose(1, 2), v.view(b, s, hkv, d).transpose(1, 2),
        enable_gqa=True).transpose(1, 2).reshape(b, s, h * d)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# -- the node --------------------------------------------------------------------------------------------

def test_node_clones_the_model_and_leaves_the_original_untouched(comfy):
    model = comfy.model_patcher()
    model.model_options["transformer_options"]["marker"] = [1, 2]
    before = copy.deepcopy(model.model_options)
    wrappers_before = copy.deepcopy(model.wrappers)
    patched = node_patch(model, backend="sdpa_math")
    assert patched is not model
    assert model.model_options == before and model.wrappers == wrappers_before
    assert OVERRIDE.OVERRIDE_KEY not in model.model_options["transformer_options"]
    ov = override_of(patched)
    assert callable(ov) and patched.model_options["transformer_options"]["marker"] == [1, 2]
    assert patched.wrappers["outer_sample"]["attnpatch"] == [ov.outer_sample_wrapper]
    again = patched.clone()  # a later node (a LoRA loader...) clones again: one override, one report
    assert override_of(again) is ov


def test_errors_name_the_fix():
    model = standin.ModelPatcher()
    with pytest.raises(ValueError) as err:
        node_patch(model, backend="fash")
    msg = str(err.value)
    assert "unknown attention backend 'fash'" in msg and "Attention (attnpatch)" in msg and "input backend" in msg
    assert "valid names: auto, " in msg and "sdpa_math" in msg
    with pytest.raises(ValueError, match="exact_backend names lossy backend"):
        node_patch(model, exact_first_steps=2, exact_backend="sage")
    with pytest.raises(RecipeError, match="no shipped recipe named 'wann'.*did you mean 'wan'"):
        node_patch(model, recipe="wann")
    with pytest.raises(ValueError, match="exact_last_steps must be an int >= 0"):
        node_patch(model, exact_last_steps=-1)
    assert OVERRIDE.OVERRIDE_KEY not in model.model_options["transformer_options"]


SIGMAS = torch.tensor([14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0])  # 6 steps


def _backend_per_step(comfy, patched, sigmas=SIGMAS, extra_sigma=None):
    """Sample; each step calls attention once (and once more at ``extra_sigma(sigma)`` if given, like a
    second-order sampler); returns the backend that ran per step."""
    seen = []

    def step(options, sigma):
        q, k, v = _inputs(1, 2, 8, 8, 16, True)
        before = dict(attnpatch.stats().calls)
        comfy.attention_pytorch(q, k, v, 2, skip_reshape=True, transformer_options=options)
        if extra_sigma is not None:
            extra = dict(options, sigmas=torch.full((2,), extra_sigma(sigma)))
            comfy.attention_pytorch(q, k, v, 2, skip_reshape=True, transformer_options=extra)
        after = attnpatch.stats().calls
        seen.append(sorted(n for n in after if after[n] != before.get(n, 0)))
        return None

    comfy.sample(patched, sigmas, step)
    return seen


def test_exact_first_and_last_steps_switch_at_the_right_sigmas(comfy, caplog):
    patched = node_patch(comfy.model_patcher(), backend="sdpa_math", exact_first_steps=2, exact_last_steps=1,
                         exact_backend="eager")
    with caplog.at_level(logging.INFO, logger="attnpatch.comfyui"):
        seen = _backend_per_step(comfy, patched)
    assert seen == [["eager"], ["eager"], ["sdpa_math"], ["sdpa_math"], ["sdpa_math"], ["eager"]]
    report = override_of(patched).last_run_report
    assert "steps: 0–1 exact steps, 2–4 default, 5 exact steps (of 6)" in report
    assert "exact steps (steps first 2, last 1; backend eager; exact only unless named): eager×3" in report
    assert "default (every step; backend sdpa_math; exact only unless named): sdpa_math×3" in report
    assert report in caplog.text  # logged after the run


def test_an_evaluation_between_two_sigmas_counts_in_the_step_it_started(comfy):
    patched = node_patch(comfy.model_patcher(), backend="sdpa_math", exact_first_steps=1, exact_backend="eager")
    seen = _backend_per_step(comfy, patched, extra_sigma=lambda s: s * 0.75)
    assert seen[0] == ["eager"] and seen[1] == ["sdpa_math"]
    assert attnpatch.stats().calls == {"eager": 2, "sdpa_math": 10}


def test_without_a_sampler_step_rules_are_skipped():
    override = OVERRIDE.ComfyAttention(backend="sdpa_math", exact_first_steps=3, exact_backend="eager")
    q, k, v = _inputs(1, 2, 8, 8, 16, False)
    standin.attention_pytorch(q, k, v, 2, transformer_options={OVERRIDE.OVERRIDE_KEY: override})
    assert attnpatch.stats().calls == {"sdpa_math": 1}


def test_recipe_steps_rules_apply_and_site_rules_are_reported(comfy, tmp_path):
    path = tmp_path / "comfy-steps.yaml"
    path.write_text("version: 1\nname: comfy-steps\ndefault_backend: sdpa_math\nrules:\n"
                    "  - name: early\n    steps: {first: 1}\n    backend: eager\n"
                    "  - name: blocks-only\n    pattern: 'blocks.*.attn1'\n    backend: sdpa\n")
    patched = node_patch(comfy.model_patcher(), recipe=str(path))
    assert _backend_per_step(comfy, patched)[:3] == [["eager"], ["sdpa_math"], ["sdpa_math"]]
    report = override_of(patched).last_run_report
    assert "recipe=comfy-steps" in report and "recipe comfy-steps: rule early (steps first 1; backend eager" in report
    assert "blocks-only (pattern)" in report and "not applied" in report
    with pytest.raises(ValueError, match=r"\(strict\).*blocks-only"):
        node_patch(comfy.model_patcher(), recipe=str(path), strict=True)


def test_shipped_lossy_recipe_keeps_its_exact_steps(comfy):
    patched = node_patch(comfy.model_patcher(), recipe="wan-lossy", backend="sdpa_math")
    ov = override_of(patched)
    assert [r.label for r in ov.rules] == ["recipe wan-lossy: rule exact-first-last-steps", "default"]
    assert ov.rules[0].steps.describe() == "first 2, last 2" and ov.rules[0].scope.allow_lossy is False
    assert ov.default.scope.backends == ("sdpa_math",)  # the node's backend replaces default_backend


def test_fallbacks_are_reported_with_reasons_and_strict_raises(comfy):
    patched = node_patch(comfy.model_patcher(), backend="sage")  # not installed here
    _backend_per_step(comfy, patched)
    report = override_of(patched).last_run_report
    assert "fell back sage -> " in report and "×6: " in report
    assert "sageattention" in report  # the reason names the missing package or the refused call
    strict = node_patch(comfy.model_patcher(), backend="sage", strict=True)
    q, k, v = _inputs(1, 2, 8, 8, 16, False)
    with pytest.raises(attnpatch.BackendUnsupportedError, match="strict"):
        comfy.attention_pytorch(q, k, v, 2, transformer_options=strict.model_options["transformer_options"])


def test_untranslatable_arguments_run_comfyuis_function_and_are_counted(caplog):
    override = OVERRIDE.ComfyAttention(backend="sdpa_math")
    q, k, v = _inputs(1, 2, 8, 8, 16, False)
    options = {OVERRIDE.OVERRIDE_KEY: override}
    with caplog.at_level(logging.WARNING, logger="attnpatch"):
        got = standin.attention_pytorch(q, k, v, 2, transformer_options=options, enable_magic=True)
        standin.attention_pytorch(q, k, v, 2, transformer_options=options, enable_magic=True)
    torch.testing.assert_close(got, standin.attention_pytorch(q, k, v, 2))
    assert attnpatch.stats().calls == {}
    assert override.default.site.bypassed == {"ComfyUI passed argument(s) attnpatch does not translate: enable_magic": 2}
    assert caplog.text.count("was not routed") == 1  # warned once
    assert "not routed ×2 (ran ComfyUI's own attention)" in override.report()


def test_report_node(comfy):
    model = comfy.model_patcher()
    out = NODES.AttnpatchReport().report(model, {"samples": torch.zeros(1)})
    assert "no attnpatch attention override" in out["result"][1]
    patched = node_patch(model, backend="sdpa_math")
    _backend_per_step(comfy, patched)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = NODES.AttnpatchReport().report(patched, latent)
    assert out["result"][0] is latent and out["ui"]["text"] == [out["result"][1]]
    assert "sdpa_math×6" in out["result"][1]


# -- the real ComfyUI sampler (opt-in) ---------------------------------------------------------------------

@pytest.mark.comfyui
@pytest.mark.skipif(not COMFY_ROOT, reason="set ATTNPATCH_COMFYUI=/path/to/ComfyUI (with scipy and torchsde)")
def test_real_ksampler_run_on_a_tiny_unet():
    """ComfyUI's own sampling (comfy.sample.sample, euler, 4 steps) on a tiny SD1.x-style UNet whose
    CrossAttention calls optimized_attention(..., transformer_options=...): the node's override receives
    every call, the exact first/last steps run on their backend, the report is logged."""
    Comfy("comfyui")
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    unet = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1], channel_mult=[1],
                transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                context_dim=32, use_linear_in_transformer=True, use_temporal_attention=False,
                adm_in_channels=None, image_size=32, use_spatial_transformer=True, legacy=False)
    model = comfy.model_base.BaseModel(comfy.supported_models.SD15(unet), device=torch.device("cpu"))
    dev = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)
    patched = node_patch(patcher, backend="sdpa_math", exact_first_steps=1, exact_last_steps=1, exact_backend="eager")
    cond = [[torch.randn(1, 7, 32), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8)
    comfy.sample.sample(patched, noise, 4, 1.0, "euler", "normal", cond, cond, latent, seed=0, disable_pbar=True)
    report = override_of(patched).last_run_report
    assert "steps: 0 exact steps, 1–2 default, 3 exact steps (of 4)" in report, report
    calls = attnpatch.stats().calls
    # 4 steps x 8 attention calls (4 transformer blocks, self + cross; cfg 1 skips the uncond pass)
    assert calls == {"eager": 16, "sdpa_math": 16}, calls
