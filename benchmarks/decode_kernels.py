"""Decode-shaped attention (one query token, a growing key cache): what each exact kernel costs (issue 15).

    python benchmarks/decode_kernels.py --out DIR

For a Qwen2.5-0.5B-like head layout (14 query / 2 key-value heads, d=64) and a Llama-3-8B-like one
(32 / 8, d=128), bf16, batch 1, query length 1:

* **steady**: 200 back-to-back calls at one key length (64 ... 32768), one sync at the end: microseconds
  per call, what a decode loop pays once torch has seen the length;
* **new lengths**: 64 calls, each at a key length not seen before in the process, each synchronised:
  what the first token at each length pays (torch builds a cuDNN graph per new shape).

Rows: stock ``F.scaled_dot_product_attention(..., enable_gqa=True)`` (transformers' call);
``attnpatch.attention_forward`` with backend ``sdpa`` (torch's dispatch), ``sdpa_flash``,
``sdpa_efficient`` and ``auto``; and torch's kernels called directly as aten operators, without
attnpatch (what each costs by itself): flash with its native GQA, and flash / memory-efficient with the
query heads of each key/value head folded into the query length (q (1, h_kv, h_q / h_kv, d), no GQA).
``--rows`` picks rows by name (comma-separated substrings). Writes DIR/decode_kernels.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnpatch  # noqa: E402

LAYOUTS = {"qwen2.5-0.5b (14/2, d64)": (14, 2, 64), "llama-8b (32/8, d128)": (32, 8, 128)}
STEADY_LENGTHS = (64, 1024, 8192, 32768)


def _stock(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _routed(backend):
    def run(q, k, v):
        return attnpatch.attention_forward(q, k, v, backend=backend)
    return run


def _aten_flash(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[0]


def _folded(op):
    """``op`` on the query heads folded into the query length: exact for one query token."""
    def run(q, k, v):
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        out = op(q.reshape(b, hkv, hq // hkv, d), k, v)
        return out.reshape(b, hq, 1, out.shape[-1])
    return run


def _aten_efficient(q, k, v):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]


def _tensors(hq, hkv, d, length, device, dtype):
    q = torch.randn(1, hq, 1, d, device=device, dtype=dtype)
    k = torch.randn(1, hkv, length, d, device=device, dtype=dtype)
    v = torch.randn(1, hkv, length, d, device=device, dtype=dtype)
    return q, k, v


def steady_us(fn, hq, hkv, d, length, device, dtype, calls=200):
    q, k, v = _tensors(hq, hkv, d, length, device, dtype)
    for _ in range(20):
        fn(q, k, v)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(q, k, v)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6


def new_lengths_us(fn, hq, hkv, d, start, device, dtype, calls=64):
    times = []
    for i in range(calls):
        q, k, v = _tensors(hq, hkv, d, start + i, device, dtype)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(q, k, v)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sum(times) / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default="", help="only the rows whose name contains one of these (comma-separated)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_kernels.py needs a CUDA device")
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = {"stock F.sdpa(enable_gqa=True)": _stock, "attnpatch sdpa": _routed("sdpa"),
            "attnpatch sdpa_flash": _routed("sdpa_flash"), "attnpatch sdpa_efficient": _routed("sdpa_efficient"),
            "attnpatch auto": _routed("auto"), "aten flash, native GQA": _aten_flash,
            "aten flash, heads folded": _folded(_aten_flash), "aten efficient, heads folded": _folded(_aten_efficient)}
    if args.rows:
        rows = {n: f for n, f in rows.items() if any(w in n for w in args.rows.split(","))}
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "results": {}}
    # every row's "new lengths" start where no other row has been: the lengths are new to the process
    start = 40000
    for layout, (hq, hkv, d) in LAYOUTS.items():
        for row, fn in rows.items():
            r = {"new_lengths_us": new_lengths_us(fn, hq, hkv, d, start, device, dtype)}
            start += 100
            for length in STEADY_LENGTHS:
                r[f"steady_us@{length}"] = steady_us(fn, hq, hkv, d, length, device, dtype)
            res["results"][f"{layout} / {row}"] = r
            print(layout, row, json.dumps({k: round(x, 1) for k, x in r.items()}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_kernels.json"), "w") as f:
        json.dump(res, f, indent=1)
    cols = ["new_lengths_us"] + [f"steady_us@{n}" for n in STEADY_LENGTHS]
    lines = [f"# decode-shaped attention ({res['device']}, torch {res['torch']}, cuDNN {res['cudnn']}, {res['date']})", "",
             "Microseconds per call, batch 1, one query token, bf16. new lengths: each call at a key length new to "
             "the process, synchronised; steady: 200 back-to-back calls at one key length.", "",
             "| heads / row | new lengths (64 calls, mean) | " + " | ".join(f"steady, {n} keys" for n in STEADY_LENGTHS)
             + " |", "|---|" + "---:|" * len(cols)]
    for name, r in res["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "decode_kernels.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
