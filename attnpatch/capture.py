"""The scoped capture behind `attnpatch.calibrate`: sample each site's real attention inputs while the
exact reference run goes through the model, and measure every candidate backend on the samples.

`Capture.backend()` is a `Backend` registered only while `attnpatch.calibrate` runs; a patch whose
sites all name it (nothing else in the process does) sends every routed call of the target to it.
For each call it

1. runs the call on the exact backend auto would pick for it (``allow_lossy=False``; decided once per
   call shape) through the router, so the run is an exact run of the model;
2. at the first call of each denoising step of each site (of every call when no step is known), up
   to ``max_samples`` per site and step bucket, takes a *sample* and measures it at once: the sample
   is freed before the call returns, so at most one sample exists at a time.

A sample is batch element 0 of ``heads`` query heads (those with the largest ``max|q|·max|k|``: the
heads 8-bit rounding hurts most; each with its own key/value head, so GQA becomes plain attention),
``query_rows`` query rows (blocks of 128 consecutive rows spread over the sequence; all rows for
causal calls, whose rows depend on their position), **all** keys and values of those heads (a
kernel's error depends on every key: smoothing by the key mean, per-block scales), and the matching
slice of the mask. Its size, in bytes, is::

    heads × (rows × head_dim + seq_kv × (head_dim + head_dim_v)) × element size  (+ the mask slice)

which grows with the key length only through the keys of the sampled heads, never with the number of
query rows or heads of the call. ``budget`` caps it: heads are dropped down to one, and a site whose
one-head sample is still over the budget is not sampled (reported, and kept exact).

On the sample every candidate backend that can serve the *real* call runs (its runner is built for
the sample's shape, so speed-only length limits such as fp8's do not apply), and so does a reference
in float64 (CPU) or float32 (GPU), chunked over query rows; each candidate's relative L2 error,
cosine and max abs error against it are kept (the worst over the samples of a site and step bucket).
Calls with dropout, a sliding window, softcap or sinks are run but not sampled (no lossy kernel
serves them). Calls traced by torch.compile are refused (calibrate the model before compiling it).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import controls, registry, router
from .backends.eager import eager_attention
from .call import Call, Features, build_call
from .controls import AUTO, Scope
from .registry import Backend

logger = logging.getLogger("attnpatch")

#: The most bytes one sample may hold (see the module docstring), by default.
DEFAULT_BUDGET = 256 << 20
#: Query heads per sample, by default.
DEFAULT_HEADS = 2
#: Query rows per sample, by default (taken in blocks of `ROW_BLOCK`).
DEFAULT_QUERY_ROWS = 256
#: Consecutive query rows kept together (8-bit kernels scale queries per block of rows).
ROW_BLOCK = 128
#: Samples per site and step bucket, by default (the first call of each step, until this many).
DEFAULT_MAX_SAMPLES = 4
#: Memory of one chunk of the reference's score matrix.
REFERENCE_CHUNK_BYTES = 64 << 20
#: Exact alternatives whose runner materialises the score matrix are used for the floor only below this.
FLOOR_SCORES_BYTES = 1 << 30
#: Exact alternatives measured on the samples (for the floor), at most.
MAX_FLOOR_OPTIONS = 3

_IDS = itertools.count(1)


def step_buckets(total: Optional[int], buckets) -> List[Tuple[int, int]]:
    """The step buckets of a run of ``total`` steps, as inclusive (first, last) ranges: ``buckets`` is a
    count (near-equal contiguous ranges) or a list of the first step of each bucket. [] when
    ``total`` is unknown."""
    if not total:
        return []
    if isinstance(buckets, int):
        n = max(1, min(buckets, total))
        starts = [(i * total) // n for i in range(n)]
    else:
        starts = sorted({int(s) for s in buckets if 0 <= int(s) < total} | {0})
    ends = [s - 1 for s in starts[1:]] + [total - 1]
    return list(zip(starts, ends))


@dataclass
class Errors:
    """A candidate's error on samples (the worst over them): relative L2, cosine, max abs."""

    rel_l2: float
    cosine: float
    max_abs: float

    def worst(self, other: Optional["Errors"]) -> "Errors":
        if other is None:
            return self
        return Errors(max(self.rel_l2, other.rel_l2), min(self.cosine, other.cosine),
                      max(self.max_abs, other.max_abs))


@dataclass
class CallInfo:
    """One distinct real call shape seen at some site: its exact reference backend, the candidates that
    can serve it, and the exact alternatives for the floor."""

    call: Call
    reference: str
    candidates: Tuple[str, ...]
    refused: Dict[str, str]
    floor_options: Tuple[str, ...]


