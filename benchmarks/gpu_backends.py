"""Benchmark every available attention backend on this GPU: median time, TFLOP/s, relative error.

    PYTHONPATH=. python3 benchmarks/gpu_backends.py --out OUTDIR [--backends a,b,...] [--with-flex]

For each shape (Flux, SDXL, a short SD shape, ViT, causal LLM prefill, a key-padding case) and each
backend that can serve it (asked through attnpatch with strict=True, so a refusal is recorded with its
reason instead of silently running another kernel): the median of ``triton.testing.do_bench``
(milliseconds), effective TFLOP/s (4·b·h·s_q·s_kv·d, halved for causal), and the relative error
‖out − ref‖ / ‖ref‖ against an fp32 reference (SDPA on fp32 copies of the inputs). Lossy backends'
error is printed next to their speed. Writes OUTDIR/gpu_backends.json and OUTDIR/gpu_backends.md.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnpatch  # noqa: E402

SHAPES = [
    # name, b, h_q, h_kv, s_q, s_kv, d, dtype, causal, key-padding fraction (masked at varied positions)
    ("Flux 1024² (1,24,4608,128) bf16", 1, 24, 24, 4608, 4608, 128, torch.bfloat16, False, 0.0),
    ("SDXL (2,10,4096,64) fp16", 2, 10, 10, 4096, 4096, 64, torch.float16, False, 0.0),
    ("SD short (2,20,1024,64) fp16", 2, 20, 20, 1024, 1024, 64, torch.float16, False, 0.0),
    ("ViT (32,12,197,64) fp16", 32, 12, 12, 197, 197, 64, torch.float16, False, 0.0),
    ("LLM causal (1,32,8192,128) bf16", 1, 32, 32, 8192, 8192, 128, torch.bfloat16, True, 0.0),
    ("key padding (4,24,2048,128) bf16, 25% masked", 4, 24, 24, 2048, 2048, 128, torch.bfloat16, False, 0.25),
]

DEFAULT = ["sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flash_attn", "flash_attn3", "flash_attn4",
           "xformers", "sage", "sage_fp16_triton", "sage_fp16_cuda", "sage_fp8_cuda", "sage_fp8_cuda_sm90", "sage3",
           "flash_attn3_fp8"]


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version()}
    for pkg in ("triton", "flash-attn", "flash_attn_3", "flash-attn-4", "xformers", "sageattention", "sageattn3",
                "nvidia-cutlass-dsl"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception as exc:  # noqa: BLE001
        out["driver"] = f"unknown ({exc})"
    return out


def make(shape, device="cuda"):
    name, b, hq, hkv, sq, skv, d, dtype, causal, frac = shape
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, sq, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, hkv, skv, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, hkv, skv, d, device=device, dtype=dtype, generator=g)
    kw = {"is_causal": causal}
    if frac:
        mask = torch.ones(b, skv, dtype=torch.bool, device=device)
        n = int(skv * frac)
        for i in range(b):  # the masked block moves: front, middle, end, scattered
            start = [0, skv // 3, skv - n, 0][i % 4]
            if i % 4 == 3:
                mask[i, torch.randperm(skv, device=device, generator=g)[:n]] = False
            else:
                mask[i, start:start + n] = False
        kw["attn_mask"] = mask
    return q, k, v, kw


def reference(q, k, v, kw):
    m = kw.get("attn_mask")
    if m is not None:
        m = m[:, None, None, :]
    rep = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(rep, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=m, is_causal=kw["is_causal"])


def flops(q, k, v, kw):
    b, h, sq, d = q.shape
    f = 4.0 * b * h * sq * k.shape[2] * d
    return f / 2 if kw["is_causal"] else f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", default=",".join(DEFAULT))
    ap.add_argument("--with-flex", action="store_true", help="also flex (compiles once per shape: slow)")
    args = ap.parse_args()
    from triton.testing import do_bench

    names = [n for n in args.backends.split(",") if n]
    if args.with_flex:
        names.append("flex")
    infos = {i.name: i for i in attnpatch.backends()}
    meta = dict(device=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                versions=versions(),
                backends={n: dict(available=i.available, version=i.version, lossy=i.lossy, why_not=i.why_not)
                          for n, i in infos.items()})
    results = []
    for shape in SHAPES:
        q, k, v, kw = make(shape)
        ref = reference(q, k, v, kw)
        fl = flops(q, k, v, kw)
        for name in names:
            row = dict(shape=shape[0], backend=name)
            if not infos[name].available:
                continue
            try:
                with attnpatch.use_backend(name, strict=True):
                    out = attnpatch.attention_forward(q, k, v, **kw)
                    torch.cuda.synchronize()
                    ms = do_bench(lambda: attnpatch.attention_forward(q, k, v, **kw), warmup=25, rep=100)
            except attnpatch.BackendUnsupportedError as exc:
                row["refused"] = "; ".join(exc.reasons.get(name, [])) or str(exc).splitlines()[0]
                results.append(row)
                continue
            except Exception as exc:  # noqa: BLE001 - a kernel that crashes is a result too
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                results.append(row)
                continue
            row.update(ms=ms, tflops=fl / ms / 1e9, relerr=((out.float() - ref).norm() / ref.norm()).item(),
                       lossy=infos[name].lossy)
            results.append(row)
            print(f"{shape[0]:<48} {name:<20} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s relerr {row['relerr']:.2e}",
                  flush=True)
        del q, k, v, ref
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_backends.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_backends.md"), "w") as f:
        f.write(markdown(meta, results, names))
    print(markdown(meta, results, names))


def markdown(meta, results, names):
    v = meta["versions"]
    lines = [f"Device: **{meta['device']}** (sm{meta['capability'][0]}{meta['capability'][1]}), driver {v.get('driver')}; "
             f"torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, triton {v.get('triton')}; "
             + ", ".join(f"{p} {v[p]}" for p in ("flash-attn", "flash_attn_3", "flash-attn-4", "xformers",
                                                  "sageattention", "sageattn3") if p in v)
             + f"; {meta['date']}.", "",
             "Median of `triton.testing.do_bench` through `attnpatch.attention_forward(..., strict)`; "
             "TFLOP/s = 4·b·h·s_q·s_kv·d / t (halved for causal); relerr = ‖out − ref‖/‖ref‖ vs fp32 SDPA.", ""]
    shown = [n for n in names if any(r["backend"] == n for r in results)]
    lines.append("| shape | " + " | ".join(shown) + " |")
    lines.append("|---|" + "---|" * len(shown))
    for shape in dict.fromkeys(r["shape"] for r in results):
        cells = []
        for n in shown:
            r = next((r for r in results if r["shape"] == shape and r["backend"] == n), None)
            if r is None:
                cells.append("–")
            elif "ms" in r:
                lossy = " **lossy**" if r["lossy"] else ""
                cells.append(f"{r['ms']:.3f} ms, {r['tflops']:.0f} TFLOP/s, relerr {r['relerr']:.1e}{lossy}")
            else:
                cells.append("refused: " + (r.get("refused") or r.get("error", ""))[:90])
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    lines += ["", "Unavailable here:", ""]
    for n, b in meta["backends"].items():
        if not b["available"]:
            lines.append(f"- `{n}`: {b['why_not']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
