"""Per-call host overhead of attnpatch.attention_forward over calling the chosen kernel directly.

    python benchmarks/routing_overhead.py --out DIR [--device cpu|cuda] [--calls N] [--repeats R]

Routing cost is host time: it hides behind the GPU for big shapes and shows when the CPU is the
bottleneck, so this times a tight loop of tiny calls without synchronising between them (on CUDA one
synchronise before each timed loop and one after it, outside the timer). Each variant is timed R
times, garbage collection off; a group's loops run back to back (order alternating), so the overhead
is reported both as the median of same-repeat differences and as min − min (robust on a busy host).
Pairs:

* auto:      ``F.scaled_dot_product_attention(q, k, v)``  vs  ``attention_forward(q, k, v)``
* pinned:    ``with sdpa_kernel(<kernel>): F.sdpa(...)``   vs  ``attention_forward(..., backend=<pinned>)``
  (also the plain-SDPA time, to show what ``sdpa_kernel`` itself costs)
* masked bsnd: ``F.sdpa(q.transpose(1, 2), ..., attn_mask=pad[:, None, None, :]).transpose(1, 2)``  vs
  ``attention_forward(q, k, v, layout="bsnd", attn_mask=pad)``
* diffusers: ``dispatch_attention_fn(q, k, v)`` (bsnd, native backend), when diffusers imports.
* decode:    one query against keys that grow by one each call (a new shape every call, as while
  generating): ``F.sdpa(..., enable_gqa=True)``  vs  ``attention_forward(...)``

Writes DIR/routing_overhead_<device>.json and DIR/routing_overhead_<device>.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnpatch  # noqa: E402


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm{props.major}{props.minor}), host CPU {_cpu_name()} ({os.cpu_count()} cores)"
    return f"{_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def make_variants(device: torch.device):
    """(name, group, fn) triples; ``group`` pairs each attnpatch variant with its direct baseline."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    b, h, s, d = 1, 2, 16, 32
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(3))
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # bsnd
    pad = torch.ones(b, s, dtype=torch.bool, device=device)
    pad[:, -3:] = False
    sdpa = F.scaled_dot_product_attention
    af = attnpatch.attention_forward

    pinned_name, pinned_kernel = ("sdpa_flash", SDPBackend.FLASH_ATTENTION)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap >= (9, 0):
            pinned_name, pinned_kernel = ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)

    def pinned_direct():
        with sdpa_kernel(pinned_kernel):
            return sdpa(q, k, v)

    variants = [
        ("F.sdpa (direct)", "auto", lambda: sdpa(q, k, v)),
        ("attention_forward (auto)", "auto", lambda: af(q, k, v)),
        (f"sdpa_kernel({pinned_kernel.name}) + F.sdpa", "pinned", pinned_direct),
        (f"attention_forward(backend={pinned_name!r})", "pinned", lambda: af(q, k, v, backend=pinned_name)),
        ("F.sdpa bsnd + key-padding mask (direct)", "masked",
         lambda: sdpa(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                      attn_mask=pad[:, None, None, :]).transpose(1, 2)),
        ("attention_forward(layout='bsnd', attn_mask=(b, s_kv))", "masked",
         lambda: af(qs, ks, vs, layout="bsnd", attn_mask=pad)),
    ]
    # decoding: one query against a key length that grows by one each call (a new exact shape every
    # time, inside one length bucket): the plan of the bucket must serve it without re-deciding
    lengths = list(range(256, 320))  # one bucket: [256, 320)
    dq = torch.randn(1, 8, 1, 64, device=device, dtype=dtype)
    dkv = [torch.randn(1, 2, n, 64, device=device, dtype=dtype) for n in lengths]
    step = [0]

    def decode_direct():
        kv = dkv[step[0] % len(dkv)]
        step[0] += 1
        return sdpa(dq, kv, kv, enable_gqa=True)

    def decode_routed():
        kv = dkv[step[0] % len(dkv)]
        step[0] += 1
        return af(dq, kv, kv)

    variants += [
        ("F.sdpa decode step (direct, GQA 8/2, growing keys)", "decode", decode_direct),
        ("attention_forward decode step (growing keys)", "decode", decode_routed),
    ]
    if device.type == "cuda":
        # On sm90 auto's decode rule runs torch's flash kernel (cuDNN builds a graph per new key length),
        # while a direct F.sdpa runs cuDNN, whose graphs for these 64 cycling lengths are cached after the
        # first loop: two operators. The same-kernel baseline turns cuDNN off around each direct call
        # (two flag calls, a fraction of a µs, counted against the baseline).
        def decode_direct_flash():
            torch.backends.cuda.enable_cudnn_sdp(False)
            try:
                return decode_direct()
            finally:
                torch.backends.cuda.enable_cudnn_sdp(True)

        variants += [
            ("F.sdpa decode step, cuDNN off (direct: torch's flash, as auto's decode rule)", "decode_same_kernel",
             decode_direct_flash),
            ("attention_forward decode step (growing keys; vs the flash baseline)", "decode_same_kernel",
             decode_routed),
        ]
    extra = {"shape_bnsd": [b, h, s, d], "dtype": str(dtype).replace("torch.", ""), "pinned_backend": pinned_name,
             "decode": "q (1, 8, 1, 64), k/v (1, 2, n, 64), n cycling 256..319 (one length bucket)"}
    try:
        import diffusers
        from diffusers.models.attention_dispatch import dispatch_attention_fn
    except Exception as exc:  # diffusers is optional
        extra["diffusers"] = f"not measured: {type(exc).__name__}: {exc}"
    else:
        extra["diffusers"] = diffusers.__version__
        variants.append(("F.sdpa bsnd (direct, transposes)", "diffusers",
                         lambda: sdpa(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)).transpose(1, 2)))
        variants.append(("diffusers dispatch_attention_fn (native)", "diffusers",
                         lambda: dispatch_attention_fn(qs, ks, vs)))
        variants.append(("attention_forward(layout='bsnd')", "diffusers", lambda: af(qs, ks, vs, layout="bsnd")))
    # every attnpatch variant must give its direct counterpart's numbers
    for _, group, fn in variants:
        fn()
    torch.testing.assert_close(variants[1][2](), variants[0][2]())
    torch.testing.assert_close(variants[5][2](), variants[4][2](), atol=1e-3, rtol=1e-3)
    return variants, extra


