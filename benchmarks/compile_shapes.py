"""Compiled patched models across changing shapes, against compiled stock (issue 17).

    python benchmarks/compile_shapes.py --out DIR [--layers 2] [--small] [--modes default,reduce-overhead]

For Flux-dev (two resolutions: 1024² and 768²) and Wan2.1-1.3B (480p at 81 and 49 frames), each built
with the real widths, heads and head dims but ``--layers`` blocks of each kind (compile time grows
with depth; what is compared — graphs, recompiles, time per forward — does not depend on it), and for
each compile mode: stock diffusers compiled vs the same model patched with ``attnpatch.apply`` and
compiled. For each: the number of graphs dynamo compiled and of recompiles, graph breaks, the first
call at each shape (compile included) and the median of a few more calls. Outputs are compared
against the uncompiled stock model. Writes DIR/compile_shapes.json and DIR/compile_shapes.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

from _timing import first_tensor, sync  # benchmarks/_timing.py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attnpatch  # noqa: E402
import patch_overhead as po  # noqa: E402


def _flux(layers: int, small: bool, device, dtype):
    import diffusers

    cfg = dict(po.FLUX_SMALL if small else po.FLUX_DEV)
    if not small:
        cfg.update(num_layers=layers, num_single_layers=2 * layers)
    with torch.device(device):
        model = diffusers.FluxTransformer2DModel(**cfg).to(dtype)

    def inputs(side):
        side = 4 if small else side
        txt = 8 if small else 512
        g = torch.Generator(device="cpu").manual_seed(side)
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        kw = dict(hidden_states=torch.randn(1, side * side, cfg["in_channels"], generator=g),
                  encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"], generator=g),
                  pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(txt, 3), return_dict=False)
        return _to(kw, device, dtype), f"{side}x{side} latent ({side * side} image + {txt} text tokens)"
    shapes = [64, 48] if not small else [4, 4]  # 1024² and 768²
    return model.eval().requires_grad_(False), [inputs(s) for s in shapes]


def _wan(layers: int, small: bool, device, dtype):
    import diffusers

    cfg = dict(po.WAN_SMALL if small else po.WAN_13B)
    if not small:
        cfg.update(num_layers=layers)
    with torch.device(device):
        model = diffusers.WanTransformer3DModel(**cfg).to(dtype)

    def inputs(frames):
        f, h, w = (2, 8, 8) if small else ((frames - 1) // 4 + 1, 60, 104)
        g = torch.Generator(device="cpu").manual_seed(frames)
        kw = dict(hidden_states=torch.randn(1, cfg["in_channels"], f, h, w, generator=g),
                  timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8 if small else 512, cfg["text_dim"], generator=g),
                  return_dict=False)
        return _to(kw, device, dtype), f"{frames} frames ({f * (h // 2) * (w // 2)} video tokens)"
    return model.eval().requires_grad_(False), [inputs(81), inputs(49)]


def _to(kw, device, dtype):
    keep = ("timestep", "guidance", "img_ids", "txt_ids")
    return {k: (v.to(device=device, dtype=dtype if v.is_floating_point() and k not in keep else v.dtype)
                if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def run_one(model, shapes, mode: str, patched: bool, device, repeats: int, refs):
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    dynamo.reset()
    dynamo.utils.counters.clear()
    patch = attnpatch.apply(model) if patched else None
    counter = CompileCounterWithBackend("inductor")
    kwargs = {} if mode == "default" else {"mode": mode}
    compiled = torch.compile(model, backend=counter, **kwargs) if mode == "default" else torch.compile(model, **kwargs)
    rows = []
    try:
        for (kw, label), ref in zip(list(shapes) + [shapes[0]], refs + [refs[0]]):
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = first_tensor(compiled(**kw))
            sync(device)
            first = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    compiled(**kw)
                sync(device)
                times.append(time.perf_counter() - t0)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            rows.append({"shape": label, "first_call_s": first, "median_ms": statistics.median(times) * 1e3,
                         "rel_l2_vs_uncompiled_stock": err})
        counters = dynamo.utils.counters
        result = {
            "graphs": counter.frame_count if mode == "default" else counters["stats"].get("unique_graphs", 0),
            "recompiles": counters["recompiles"] and sum(counters["recompiles"].values()),
            "graph_breaks": sum(counters["graph_break"].values()),
            "rows": rows,
        }
        if patch is not None:
            result["backends"] = {r.site.path: r.traced for r in patch.report().rows[:3]}
        return result
    finally:
        if patch is not None:
            patch.remove()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="tiny configs (a CPU dry run)")
    p.add_argument("--models", default="flux,wan")
    p.add_argument("--modes", default="default", help="comma-separated torch.compile modes")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    os.makedirs(args.out, exist_ok=True)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "layers": args.layers, "models": {}}
    try:
        import diffusers
        results["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    builders = {"flux": _flux, "wan": _wan}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model, shapes = builders[name](args.layers, args.small, device, dtype)
        with torch.no_grad():
            refs = [first_tensor(model(**kw)).float() for kw, _ in shapes]
        results["models"][name] = {}
        for mode in args.modes.split(","):
            for patched in (False, True):
                key = f"{mode}/{'patched' if patched else 'stock'}"
                t0 = time.perf_counter()
                results["models"][name][key] = run_one(model, shapes, mode, patched, device, args.repeats, refs)
                results["models"][name][key]["wall_s"] = time.perf_counter() - t0
                print(name, key, json.dumps(results["models"][name][key])[:400], flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "compile_shapes.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"# Compiled models across shapes: stock vs patched ({results['device']}, torch {results['torch']}, "
             f"diffusers {results.get('diffusers')}, {results['date']})", "",
             f"Real widths/heads/head dims, {args.layers} blocks of each kind. Shapes run in order, then the first again.",
             "", "| model | mode | run | graphs | recompiles | breaks | shape | first call (s) | median (ms) | rel L2 vs stock eager |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, runs in results["models"].items():
        for key, r in runs.items():
            mode, who = key.split("/")
            for row in r["rows"]:
                lines.append(f"| {name} | {mode} | {who} | {r['graphs']} | {r['recompiles']} | {r['graph_breaks']} | "
                             f"{row['shape']} | {row['first_call_s']:.2f} | {row['median_ms']:.2f} | "
                             f"{row['rel_l2_vs_uncompiled_stock']:.2e} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "compile_shapes.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
