"""Calibrated lossy attention on real-size pipelines (issue 11): calibrate, then time in fresh processes.

Pipelines (random bf16 weights built from the real configs on the GPU; nothing is downloaded; the text
encoders are left out and random prompt embeddings of the real shapes are passed instead):

* ``wan``: WanPipeline with Wan2.1-T2V-1.3B's transformer (30 blocks, 12 heads x 128) and the Wan 2.1
  VAE (float32, as diffusers' example loads it), UniPC flow scheduler (shift 3), 480x832, ``--wan-frames``
  frames (default 81: 32760 video tokens), ``--wan-steps`` steps (default 20), classifier-free guidance
  5.0 (two transformer calls per step).
* ``flux``: FluxPipeline with FLUX.1-dev's transformer (19 + 38 blocks, 24 heads x 128) and VAE,
  flow-matching Euler, ``--flux-size`` square (default 1024: 4096 image + 512 text tokens), ``--flux-steps``
  steps (default 20), guidance 3.5 (embedded; one call per step).

For each pipeline:

1. **Calibrate** (one process): ``attnpatch.calibrate(pipe, run)`` with every available backend as a
   candidate (exact SDPA kernels, attnpatch's ``fp8``, and the SageAttention backends that load here),
   ``--min-psnr`` (default 35) on the decoded output, ``--step-buckets`` (default 4). Writes
   ``<model>-calibrated.yaml`` (the recipe, measurements as comments), ``<model>-calibration.json`` and
   ``<model>-calibration.txt`` (the report: per site and step range the backend, error and time saved;
   free-running and teacher-forced errors beside the exact-kernel floor; back-off).
2. **Time, each variant in a fresh process**: ``stock`` (diffusers as installed), ``calibrated``
   (``attnpatch.apply(pipe, recipe=<model>-calibrated.yaml)``), and for Wan the shipped ``wan-lossy``
   (``--variants`` adds ``auto`` = ``attnpatch.apply(pipe)``). Each child builds the pipeline (timed
   apart), then times the *first run* from before ``import attnpatch`` + ``apply`` to the end of the
   first call (CUDA synchronised), then a second run (*steady state*). Its decoded output is compared
   with the stock child's: PSNR, SSIM, relative L2, max abs. The children use the machine's Triton
   and attnpatch caches (which the calibration filled: what a user who calibrated on this machine
   sees); ``--fresh-caches`` gives each an empty one (a first run on a new machine).

Writes ``calibrate_pipelines.json`` and ``calibrate_pipelines.md`` (+ the files above) to ``--out``.
Outputs of the children go to a temporary folder (``--keep-outputs DIR`` keeps them; a Wan video is
388 MB in float32).

What the defaults cost on an H200 (estimates from the 2026-11-29 runs: a 20-step Wan run is ~27 s):
Wan calibration ~3 min (build, the exact run with sampling, timing, 2 floor runs, 2 validation runs;
each back-off round adds a run), Wan timing ~3 min (3 children: build + 2 runs each), Flux ~1.5 min.
About 7.5 min in all; ``--budget-s`` (default 470) skips what no longer fits, in this order (Wan
calibrate, Wan timing, Flux calibrate, Flux timing), and records it. ``--wan-frames 49`` (~20k
tokens, still above fp8's 16384-token floor) or ``--wan-steps 10`` roughly halve Wan's share.

    PYTHONPATH=. python benchmarks/calibrate_pipelines.py --out OUT
    PYTHONPATH=. python benchmarks/calibrate_pipelines.py --out /tmp/c --small   # CPU self-check, tiny configs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from patch_overhead import FLUX_DEV, WAN_13B  # noqa: E402  (the configs the project benchmarks with)

WAN_SMALL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                 text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
FLUX_SMALL = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(4, 6, 6))
#: FLUX.1-dev's VAE (diffusers AutoencoderKL config of black-forest-labs/FLUX.1-dev)
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
FLUX_VAE_SMALL = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                      latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
                      shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
#: Wan2.1-T2V-1.3B's scheduler config (UniPC with flow sigmas)
WAN_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                     solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                     final_sigmas_type="zero", timestep_spacing="linspace")
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)

VARIANTS = {"wan": ["stock", "calibrated", "wan-lossy"], "flux": ["stock", "calibrated"]}


# -- the pipelines ------------------------------------------------------------------------------------------

def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_module(cls, cfg, device, dtype):
    """Build on the device in the dtype directly (no float32 copy of billions of parameters)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = cls(**cfg)
    finally:
        torch.set_default_dtype(old)
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_wan(args, device, dtype):
    """(pipeline, call kwargs) for Wan2.1-1.3B at 480p (or the tiny config with --small)."""
    import diffusers

    torch.manual_seed(0)
    small = args.small
    transformer = _build_module(diffusers.WanTransformer3DModel, WAN_SMALL if small else WAN_13B, device, dtype)
    vae_cfg = (dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True],
                    latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2, scale_factor_spatial=2)
               if small else {})
    vae = _build_module(diffusers.AutoencoderKLWan, vae_cfg, device, torch.float32)
    scheduler = diffusers.UniPCMultistepScheduler(**WAN_SCHEDULER)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    text_dim, txt = (32, 8) if small else (4096, 512)
    g = torch.Generator("cpu").manual_seed(0)
    prompt = torch.randn(1, txt, text_dim, generator=g).to(device, dtype)
    negative = torch.randn(1, txt, text_dim, generator=g).to(device, dtype)
    kw = dict(prompt_embeds=prompt, negative_prompt_embeds=negative, height=16 if small else 480,
              width=16 if small else 832, num_frames=5 if small else args.wan_frames, num_inference_steps=args.wan_steps,
              guidance_scale=5.0, output_type="pt")
    return pipe, kw


