"""`flex`: torch's flex_attention, compiled once per shape family.

Masks become score modifications inside the compiled kernel (a bool mask sends masked scores to -inf,
a float mask is added); causal becomes a block mask built once per (seq_q, seq_kv), so fully masked
blocks are skipped. Rows whose keys are all masked give zeros. Uncompiled flex is several times
slower than SDPA, so this backend always runs the compiled kernel, except inside an outer
``torch.compile`` where the outer compiler compiles it.
"""

from __future__ import annotations

import threading
import types
from typing import List

import torch

from ..call import Call
from ..registry import Backend, version_at_least

_LOCK = threading.Lock()
_COMPILED = {}


def _flex_module():
    from torch.nn.attention import flex_attention as fa
    return fa


def _plain(q, k, v, block_mask, scale, enable_gqa):
    return _flex_module().flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _with_bias(q, k, v, bias, block_mask, scale, enable_gqa):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]
    return _flex_module().flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                         enable_gqa=enable_gqa)


def _with_bool(q, k, v, keep, block_mask, scale, enable_gqa):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(keep[b, h, q_idx, kv_idx], score, -float("inf"))
    return _flex_module().flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                         enable_gqa=enable_gqa)


def _compiled(fn, family: tuple):
    """torch.compile ``fn`` once per shape family (dtype, device, head dims, GQA, causal).

    Each family compiles its own copy of ``fn``'s code: dynamo counts recompiles per code object and,
    past its limit (8), silently runs flex unfused, several times slower. With one copy per family, a
    process that mixes dtypes and head dims keeps every family compiled; within a family the lengths
    become dynamic after one recompile."""
    key = (fn, family)
    c = _COMPILED.get(key)
    if c is None:
        with _LOCK:
            c = _COMPILED.get(key)
            if c is None:
                code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_COMPILED)}")
                copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
                c = torch.compile(copy)
                _COMPILED[key] = c
    return c


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


class FlexBackend(Backend):
    NAME = "flex"
    DESCRIPTION = "torch flex_attention, compiled (block-sparse causal, masks as score mods)"
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
    SUPPORTS_DROPOUT = False
    AUTOTUNE_TIMED = False  # never worth measuring: compiles before it runs, and auto ranks it behind SDPA
    AUTO_PRIORITY = {"cuda_sm90": 50, "cuda": 50}
    TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    def probe(self) -> List[str]:
        if not version_at_least(torch.__version__, "2.6"):
            return [f"torch {torch.__version__} is older than 2.6 (flex_attention with enable_gqa and CPU support)"]
        try:
            _flex_module()
        except ImportError as exc:
            return [f"torch.nn.attention.flex_attention does not import: {exc}"]
        return []

    def extra_reasons(self, call: Call) -> List[str]:
        reasons = []
        if call.device_type == "cpu" and call.needs_grad:
            reasons.append("gradients are needed but flex on CPU is forward-only (torch has no CPU backward)")
        if call.device_type == "cuda":
            if call.head_dim < 16 or call.head_dim_v < 16:
                reasons.append(f"head_dim={call.head_dim}, value head_dim={call.head_dim_v} (flex on CUDA needs >= 16)")
            if call.dtype == torch.float32 and call.head_dim > 128:
                reasons.append(f"head_dim={call.head_dim} in float32 (flex on CUDA runs out of shared memory above 128)")
        return reasons

    def build(self, call: Call):
        block_mask = None
        if call.is_causal:
            device = torch.device(call.device_type, call.device_index) if call.device_index is not None else call.device_type
            block_mask = _flex_module().create_block_mask(_causal, None, None, call.seq_q, call.seq_kv, device=device)
        gqa = call.gqa
        kind = call.mask_kind
        full = (call.batch, call.heads_q, call.seq_q, call.seq_kv)
        compiling = call.compiling
        family = (call.device_type, call.device_index, call.dtype, call.head_dim, call.head_dim_v, gqa,
                  call.is_causal)
        plain = _plain if compiling else _compiled(_plain, family)
        bias = _with_bias if compiling else _compiled(_with_bias, family)
        boolean = _with_bool if compiling else _compiled(_with_bool, family)

        if kind == "none":
            def run(q, k, v, m, c, s, p):
                return plain(q, k, v, block_mask, s, gqa)
        elif kind == "bool":
            def run(q, k, v, m, c, s, p):
                return boolean(q, k, v, m.expand(full), block_mask, s, gqa)
        else:
            def run(q, k, v, m, c, s, p):
                return bias(q, k, v, m.expand(full), block_mask, s, gqa)
        return run
