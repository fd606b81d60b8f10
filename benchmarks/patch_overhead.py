"""What patching costs: a real-size diffusers transformer, stock vs patched by attnpatch, on one GPU.

Models (random bf16 weights built from the real configs on the GPU; nothing is downloaded):

* ``flux``: FluxTransformer2DModel with Flux-dev's config (19 double + 38 single blocks, 24 heads x 128),
  at 1024x1024 (4096 image tokens + 512 text tokens).
* ``wan``: WanTransformer3DModel with Wan2.1-T2V-1.3B's config (30 blocks, 12 heads x 128), at 480p x
  81 frames (21 x 30 x 52 = 32760 tokens) with 512 text tokens.

Variants, each in eager mode (median of ``--repeats`` forwards after ``--warmup``, timed with CUDA events):

* ``stock``: diffusers as installed (its native SDPA path);
* ``attnpatch sdpa``: ``attnpatch.apply(model, backend="sdpa")`` (the same kernel: this is the overhead);
* ``attnpatch auto``: ``attnpatch.apply(model)`` (whatever auto / a shipped recipe picks);
* ``diffusers _native_cudnn`` / ``_native_flash`` / ``_native_efficient``: ``model.set_attention_backend``.

With ``--compile``: ``torch.compile`` of the stock and of the patched (sdpa) model: compile time, time
per forward, and graph breaks (``torch._dynamo.utils.counters["graph_break"]``).

For every variant: peak GPU memory, and the output's max abs difference / relative L2 error vs stock.
``--small`` runs tiny configs on the CPU (or the GPU if there is one) to check the script itself.

    python benchmarks/patch_overhead.py --out docs/bench --models flux,wan --compile

Writes ``patch_overhead.json`` and ``patch_overhead.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import math
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch

from _timing import sync, timed_repeats  # benchmarks/_timing.py

# -- models -------------------------------------------------------------------------------------------

FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_SMALL = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(4, 6, 6))
WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_SMALL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                 text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


class _cpu_fp32:
    """Inputs are drawn on the CPU in float32 from a seeded generator (then moved and cast), whatever
    device and default dtype the model is built under."""

    def __enter__(self):
        self._dtype = torch.get_default_dtype()
        self._ctx = torch.device("cpu")
        self._ctx.__enter__()
        torch.set_default_dtype(torch.float32)

    def __exit__(self, *exc):
        torch.set_default_dtype(self._dtype)
        self._ctx.__exit__(*exc)


def _flux(small: bool, device, dtype):
    import diffusers

    cfg = FLUX_SMALL if small else FLUX_DEV
    model = diffusers.FluxTransformer2DModel(**cfg)
    with _cpu_fp32():
        return (model,) + _flux_inputs(cfg, small)


def _flux_inputs(cfg, small):
    side = 4 if small else 64  # 1024 px / 8 (VAE) / 2 (packing) = 64 -> 4096 tokens
    txt = 8 if small else 512
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, side * side, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(txt, 3), return_dict=False)
    tokens = f"{side * side} image + {txt} text"
    return inputs, tokens


def _wan(small: bool, device, dtype):
    import diffusers

    cfg = WAN_SMALL if small else WAN_13B
    model = diffusers.WanTransformer3DModel(**cfg)
    with _cpu_fp32():
        return (model,) + _wan_inputs(cfg, small)


def _wan_inputs(cfg, small):
    # 480x832, 81 frames -> latent 21 x 60 x 104 (VAE 4x temporal, 8x spatial) -> 21 x 30 x 52 tokens
    f, h, w = (2, 8, 8) if small else (21, 60, 104)
    txt = 8 if small else 512
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, cfg["in_channels"], f, h, w, generator=g),
                  timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, txt, cfg["text_dim"], generator=g),
                  return_dict=False)
    tokens = f"{f * (h // 2) * (w // 2)} video + {txt} text"
    return inputs, tokens


MODELS: Dict[str, Callable] = {"flux": _flux, "wan": _wan}
CONFIG_NAMES = {"flux": "Flux-dev transformer (FluxTransformer2DModel)", "wan": "Wan2.1-T2V-1.3B transformer (WanTransformer3DModel)"}


def build(name: str, small: bool, device, dtype):
    """Build on the target device in the target dtype directly (no fp32 copy of 12B parameters)."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model, inputs, tokens = MODELS[name](small, device, dtype)
    finally:
        torch.set_default_dtype(old)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    inputs = {k: (v.to(device=device, dtype=dtype if v.is_floating_point() and k not in ("timestep", "guidance", "img_ids", "txt_ids") else v.dtype)
                  if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return model, inputs, tokens


# -- timing -------------------------------------------------------------------------------------------

def time_forward(fn: Callable[[], Any], device, warmup: int, repeats: int) -> Dict[str, Any]:
    """Median / min / all times in ms of ``fn()``, after ``warmup`` calls; peak memory in GiB."""
    with torch.no_grad():
        for _ in range(warmup):
            out = fn()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, out = timed_repeats(fn, device, repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": [round(t, 3) for t in times],
            "peak_gib": peak, "output": out}


def first_tensor(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.sample if hasattr(out, "sample") else out


def compare(out, ref) -> Dict[str, float]:
    a, b = first_tensor(out).float(), first_tensor(ref).float()
    mse = (a - b).pow(2).mean().item()
    peak = b.abs().max().item()
    return {"max_abs_diff": (a - b).abs().max().item(),
            "rel_l2": ((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
            # PSNR of the output latent against stock, peak = max |stock| (inf when identical)
            "psnr_db": float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse),
            "bitwise_equal": bool(torch.equal(first_tensor(out), first_tensor(ref)))}


def _apply(model, backend: str):
    import attnpatch

    try:
        return attnpatch.apply(model, backend=backend), ""
    except ImportError as exc:  # a checkout without attnpatch.recipes yet
        return attnpatch.apply(model, backend=backend, recipe=False), f"recipes unavailable ({exc}); recipe=False"


def backends_used(patch) -> Dict[str, int]:
    used: Dict[str, int] = {}
    for row in patch.report().rows:
        for name, n in row.calls.items():
            used[name] = used.get(name, 0) + n
        for name in row.traced:
            used[f"{name} (compiled)"] = used.get(f"{name} (compiled)", 0) + 1
    return used


def graph_breaks() -> Dict[str, Any]:
    from torch._dynamo.utils import counters

    gb = counters.get("graph_break", {})
    return {"graph_breaks": int(sum(gb.values())), "reasons": {str(k)[:300]: int(v) for k, v in list(gb.items())[:20]},
            "unique_graphs": int(counters.get("stats", {}).get("unique_graphs", 0))}


# -- one model ------------------------------------------------------------------------------------------

def bench_model(name: str, args, device, dtype, deadline: float) -> Dict[str, Any]:
    import attnpatch
    from diffusers.models import attention_dispatch as AD

    res: Dict[str, Any] = {"model": name, "config": CONFIG_NAMES[name], "variants": {}}
    model, inputs, tokens = build(name, args.small, device, dtype)
    res["tokens"] = tokens
    res["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    n_attn = sum(1 for m in model.modules() if "processor" in vars(m) or "processor" in m._modules)
    res["attention_modules"] = n_attn
    run = lambda: model(**inputs)  # noqa: E731
    V = res["variants"]

    def record(label: str, fn, extra: Optional[dict] = None, warmup: Optional[int] = None):
        if time.monotonic() > deadline:
            V[label] = {"skipped": "time budget (--budget-s) spent"}
            return None
        try:
            r = time_forward(fn, device, args.warmup if warmup is None else warmup, args.repeats)
        except Exception as exc:  # a backend that cannot run here is a result, not a crash
            V[label] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            return None
        out = r.pop("output")
        if "stock" in V and "output" in V["stock"]:
            r.update(compare(out, V["stock"]["output"]))
        r.update(extra or {})
        V[label] = r
        print(f"  {name} {label:28s} {r['median_ms']:9.2f} ms  peak {r['peak_gib'] or 0:.2f} GiB"
              f"  maxdiff {r.get('max_abs_diff', 0):.3g}", flush=True)
        return out

    print(f"{name}: {res['params_b']:.2f} B params, {tokens} tokens, {n_attn} attention modules", flush=True)
    out = record("stock", run)
    if out is not None:
        V["stock"]["output"] = out

    patch, note = _apply(model, "sdpa")
    record("attnpatch sdpa", run, {"sites": len(patch.routed_sites), "note": note})
    V["attnpatch sdpa"]["backends"] = backends_used(patch)
    patch.remove()
    attnpatch.stats(reset=True)

    patch, note = _apply(model, "auto")
    record("attnpatch auto", run, {"note": note, "recipe": getattr(patch, "recipe_name", None)})
    V["attnpatch auto"]["backends"] = backends_used(patch)
    patch.remove()

    for recipe in args.recipes:  # e.g. wan-lossy: fp8 / 8-bit kernels in the DiT's self-attention only
        import attnpatch

        patch = attnpatch.apply(model, recipe=recipe)
        record(f"attnpatch recipe {recipe}", run, {"recipe": recipe})
        if f"attnpatch recipe {recipe}" in V:
            V[f"attnpatch recipe {recipe}"]["backends"] = backends_used(patch)
        patch.remove()

    reg = AD._AttentionBackendRegistry
    saved = reg._active_backend
    for be in ("_native_cudnn", "_native_flash", "_native_efficient"):
        try:
            model.set_attention_backend(be)
        except Exception as exc:
            V[f"diffusers {be}"] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            continue
        record(f"diffusers {be}", run)
    model.set_attention_backend("native")
    reg._active_backend = saved
    for m in model.modules():  # back to "no backend set" (diffusers' default)
        proc = getattr(m, "processor", None)
        if proc is not None and "_attention_backend" in vars(proc):
            proc._attention_backend = None

    record("stock (again, for drift)", run)

    if args.compile:
        import torch._dynamo as dynamo
        from torch._dynamo.utils import counters

        for label, patched in (("compiled stock", False), ("compiled attnpatch sdpa", True)):
            if time.monotonic() > deadline:
                V[label] = {"skipped": "time budget (--budget-s) spent"}
                continue
            dynamo.reset()
            counters.clear()
            patch = _apply(model, "sdpa")[0] if patched else None
            compiled = torch.compile(model, backend=args.compile_backend)
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    compiled(**inputs)
                sync(device)
            except Exception as exc:
                V[label] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                traceback.print_exc()
                if patch is not None:
                    patch.remove()
                continue
            compile_s = time.perf_counter() - t0
            breaks = graph_breaks()
            record(label, lambda: compiled(**inputs), {"compile_s": compile_s, **breaks}, warmup=1)
            if patch is not None:
                V[label]["backends"] = backends_used(patch)
                patch.remove()
            print(f"  {name} {label}: compile {compile_s:.1f} s, graph breaks {breaks['graph_breaks']}", flush=True)
        dynamo.reset()

    V.get("stock", {}).pop("output", None)
    stock = V.get("stock", {}).get("median_ms")
    for r in V.values():
        if stock and "median_ms" in r:
            r["vs_stock"] = r["median_ms"] / stock
    del model, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


# -- report ----------------------------------------------------------------------------------------------

def markdown(results: Dict[str, Any]) -> str:
    env = results["env"]
    lines = [f"# attnpatch patch overhead ({'small, self-check' if results['small'] else 'real size'})", "",
             f"{env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, attnpatch {env['attnpatch']}; "
             f"{env['dtype']}; median of {results['repeats']} forwards after {results['warmup']} warm-up "
             f"({'CUDA events' if env['cuda'] else 'perf_counter'}).", ""]
    for res in results["models"]:
        lines += [f"## {res['config']}", "",
                  f"{res['params_b']:.2f} B parameters, {res['tokens']} tokens, {res['attention_modules']} attention modules.", "",
                  "| variant | median ms | vs stock | min ms | peak GiB | max abs diff vs stock | rel L2 | PSNR dB | bitwise | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in res["variants"].items():
            if "median_ms" not in r:
                lines.append(f"| {label} | – | – | – | – | – | – | – | {r.get('error') or r.get('skipped')} |")
                continue
            notes = []
            if r.get("backends"):
                notes.append("ran: " + ", ".join(f"{k}×{v}" for k, v in sorted(r["backends"].items())))
            if "compile_s" in r:
                notes.append(f"compile {r['compile_s']:.1f} s, graph breaks {r['graph_breaks']}")
            if r.get("recipe"):
                notes.append(f"recipe {r['recipe']}")
            if r.get("note"):
                notes.append(r["note"])
            peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "–"
            lines.append(
                f"| {label} | {r['median_ms']:.2f} | {r.get('vs_stock', 1.0):.3f} | {r['min_ms']:.2f} | {peak} | "
                f"{r.get('max_abs_diff', 0.0):.3g} | {r.get('rel_l2', 0.0):.3g} | {r.get('psnr_db', float('inf')):.1f} | "
                f"{r.get('bitwise_equal', '–')} | "
                f"{'; '.join(notes)} |")
        lines.append("")
    lines.append(f"Total wall time: {results['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-out", help="directory for patch_overhead.json / .md")
    p.add_argument("--models", default="flux,wan", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--compile", action="store_true", help="also torch.compile stock and patched models")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--small", action="store_true", help="tiny configs (CPU unless a GPU exists): checks the script")
    p.add_argument("--recipe", action="append", dest="recipes", default=[],
                   help="also time attnpatch.apply(model, recipe=NAME) (repeatable), e.g. wan-lossy for the "
                        "fp8 kernel in Wan's self-attention; reports relative error and PSNR vs stock")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip remaining variants after this many seconds (default 420)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in MODELS:
            p.error(f"unknown model {n!r}; choose from {', '.join(MODELS)}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")

    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        p.error("real-size runs need a CUDA GPU; use --small to check the script on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32

    import attnpatch
    import diffusers

    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    results: Dict[str, Any] = {
        "small": args.small, "repeats": args.repeats, "warmup": args.warmup, "models": [],
        "env": {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                "cuda": cuda, "torch": torch.__version__, "diffusers": diffusers.__version__,
                "attnpatch": attnpatch.__version__, "python": sys.version.split()[0], "dtype": str(dtype),
                "cudnn": torch.backends.cudnn.version() if cuda else None},
    }
    for n in names:
        results["models"].append(bench_model(n, args, device, dtype, deadline))
    results["wall_s"] = time.monotonic() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "patch_overhead.json"), "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    md = markdown(results)
    with open(os.path.join(args.out, "patch_overhead.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
