"""The ComfyUI nodes: "Attention (attnpatch)" (MODEL → MODEL) and "Attention report (attnpatch)".

ComfyUI's classic node interface (``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION``), which every
ComfyUI version loads. Nothing here imports ComfyUI at import time; ``comfy.patcher_extension`` is used
only when present (for the per-run report in the log).
"""

from __future__ import annotations

import logging

from .override import OVERRIDE_KEY, ComfyAttention, previous_override

logger = logging.getLogger("attnpatch.comfyui")

_BACKEND_TIP = ("attnpatch backend: a name (sdpa, sdpa_flash, flash_attn, sage, sage_hub, ...), a comma-separated "
                "priority list, or auto. `attnpatch info` lists them with the reasons each is unavailable here.")


def _backend_names() -> str:
    from attnpatch import registry

    return ", ".join(["auto"] + sorted(registry.backend_names()))


class AttnpatchAttention:
    """Route the attention of the diffusion model in MODEL through attnpatch (a patched clone)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "backend": ("STRING", {"default": "auto", "tooltip": _BACKEND_TIP + " Valid: " + _backend_names()}),
                "allow_lossy": ("BOOLEAN", {"default": False, "tooltip": "let auto pick lossy (8-bit / fp8) kernels "
                                            "where they are accurate; naming a lossy backend is an opt-in by itself"}),
                "strict": ("BOOLEAN", {"default": False, "tooltip": "raise instead of falling back when the named "
                                       "backend cannot serve a call (the error lists every backend's reasons)"}),
                "exact_first_steps": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip":
                                              "the first N sampling steps use exact_backend (never a lossy kernel)"}),
                "exact_last_steps": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip":
                                             "the last M sampling steps use exact_backend (never a lossy kernel)"}),
            },
            "optional": {
                "recipe": ("STRING", {"default": "", "tooltip": "an attnpatch recipe: a shipped name (wan-lossy, ...) "
                                      "or a path to a .yaml; its steps rules and default backend apply"}),
                "exact_backend": ("STRING", {"default": "auto", "tooltip": "backend of the exact steps"}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/attention"
    DESCRIPTION = ("Routes the diffusion model's attention through attnpatch: the fastest correct kernel per call, "
                   "fallbacks with reasons, optional exact first/last steps. Returns a patched clone; the input "
                   "MODEL is unchanged. Connect 'Attention report (attnpatch)' after the sampler to see what ran.")

    def patch(self, model, backend="auto", allow_lossy=False, strict=False, exact_first_steps=0,
              exact_last_steps=0, recipe="", exact_backend="auto"):
        override = ComfyAttention(backend=backend, recipe=recipe or None, allow_lossy=bool(allow_lossy),
                                  strict=bool(strict), exact_first_steps=int(exact_first_steps),
                                  exact_last_steps=int(exact_last_steps), exact_backend=exact_backend)
        prev = previous_override(getattr(model, "model_options", None))
        if prev is not None and not hasattr(prev, "attnpatch_report"):
            logger.warning("attnpatch: the MODEL already had an attention override (%s, from an earlier node); the "
                           "attnpatch node replaces it on its clone", getattr(prev, "__qualname__", type(prev).__name__))
        patched = model.clone()
        patched.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = override
        add = getattr(patched, "add_wrapper_with_key", None)
        if add is not None:
            try:
                from comfy.patcher_extension import WrappersMP
                kind = WrappersMP.OUTER_SAMPLE
            except ImportError:  # not running inside ComfyUI (tests with stand-ins)
                kind = "outer_sample"
            add(kind, "attnpatch", override.outer_sample_wrapper)
        return (patched,)


class AttnpatchReport:
    """After a sampler: what the attnpatch attention of MODEL ran (backends, fallbacks and reasons)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "latent": ("LATENT", {"tooltip": "the sampler's output (passed "
                                                                                   "through), so this runs after it"})}}

    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "report")
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "advanced/attention"
    DESCRIPTION = "The attnpatch report of the last sampler run of MODEL (also written to the log after each run)."

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # the report changes with every run

    def report(self, model, latent):
        text = report_text(model)
        return {"ui": {"text": [text]}, "result": (latent, text)}


def report_text(model) -> str:
    override = previous_override(getattr(model, "model_options", None))
    if override is None or not hasattr(override, "attnpatch_report"):
        return ("this MODEL has no attnpatch attention override: connect the MODEL output of "
                "'Attention (attnpatch)' (the one the sampler used)")
    if override.last_run_report is not None:
        return override.last_run_report
    return override.report()


NODE_CLASS_MAPPINGS = {"AttnpatchAttention": AttnpatchAttention, "AttnpatchReport": AttnpatchReport}
NODE_DISPLAY_NAME_MAPPINGS = {"AttnpatchAttention": "Attention (attnpatch)",
                              "AttnpatchReport": "Attention report (attnpatch)"}
