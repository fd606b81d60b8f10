"""Decisions shipped with attnpatch for the cards the project has measured, used by auto before it
times anything: a fresh process then pays no timing for the calls they cover (issue 11: the first
call of a new signature used to cost up to 1.3 s of timing at Wan's shape).

A rule answers only when *every* backend the router found eligible for the call is one it covers, so
a backend the rule was not measured with (a registered one, a lossy kernel outside video lengths) makes
auto time the candidates as before (FlashAttention 4 never reaches auto on sm90: its ``AUTO_LEFT_OUT``). A machine's own measurement in the
autotune cache wins over a rule.
The rule picks among the eligible backends only: it can never make an ineligible kernel run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple

import torch

from .call import Call

#: The exact torch kernels (and the reference paths) a rule may cover.
_TORCH_EXACT = frozenset({"sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "eager"})
#: The backends measured side by side on sm90 (H200, 2026-11-30: docs/GPU_BACKENDS.md, fifth run): torch's
#: kernels, FlashAttention 2 and 3 (exact), SageAttention 2.2.0's kernels and attnpatch's fp8 (lossy: those
#: are eligible only under the lossy opt-in, so a rule preferring one never runs it without the opt-in).
#: The lossy ones were compared at every shape but ranked only at video lengths, so only the video rules
#: cover them; elsewhere the opt-in makes auto time the candidates.
#: xFormers 0.0.35 (built from source on the box) runs no kernel of its own: FlashAttention 3 when it imports
#: (0.366 vs 0.368 ms at Flux 1024², the same kernel), else torch's (0.78 ms there, behind cuDNN's 0.42)
#: (H200, 2026-11-30, sixth run).
_SM90_EXACT_MEASURED = _TORCH_EXACT | frozenset({"flash_attn", "flash_attn3", "xformers"})
_SM90_MEASURED = _SM90_EXACT_MEASURED | frozenset({"fp8", "sage", "sage_fp16_triton", "sage_fp16_cuda",
                                                   "sage_fp8_cuda_sm90"})


def _plain_head_dim_128(call: Call) -> bool:
    """Forward only, no mask, window, softcap or sinks; head dim 128: the calls the long-sequence rows
    measured (inference; a call that needs gradients is timed, its backward was not ranked)."""
    return (call.mask_kind == "none" and call.head_dim == 128 and call.head_dim_v == 128 and call.window is None
            and call.softcap is None and not call.sinks and not call.needs_grad)


#: The kinds of call a rule can be limited to (`ShippedRule.calls`).
CALL_KINDS: Dict[str, Callable[[Call], bool]] = {
    "any": lambda call: True,
    # one query token against a key cache: a decoding step, whose key length is new at every step
    "decode": lambda call: call.seq_q == 1,
    # at least 4608 queries and keys (Flux 1024²'s joint sequence and up), no mask, head dim 128
    "long": lambda call: _plain_head_dim_128(call) and min(call.seq_q, call.seq_kv) >= 4608,
    # at least 16384 queries and keys, not causal: video self-attention (Wan 480p: 32760 tokens)
    "video": lambda call: _plain_head_dim_128(call) and not call.is_causal and min(call.seq_q, call.seq_kv) >= 16384,
}


@dataclass(frozen=True)
class ShippedRule:
    """On ``device_class`` (as in ``AUTO_PRIORITY``: "cuda_sm90") with a torch whose "major.minor" is in
    ``torch_versions`` (what torch's own dispatch does changes between releases), for the calls of kind
    ``calls`` (a key of `CALL_KINDS`), when every eligible backend is in ``covers``, auto takes
    ``prefer`` without timing. Rules are tried in order; one whose ``prefer`` is not eligible for the
    call passes to the next. ``evidence`` says where the measurement is. ``over_measurement``: the rule
    also wins over this machine's own autotune entry, for costs that timing one shape cannot see (a
    cost paid once per new shape, as decoding meets a new key length at every step)."""

    device_class: str
    torch_versions: Tuple[str, ...]
    prefer: str
    covers: FrozenSet[str]
    evidence: str
    calls: str = "any"
    over_measurement: bool = False


RULES: Tuple[ShippedRule, ...] = (
    ShippedRule(
        "cuda_sm90", ("2.11",), "sdpa_flash", _TORCH_EXACT,
        "sm90 decoding: torch's dispatch runs cuDNN, which builds a graph for every new key length "
        "(77-84 ms per call near 40k keys, 1.9 ms per layer per token in a 0.5B model) where flash takes "
        "0.5 ms; generate's first run in a fresh process 1.74 s vs stock's 6.30 s (Qwen2.5-0.5B config) and "
        "2.31 s vs 8.14 s (Llama-3-8B config); steady state, interleaved with a new prompt each round, 0.98x / "
        "0.97x stock's time (H200, docs/GENERATE.md, 2026-11-30)", calls="decode", over_measurement=True),
    ShippedRule(
        "cuda_sm90", ("2.11",), "sage_fp8_cuda_sm90", _SM90_MEASURED,
        "sm90, lossy opt-in, video self-attention: SageAttention 2's sm90 kernel was the fastest kernel auto "
        "may take at Wan 480p (1, 40, 32760, 128): 28.2 ms bf16 / 28.6 fp16, against sage 28.7, fp8 29.2, "
        "FlashAttention 3 32.8 and cuDNN 38.6 (relative error 3.9e-2), and `attnpatch calibrate` chose it for "
        "every self-attention site of Wan 1.3B (8.0 vs 9.7 ms for FlashAttention 3; 5e-3 relative L2 on the "
        "pipeline's own activations) (H200, 2026-11-30, docs/GPU_BACKENDS.md and docs/CALIBRATE.md); it "
        "is compiled ahead of time, so a fresh process pays no kernel compilation", calls="video"),
    ShippedRule(
        "cuda_sm90", ("2.11",), "fp8", _SM90_MEASURED,
        "sm90, lossy opt-in, video self-attention without SageAttention 2's sm90 kernel: attnpatch's fp8 "
        "29.2 ms at Wan 480p (1, 40, 32760, 128) against FlashAttention 3's 32.8 and cuDNN's 38.6 "
        "(relative error 4.7e-2; H200, 2026-11-30)", calls="video"),
    ShippedRule(
        "cuda_sm90", ("2.11",), "flash_attn3", _SM90_EXACT_MEASURED,
        "sm90, 4608 tokens and more, head dim 128, no mask: FlashAttention 3 was the fastest exact kernel on "
        "every such row, bf16 and fp16: Flux 1024² 0.396 / 0.411 ms vs cuDNN 0.439 / 0.459, Wan 480p 32.8 / "
        "34.0 vs 38.6 / 40.1, causal GQA prefill of 8192 tokens 0.834 / 0.879 vs 1.008 / 1.055 (torch's "
        "dispatch) (H200, 2026-11-30, docs/GPU_BACKENDS.md)", calls="long"),
    ShippedRule(
        "cuda_sm90", ("2.11",), "sdpa", _TORCH_EXACT,
        "sm90: torch's own dispatch (what stock runs) was within 2.4% of the fastest exact kernel on all 16 "
        "shape x dtype rows on an H100 (docs/BENCHMARKS.md, 2026-11-27) and within 0.6% on the H200 rows "
        "(docs/GPU_BACKENDS.md, 2026-11-26); pinned cuDNN was 13x slower at GQA decode"),
)


_TORCH = ".".join(torch.__version__.split("+")[0].split(".")[:2])


def device_class(call: Call) -> Optional[str]:
    if call.capability is None:
        return None
    major, minor = call.capability
    return f"{call.device_type}_sm{major}{minor}"


def has_rule(call: Call) -> bool:
    """Whether any rule is for this call's card and torch (then auto collects every eligible backend)."""
    key = device_class(call)
    return key is not None and any(r.device_class == key and _TORCH in r.torch_versions for r in RULES)


def choice(call: Call, eligible: Sequence, over_measurement: bool = False) -> Optional[Tuple[object, str]]:
    """(backend, how it was chosen) from a shipped rule, or None when no rule covers the call; with
    ``over_measurement``, only from the rules that win over a machine's own measurement."""
    key = device_class(call)
    if key is None:
        return None
    names = {b.NAME for b in eligible}
    for rule in RULES:
        if (rule.device_class == key and _TORCH in rule.torch_versions and names <= rule.covers
                and CALL_KINDS[rule.calls](call) and (rule.over_measurement or not over_measurement)):
            for b in eligible:
                if b.NAME == rule.prefer:
                    kind = "" if rule.calls == "any" else f", {rule.calls}"
                    return b, f"shipped table ({key}{kind}; not timed)"
    return None