@dataclass
class SiteRecord:
    """What the capture saw at one site in one step bucket (``bucket`` None: the step was unknown or
    outside the denoising steps)."""

    site: object
    bucket: Optional[Tuple[int, int]]
    calls: Counter = field(default_factory=Counter)  # Call -> calls
    samples: int = 0
    steps_sampled: set = field(default_factory=set)
    errors: Dict[str, Errors] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)
    #: exact alternatives whose sample output was bitwise equal to the reference backend's
    same_as_reference: set = field(default_factory=set)
    not_sampled: Counter = field(default_factory=Counter)  # reason -> calls
    sample_bytes: int = 0  # the largest sample taken

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


def _exact_scope() -> Scope:
    return Scope(backends=AUTO, strict=False, allow_lossy=False, source="attnpatch.calibrate: exact reference")


class Capture:
    """Records and measures samples for `attnpatch.calibrate` (see the module docstring)."""

    def __init__(self, candidates: Optional[Sequence[str]] = None, buckets=4, budget: int = DEFAULT_BUDGET,
                 heads: int = DEFAULT_HEADS, query_rows: int = DEFAULT_QUERY_ROWS,
                 max_samples: int = DEFAULT_MAX_SAMPLES):
        self.name = f"calibrate_capture_{next(_IDS)}"
        self.candidate_names = tuple(candidates) if candidates is not None else None
        self.buckets = buckets
        self.budget = int(budget)
        self.heads = int(heads)
        self.query_rows = int(query_rows)
        self.max_samples = int(max_samples)
        #: a `attnpatch.recipes.StepSchedule` whose step/total say the current step (None: unknown)
        self.schedule = None
        self.records: Dict[Tuple[int, Optional[Tuple[int, int]]], SiteRecord] = {}
        self.infos: Dict[Call, CallInfo] = {}
        self._scope = _exact_scope()
        self._buckets_memo: Dict[int, List[Tuple[int, int]]] = {}
        self._sample_runners: Dict[Tuple[str, Call], object] = {}
        self.max_sample_bytes = 0
        #: the step count of the run (the largest ``total`` seen), None when no step was known
        self.total_steps: Optional[int] = None

    # -- the backend --------------------------------------------------------------------------------
    def backend(self) -> Backend:
        """A new `Backend` instance bound to this capture (register it, name it in the sites' scopes)."""
        capture = self

        class CaptureBackend(Backend):
            NAME = capture.name
            DESCRIPTION = "attnpatch.calibrate: runs each call on the exact backend auto picks, and samples it"
            SUPPORTS_DROPOUT = True
            SUPPORTS_WINDOW = True
            SUPPORTS_SOFTCAP = True
            SUPPORTS_SINKS = True
            SUPPORTS_LSE = True
            RUNNER_FIXED_LENGTHS = True
            NATIVE_LAYOUT = "bnsd"
            AUTO_PRIORITY: Dict[str, int] = {}

            def not_supported_reasons(self, call: Call) -> List[str]:
                if call.compiling or call.symbolic_lengths:
                    return ["attnpatch.calibrate does not sample calls traced by torch.compile; calibrate the "
                            "model before compiling it"]
                try:
                    capture.reference_for(call)
                except router.BackendUnsupportedError as exc:
                    return [str(exc).splitlines()[0]]
                return []

            def build(self, call: Call):
                return capture.runner(call, None)

            def build_for_site(self, call: Call, site):
                return capture.runner(call, site)

        return CaptureBackend()

    def reference_for(self, call: Call) -> str:
        """The exact backend auto picks for ``call`` (``allow_lossy=False``), by name."""
        info = self.infos.get(call)
        if info is not None:
            return info.reference
        return router.decide(call, None, None, self._scope).backend.NAME

    def info_for(self, call: Call) -> CallInfo:
        info = self.infos.get(call)
        if info is not None:
            return info
        reference = self.reference_for(call)
        env = controls.env_settings()
        names, named = self.candidate_names, True
        if names is None:
            named = False
            names = tuple(b.NAME for b in registry.all_backends()
                          if getattr(b, "AUTOTUNE_TIMED", True) and b.NAME != self.name and not b.availability())
        candidates, refused = [], {}
        for name in names:
            b = registry.get_backend(name)
            reasons = ["disabled by ATTNPATCH_DISABLE"] if name in env.disabled else b.not_supported_reasons(call)
            left_out = None if named or reasons else registry.auto_left_out(b, call)
            if left_out:  # a recipe naming it would pay its cold start in every fresh process; candidates= may name it
                reasons = [left_out]
            if reasons:
                refused[name] = "; ".join(reasons)
            elif name != reference:
                candidates.append(name)
        info = CallInfo(call, reference, tuple(candidates), refused, self._floor_options(call, reference, env))
        self.infos[call] = info
        return info

    def _floor_options(self, call: Call, reference: str, env) -> Tuple[str, ...]:
        """Exact backends other than the reference that auto could run for ``call``, in its static order;
        slow reference kernels (``AUTOTUNE_TIMED = False``) last, and only for small calls."""
        fast, slow = [], []
        scores = call.batch * call.heads_q * call.seq_q * call.seq_kv * 4
        for b in router._auto_candidates(call):
            if b.LOSSY or b.NAME == reference or b.NAME in env.disabled or b.not_supported_reasons(call):
                continue
            if getattr(b, "AUTOTUNE_TIMED", True):
                fast.append(b.NAME)
            elif scores <= FLOOR_SCORES_BYTES:
                slow.append(b.NAME)
        return tuple((fast + slow)[:MAX_FLOOR_OPTIONS])

    # -- the runner ---------------------------------------------------------------------------------
    def _bucket(self, step: Optional[int], total: Optional[int]) -> Optional[Tuple[int, int]]:
        if step is None or not total or step >= total:
            return None
        ranges = self._buckets_memo.get(total)
        if ranges is None:
            ranges = self._buckets_memo[total] = step_buckets(total, self.buckets)
        for r in ranges:
            if r[0] <= step <= r[1]:
                return r
        return None

    def record_for(self, site, step: Optional[int], total: Optional[int]) -> SiteRecord:
        if total and (self.total_steps is None or total > self.total_steps):
            self.total_steps = total
        bucket = self._bucket(step, total)
        key = (id(site), bucket)
        rec = self.records.get(key)
        if rec is None:
            rec = self.records[key] = SiteRecord(site, bucket)
        return rec

    def runner(self, call: Call, site):
        """The runner of ``call`` at ``site``: sample when due, then run the exact reference backend."""
        info = self.info_for(call)
        ref = info.reference
        features = None
        if call.window is not None or call.softcap is not None or call.sinks or call.return_lse:
            features = Features(window=call.window, softcap=call.softcap, sinks=call.sinks,
                                return_lse=call.return_lse)
        why_not = None
        if call.window is not None or call.softcap is not None or call.sinks:
            why_not = "calls with a sliding window, softcap or sinks are not sampled (no lossy kernel serves them)"
        route = router.route
        capture = self

        def run(q, k, v, m, c, s, p, sinks=None):
            if site is not None:
                sched = capture.schedule
                step, total = (sched.step, sched.total) if sched is not None else (None, None)
                rec = capture.record_for(site, step, total)
                rec.calls[call] += 1
                if rec.samples < capture.max_samples and (step is None or step not in rec.steps_sampled):
                    if why_not is not None:
                        rec.not_sampled[why_not] += 1
                    elif p > 0:
                        rec.not_sampled["calls with dropout are not sampled (calibrate in eval mode)"] += 1
                    else:
                        capture.sample(rec, info, step, q, k, v, m, c, s)
            return route(None, q, k, v, "bnsd", m, c, s, p, ref, features, sinks)
        return run

    # -- sampling -----------------------------------------------------------------------------------
    def sample_size(self, heads: int, rows: int, seq_kv: int, d: int, dv: int, element: int) -> int:
        """Bytes of a sample (without the mask slice): see the module docstring."""
        return heads * (rows * d + seq_kv * (d + dv)) * element

    def _rows(self, sq: int, causal: bool) -> Optional[torch.Tensor]:
        """The query rows to sample (None: all of them)."""
        if causal or sq <= self.query_rows:
            return None
        block = min(ROW_BLOCK, self.query_rows)
        n = max(1, self.query_rows // block)
        last = sq - block
        starts = sorted({(round(i * last / (n - 1)) if n > 1 else last // 2) // block * block for i in range(n)})
        return torch.cat([torch.arange(a, a + block) for a in starts])

    def sample(self, rec: SiteRecord, info: CallInfo, step, q, k, v, m, c, s) -> None:
        """Take one sample of this call and measure every candidate on it (see the module docstring)."""
        b, hq, sq, d = q.shape
        hkv, skv, dv = k.shape[1], k.shape[2], v.shape[3]
        rows = self._rows(sq, c)
        nrows = sq if rows is None else int(rows.numel())
        element = q.element_size()
        nheads = min(self.heads, hq)
        while nheads > 1 and self.sample_size(nheads, nrows, skv, d, dv, element) > self.budget:
            nheads -= 1
        size = self.sample_size(nheads, nrows, skv, d, dv, element)
        if size > self.budget:
            rec.not_sampled[f"one head's sample is {size / 2**20:.1f} MiB, over the budget of "
                            f"{self.budget / 2**20:.1f} MiB (raise budget=)"] += 1
            return
        # the user's run may be under autocast: the sample and its reference keep their own dtypes
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            group = hq // hkv
            qa = q[0].abs().amax(dim=(1, 2)).float()
            ka = k[0].abs().amax(dim=(1, 2)).float().repeat_interleave(group)
            qh = torch.argsort(qa * ka, descending=True, stable=True)[:nheads].sort().values.to(q.device)
            kh = torch.div(qh, group, rounding_mode="floor")
            if rows is None:
                qs = q[0, qh].unsqueeze(0).contiguous()
            else:
                rows_d = rows.to(q.device)
                qs = q[0, qh[:, None], rows_d[None, :]].unsqueeze(0).contiguous()
            ks = k[0, kh].unsqueeze(0).contiguous()
            vs = v[0, kh].unsqueeze(0).contiguous()
            ms = None
            if m is not None:
                ms = m[:1]
                if ms.shape[1] > 1:
                    ms = ms[:, qh]
                if ms.shape[2] > 1 and rows is not None:
                    ms = ms[:, :, rows.to(ms.device)]
                ms = ms.contiguous()
                size += ms.numel() * ms.element_size()
            rec.sample_bytes = max(rec.sample_bytes, size)
            self.max_sample_bytes = max(self.max_sample_bytes, size)
            scall, _ = build_call(qs, ks, vs, "bnsd", ms, c, s, 0.0, False)
            ref_out = reference_attention(qs, ks, vs, ms, c, s)
            outs = {}
            for name in (info.reference,) + info.candidates + info.floor_options:
                if name in outs:
                    continue
                try:
                    out = self._run_sample(name, scall, qs, ks, vs, ms, c, s)
                except Exception as exc:  # a candidate that fails here is not chosen; say why
                    first = str(exc).splitlines()[0][:200] if str(exc) else ""
                    rec.failed[name] = f"raised {type(exc).__name__}: {first}"
                    continue
                outs[name] = out
                rec.errors[name] = sample_errors(out, ref_out).worst(rec.errors.get(name))
            ref_sample = outs.get(info.reference)
            if ref_sample is not None:
                for name in info.floor_options:
                    if name in outs and torch.equal(outs[name], ref_sample):
                        rec.same_as_reference.add(name)
                    elif name in outs:
                        rec.same_as_reference.discard(name)
        rec.samples += 1
        if step is not None:
            rec.steps_sampled.add(step)

    def _run_sample(self, name: str, scall: Call, q, k, v, m, c, s) -> torch.Tensor:
        b = registry.get_backend(name)
        key = (name, scall)
        runner = self._sample_runners.get(key)
        if runner is None:
            runner = self._sample_runners[key] = b.build(scall)
        if b.NATIVE_LAYOUT == "bsnd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = runner(q, k, v, m, c, s, 0.0)
        if isinstance(out, tuple):
            out = out[0]
        return out.transpose(1, 2) if b.NATIVE_LAYOUT == "bsnd" else out


def reference_attention(q, k, v, mask, causal: bool, scale) -> torch.Tensor:
    """Attention of a (bnsd) sample in float64 on the CPU and float32 on a GPU, in chunks of query
    rows (each chunk's score matrix at most `REFERENCE_CHUNK_BYTES`). Fully masked rows give zeros."""
    dt = torch.float64 if q.device.type == "cpu" else torch.float32
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    heads, sq, skv = q.shape[1], q.shape[2], k.shape[2]
    chunk = max(1, REFERENCE_CHUNK_BYTES // max(1, heads * skv * torch.finfo(dt).bits // 8))
    outs = []
    for a in range(0, sq, chunk):
        part = q[:, :, a:a + chunk]
        mk = None
        if mask is not None:
            mk = mask[:, :, a:a + chunk] if mask.shape[2] > 1 else mask
            if mk.dtype != torch.bool:
                mk = mk.to(dt)
        if causal:  # SDPA's top-left causal, for rows a.. of the full sequence
            rows = torch.arange(a, a + part.shape[2], device=q.device)
            keep = torch.arange(skv, device=q.device)[None, :] <= rows[:, None]
            if mk is None:
                mk = keep
            elif mk.dtype == torch.bool:
                mk = mk & keep
            else:
                mk = mk.masked_fill(~keep, float("-inf"))
        outs.append(eager_attention(part, k, v, attn_mask=mk, is_causal=False,
                                    scale=None if scale is None else float(scale)))
    return torch.cat(outs, dim=2)


def sample_errors(out: torch.Tensor, ref: torch.Tensor) -> Errors:
    """Relative L2, cosine and max abs error of a candidate's sample output against the reference."""
    a = out.to(ref.dtype)
    if not torch.isfinite(a).all():
        return Errors(math.inf, -1.0, math.inf)
    diff = a - ref
    den = ref.norm().item()
    num = diff.norm().item()
    rel = 0.0 if num == 0 else (num / den if den > 0 else math.inf)
    na = a.norm().item()
    cos = 1.0 if num == 0 else ((a.flatten() @ ref.flatten()).item() / (na * den) if na > 0 and den > 0 else 0.0)
    return Errors(rel, cos, diff.abs().max().item() if diff.numel() else 0.0)