def build_flux(args, device, dtype):
    """(pipeline, call kwargs) for FLUX.1-dev at --flux-size (or the tiny config with --small)."""
    import diffusers

    torch.manual_seed(0)
    small = args.small
    transformer = _build_module(diffusers.FluxTransformer2DModel, FLUX_SMALL if small else FLUX_DEV, device, dtype)
    vae = _build_module(diffusers.AutoencoderKL, FLUX_VAE_SMALL if small else FLUX_VAE, device, dtype)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    joint, pooled, txt = (32, 32, 8) if small else (4096, 768, 512)
    g = torch.Generator("cpu").manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, txt, joint, generator=g).to(device, dtype),
              pooled_prompt_embeds=torch.randn(1, pooled, generator=g).to(device, dtype),
              height=32 if small else args.flux_size, width=32 if small else args.flux_size,
              num_inference_steps=args.flux_steps, guidance_scale=3.5, output_type="pt")
    return pipe, kw


BUILDERS = {"wan": build_wan, "flux": build_flux}
DESCRIPTIONS = {
    "wan": "WanPipeline, Wan2.1-T2V-1.3B transformer + Wan 2.1 VAE, random weights",
    "flux": "FluxPipeline, FLUX.1-dev transformer + VAE, random weights",
}


def workload(name: str, args, device, dtype):
    """The pipeline and ``run(pipe)``: one generation with a fixed seed, returning the decoded output."""
    pipe, kw = BUILDERS[name](args, device, dtype)

    def run(p):
        with torch.no_grad():
            out = p(generator=torch.Generator("cpu").manual_seed(0), **kw)
        return out.frames if hasattr(out, "frames") else out.images
    return pipe, run, kw


def _device_and_dtype(args):
    cuda = torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu"), (torch.bfloat16 if cuda else torch.float32)


# -- children ---------------------------------------------------------------------------------------------

