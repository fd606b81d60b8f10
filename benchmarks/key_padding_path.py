"""Where the time of a key-padded attention call goes: GPU kernels or the host (issue 13).

    PYTHONPATH=. python3 benchmarks/key_padding_path.py --out DIR [--load N] [--tag NAME]

FlashAttention's wrappers serve a key-padding mask by packing the kept keys for the varlen entry point
(`pack_keys`), a dozen small kernels in front of the attention kernel. On HunyuanVideo's joint shape
(1, 24, 4352, 128) with 200 padded keys, FlashAttention 3 through attnpatch read 0.55 ms in some sweeps
and 0.93-0.99 ms in others (H200, 2026-11-30). This script tells the two causes apart, per path:

* ``gpu ms``: CUDA-event time per call over back-to-back calls (what a benchmark reads);
* ``host us``: the host's time to *issue* one call (no sync inside the loop). When it exceeds the GPU
  time, the GPU waits for the host and the call is host-bound;
* ``kernels ms``: the sum of the CUDA kernels' own durations per call (torch.profiler).

``--load N`` runs N busy processes on the CPU meanwhile (a build beside the benchmark, as in the sweeps
that read 0.95 ms). Paths: flash_attn3 / flash_attn / sdpa_cudnn through ``attention_forward`` with the
mask, flash_attn3's varlen kernel on keys packed beforehand, ``pack_keys`` alone. Appends one JSON line
per run to DIR/key_padding_path.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnpatch  # noqa: E402
from attnpatch.backends._third_party import pack_keys  # noqa: E402

B, H, S, D, PAD = 1, 24, 4352, 128, 200


def _busy(stop):
    x = 0
    while not stop.is_set():
        for i in range(100000):
            x += i * i


def _time(fn, calls: int, rounds: int):
    """(gpu ms per call, host us per issued call), medians over ``rounds``."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / calls)
        host.append((t1 - t0) / calls * 1e6)
    return statistics.median(gpu), statistics.median(host)


def _kernels_ms(fn, calls: int = 10) -> float:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages())
    return total / calls / 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--load", type=int, default=0, help="busy CPU processes during the measurement")
    p.add_argument("--tag", default="")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device="cuda")
    mask[..., S - PAD:] = False

    paths = {}
    names = {b.name for b in attnpatch.backends() if b.available}
    for name in ("flash_attn3", "flash_attn", "sdpa_cudnn"):
        if name in names:
            paths[f"{name} (attnpatch, mask)"] = (
                lambda n=name: attnpatch.attention_forward(q, k, v, attn_mask=mask, backend=n))
    if "flash_attn3" in names:
        import flash_attn_interface as fa3

        paths["flash_attn3 (no mask)"] = lambda: attnpatch.attention_forward(q, k, v, backend="flash_attn3")
        qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        keep = mask.reshape(B, S)
        kp, vp, cu_k, _ = pack_keys(keep, ks, vs)
        cu_q = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device="cuda")
        qf = qs.reshape(B * S, H, D)
        paths["flash_attn3 varlen kernel, keys packed before"] = (
            lambda: fa3.flash_attn_varlen_func(qf, kp, vp, cu_q, cu_k, S, S))
        paths["pack_keys alone"] = lambda: pack_keys(keep, ks, vs)

    stop = mp.Event()
    workers = [mp.Process(target=_busy, args=(stop,), daemon=True) for _ in range(args.load)]
    for w in workers:
        w.start()
    rows = {}
    try:
        for label, fn in paths.items():
            gpu, host = _time(fn, args.calls, args.rounds)
            rows[label] = {"gpu_ms": gpu, "host_us": host, "kernels_ms": _kernels_ms(fn)}
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=5)
    doc = {"tag": args.tag, "load": args.load, "dtype": args.dtype, "shape": [B, H, S, D], "padded_keys": PAD,
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(args.out, "key_padding_path.jsonl"), "a") as fh:
        fh.write(json.dumps(doc) + "\n")
    print(f"# {args.tag} load={args.load} {args.dtype} {doc['device']}")
    for label, r in rows.items():
        print(f"{label:48s} gpu {r['gpu_ms']:.3f} ms  host {r['host_us']:7.1f} us  kernels {r['kernels_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
