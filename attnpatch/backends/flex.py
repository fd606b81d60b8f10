"""`flex`: torch's flex_attention, compiled once per shape family.

Masks become score modifications inside the compiled kernel (a bool mask sends masked scores to -inf,
a float mask is added), softcap becomes ``tanh(s / c) * c`` on the scores; causal and sliding windows
become a block mask built once per (seq_q, seq_kv), so fully masked blocks are skipped. Rows whose
keys are all masked give zeros (and a log-sum-exp of -inf). Uncompiled flex is several times slower
than SDPA, so this backend always runs the compiled kernel, except inside an outer ``torch.compile``
where the outer compiler compiles it.
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


def _flex(q, k, v, extra, block_mask, scale, enable_gqa, mode, softcap, return_lse):
    """flex_attention with the score modification ``mode`` ("none", "bool": ``extra`` is the keep
    mask, "additive": ``extra`` is added) and an optional softcap; returns (out, lse) or out."""
    fa = _flex_module()

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        if mode == "bool":
            score = torch.where(extra[b, h, q_idx, kv_idx], score, -float("inf"))
        elif mode == "additive":
            score = score + extra[b, h, q_idx, kv_idx]
        return score

    mod = score_mod if (mode != "none" or softcap is not None) else None
    if not return_lse:
        return fa.flex_attention(q, k, v, score_mod=mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    aux = getattr(fa, "AuxRequest", None)
    if aux is not None:
        out, got = fa.flex_attention(q, k, v, score_mod=mod, block_mask=block_mask, scale=scale,
                                     enable_gqa=enable_gqa, return_aux=aux(lse=True))
        return out, got.lse
    return fa.flex_attention(q, k, v, score_mod=mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                             return_lse=True)


def _compiled(fn, family: tuple):
    """torch.compile ``fn`` once per shape family (dtype, device, head dims, GQA, mask mode, ...).

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


def _band(left, right):
    """The mask_mod of a causal / sliding-window band: ``i - left <= j <= i + right``."""
    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= 0  # all True, as a tensor
        if right is not None:
            keep = keep & (kv_idx <= q_idx + right)
        if left is not None:
            keep = keep & (kv_idx >= q_idx - left)
        return keep
    return mask_mod


class FlexBackend(Backend):
    NAME = "flex"
    DESCRIPTION = "torch flex_attention, compiled (block-sparse causal and windows, masks and softcap as score mods)"
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
    SUPPORTS_DROPOUT = False
    SUPPORTS_WINDOW = True
    SUPPORTS_SOFTCAP = True
    SUPPORTS_LSE = True
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
        if call.device_type == "cpu" and min(call.head_dim, call.head_dim_v) < 24:
            # measured with torch 2.14.1: errors of 1 to 4 (not rounding) at head_dim 8 and 16 for many
            # lengths, masked or not; head_dim 24 to 128 matched SDPA
            reasons.append(f"head_dim={call.head_dim} on CPU: torch's compiled CPU flex kernel gives wrong "
                           "results below head_dim 24")
        if call.device_type == "cuda":
            if call.head_dim < 16 or call.head_dim_v < 16:
                reasons.append(f"head_dim={call.head_dim}, value head_dim={call.head_dim_v} (flex on CUDA needs >= 16)")
            if call.dtype == torch.float32 and call.head_dim > 128:
                reasons.append(f"head_dim={call.head_dim} in float32 (flex on CUDA runs out of shared memory above 128)")
        return reasons

    def shares_runner_across_lengths(self, call: Call) -> bool:
        return not (call.is_causal or call.window is not None)  # the block mask has fixed lengths

    def build(self, call: Call):
        fa = _flex_module()
        left, right = call.window_bounds
        banded = (left, right) != (None, None)
        device = torch.device(call.device_type, call.device_index) if call.device_index is not None else call.device_type
        compiling = call.compiling
        mode, softcap, lse, gqa = call.mask_kind, call.softcap, call.return_lse, call.gqa
        family = (call.device_type, call.device_index, call.dtype, call.head_dim, call.head_dim_v, gqa,
                  banded, mode, softcap, lse)
        flex = _flex if compiling else _compiled(_flex, family)
        block_mask = None
        if banded and not compiling:
            block_mask = fa.create_block_mask(_band(left, right), None, None, call.seq_q, call.seq_kv, device=device)

        def run(q, k, v, m, c, s, p):
            bm = block_mask
            if banded and compiling:  # traced: built from the traced sizes
                bm = fa.create_block_mask(_band(left, right), None, None, q.shape[2], k.shape[2], device=device)
            extra = None if m is None else m.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            return flex(q, k, v, extra, bm, s, gqa, mode, softcap, lse)
        return run
