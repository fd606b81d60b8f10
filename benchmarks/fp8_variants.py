"""Sweep the fp8 attention kernel's variants and launch configs on one GPU (sm90).

    PYTHONPATH=. python3 benchmarks/fp8_variants.py --out OUTDIR

For each shape: SDPA cuDNN time, then every (variant, fixed config) of the whole
fp8 call (quantization passes included): the pointer-load kernel with a separate
Q pass over launch configs (query rows BM, warps, pipeline stages),
and with exp2 in fp16x2 (``exp_f16``).  Every output is compared with the first
variant's (identical numerics show 0).  Then the quantization passes
alone over their launch parameters.  Writes OUTDIR/fp8_variants.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attnpatch.kernels import fp8_attention as FA  # noqa: E402

SHAPES = [
    # name, b, h, s, d, dtype
    ("dit-4608", 1, 24, 4608, 128, torch.bfloat16),
    ("video-32760", 1, 40, 32760, 128, torch.bfloat16),
    ("wan13b-32760", 1, 12, 32760, 128, torch.bfloat16),
    ("sd-4096-d64", 2, 10, 4096, 64, torch.float16),
]
DEFAULT_SHAPES = "dit-4608,video-32760,wan13b-32760"
# Variants measured on an H100 at commit 31e2769 (docs/gpu_runs/fp8_variants_h100_run1.md) and then
# removed: K/V tiles through TMA descriptors (5-15% slower) and a warp-specialized key loop (no
# change at 8 warps; the 4-warp build fails in Triton 3.6's NVGPUWarpSpecialization pass).
# Variants measured on an H100 and then removed (docs/FP8_KERNEL.md, "Experiments"): at commit
# 31e2769 K/V tiles through TMA descriptors (5-15% slower), a warp-specialized key loop (no change
# at 8 warps; the 4-warp build fails in Triton 3.6's NVGPUWarpSpecialization pass) and Q quantized
# inside the attention kernel (3-20% slower at d=128); at commit 0032607 exp2 as one
# ex2.approx.ftz and skipping the accumulator rescale when no row max grew (no gain).
# Also measured and removed (docs/FP8_KERNEL.md, "Experiments"): at commit 17d2f6e, Q.K^T of the
# next key tile issued before the softmax of this one, and register caps (maxnreg) for more
# programs per SM; 64-key tiles (BN=64, K scales still per 128 keys) in sweep 3; at commit 1c1df64,
# part of the exp2s (one in two / in four) by a polynomial on the FMA pipe.
VARIANTS = {
    "base": dict(),
    "exp_f16": dict(exp_f16=True),
}
CONFIGS = [(64, 4, 3), (64, 4, 2), (128, 8, 3)]  # BM, warps, stages
QUANT_GRID = [  # STATS_ROWS, STATS_WARPS, STATS_PROGRAMS_PER_SM, KV_WARPS
    (16, 4, 4, 8), (16, 4, 8, 4), (32, 4, 4, 4), (64, 8, 8, 4),
]


def bench(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated names of SHAPES")
    ap.add_argument("--quant", action="store_true", help="also sweep the quantization passes")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    info = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    print(info, flush=True)
    rows = []
    want = set(args.shapes.split(","))
    for name, b, h, s, d, dt in SHAPES:
        if name not in want:
            continue
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dt) for _ in range(3))
        fl = 4.0 * b * h * s * s * d

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        t_ref = bench(cudnn)
        rows.append(dict(shape=name, variant="cudnn", config=None, ms=t_ref, tflops=fl / t_ref / 1e9))
        print(f"{name}: cudnn {t_ref:.3f} ms {fl / t_ref / 1e9:.0f} TFLOP/s", flush=True)
        base_out = None
        for vname, kw in VARIANTS.items():
            for cfg in CONFIGS:
                if vname != "base" and cfg != CONFIGS[0]:
                    continue
                fn = lambda: FA._triton_forward(q, k, v, 1 / math.sqrt(d), False, None, "bnsd",  # noqa: E731
                                                fixed_config=cfg, **kw)
                try:
                    o = fn()
                    torch.cuda.synchronize()
                    t = bench(fn)
                except Exception as e:  # record and go on: a variant may not compile here
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                    rows.append(dict(shape=name, variant=vname, config=cfg, error=msg))
                    print(f"  {vname} {cfg}: ERROR {msg}", flush=True)
                    traceback.print_exc(limit=2)
                    continue
                if base_out is None:
                    base_out = o
                diff = (o.float() - base_out.float()).abs().max().item()
                rows.append(dict(shape=name, variant=vname, config=cfg, ms=t, tflops=fl / t / 1e9,
                                 speedup=t_ref / t, maxdiff_vs_first=diff))
                print(f"  {vname:16s} {str(cfg):14s} {t:8.3f} ms {fl / t / 1e9:6.0f} TFLOP/s "
                      f"x{t_ref / t:.3f}  maxdiff {diff:.2e}", flush=True)
        # quantization passes alone (stats + Q + K/V), over their launch parameters
        saved = (FA.STATS_ROWS, FA.STATS_WARPS, FA.STATS_PROGRAMS_PER_SM, FA.KV_WARPS)
        for g in QUANT_GRID if args.quant else ():
            FA.STATS_ROWS, FA.STATS_WARPS, FA.STATS_PROGRAMS_PER_SM, FA.KV_WARPS = g
            fn = lambda: FA._triton_forward(q, k, v, 1 / math.sqrt(d), False, None, "bnsd",  # noqa: E731
                                            return_quant=True)
            try:
                fn()
                t = bench(fn)
            except Exception as e:
                rows.append(dict(shape=name, variant="quant", config=g, error=str(e)[:300]))
                continue
            rows.append(dict(shape=name, variant="quant", config=g, ms=t))
            print(f"  quant passes {g}: {t:.3f} ms", flush=True)
        FA.STATS_ROWS, FA.STATS_WARPS, FA.STATS_PROGRAMS_PER_SM, FA.KV_WARPS = saved
        del q, k, v, base_out
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "fp8_variants.json"), "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1, default=str)
    with open(os.path.join(args.out, "fp8_variants.md"), "w") as f:
        f.write(f"{info}\n\n| shape | variant | config (BM, warps, stages) | ms | TFLOP/s | vs cuDNN | max diff vs first |\n"
                "|---|---|---|---|---|---|---|\n")
        for r in rows:
            if "error" in r:
                f.write(f"| {r['shape']} | {r['variant']} | {r['config']} | error: {r['error']} | | | |\n")
            else:
                f.write(f"| {r['shape']} | {r['variant']} | {r['config']} | {r['ms']:.3f} | "
                        f"{r.get('tflops', 0):.0f} | {r.get('speedup', 1):.3f} | {r.get('maxdiff_vs_first', '')} |\n")


if __name__ == "__main__":
    main()
