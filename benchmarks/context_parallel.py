"""Context parallelism on real-size diffusers transformers: one GPU vs attnpatch's ulysses / ring vs
diffusers' own ``ContextParallelConfig``, in one run, on the GPUs of one host.

    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --out $OUT

Models (random bf16 weights built from the real configs directly on each GPU, same seed on every
process; nothing is downloaded; each model is built once per process and reused):

* ``wan``: WanTransformer3DModel with Wan2.1-T2V-1.3B's config, 480p x 81 frames (21 x 30 x 52 = 32760
  video tokens, 512 text tokens).
* ``flux``: FluxTransformer2DModel with Flux-dev's config, 1024 x 1024 (4096 image + 512 text tokens).
* ``wan14b`` (opt-in: ``--models wan,flux,wan14b``): Wan2.1-14B's config at 720p x 81 frames (21 x 45 x
  80 = 75600 tokens); about 28 GiB of weights and tens of seconds per single-GPU forward.
* ``wan-pipeline`` (opt-in): a whole ``WanPipeline`` with the 1.3B transformer, 480p x 81,
  ``--pipeline-steps`` denoising steps (default 10) with classifier-free guidance (two transformer
  forwards per step), prompt embeddings given directly (no tokenizer or text encoder: nothing to
  download) and ``output_type="latent"`` (no VAE decode); one GPU vs attnpatch ulysses vs diffusers
  ulysses, one timed run each after the first (the first call is reported too).

Variants (W = the number of processes):

* ``one GPU``: every process runs the whole, unpatched model (the reference output and time);
* ``attnpatch ulysses=W`` / ``attnpatch ring=W`` (and ``ulysses=2,ring=2`` when W = 4):
  ``attnpatch.apply(model, parallel=...)``, removed afterwards (the output after removal is checked
  against the reference);
* ``diffusers ulysses`` (its default attention backend), ``diffusers ulysses _native_cudnn`` and
  ``diffusers ring _native_cudnn``: a fresh model with ``model.enable_parallelism(config=
  ContextParallelConfig(...))`` (diffusers cannot undo it). A variant that diffusers refuses is recorded
  with its error.

For each: the first call (ms, includes plan building, autotune, NCCL warm-up), then the median of
``--repeats`` forwards after ``--warmup`` (CUDA events on process 0), peak memory, and the output's
relative L2 error / max abs difference / bitwise equality against one GPU. Everything runs in eager
mode. ``--budget-s`` (default 330) skips the remaining variants once spent (process 0 decides, every
process follows), so that the run stays within about 6 minutes.

NVLink multicast is left as the machine has it: this script sets no NCCL or symmetric-memory variable.

Writes ``context_parallel.json`` and ``context_parallel.md`` to ``--out`` (process 0). ``--small`` runs
tiny configs (CPU with gloo when there is no GPU) to check the script itself:

    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --small --out /tmp/cp
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from _timing import first_tensor, sync, timed_repeats  # benchmarks/_timing.py

WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = dict(WAN_13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
FLUX_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
WAN_SMALL = dict(WAN_13B, num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
                 freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
FLUX_SMALL = dict(FLUX_DEV, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def _wan_inputs(cfg, frames, h, w, text):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, cfg["in_channels"], frames, h, w, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, text, cfg["text_dim"], generator=g), return_dict=False)


def _flux_inputs(cfg, side, text):
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return dict(hidden_states=torch.randn(1, side * side, cfg["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text, 3), return_dict=False)


#: name -> (diffusers class, config, small config, inputs(cfg, small), description)
MODELS: Dict[str, tuple] = {
    "wan": ("WanTransformer3DModel", WAN_13B, WAN_SMALL,
            lambda cfg, small: _wan_inputs(cfg, *((2, 8, 8, 8) if small else (21, 60, 104, 512))),
            "Wan2.1-T2V-1.3B transformer, 480p x 81 frames (32760 video + 512 text tokens)"),
    "flux": ("FluxTransformer2DModel", FLUX_DEV, FLUX_SMALL,
             lambda cfg, small: _flux_inputs(cfg, *((4, 8) if small else (64, 512))),
             "Flux-dev transformer, 1024 x 1024 (4096 image + 512 text tokens)"),
    "wan14b": ("WanTransformer3DModel", WAN_14B, WAN_SMALL,
               lambda cfg, small: _wan_inputs(cfg, *((2, 8, 8, 8) if small else (21, 90, 160, 512))),
               "Wan2.1-14B transformer config, 720p x 81 frames (75600 video + 512 text tokens)"),
}
_KEEP_DTYPE = ("timestep", "guidance", "img_ids", "txt_ids")


def build(name: str, small: bool, device, dtype):
    """The model, built on ``device`` in ``dtype`` directly (seed 0: the same weights on every process)."""
    import diffusers

    cls, cfg, small_cfg, inputs_fn, _ = MODELS[name]
    cfg = small_cfg if small else cfg
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(diffusers, cls)(**cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    inputs = {k: (v.to(device=device, dtype=v.dtype if (k in _KEEP_DTYPE or not v.is_floating_point()) else dtype)
                  if isinstance(v, torch.Tensor) else v) for k, v in inputs_fn(cfg, small).items()}
    return model, inputs


# -- timing and comparison ----------------------------------------------------------------------------------

def time_forward(fn: Callable[[], Any], device, warmup: int, repeats: int) -> Dict[str, Any]:
    """First call (ms), then the median of ``repeats`` calls after ``warmup`` more; peak GiB; the output."""
    with torch.no_grad():
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        first = (time.perf_counter() - t0) * 1e3
        for _ in range(warmup):
            out = fn()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        dist.barrier()
        times, out = timed_repeats(fn, device, repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"first_call_ms": first, "median_ms": statistics.median(times), "min_ms": min(times),
            "times_ms": [round(t, 3) for t in times], "peak_gib": peak, "output": first_tensor(out)}


def compare(out, ref) -> Dict[str, Any]:
    a, b = out.float(), ref.float()
    return {"rel_l2": ((a - b).norm() / b.norm().clamp_min(1e-30)).item(), "max_abs_diff": (a - b).abs().max().item(),
            "bitwise_equal": bool(torch.equal(out, ref)), "finite": bool(torch.isfinite(a).all().item())}


def _agree(flag: bool) -> bool:
    """Process 0's decision, on every process (so that all run or skip the same variants)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