def child_calibrate(args) -> Dict[str, Any]:
    import attnpatch

    device, dtype = _device_and_dtype(args)
    t0 = time.perf_counter()
    pipe, run, kw = workload(args.model, args, device, dtype)
    build_s = time.perf_counter() - t0
    start = time.perf_counter()

    def progress(done, total, phase):
        print(f"  [{time.perf_counter() - start:7.1f} s] calibrate {args.model} {done + 1 if done < total else total}/"
              f"{total}: {phase}", flush=True)

    cal = attnpatch.calibrate(pipe, run, min_psnr=args.min_psnr, step_buckets=args.step_buckets,
                              bound_on=args.bound_on, progress=progress)
    wall = time.perf_counter() - start
    base = os.path.join(args.out, f"{args.model}-calibrated.yaml")
    cal.save(base)
    with open(os.path.join(args.out, f"{args.model}-calibration.txt"), "w") as fh:
        fh.write(cal.report() + "\n")
    doc = cal.as_dict()
    doc.update(build_s=build_s, calibrate_s=wall, recipe_path=base,
               backends=[{"name": b.name, "available": b.available, "lossy": b.lossy, "why_not": b.why_not[:300]}
                         for b in attnpatch.backends()])
    with open(os.path.join(args.out, f"{args.model}-calibration.json"), "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    print(cal.report(), flush=True)
    return {"calibrate_s": wall, "build_s": build_s, "recipe_path": base}


def child_time(args) -> Dict[str, Any]:
    device, dtype = _device_and_dtype(args)
    t0 = time.perf_counter()
    pipe, run, kw = workload(args.model, args, device, dtype)
    _sync(device)
    res: Dict[str, Any] = {"variant": args.variant, "build_s": time.perf_counter() - t0}
    patch = None
    _sync(device)
    t0 = time.perf_counter()
    if args.variant != "stock":
        import attnpatch  # part of the first run's cost in a fresh process

        res["import_attnpatch_s"] = time.perf_counter() - t0
        ta = time.perf_counter()
        if args.variant == "auto":
            patch = attnpatch.apply(pipe)
        else:
            patch = attnpatch.apply(pipe, recipe=args.recipe)
        res["apply_s"] = time.perf_counter() - ta
    out = run(pipe)
    _sync(device)
    res["first_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    out2 = run(pipe)
    _sync(device)
    res["steady_s"] = time.perf_counter() - t1
    res["repeatable"] = bool(torch.equal(out, out2))
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if patch is not None:
        used: Dict[str, int] = {}
        for row in patch.report().rows:
            for n, c in row.calls.items():
                used[n] = used.get(n, 0) + c
        res["backends"] = used
        res["recipe"] = patch.recipe_name
    torch.save(out.detach().float().cpu(), args.output_file)
    res["output_shape"] = list(out.shape)
    return res


# -- the parent ---------------------------------------------------------------------------------------------

def _child(args, extra: List[str], timeout: float, fresh_caches: bool = False) -> Tuple[Optional[Dict[str, Any]], str]:
    """Run this script as a child; returns (its result dict or None, an error message). With
    ``fresh_caches`` the child gets empty Triton and attnpatch caches (a first run on a new machine)."""
    env = dict(os.environ)
    cache = None
    if fresh_caches:
        cache = tempfile.mkdtemp(prefix="calibrate-caches-")
        env.update(TRITON_CACHE_DIR=os.path.join(cache, "triton"), ATTNPATCH_CACHE_DIR=os.path.join(cache, "attnpatch"))
    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--child-result", result, "--out", args.out,
           "--wan-steps", str(args.wan_steps), "--wan-frames", str(args.wan_frames), "--flux-steps", str(args.flux_steps),
           "--flux-size", str(args.flux_size), "--min-psnr", str(args.min_psnr), "--step-buckets", str(args.step_buckets),
           "--bound-on", args.bound_on] + (["--small"] if args.small else []) + extra
    print("$ " + " ".join(cmd[2:]), flush=True)
    try:
        proc = subprocess.run(cmd, timeout=max(30.0, timeout), env=env)
        if proc.returncode != 0:
            return None, f"child exited with {proc.returncode}"
        with open(result) as fh:
            return json.load(fh), ""
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s (--budget-s)"
    finally:
        os.unlink(result)
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)


