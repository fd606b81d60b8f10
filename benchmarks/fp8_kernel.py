"""Benchmark attnpatch's 8-bit attention kernel against SDPA cuDNN (bf16/fp16).

    PYTHONPATH=. python3 benchmarks/fp8_kernel.py --out OUTDIR [--quick] [--variants]

Measures (median of triton.testing.do_bench, after warm-up, rotating over several
input sets so the L2 cache doesn't hold them): the bf16 matmul ceiling (8192^3),
SDPA with the cuDNN backend, and fp8_attention *including* its quantization
passes.  Effective TFLOP/s = 4*b*h*sq*skv*d / time (halved for causal).
Accuracy (relerr = ||o - ref|| / ||ref||, cosine similarity) is taken against an
fp32 reference on a subset of query rows (all keys), for both kernels.
Writes OUTDIR/fp8_kernel.json and OUTDIR/fp8_kernel.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attnpatch.kernels import fp8_attention as FA  # noqa: E402
from attnpatch.kernels.fp8_emulation import to_bnsd  # noqa: E402

CASES = [
    # name, b, hq, hkv, sq, skv, d, dtype, causal, key_padding(frac masked at tail)
    ("dit-4608", 1, 24, 24, 4608, 4608, 128, torch.bfloat16, False, 0.0),
    ("video-32760", 1, 40, 40, 32760, 32760, 128, torch.bfloat16, False, 0.0),
    ("sd-4096-d64-fp16", 2, 10, 10, 4096, 4096, 64, torch.float16, False, 0.0),
    ("vit-197", 32, 12, 12, 197, 197, 64, torch.bfloat16, False, 0.0),
    ("causal-8192", 1, 32, 32, 8192, 8192, 128, torch.bfloat16, True, 0.0),
    ("keypad-4096", 2, 24, 24, 4096, 4096, 128, torch.bfloat16, False, 0.25),
    ("gqa-8192", 1, 32, 8, 8192, 8192, 128, torch.bfloat16, False, 0.0),
    ("cross-4096x1024", 2, 24, 24, 4096, 1024, 128, torch.bfloat16, False, 0.0),
    ("short-1024", 4, 24, 24, 1024, 1024, 128, torch.bfloat16, False, 0.0),
    ("short-2048-d64", 4, 16, 16, 2048, 2048, 64, torch.bfloat16, False, 0.0),
    # accepted by fp8_not_supported_reasons (>= 16384 tokens, d=128): each kind of call it takes
    ("wan13b-32760", 1, 12, 12, 32760, 32760, 128, torch.bfloat16, False, 0.0),
    ("causal-16384", 1, 24, 24, 16384, 16384, 128, torch.bfloat16, True, 0.0),
    ("keypad-16384", 2, 12, 12, 16384, 16384, 128, torch.bfloat16, False, 0.25),
    ("gqa-16384", 1, 32, 8, 16384, 16384, 128, torch.bfloat16, False, 0.0),
    ("video-32760-fp16", 1, 40, 40, 32760, 32760, 128, torch.float16, False, 0.0),
    # the outliers real models have: 4 K channels with mean +20, 1/64 of the Q rows x8
    ("outliers-wan13b-32760", 1, 12, 12, 32760, 32760, 128, torch.bfloat16, False, 0.0),
    ("outliers-causal-16384", 1, 24, 24, 16384, 16384, 128, torch.bfloat16, True, 0.0),
]


def add_outliers(q, k, gen):
    """4 channels of K shifted by +20 (a large mean), 1/64 of the query rows scaled by 8."""
    d, sq = k.shape[-1], q.shape[2]
    ch = torch.randperm(d, generator=gen)[:4].to(k.device)
    k = k.clone()
    k[..., ch] += 20.0
    rows = torch.randperm(sq, generator=gen)[: max(1, sq // 64)].to(q.device)
    q = q.clone()
    q[:, :, rows] *= 8.0
    return q, k


def flops(b, hq, sq, skv, d, causal):
    f = 4.0 * b * hq * sq * skv * d
    return f / 2 if causal else f


def make_inputs(c, n_sets, device):
    name, b, hq, hkv, sq, skv, d, dt, causal, kpfrac = c
    sets = []
    for _ in range(n_sets):
        q = torch.randn(b, hq, sq, d, device=device, dtype=dt)
        k = torch.randn(b, hkv, skv, d, device=device, dtype=dt)
        v = torch.randn(b, hkv, skv, d, device=device, dtype=dt)
        if name.startswith("outliers"):
            q, k = add_outliers(q, k, torch.Generator().manual_seed(len(sets)))
        kp = None
        if kpfrac > 0:
            kp = torch.ones(b, skv, dtype=torch.bool, device=device)
            kp[:, int(skv * (1 - kpfrac)):] = False
            kp[-1, :37] = False  # padding not only at the tail
        sets.append((q, k, v, kp))
    return sets


def rotating(fn, sets):
    it = [0]

    def run():
        s = sets[it[0] % len(sets)]
        it[0] += 1
        return fn(*s)
    return run


def sdpa_cudnn(c):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    name, b, hq, hkv, sq, skv, d, dt, causal, kpfrac = c

    def fn(q, k, v, kp):
        mask = None if kp is None else kp[:, None, None, :]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=hq != hkv)
    return fn


def ours(c, **variant):
    name, b, hq, hkv, sq, skv, d, dt, causal, kpfrac = c

    if not variant:
        def fn(q, k, v, kp):
            return FA.fp8_attention(q, k, v, is_causal=causal, key_padding=kp)
        return fn

    def fnv(q, k, v, kp):
        return FA._triton_forward(q, k, v, 1.0 / math.sqrt(d), causal, kp, "bnsd", **variant)
    return fnv


def ref_rows(q, k, v, kp, causal, rows):
    """fp32 reference for the query rows ``rows`` (all keys), (b, h, len(rows), d)."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = []
    for h0 in range(0, hq, 8):
        qh = q[:, h0:h0 + 8, rows].float()
        kh = k[:, [(h // g) for h in range(h0, min(hq, h0 + 8))]].float()
        vh = v[:, [(h // g) for h in range(h0, min(hq, h0 + 8))]].float()
        s = (qh @ kh.transpose(-1, -2)) / math.sqrt(d)
        valid = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
        if causal:
            j = torch.arange(k.shape[2], device=q.device)
            valid = j[None, :] <= rows[:, None]
        valid = valid[None, None].expand(b, 1, *valid.shape)
        if kp is not None:
            valid = valid & kp[:, None, None, :]
        s = s.masked_fill(~valid, -math.inf)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out.append(p @ vh)
    return torch.cat(out, dim=1)


def accuracy(o, ref, rows):
    a = o[:, :, rows].double()
    r = ref.double()
    rel = ((a - r).norm() / r.norm()).item()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), r.flatten(), dim=0).item()
    finite = bool(torch.isfinite(o).all().item())
    return rel, cos, finite


def bench(fn, warmup=25, rep=100):
    import triton
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    ap.add_argument("--variants", action="store_true",
                    help="also time kernel variants (exp2 f16/f32, int->float trick, bf16 P.V)")
    ap.add_argument("--cases", default="", help="comma-separated case names")
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--profile", action="store_true",
                    help="per-kernel GPU times (torch.profiler) and CUDA-graph replay time of fp8")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    meta = dict(card=props.name, sm=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(meta, flush=True)

    # matmul ceiling
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = bench(lambda: a @ bm)
    meta["matmul_bf16_tflops"] = 2 * 8192 ** 3 / t / 1e9
    print(f"bf16 matmul 8192^3: {t:.3f} ms = {meta['matmul_bf16_tflops']:.0f} TFLOP/s", flush=True)
    del a, bm

    cases = CASES
    if args.cases:
        want = set(args.cases.split(","))
        cases = [c for c in CASES if c[0] in want]
    elif args.quick:
        cases = CASES[:6]
    rows_out = []
    for c in cases:
        name, b, hq, hkv, sq, skv, d, dt, causal, kpfrac = c
        torch.cuda.empty_cache()
        t0 = time.time()
        n_sets = 2 if sq * skv * hq * b > 2e10 else args.sets
        sets = make_inputs(c, n_sets, dev)
        fl = flops(b, hq, sq, skv, d, causal)
        q, k, v, kp = sets[0]
        g = torch.Generator(device="cpu").manual_seed(0)
        rows = torch.randperm(sq, generator=g)[: min(sq, 512)].sort().values.to(dev)
        ref = ref_rows(q, k, v, kp, causal, rows)
        res = dict(case=name, shape=f"({b},{hq},{sq},{d})" + (f" kv=({hkv},{skv})" if (hkv, skv) != (hq, sq) else ""),
                   dtype=str(dt).replace("torch.", ""), causal=causal, key_padding=kpfrac > 0)
        reasons = FA.fp8_not_supported_reasons(q, k, v, is_causal=causal, key_padding=kp)
        res["declined"] = "; ".join(reasons)
        # cuDNN
        try:
            fc = sdpa_cudnn(c)
            oc = fc(q, k, v, kp)
            res["cudnn_ms"] = bench(rotating(fc, sets))
            res["cudnn_tflops"] = fl / res["cudnn_ms"] / 1e9
            res["cudnn_relerr"], res["cudnn_cos"], _ = accuracy(oc, ref, rows)
            del oc
        except Exception as e:  # cuDNN may refuse (e.g. a mask)
            res["cudnn_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        variants = [("fp8", {})]
        if args.variants:
            variants += [
                ("fp8 exp32", dict(exp_f16=False, magic=True)),
                ("fp8 exp16 i2f", dict(exp_f16=True, magic=False)),
                ("int8qk+bf16pv", dict(exp_f16=True, magic=True, pv_fp8=False)),
            ]
        for vname, var in variants:
            try:
                fo = ours(c, **var)
                oo = fo(q, k, v, kp)
                torch.cuda.synchronize()
                ms = bench(rotating(fo, sets))
                rel, cos, fin = accuracy(oo, ref, rows)
                key = "ours" if vname == "fp8" else vname
                res[f"{key}_ms"] = ms
                res[f"{key}_tflops"] = fl / ms / 1e9
                res[f"{key}_relerr"] = rel
                res[f"{key}_cos"] = cos
                res[f"{key}_finite"] = fin
                if "cudnn_ms" in res:
                    res[f"{key}_speedup"] = res["cudnn_ms"] / ms
                del oo
            except Exception as e:
                res[f"{vname}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(res[f"{vname}_error"], flush=True)
        if args.profile and "ours_ms" in res:
            try:
                fo = ours(c)
                from torch.profiler import ProfilerActivity, profile
                for _ in range(3):
                    fo(q, k, v, kp)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fo(q, k, v, kp)
                    torch.cuda.synchronize()
                kt = {}
                for ev in prof.key_averages():
                    dt_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                    if dt_us and ev.key.startswith("_"):
                        kt[ev.key] = dt_us / 5 / 1000.0
                res["kernel_ms"] = kt
                res["gpu_sum_ms"] = sum(kt.values())
                print(name, "per-kernel GPU ms:", {kk: round(vv, 4) for kk, vv in kt.items()}, flush=True)
                g = torch.cuda.CUDAGraph()
                st = torch.cuda.Stream()
                st.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(st):
                    fo(q, k, v, kp)
                torch.cuda.current_stream().wait_stream(st)
                with torch.cuda.graph(g):
                    og = fo(q, k, v, kp)
                res["ours_graph_ms"] = bench(g.replay)
                res["ours_graph_speedup"] = res["cudnn_ms"] / res["ours_graph_ms"] if "cudnn_ms" in res else None
                print(name, "graph replay ms:", round(res["ours_graph_ms"], 4), flush=True)
                del g, og
            except Exception as e:
                res["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(res["profile_error"], flush=True)
        # quantization share: time the three pre-passes alone
        try:
            fqp = lambda q, k, v, kp: FA._triton_forward(q, k, v, 1.0 / math.sqrt(d), causal, kp, "bnsd", return_quant=True)  # noqa: E731
            res["quant_ms"] = bench(rotating(fqp, sets))
        except Exception as e:
            res["quant_error"] = str(e)[:120]
        res["wall_s"] = time.time() - t0
        rows_out.append(res)
        print(json.dumps(res), flush=True)
        del sets, ref, q, k, v, kp

    with open(os.path.join(args.out, "fp8_kernel.json"), "w") as f:
        json.dump(dict(meta=meta, results=rows_out), f, indent=1)
    lines = [f"Card: {meta['card']} (sm {meta['sm']}, {meta['sms']} SMs); torch {meta['torch']}, "
             f"triton {meta['triton']}, CUDA {meta['cuda']}; {meta['date']}; "
             f"bf16 matmul 8192^3: {meta['matmul_bf16_tflops']:.0f} TFLOP/s", "",
             "| case | shape | dtype | cuDNN ms | cuDNN TFLOP/s | fp8 ms (incl. quant) | fp8 TFLOP/s | speedup | fp8 graph ms | quant GPU ms | attn GPU ms | relerr fp8 | cos fp8 | relerr cuDNN | declined by reasons() |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "n/a"

    def qgpu(r):
        kt = r.get("kernel_ms")
        return sum(v for kk, v in kt.items() if "attn" not in kk) if kt else None

    def agpu(r):
        kt = r.get("kernel_ms")
        return sum(v for kk, v in kt.items() if "attn" in kk) if kt else None
    for r in rows_out:
        lines.append(
            f"| {r['case']} | {r['shape']}{' causal' if r['causal'] else ''}{' kpad' if r['key_padding'] else ''} | {r['dtype']} | "
            f"{f(r.get('cudnn_ms'), '.3f')} | {f(r.get('cudnn_tflops'), '.0f')} | {f(r.get('ours_ms'), '.3f')} | "
            f"{f(r.get('ours_tflops'), '.0f')} | {f(r.get('ours_speedup'), '.2f')}x | {f(r.get('ours_graph_ms'), '.3f')} | "
            f"{f(qgpu(r), '.3f')} | {f(agpu(r), '.3f')} | "
            f"{f(r.get('ours_relerr'), '.4f')} | {f(r.get('ours_cos'), '.5f')} | {f(r.get('cudnn_relerr'), '.4f')} | "
            f"{'yes' if r['declined'] else 'no'} |")
    if args.variants:
        lines += ["", "Variants (ms / speedup vs cuDNN / relerr):", ""]
        for r in rows_out:
            parts = []
            for vn in ("fp8 exp32", "fp8 exp16 i2f", "int8qk+bf16pv"):
                if f"{vn}_ms" in r:
                    parts.append(f"{vn}: {r[vn + '_ms']:.3f} ms / {r.get(vn + '_speedup', float('nan')):.2f}x / {r[vn + '_relerr']:.4f}")
            lines.append(f"- {r['case']}: " + "; ".join(parts))
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "fp8_kernel.md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
