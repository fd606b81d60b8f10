"""STAND-IN for the parts of ComfyUI that the attnpatch ComfyUI node touches, for CPU tests where
ComfyUI is not installed (no package on PyPI ships its ``comfy`` modules; see README "ComfyUI").

Written from ComfyUI's source at commit a125cd84 (Oct 2025), not copied from it:

* `wrap_attn` — ``comfy/ldm/modules/attention.py``: a call whose ``transformer_options`` holds
  ``"optimized_attention_override"`` returns ``override(func, *args, **kwargs)``, with
  ``kwargs["_inside_attn_wrapper"] = True`` set for the call and removed after it.
* `attention_pytorch` — the same file's SDPA path: the signature ``(q, k, v, heads, mask=None,
  attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)``; (b, s, h*d) inputs
  viewed as (b, h, s, d) unless ``skip_reshape``; a 2-D mask gets a batch and a heads dim, a 3-D mask a
  heads dim; ``torch.nn.functional.scaled_dot_product_attention`` without scale/causal/dropout; output
  (b, s, h*d), or (b, h, s, d) with ``skip_output_reshape``.
* `ModelPatcher` — ``comfy/model_patcher.py``: ``model_options = {"transformer_options": {}}``,
  ``clone()`` deep-copies ``model_options`` and copies the wrappers, ``add_wrapper_with_key``.
* `sample` — what ``comfy/samplers.py`` does around the model per step, reduced to what the override
  sees: the OUTER_SAMPLE wrappers around the run, ``transformer_options["sample_sigmas"]`` = the
  schedule, and per model evaluation a copy of the model's ``transformer_options`` with
  ``"sigmas"`` = a (batch,) tensor of the current sigma.

tests/test_comfyui_node.py pins the signature; with ``ATTNPATCH_COMFYUI=/path/to/ComfyUI`` the same
tests also run against ComfyUI's real ``attention_pytorch`` and ``ModelPatcher``.
"""

from __future__ import annotations

import copy
import functools

import torch

#: The parameter list of ComfyUI's attention functions (attention.py at a125cd84).
SIGNATURE = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape", "kwargs")
COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"


def wrap_attn(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if "_inside_attn_wrapper" in kwargs:
            return func(*args, **kwargs)
        kwargs["_inside_attn_wrapper"] = True
        try:
            options = kwargs.get("transformer_options")
            if options is not None and "optimized_attention_override" in options:
                return options["optimized_attention_override"](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            del kwargs["_inside_attn_wrapper"]
    return wrapper


@wrap_attn
def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                      **kwargs):
    if skip_reshape:
        b, dim_head = q.shape[0], q.shape[-1]
    else:
        b, dim_head = q.shape[0], q.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


class ModelPatcher:
    def __init__(self, model=None):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers = {}
        self.parent = None

    def clone(self):
        n = self.__class__(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {k: {k1: list(w) for k1, w in v.items()} for k, v in self.wrappers.items()}
        n.parent = self
        return n

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)


def sample(model: ModelPatcher, sigmas: torch.Tensor, step_fn, batch: int = 2):
    """Run ``step_fn(transformer_options, sigma)`` once per step of ``sigmas`` (N steps: N + 1 sigmas),
    inside the model's OUTER_SAMPLE wrappers, the way ComfyUI's samplers hand the model its options."""
    options = copy.deepcopy(model.model_options)
    options["transformer_options"]["sample_sigmas"] = sigmas

    def run():
        outs = []
        for i in range(len(sigmas) - 1):
            to = dict(options["transformer_options"])
            to["sigmas"] = sigmas[i].repeat(batch)
            outs.append(step_fn(to, float(sigmas[i])))
        return outs

    wrappers = [w for ws in model.wrappers.get("outer_sample", {}).values() for w in ws]

    def call(idx):
        if idx == len(wrappers):
            return run()
        return wrappers[idx](lambda *a, **k: call(idx + 1))

    return call(0)