def _compare(a_path: str, b_path: str) -> Dict[str, Any]:
    from attnpatch import quality

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.load(a_path).to(dev), torch.load(b_path).to(dev)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return {"error": "non-finite values in an output"}
    return quality.compare(a, b).as_dict()


def run_model(name: str, args, deadline: float, tmp: str) -> Dict[str, Any]:
    res: Dict[str, Any] = {"model": name, "description": DESCRIPTIONS[name], "variants": {}}
    left = deadline - time.monotonic()
    given = getattr(args, "calibrated_recipe", None)
    if given:
        res["calibration"] = {"skipped": f"recipe given: {given} (--calibrated-recipe)"}
    elif left < 60:
        res["calibration"] = {"skipped": "time budget (--budget-s) spent"}
    else:
        got, err = _child(args, ["--child", "calibrate", "--model", name], left)
        res["calibration"] = got or {"error": err}
        path = os.path.join(args.out, f"{name}-calibration.json")
        if got and os.path.exists(path):
            with open(path) as fh:
                doc = json.load(fh)
            res["calibration"].update({k: doc[k] for k in ("bound", "bound_met", "validation", "floor", "backoff",
                                                           "saved_ms", "total_steps", "buckets", "candidates", "notes",
                                                           "machine", "capture")})
            lossy: Dict[str, int] = {}
            for c in doc["choices"]:
                lossy[c["backend"]] = lossy.get(c["backend"], 0) + 1
            res["calibration"]["site_steps_per_backend"] = lossy
    recipe = given or os.path.join(args.out, f"{name}-calibrated.yaml")
    variants = [v for v in args.variants.split(",") if v in VARIANTS[name] + ["auto"]] if args.variants else VARIANTS[name]
    for v in variants:
        if v == "wan-lossy" and name != "wan":
            continue
        left = deadline - time.monotonic()
        if left < 30:
            res["variants"][v] = {"skipped": "time budget (--budget-s) spent"}
            continue
        if v == "calibrated" and not os.path.exists(recipe):
            res["variants"][v] = {"skipped": "no calibrated recipe (the calibration did not finish)"}
            continue
        out_file = os.path.join(tmp, f"{name}-{v}.pt")
        extra = ["--child", "time", "--model", name, "--variant", v, "--output-file", out_file]
        if v in ("calibrated", "wan-lossy"):
            extra += ["--recipe", recipe if v == "calibrated" else "wan-lossy"]
        got, err = _child(args, extra, left, fresh_caches=args.fresh_caches)
        res["variants"][v] = got or {"error": err}
        if got:
            got["output_file"] = out_file
    stock = res["variants"].get("stock", {})
    for v, r in res["variants"].items():
        if "first_s" not in r or "first_s" not in stock:
            continue
        r["first_vs_stock"] = stock["first_s"] / r["first_s"]
        r["steady_vs_stock"] = stock["steady_s"] / r["steady_s"]
        if v != "stock":
            try:
                r["vs_stock_output"] = _compare(r["output_file"], stock["output_file"])
            except Exception as exc:  # a comparison that fails is a result, not a crash
                r["vs_stock_output"] = {"error": f"{type(exc).__name__}: {exc}"}
    return res


def _fmt(x, spec=".2f", none="–") -> str:
    return none if x is None else format(x, spec)


def _metrics(m: Optional[Dict[str, Any]]) -> str:
    if not m:
        return "–"
    if "error" in m:
        return m["error"]
    psnr = "inf" if m["psnr_db"] == float("inf") else f"{m['psnr_db']:.2f}"
    ssim = "" if m.get("ssim") is None else f", SSIM {m['ssim']:.5f}"
    return f"PSNR {psnr} dB{ssim}, rel L2 {m['rel_l2']:.3g}"


