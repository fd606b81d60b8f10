"""Decisions shipped with attnpatch for the cards the project has measured, used by auto before it
times anything: a fresh process then pays no timing for the calls they cover (issue 11: the first
call of a new signature used to cost up to 1.3 s of timing at Wan's shape).

A rule answers only when *every* backend the router found eligible for the call is one it covers, so
an installed third-party kernel, a lossy opt-in or a backend the rule was not measured with makes auto
time the candidates as before. A machine's own measurement in the autotune cache wins over a rule.
The rule picks among the eligible backends only: it can never make an ineligible kernel run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple

import torch

from .call import Call

#: The exact torch kernels (and the reference paths) a rule may cover.
_TORCH_EXACT = frozenset({"sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "eager"})


#: The kinds of call a rule can be limited to (`ShippedRule.calls`).
CALL_KINDS: Dict[str, Callable[[Call], bool]] = {
    "any": lambda call: True,
    # one query token against a key cache: a decoding step, whose key length is new at every step
    "decode": lambda call: call.seq_q == 1,
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