# -- one model ------------------------------------------------------------------------------------------------------

def bench_model(name: str, args, device, dtype, deadline: float, log) -> Dict[str, Any]:
    import attnpatch

    W = dist.get_world_size()
    res: Dict[str, Any] = {"model": name, "description": MODELS[name][4], "world": W, "variants": {}}
    V = res["variants"]
    t0 = time.perf_counter()
    model, inputs = build(name, args.small, device, dtype)
    res["build_s"] = time.perf_counter() - t0
    res["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    log(f"{name}: {res['params_b']:.2f} B params, built in {res['build_s']:.1f} s")
    ref: List[Optional[torch.Tensor]] = [None]

    def record(label: str, fn: Callable[[], Any], extra: Optional[Callable[[], Dict[str, Any]]] = None) -> bool:
        if not _agree(time.monotonic() < deadline):
            V[label] = {"skipped": f"time budget (--budget-s {args.budget_s}) spent"}
            log(f"  {label}: skipped (time budget)")
            return False
        try:
            r = time_forward(fn, device, args.warmup, args.repeats)
        except Exception as exc:  # a variant that cannot run here is a result
            V[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}"}
            log(f"  {label}: {V[label]['error']}")
            return False
        out = r.pop("output")
        if ref[0] is None:
            ref[0] = out
        r.update(compare(out, ref[0]))
        if extra is not None:
            r.update(extra())
        V[label] = r
        log(f"  {label:36s} first {r['first_call_ms']:9.1f} ms  median {r['median_ms']:9.2f} ms  "
            f"rel_l2 {r['rel_l2']:.2e}  peak {r['peak_gib'] or 0:.1f} GiB")
        return True

    run = lambda: model(**inputs)  # noqa: E731
    record("one GPU (stock diffusers)", run)
    if ref[0] is None:
        return res

    degrees = [("ulysses", {"ulysses": W}), ("ring", {"ring": W})]
    if W == 4:
        degrees.append(("ulysses=2,ring=2", {"ulysses": 2, "ring": 2}))
    for label, spec in degrees:
        patch = None
        try:
            patch = attnpatch.apply(model, parallel=spec)
        except Exception as exc:
            V[f"attnpatch {label}"] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        name_ = f"attnpatch {label}" if "=" in label else f"attnpatch {label}={W}"

        def details(p=patch):
            used: Dict[str, int] = {}
            for row in p.report().rows:
                for b, n in row.calls.items():
                    used[b] = used.get(b, 0) + n
            return {"backends": used, "parallel": [n for n in p.report().notes if n.startswith("context parallel")]}

        try:
            record(name_, run, details)
        finally:
            patch.remove()
        with torch.no_grad():
            restored = first_tensor(run())
        if name_ in V:
            V[name_]["restored_bitwise"] = bool(torch.equal(restored, ref[0]))

    model = run = None  # free the weights before building diffusers' copies
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    for label, cfg_kw, backend in (("diffusers ulysses", {"ulysses_degree": W}, None),
                                   ("diffusers ulysses _native_cudnn", {"ulysses_degree": W}, "_native_cudnn"),
                                   ("diffusers ring _native_cudnn", {"ring_degree": W}, "_native_cudnn")):
        if not _agree(time.monotonic() < deadline):
            V[f"{label}={W}"] = {"skipped": f"time budget (--budget-s {args.budget_s}) spent"}
            continue
        dmodel = None
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

        saved_backend = registry._active_backend  # set_attention_backend changes diffusers' process-wide default
        try:
            from diffusers import ContextParallelConfig

            dmodel, _ = build(name, args.small, device, dtype)
            if backend:
                dmodel.set_attention_backend(backend)
            dmodel.enable_parallelism(config=ContextParallelConfig(**cfg_kw))
        except Exception as exc:
            V[f"{label}={W}"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}"}
            log(f"  {label}: {V[f'{label}={W}']['error']}")
        else:
            record(f"{label}={W}", lambda m=dmodel: m(**inputs))
        registry.set_active_backend(saved_backend)
        del dmodel
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = V.get("one GPU (stock diffusers)", {}).get("median_ms")
    for r in V.values():
        if base and "median_ms" in r:
            r["speedup_vs_one_gpu"] = base / r["median_ms"]
    return res


def bench_pipeline(args, device, dtype, deadline: float, log) -> Dict[str, Any]:
    """A whole WanPipeline run (CFG, several steps): one GPU vs attnpatch ulysses vs diffusers ulysses."""
    import attnpatch
    from diffusers import ContextParallelConfig, FlowMatchEulerDiscreteScheduler, WanPipeline

    W = dist.get_world_size()
    steps = args.pipeline_steps
    res: Dict[str, Any] = {"model": "wan-pipeline", "world": W, "variants": {},
                           "description": f"WanPipeline (Wan2.1-1.3B transformer), 480p x 81 frames, {steps} steps, "
                                          "CFG 5.0, latents out",
                           "timing": "Each variant: the first pipeline call, then one more (its time is the "
                                     "median column); not the model-level repeats of the header."}
    V = res["variants"]
    small = args.small
    cfg = WAN_SMALL if small else WAN_13B
    text = 8 if small else 512
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, text, cfg["text_dim"], generator=g).to(device, dtype)
    negative = torch.randn(1, text, cfg["text_dim"], generator=g).to(device, dtype)
    size = dict(height=32, width=32, num_frames=5) if small else dict(height=480, width=832, num_frames=81)

    def make():
        model, _ = build("wan", small, device, dtype)
        return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))

    def call(pipe):
        out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps,
                   guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(0), **size)
        return out.frames

    pipe = make()
    pipe.set_progress_bar_config(disable=True)
    ref: List[Optional[torch.Tensor]] = [None]

    def record(label, fn) -> None:
        if not _agree(time.monotonic() < deadline):
            V[label] = {"skipped": f"time budget (--budget-s {args.budget_s}) spent"}
            return
        try:
            r = time_forward(fn, device, 0, 1)
        except Exception as exc:
            V[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}"}
            log(f"  {label}: {V[label]['error']}")
            return
        out = r.pop("output")
        if ref[0] is None:
            ref[0] = out
        r.update(compare(out, ref[0]))
        V[label] = r
        log(f"  {label:36s} first {r['first_call_ms']:9.1f} ms  run {r['median_ms']:9.1f} ms  rel_l2 {r['rel_l2']:.2e}")

    record("one GPU (stock diffusers)", lambda: call(pipe))
    patch = attnpatch.apply(pipe, parallel={"ulysses": W})
    label = f"attnpatch ulysses={W}"
    try:
        record(label, lambda: call(pipe))
    finally:
        patch.remove()
    if label in V and "median_ms" in V[label] and _agree(time.monotonic() < deadline):
        V[label]["restored_bitwise"] = bool(torch.equal(call(pipe), ref[0]))
    pipe = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if _agree(time.monotonic() < deadline):
        dpipe = make()
        dpipe.set_progress_bar_config(disable=True)
        try:
            dpipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=W))
        except Exception as exc:
            V[f"diffusers ulysses={W}"] = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            record(f"diffusers ulysses={W}", lambda: call(dpipe))
        dpipe = None
    base = V.get("one GPU (stock diffusers)", {}).get("median_ms")
    for r in V.values():
        if base and "median_ms" in r:
            r["speedup_vs_one_gpu"] = base / r["median_ms"]
    return res