def _steps(errors: List[Dict[str, Any]]) -> str:
    if not errors:
        return "–"
    worst = max(errors, key=lambda e: e["rel_l2"])
    mean = sum(e["rel_l2"] for e in errors) / len(errors)
    return f"worst rel L2 {worst['rel_l2']:.3g} (step {worst['step']}), mean {mean:.3g}"


def markdown(results: Dict[str, Any]) -> str:
    env = results["env"]
    lines = [f"# attnpatch calibrate: real-size pipelines ({'small, self-check' if results['small'] else 'real size'})",
             "", f"{env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, attnpatch {env['attnpatch']}; "
             f"{env['dtype']}. Lossy backends available: {', '.join(env['lossy_available']) or 'none'}.", ""]
    for res in results["models"]:
        cal = res.get("calibration", {})
        lines += [f"## {res['description']}", "", f"Workload: {results['workloads'][res['model']]}.", ""]
        if "bound" in cal:
            v, f = cal["validation"], cal["floor"]
            b = cal["bound"]
            bound = " and ".join(([f"PSNR >= {b['min_psnr']:g} dB"] if b.get("min_psnr") is not None else [])
                                 + ([f"rel L2 <= {b['max_error']:g}"] if b.get("max_error") is not None else []))
            bound += " on the output" if b["on"] == "output" else " on every teacher-forced step"
            lines += [f"Calibration: {cal['calibrate_s']:.0f} s (build {cal['build_s']:.0f} s); bound "
                      f"{'met' if cal['bound_met'] else 'MISSED'} ({bound}); site-steps per backend: "
                      + ", ".join(f"{k} {n}" for k, n in sorted(cal["site_steps_per_backend"].items()))
                      + f"; attention time saved per run (from the kernel timings): {cal['saved_ms'] / 1e3:.2f} s; "
                      f"back-off rounds: {len(cal['backoff'])}. Recipe: `{res['model']}-calibrated.yaml`, report: "
                      f"`{res['model']}-calibration.txt`.", "",
                      "| vs the exact run (same seed) | calibrated recipe | exact-kernel floor |", "|---|---|---|",
                      f"| output, free-running | {_metrics(v.get('free_running'))} | {_metrics(f.get('free_running'))} |",
                      f"| per step, teacher-forced | {_steps(v.get('teacher_forced')) if v.get('teacher_forced') else v.get('note') or '–'} "
                      f"| {_steps(f.get('teacher_forced'))} |", ""]
            for n in cal.get("notes", []):
                lines.append(f"Note: {n}")
            lines.append("")
        else:
            lines += [f"Calibration: {cal.get('error') or cal.get('skipped')}", ""]
        caches = ("empty Triton and attnpatch caches" if results["fresh_caches"]
                  else "the machine's Triton and attnpatch caches, as the calibration left them")
        lines += [f"Each variant in a fresh process ({caches}); first run = `import attnpatch` + `apply` + the "
                  "first call.", "",
                  "| variant | build s | first run s | first vs stock | steady s | steady vs stock | output vs stock | backends |",
                  "|---|---|---|---|---|---|---|---|"]
        for v, r in res["variants"].items():
            if "first_s" not in r:
                lines.append(f"| {v} | – | – | – | – | – | {r.get('error') or r.get('skipped')} | |")
                continue
            used = ", ".join(f"{k}×{n}" for k, n in sorted(r.get("backends", {}).items()))
            lines.append(f"| {v} | {r['build_s']:.1f} | {r['first_s']:.2f} | {_fmt(r.get('first_vs_stock'), '.3f')} | "
                         f"{r['steady_s']:.2f} | {_fmt(r.get('steady_vs_stock'), '.3f')} | "
                         f"{_metrics(r.get('vs_stock_output')) if v != 'stock' else '(reference)'} | {used} |")
        lines.append("")
    lines.append(f"Total wall time: {results['wall_s']:.0f} s. vs stock = stock time / variant time (> 1: faster).")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="calibrate-out", help="folder for the results")
    p.add_argument("--models", default="wan,flux", help="comma-separated: wan, flux")
    p.add_argument("--variants", help="comma-separated variants to time (default: stock,calibrated[,wan-lossy]; "
                                      "auto = attnpatch.apply(pipe) can be added)")
    p.add_argument("--wan-steps", type=int, default=20)
    p.add_argument("--wan-frames", type=int, default=81)
    p.add_argument("--flux-steps", type=int, default=20)
    p.add_argument("--flux-size", type=int, default=1024)
    p.add_argument("--min-psnr", type=float, default=35.0, help="the calibration bound (dB, decoded output)")
    p.add_argument("--bound-on", default="output", choices=["output", "step"])
    p.add_argument("--step-buckets", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=470.0, help="skip what no longer fits after this many seconds")
    p.add_argument("--small", action="store_true", help="tiny configs on the CPU (or GPU): checks the script")
    p.add_argument("--keep-outputs", metavar="DIR", help="keep the children's decoded outputs here")
    p.add_argument("--calibrated-recipe", metavar="YAML",
                   help="time this recipe as the calibrated variant instead of calibrating (one --models only)")
    p.add_argument("--fresh-caches", action="store_true",
                   help="give each timing child empty Triton and attnpatch caches (default: the machine's, which "
                        "the calibration has filled: the first run of a user who calibrated here)")
    # internal: child processes
    p.add_argument("--child", choices=["calibrate", "time"], help=argparse.SUPPRESS)
    p.add_argument("--child-result", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--output-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            from diffusers.utils import logging as dlogging

            dlogging.set_verbosity_error()
        except ImportError:
            pass
        try:
            res = child_calibrate(args) if args.child == "calibrate" else child_time(args)
        except Exception:
            traceback.print_exc()
            return 1
        with open(args.child_result, "w") as fh:
            json.dump(res, fh, default=str)
        return 0

    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        p.error("real-size runs need a CUDA GPU; use --small to check the script on the CPU")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if args.calibrated_recipe and len(names) != 1:
        p.error("--calibrated-recipe names one model's recipe: give one --models")
    if args.calibrated_recipe and not os.path.exists(args.calibrated_recipe):
        p.error(f"--calibrated-recipe {args.calibrated_recipe}: no such file")
    for n in names:
        if n not in BUILDERS:
            p.error(f"unknown model {n!r}; choose from {', '.join(BUILDERS)}")
    import attnpatch
    import diffusers

    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    device, dtype = _device_and_dtype(args)
    results: Dict[str, Any] = {
        "small": args.small, "fresh_caches": args.fresh_caches, "models": [],
        "workloads": {
            "wan": (f"480x832, {args.wan_frames} frames, {args.wan_steps} steps, CFG 5.0" if not args.small
                    else f"16x16, 5 frames, {args.wan_steps} steps, CFG 5.0"),
            "flux": f"{args.flux_size if not args.small else 32}² px, {args.flux_steps} steps, guidance 3.5",
        },
        "env": {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                "torch": torch.__version__, "diffusers": diffusers.__version__, "attnpatch": attnpatch.__version__,
                "python": sys.version.split()[0], "dtype": str(dtype),
                "lossy_available": [b.name for b in attnpatch.backends() if b.lossy and b.available]},
    }
    tmp = args.keep_outputs or tempfile.mkdtemp(prefix="calibrate-outputs-")
    os.makedirs(tmp, exist_ok=True)
    try:
        for n in names:
            results["models"].append(run_model(n, args, deadline, tmp))
    finally:
        if not args.keep_outputs:
            shutil.rmtree(tmp, ignore_errors=True)
    results["wall_s"] = time.monotonic() - t0
    with open(os.path.join(args.out, "calibrate_pipelines.json"), "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    md = markdown(results)
    with open(os.path.join(args.out, "calibrate_pipelines.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
