"""Host time per call of third-party kernels called directly vs through attnpatch (issue 13).

    PYTHONPATH=. python3 benchmarks/wrapper_overhead.py --out DIR

At small shapes a kernel's GPU time is shorter than the host time of launching it, so a benchmark that
times back-to-back calls measures the host path: the library's Python wrapper, attnpatch's custom op
and router. Per shape and kernel: microseconds per call of 200 back-to-back calls (one sync at the
end), called (a) directly through the library's own Python API and (b) through
``attnpatch.attention_forward`` under ``use_backend(NAME, strict=True)`` (shapes the kernel refuses are
left out), beside torch's ``F.scaled_dot_product_attention``.
Only installed kernels are run. Writes DIR/wrapper_overhead.json and .md.
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

SHAPES = {  # b, h, s, d, dtype
    "SD short (2,20,1024,64) fp16": (2, 20, 1024, 64, torch.float16),
    "ViT (32,12,197,64) fp16": (32, 12, 197, 64, torch.float16),
    "Flux 1024² (1,24,4608,128) bf16": (1, 24, 4608, 128, torch.bfloat16),
}


def _direct(name):
    """The library's own call on bnsd tensors, or None when it is not installed."""
    try:
        if name == "flash_attn3":
            import flash_attn_interface as fa3

            def run(q, k, v):
                out = fa3.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                return out[0] if isinstance(out, tuple) else out
            return run
        if name == "flash_attn":
            import flash_attn

            return lambda q, k, v: flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if name.startswith("sage"):
            import sageattention as sa

            fn = {"sage": "sageattn", "sage_fp16_triton": "sageattn_qk_int8_pv_fp16_triton",
                  "sage_fp16_cuda": "sageattn_qk_int8_pv_fp16_cuda",
                  "sage_fp8_cuda_sm90": "sageattn_qk_int8_pv_fp8_cuda_sm90"}[name]
            f = getattr(sa, fn)
            return lambda q, k, v: f(q, k, v, tensor_layout="HND")
    except (ImportError, AttributeError, KeyError):
        return None
    return None


def host_us(fn, q, k, v, calls=200):
    for _ in range(10):
        fn(q, k, v)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(q, k, v)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--backends", default="flash_attn3,flash_attn,sage,sage_fp16_triton,sage_fp16_cuda,sage_fp8_cuda_sm90")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("wrapper_overhead.py needs a CUDA device")
    avail = {b.name for b in attnpatch.backends() if b.available}
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    for shape, (b, h, s, d, dtype) in SHAPES.items():
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
        row = {"torch F.sdpa": host_us(F.scaled_dot_product_attention, q, k, v)}
        for name in args.backends.split(","):
            direct = _direct(name)
            if name not in avail or direct is None:
                continue
            if attnpatch.explain(q, k, v, backend=name).backend != name:  # refused: another kernel would run
                continue

            def routed(q, k, v, name=name):
                with attnpatch.use_backend(name, strict=True):
                    return attnpatch.attention_forward(q, k, v)
            row[f"{name} direct"] = host_us(direct, q, k, v)
            row[f"{name} attnpatch"] = host_us(routed, q, k, v)
        res["rows"][shape] = row
        print(shape, json.dumps({n: round(x, 1) for n, x in row.items()}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wrapper_overhead.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# host time per call ({res['device']}, torch {res['torch']}, {res['date']})", "",
             "Microseconds per call, 200 back-to-back calls, one sync at the end.", "", "| shape | call | µs |",
             "|---|---|---:|"]
    for shape, row in res["rows"].items():
        lines += [f"| {shape} | {n} | {x:.1f} |" for n, x in row.items()]
    with open(os.path.join(args.out, "wrapper_overhead.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
