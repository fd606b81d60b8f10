"""How steady auto's timing is at one shape: each exact candidate auto would time, timed REPS times through
`attnpatch.autotune.measure` (order reversed every other round), with its host and GPU time per call, and
auto's whole choice made FRESH times from an empty cache.

    python benchmarks/autotune_spread.py --out FILE.json [--shape B,H,S,D] [--pad N] [--reps R] [--fresh F]

Default shape: HunyuanVideo's joint attention with 200 padded keys (1, 24, 4352, 128), the row whose timing
once took cuDNN over FlashAttention 3 (docs/GPU_BACKENDS.md, eighth and ninth runs). Host time per call: the
launches of 50 calls behind a queue of 10, unsynchronised; GPU time: events around 50 calls back to back.
``misses``: key-padding packings computed during each timing (`_third_party.key_packing`'s cache misses).
CUDA only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def host_and_gpu(autotune, backend, call, n=50):
    runner = backend.build(call)
    q, k, v, m = autotune.make_inputs(call, backend.NATIVE_LAYOUT)

    def once():
        runner(q, k, v, m, call.is_causal, call.scale, call.dropout_p)

    with torch.no_grad():
        for _ in range(5):
            once()
        torch.cuda.synchronize()
        for _ in range(10):
            once()
        t0 = time.perf_counter()
        for _ in range(n):
            once()
        host = (time.perf_counter() - t0) * 1e3 / n
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(10):
            once()
        start.record()
        for _ in range(n):
            once()
        end.record()
        end.synchronize()
    return dict(host_ms=round(host, 4), gpu_ms=round(start.elapsed_time(end) / n, 4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="1,24,4352,128", help="B,H,S,D (self-attention, bnsd)")
    ap.add_argument("--pad", type=int, default=200, help="padded keys at the end (0: no mask)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--fresh", type=int, default=6)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("autotune_spread.py needs CUDA (auto times nothing elsewhere)", file=sys.stderr)
        return 2
    os.environ["ATTNPATCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnpatch-spread-")
    import attnpatch
    from attnpatch import autotune, router
    from attnpatch.backends import _third_party
    from attnpatch.call import build_call

    misses = [0]
    packing_order = _third_party.packing_order

    def counted(*a, **kw):
        misses[0] += 1
        return packing_order(*a, **kw)

    _third_party.packing_order = counted  # this process only: counts key_packing's cache misses
    b, h, s, d = (int(x) for x in args.shape.split(","))
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=[b, h, s, d], pad=args.pad,
               backends={i.name: i.version for i in attnpatch.backends() if i.available}, rows={})
    for dtname, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        q = torch.randn(b, h, s, d, device="cuda", dtype=dt)
        k, v = torch.randn_like(q), torch.randn_like(q)
        m = None
        if args.pad:
            m = torch.ones(b, 1, 1, s, dtype=torch.bool, device="cuda")
            m[..., -args.pad:] = False
        call, _ = build_call(q, k, v, "bnsd", m, False, None, 0.0, False)
        eligible = [x for x in router._auto_candidates(call) if not x.LOSSY and not x.not_supported_reasons(call)]
        cands = autotune._to_time(eligible)
        row = dict(call=call.describe(), eligible=[x.NAME for x in eligible], timed=[x.NAME for x in cands],
                   measure={x.NAME: [] for x in cands}, misses={x.NAME: [] for x in cands}, host_gpu={}, auto=[])
        for r in range(args.reps):
            for x in (cands if r % 2 == 0 else cands[::-1]):
                misses[0] = 0
                try:
                    t = round(autotune.measure(x, call), 4)
                except Exception as exc:
                    t = f"{type(exc).__name__}: {str(exc)[:120]}"
                row["measure"][x.NAME].append(t)
                row["misses"][x.NAME].append(misses[0])
        for x in cands:
            try:
                row["host_gpu"][x.NAME] = host_and_gpu(autotune, x, call)
            except Exception as exc:
                row["host_gpu"][x.NAME] = f"{type(exc).__name__}: {str(exc)[:120]}"
        for _ in range(args.fresh):
            autotune.reset_memory()
            autotune.clear_cache()
            router.clear_cache()
            _third_party.clear_key_packings()
            attnpatch.attention_forward(q, k, v, attn_mask=m)
            torch.cuda.synchronize()
            e = attnpatch.explain(q, k, v, attn_mask=m)
            times = next((c.get("times_ms") for c in autotune.cached_choices()
                          if c.get("signature") == autotune.signature_key(call)), None) or {}
            row["auto"].append(dict(chosen=e.backend, times={n: round(t, 4) for n, t in times.items()}))
        res["rows"][dtname] = row
        print(dtname, json.dumps(row), flush=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