# -- report ---------------------------------------------------------------------------------------------------------

def markdown(doc: Dict[str, Any]) -> str:
    env = doc["env"]
    lines = ["# Context parallelism: one GPU vs attnpatch vs diffusers", "",
             f"{env['world']} x {env['device']}, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"attnpatch {env['attnpatch_commit']}, {env['date']}, host {env['host']}. Eager, {env['dtype']}, "
             f"median of {env['repeats']} after {env['warmup']} warm-up (first call separately).", ""]
    for name, res in doc["models"].items():
        about = res.get("timing") or (f"{res.get('params_b', 0):.2f} B parameters, built in "
                                      f"{res.get('build_s', 0):.1f} s per process.")
        lines += [f"## {res.get('description', name)}", "", about, "",
                  "| variant | first call ms | median ms | speed-up vs one GPU | rel. L2 vs one GPU | max abs diff | note |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for label, r in res.get("variants", {}).items():
            if "median_ms" not in r:
                lines.append(f"| {label} | | | | | | {r.get('error') or r.get('skipped')} |")
                continue
            note = []
            if r.get("bitwise_equal"):
                note.append("bitwise equal to one GPU")
            if "restored_bitwise" in r:
                note.append("after remove(): " + ("bitwise equal" if r["restored_bitwise"] else "DIFFERS"))
            if r.get("backends"):
                note.append("kernels " + ", ".join(f"{b}×{n}" for b, n in sorted(r["backends"].items())))
            lines.append(f"| {label} | {r['first_call_ms']:.1f} | {r['median_ms']:.2f} | "
                         f"{r.get('speedup_vs_one_gpu', 1.0):.2f}x | {r['rel_l2']:.2e} | {r['max_abs_diff']:.3g} | "
                         f"{'; '.join(note)} |")
        lines.append("")
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for context_parallel.json / .md")
    ap.add_argument("--models", default="wan,flux",
                    help="comma-separated: wan, flux, wan14b, wan-pipeline (default wan,flux)")
    ap.add_argument("--pipeline-steps", type=int, default=10, help="denoising steps of wan-pipeline (default 10)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip the remaining variants after this many s")
    ap.add_argument("--small", action="store_true", help="tiny configs (checks the script; CPU/gloo without a GPU)")
    args = ap.parse_args()
    start = time.monotonic()
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    dtype = torch.bfloat16 if cuda else torch.float32

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    import diffusers

    env = {"world": dist.get_world_size(), "device": torch.cuda.get_device_name(device) if cuda else platform.processor(),
           "torch": torch.__version__, "diffusers": diffusers.__version__, "attnpatch_commit": _git_commit(),
           "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None, "dtype": str(dtype).replace("torch.", ""),
           "warmup": args.warmup, "repeats": args.repeats, "host": socket.gethostname(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "small": args.small}
    doc: Dict[str, Any] = {"env": env, "models": {}}
    deadline = start + args.budget_s
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS and name != "wan-pipeline":
            log(f"unknown model {name!r}; known: {', '.join(MODELS)}, wan-pipeline")
            continue
        try:
            if name == "wan-pipeline":
                doc["models"][name] = bench_pipeline(args, device, dtype, deadline, log)
            else:
                doc["models"][name] = bench_model(name, args, device, dtype, deadline, log)
        except Exception as exc:
            doc["models"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            log(doc["models"][name]["traceback"])
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    env["wall_s"] = time.monotonic() - start
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "context_parallel.json"), "w") as f:
            json.dump(doc, f, indent=1, default=str)
        with open(os.path.join(args.out, "context_parallel.md"), "w") as f:
            f.write(markdown(doc))
        print(markdown(doc))
        print(f"wrote {args.out}/context_parallel.json and .md in {env['wall_s']:.0f} s")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