def time_loop(fn, calls: int, device: torch.device) -> float:
    """Seconds per call of ``calls`` back-to-back calls (no synchronisation inside the loop)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return elapsed / calls


def run(device: torch.device, calls: int, repeats: int, warmup: int) -> dict:
    variants, extra = make_variants(device)
    for _, _, fn in variants:
        for _ in range(warmup):
            fn()
    groups = {}
    for name, group, fn in variants:
        groups.setdefault(group, []).append((name, fn))
    samples = {name: [] for name, _, _ in variants}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            for members in groups.values():  # a group's loops run back to back, order alternating
                for name, fn in (members if i % 2 == 0 else members[::-1]):
                    samples[name].append(time_loop(fn, calls, device) * 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()
    rows = []
    for group, members in groups.items():
        base = members[0][0]
        for name, _ in members:
            paired = [a - b for a, b in zip(samples[name], samples[base])]
            rows.append({
                "variant": name, "group": group, "baseline": base,
                "median_us": statistics.median(samples[name]), "min_us": min(samples[name]),
                "max_us": max(samples[name]),
                "overhead_median_us": statistics.median(paired),  # median of same-repeat differences
                "overhead_min_us": min(samples[name]) - min(samples[base]),
            })
    plain = next(r for r in rows if r["group"] == "auto")
    pinned = next(r for r in rows if r["group"] == "pinned")
    s = attnpatch.stats()
    return {
        "device": device_description(device), "device_type": device.type,
        "torch": torch.__version__, "python": platform.python_version(), "attnpatch": attnpatch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
        "calls_per_loop": calls, "repeats": repeats, **extra,
        "sdpa_kernel_cost_us": {"median": pinned["median_us"] - plain["median_us"],
                                "min": pinned["min_us"] - plain["min_us"]},
        "attnpatch_calls": s.calls, "attnpatch_fallbacks": {" -> ".join(k[:2]): n for k, n in s.fallbacks.items()},
        "rows": rows,
    }


def to_markdown(res: dict) -> str:
    lines = [
        f"# Routing overhead on {res['device_type']}",
        "",
        f"- device: {res['device']}",
        f"- torch {res['torch']}, Python {res['python']}, attnpatch {res['attnpatch']}, diffusers: {res['diffusers']}",
        f"- date: {res['date']}; load average at the end {', '.join(f'{x:.1f}' for x in res['load_average'])}",
        f"- tiny call: bnsd shape {tuple(res['shape_bnsd'])}, {res['dtype']}, torch threads {res['torch_threads']}; "
        f"{res['calls_per_loop']} calls per timed loop without synchronising; {res['repeats']} loops per variant, "
        "each group's loops back to back",
        "",
        "| variant | per call, median (µs) | min (µs) | overhead, median of paired differences (µs) | "
        "overhead, min − min (µs) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        if r["variant"] == r["baseline"]:
            o1 = o2 = "baseline"
        else:
            o1, o2 = f"{r['overhead_median_us']:+.2f}", f"{r['overhead_min_us']:+.2f}"
        lines.append(f"| {r['variant']} | {r['median_us']:.2f} | {r['min_us']:.2f} | {o1} | {o2} |")
    k = res["sdpa_kernel_cost_us"]
    lines += [
        "",
        f"`torch.nn.attention.sdpa_kernel` around a direct call costs {k['median']:+.2f} µs (median; "
        f"{k['min']:+.2f} µs min − min) per call over plain F.sdpa. attnpatch calls during the run: "
        f"{res['attnpatch_calls']}; fallbacks: {res['attnpatch_fallbacks'] or 'none'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs", help="output directory (default: docs/)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--calls", type=int, default=None, help="calls per timed loop (default 300 cpu, 2000 cuda)")
    parser.add_argument("--repeats", type=int, default=61, help="timed loops per variant (median taken)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: tiny CPU calls only pay thread-pool noise with more)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    calls = args.calls or (2000 if device.type == "cuda" else 300)
    torch.set_num_threads(args.threads)
    res = run(device, calls, args.repeats, args.warmup)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"routing_overhead_{device.type}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)
    md = to_markdown(res)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
