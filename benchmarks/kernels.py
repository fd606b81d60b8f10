"""Kernel-level benchmark: every installed attnpatch backend, `auto`, and a model of the seed's router
(DiffSynth: FA4 > FA3 > FA2 > Sage > xFormers > torch, by import; masks force SDPA) on a suite of
diffusion, video, LLM and ViT attention shapes, in bf16 and fp16.

    python benchmarks/kernels.py                 # on a GPU: the full suite, results to docs/
    python benchmarks/kernels.py --quick --out /tmp/b   # small shapes; runs on CPU too

For each (shape, dtype) and backend: median ms (triton.testing.do_bench, warm-up, L2 flushed, rotating
over several input sets, repeated --repeats times: the median of the repeats is reported and the
spread (max - min) / median states the noise), TFLOP/s (4·b·h·s_q·s_kv·d, halved for causal), the
fraction of the card's bf16 matmul peak measured in the same run (8192³), and the relative error
‖out − ref‖ / ‖ref‖ against an fp32 reference (on up to 256 sampled query rows, all keys).

Every backend is called through ``attnpatch.attention_forward`` (a backend pinned with
``use_backend(name, strict=True)``; auto with no scope), so all columns pay the same routing cost.
auto is measured after its first call, which runs autotune (that cost is reported separately).
Target: auto within 3% of the fastest eligible exact backend on every shape.

Writes OUT/BENCHMARKS.json (after every case, so an interrupted run keeps what it measured),
OUT/BENCHMARKS_kernels.md and OUT/BENCHMARKS_kernels.png.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnpatch  # noqa: E402
from attnpatch import autotune, registry  # noqa: E402
from attnpatch.call import build_call  # noqa: E402

# name, batch, q heads, kv heads, s_q, s_kv, head_dim, causal, mask ("kpad:N" = last N keys padded)
CASES = [  # most important first: --budget-s drops the tail
    ("flux-1024", 1, 24, 24, 4608, 4608, 128, False, None),
    ("wan-480p", 1, 40, 40, 32760, 32760, 128, False, None),
    ("sdxl-4096", 2, 10, 10, 4096, 4096, 64, False, None),
    ("hunyuan-joint-kpad", 1, 24, 24, 4352, 4352, 128, False, "kpad:200"),
    ("llm-prefill-gqa", 1, 32, 8, 8192, 8192, 128, True, None),
    ("sdxl-1024", 2, 20, 20, 1024, 1024, 64, False, None),
    ("vit-b16", 32, 12, 12, 197, 197, 64, False, None),
    ("llm-decode-gqa", 8, 32, 8, 1, 8192, 128, False, None),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: The seed's automatic priority (DiffSynth's attention router), as attnpatch backend names.
SEED_PRIORITY = [("FA4", "flash_attn4"), ("FA3", "flash_attn3"), ("FA2", "flash_attn"), ("Sage", "sage"),
                 ("xFormers", "xformers"), ("torch", "sdpa")]

#: Backends that materialise the (s_q, s_kv) score matrix: run only where it stays small.
MATERIALISING = ("eager", "sdpa_math")
MATERIALISE_LIMIT = 2 << 30


class Budget(Exception):
    pass


def quick_case(c):
    name, b, hq, hkv, sq, skv, d, causal, mask = c
    f = 16
    sq2 = sq if sq <= 256 else max(64, min(512, sq // f))
    skv2 = skv if skv <= 256 else max(64, min(512, skv // f))
    if mask:
        mask = f"kpad:{max(1, int(mask.split(':')[1]) // f)}"
    g = hq // hkv
    hkv2 = max(1, min(hkv, 4 // g if g < 4 else 1))
    return (name, min(b, 2), hkv2 * g if g > 1 else min(hq, 4), hkv2 if g > 1 else min(hq, 4), sq2, skv2, d,
            causal, mask)


def flops(b, hq, sq, skv, d, causal):
    f = 4.0 * b * hq * sq * skv * d
    return f / 2 if causal else f


def make_sets(c, dt, n, dev):
    name, b, hq, hkv, sq, skv, d, causal, mask = c
    sets = []
    for _ in range(n):
        q = torch.randn(b, hq, sq, d, device=dev, dtype=dt)
        k = torch.randn(b, hkv, skv, d, device=dev, dtype=dt)
        v = torch.randn(b, hkv, skv, d, device=dev, dtype=dt)
        m = None
        if mask and mask.startswith("kpad:"):
            pad = int(mask.split(":")[1])
            m = torch.ones(b, skv, dtype=torch.bool, device=dev)
            m[:, skv - pad:] = False
        sets.append((q, k, v, m))
    return sets


def reference_rows(q, k, v, m, causal, rows):
    """fp32 attention for query rows ``rows`` (all keys): (b, h, len(rows), d)."""
    b, hq, sq, d = q.shape
    g = hq // k.shape[1]
    out = []
    for h0 in range(0, hq, 8):
        heads = list(range(h0, min(hq, h0 + 8)))
        qh = q[:, heads][:, :, rows].float()
        kh = k[:, [h // g for h in heads]].float()
        vh = v[:, [h // g for h in heads]].float()
        s = (qh @ kh.transpose(-1, -2)) / math.sqrt(d)
        keep = torch.ones(len(rows), k.shape[2], dtype=torch.bool, device=q.device)
        if causal:
            keep = torch.arange(k.shape[2], device=q.device)[None, :] <= rows[:, None]
        keep = keep[None, None].expand(b, 1, *keep.shape)
        if m is not None:
            keep = keep & m[:, None, None, :]
        s = s.masked_fill(~keep, -math.inf)
        out.append(torch.softmax(s, dim=-1).nan_to_num(0.0) @ vh)
    return torch.cat(out, dim=1)


def relerr(o, ref, rows):
    a = o[:, :, rows].double()
    r = ref.double()
    return ((a - r).norm() / r.norm()).item()


def make_bench(cuda, warmup_ms, rep_ms):
    if cuda:
        import triton

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return bench

    def bench(fn):  # CPU (--quick smoke runs): host clock, same shape of result
        fn()
        t0 = time.perf_counter()
        fn()
        est = max(time.perf_counter() - t0, 1e-6) * 1e3
        n = max(3, min(50, int(rep_ms / est)))
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    return bench


def rotating(fn, sets):
    i = [0]

    def run():
        s = sets[i[0] % len(sets)]
        i[0] += 1
        return fn(*s)
    return run


def timed(bench, fn, sets, repeats):
    ms = [bench(rotating(fn, sets)) for _ in range(repeats)]
    med = statistics.median(ms)
    return med, (max(ms) - min(ms)) / med if med > 0 else float("nan"), ms


def seed_pick(call, infos):
    """What DiffSynth's router would run: the first *installed* kernel in its priority list (it checks
    imports only); a mask forces SDPA. Returns (label, backend name, note)."""
    if call.mask_kind != "none":
        return "torch (mask)", "sdpa", "the seed sends masked calls to SDPA"
    for label, name in SEED_PRIORITY:
        info = infos.get(name)
        if info is None:
            continue
        installed = info.available or any("not installed" not in r for r in info.reasons)
        if not installed:
            continue
        note = "" if info.available else f"installed but unusable here ({info.why_not}): the seed would fail"
        return label, name, note
    return "torch", "sdpa", ""


def package_versions():
    out = {}
    for p in ("torch", "triton", "flash-attn", "flash_attn_3", "flash-attn-4", "xformers", "sageattention",
              "sageattn3", "diffusers", "transformers"):
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def driver_version():
    try:
        with open("/proc/driver/nvidia/version") as fh:
            return next((p for p in fh.readline().split() if p[:1].isdigit() and "." in p), "unknown")
    except OSError:
        return "n/a"


def _autotune_times(call) -> dict:
    """The per-candidate times (ms) of auto's own measurement of ``call``'s signature in this process's
    autotune cache, or {} (not timed: a shipped rule, a name)."""
    skey = autotune.signature_key(call)
    for e in autotune.cached_choices():
        if e.get("signature") == skey and e.get("times_ms"):
            return {n: round(float(t), 4) for n, t in e["times_ms"].items()}
    return {}


def run_case(c, dtname, dt, args, dev, bench, peak, infos):
    name, b, hq, hkv, sq, skv, d, causal, mask = c
    fl = flops(b, hq, sq, skv, d, causal)
    per_set = (b * hq * sq * d + 2 * b * hkv * skv * d) * 2
    n_sets = max(1, min(args.sets, int(3e9 // per_set)))
    sets = make_sets(c, dt, n_sets, dev)
    q, k, v, m = sets[0]
    call, _ = build_call(q, k, v, "bnsd", m, causal, None, 0.0, False)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.randperm(sq, generator=g)[: min(sq, 256)].sort().values.to(dev)
    ref = reference_rows(q, k, v, m, causal, rows)
    res = dict(case=name, dtype=dtname, shape=[b, hq, hkv, sq, skv, d], causal=causal, mask=mask,
               flops=fl, input_sets=n_sets, backends={})
    big = fl > 2e12  # fewer reps where one call already takes milliseconds
    reps = 1 if (big and args.quick) else args.repeats

    def record(key, fn, lossy):
        o = fn(q, k, v, m)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        err = relerr(o, ref, rows)
        del o
        med, spread, all_ms = timed(bench, fn, sets, reps)
        r = dict(ms=med, spread=spread, repeats_ms=all_ms, tflops=fl / med / 1e9, relerr=err, lossy=lossy)
        if peak:
            r["frac_peak"] = r["tflops"] / peak
        return r

    for bk in registry.all_backends():
        entry = {}
        reasons = bk.not_supported_reasons(call)
        if bk.NAME in args.skip:
            reasons = reasons + ["skipped (--skip)"]
        if bk.NAME in MATERIALISING and b * hq * sq * skv * 4 > MATERIALISE_LIMIT:
            reasons = reasons + [f"would materialise {b * hq * sq * skv * 4 / 2**30:.0f} GiB of scores (reference kernel)"]
        if reasons:
            if bk.available:  # unavailable backends are listed once in meta, not per shape
                res["backends"][bk.NAME] = dict(ineligible="; ".join(reasons), lossy=bk.LOSSY)
            continue
        t0 = time.perf_counter()
        try:
            with attnpatch.use_backend(bk.NAME, strict=True):
                def fn(q, k, v, m):
                    return attnpatch.attention_forward(q, k, v, attn_mask=m, is_causal=causal)
                entry = record(bk.NAME, fn, bk.LOSSY)
        except Exception as exc:
            entry = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                         lossy=bk.LOSSY)
        entry["wall_s"] = time.perf_counter() - t0
        left_out = registry.auto_left_out(bk, call)
        if not left_out and registry.auto_priority(bk, call) is None:
            left_out = (f"auto never picks it on {registry.device_class_keys(call)[0]} (no AUTO_PRIORITY there); "
                        "name it (backend=, use_backend, a recipe) or let calibrate measure it")
        if left_out:  # timed and shown, but not among what auto may pick here (FlashAttention 4 on sm90,
            entry["auto_left_out"] = left_out  # flash_attn3_fp8 everywhere)
        res["backends"][bk.NAME] = entry
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # auto: the first call measures (autotune), the timing that follows runs the chosen kernel.
    def auto_fn(q, k, v, m):
        return attnpatch.attention_forward(q, k, v, attn_mask=m, is_causal=causal)

    def measure_auto(key, allow_lossy):  # allow_lossy None: the outer setting (exact unless opted in)
        t0 = time.perf_counter()
        try:
            with attnpatch.use_backend(allow_lossy=allow_lossy):
                auto_fn(q, k, v, m)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                e = attnpatch.explain(q, k, v, attn_mask=m, is_causal=causal)
                r = record(key, auto_fn, bool(allow_lossy))
            r.update(chosen=e.backend, source=e.source, first_call_s=first_s)
            timed = _autotune_times(call)
            if timed:  # what auto's own timing read for each candidate (the sweep's times are do_bench's)
                r["autotune_times_ms"] = timed
            return r
        except Exception as exc:
            return dict(error=f"{type(exc).__name__}: {exc}")

    a = res["auto"] = measure_auto("auto", None)

    # auto with the lossy opt-in, where a lossy backend could serve this shape: against the fastest
    # eligible backend of any kind (issue 13: within 3% with every kernel installed)
    measured = {n: r for n, r in res["backends"].items() if "ms" in r and "auto_left_out" not in r}
    if any(r["lossy"] for r in measured.values()):
        al = measure_auto("auto_lossy", True)
        res["auto_lossy"] = al
        best_any = min(measured, key=lambda n: measured[n]["ms"])
        res["fastest_any"] = best_any
        if "ms" in al:
            res["auto_lossy_over_fastest"] = al["ms"] / measured[best_any]["ms"]
            if al.get("chosen") in measured:
                res["auto_lossy_pick_over_fastest"] = measured[al["chosen"]]["ms"] / measured[best_any]["ms"]

    exact = {n: r for n, r in res["backends"].items() if "ms" in r and not r["lossy"] and "auto_left_out" not in r}
    if exact:
        best = min(exact, key=lambda n: exact[n]["ms"])
        res["fastest_exact"] = best
        if "ms" in a:
            res["auto_over_fastest"] = a["ms"] / exact[best]["ms"]
            if a.get("chosen") in exact:
                res["auto_pick_over_fastest"] = exact[a["chosen"]]["ms"] / exact[best]["ms"]
    label, seed_name, note = seed_pick(call, infos)
    s = dict(label=label, backend=seed_name, note=note)
    r = res["backends"].get(seed_name, {})
    if "ms" in r:
        s.update(ms=r["ms"], relerr=r["relerr"], lossy=r["lossy"])
        if "ms" in a:
            s["over_auto"] = r["ms"] / a["ms"]
    else:
        s["result"] = r.get("ineligible") or r.get("error") or "not measured"
    res["seed"] = s
    del sets, ref, q, k, v, m
    return res


# -- reporting --------------------------------------------------------------------------------------

def _over_note(r) -> str:
    """What a row over the target ran: the fastest kernel itself (the gap is the sweep's timing of one
    kernel twice) or another one (``pick / fastest``: the selection's own cost)."""
    if r.get("auto", {}).get("chosen") == r.get("fastest_exact"):
        return " (auto ran the fastest kernel itself)"
    return f" (auto ran {r.get('auto', {}).get('chosen')}: pick/fastest {fmt(r.get('auto_pick_over_fastest'), '.3f')})"


def fmt(x, spec, none="–"):
    return format(x, spec) if isinstance(x, (int, float)) and x == x else none


def write_markdown(path, meta, results):
    L = []
    L.append(f"Card: {meta['device']}; driver {meta.get('driver')}; torch {meta['torch']} (CUDA {meta.get('cuda')}, "
             f"cuDNN {meta.get('cudnn')}); {meta['date']}; bf16 matmul {meta.get('matmul_shape')}: "
             f"{fmt(meta.get('matmul_tflops'), '.0f')} TFLOP/s. Packages: "
             + ", ".join(f"{k} {v}" for k, v in meta["packages"].items()) + ".")
    L.append("")
    L.append(f"Each cell: median of {meta['repeats']} do_bench medians (rotating over input sets, L2 flushed); "
             "± is the spread (max − min) / median of the repeats.")
    L.append("")
    L.append("## auto vs the fastest eligible exact backend, and the seed's router")
    L.append("")
    L.append("| shape | dtype | fastest exact | ms | TFLOP/s | % peak | auto → | auto ms | auto / fastest | "
             "pick / fastest | auto source | seed → | seed ms | seed / auto | seed relerr |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        bst = r.get("fastest_exact")
        br = r["backends"].get(bst, {}) if bst else {}
        a, s = r.get("auto", {}), r.get("seed", {})
        ratio = r.get("auto_over_fastest")
        flag = " ⚠" if ratio and ratio > 1.03 else ""
        L.append(
            f"| {r['case']} {tuple(r['shape'])}{' causal' if r['causal'] else ''}{' ' + r['mask'] if r['mask'] else ''} "
            f"| {r['dtype']} | {bst or '–'} | {fmt(br.get('ms'), '.3f')} | {fmt(br.get('tflops'), '.4g')} | "
            f"{fmt(100 * br['frac_peak'] if 'frac_peak' in br else None, '.0f')} | {a.get('chosen', a.get('error', '–'))} | "
            f"{fmt(a.get('ms'), '.3f')} ± {fmt(100 * a['spread'] if 'spread' in a else None, '.1f')}% | "
            f"{fmt(ratio, '.3f')}{flag} | {fmt(r.get('auto_pick_over_fastest'), '.3f')} | {a.get('source', '')} | "
            f"{s.get('label')}: {s.get('backend')} | {fmt(s.get('ms'), '.3f') if 'ms' in s else s.get('result', '–')} | "
            f"{fmt(s.get('over_auto'), '.2f')} | {fmt(s.get('relerr'), '.1e')}{' (lossy)' if s.get('lossy') else ''} |")
    L.append("")
    L.append("`fastest exact`: among the backends auto may pick here (one its `AUTO_LEFT_OUT` keeps out, such as "
             "FlashAttention 4 on sm90, or one with no `AUTO_PRIORITY` for the device, such as `flash_attn3_fp8`, "
             "is timed and listed below but not compared; the lossy table too). "
             "`auto / fastest`: auto's own timing over the fastest exact backend's (includes run-to-run noise); "
             "`pick / fastest`: the backend auto chose, timed in the same sweep, over the fastest (selection "
             "quality alone). ⚠ marks shapes over the 3% target.")
    L.append("")
    over = [r for r in results if (r.get("auto_over_fastest") or 0) > 1.03 and r.get("auto", {}).get("autotune_times_ms")]
    if over:
        L.append("auto's own timing (ms, `attnpatch.autotune`) on the rows over the target:")
        L.append("")
        for r in over:
            times = ", ".join(f"{n} {t:.3f}" for n, t in sorted(r["auto"]["autotune_times_ms"].items(), key=lambda x: x[1]))
            L.append(f"* {r['case']} {r['dtype']}: {times}")
        L.append("")
    lossy_rows = [r for r in results if "auto_lossy" in r]
    if lossy_rows:
        L.append("## auto with the lossy opt-in vs the fastest eligible backend, lossy included")
        L.append("")
        L.append("| shape | dtype | fastest | ms | relerr | auto (lossy opt-in) → | auto ms | auto / fastest | "
                 "pick / fastest | auto relerr | auto source |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in lossy_rows:
            bst = r.get("fastest_any")
            br = r["backends"].get(bst, {}) if bst else {}
            a = r["auto_lossy"]
            ratio = r.get("auto_lossy_over_fastest")
            flag = " ⚠" if ratio and ratio > 1.03 else ""
            L.append(f"| {r['case']} | {r['dtype']} | {bst or '–'}{' (lossy)' if br.get('lossy') else ''} | "
                     f"{fmt(br.get('ms'), '.3f')} | {fmt(br.get('relerr'), '.1e')} | {a.get('chosen', a.get('error', '–'))} | "
                     f"{fmt(a.get('ms'), '.3f')} | {fmt(ratio, '.3f')}{flag} | "
                     f"{fmt(r.get('auto_lossy_pick_over_fastest'), '.3f')} | {fmt(a.get('relerr'), '.1e')} | "
                     f"{a.get('source', '')} |")
        L.append("")
    L.append("## Every backend")
    L.append("")
    L.append("| shape | dtype | backend | ms | ± | TFLOP/s | % peak | relerr | note |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for n, b in sorted(r["backends"].items(), key=lambda kv: kv[1].get("ms", float("inf"))):
            note = b.get("ineligible") or b.get("error") or b.get("auto_left_out") or ""
            if len(note) > 90:
                note = note[:87] + "..."
            L.append(f"| {r['case']} | {r['dtype']} | {n}{' (lossy)' if b.get('lossy') else ''} | "
                     f"{fmt(b.get('ms'), '.3f')} | {fmt(100 * b['spread'] if 'spread' in b else None, '.1f')}% | "
                     f"{fmt(b.get('tflops'), '.4g')} | {fmt(100 * b['frac_peak'] if 'frac_peak' in b else None, '.0f')} | "
                     f"{fmt(b.get('relerr'), '.1e')} | {note.replace('|', '/')} |")
    if meta.get("unavailable"):
        L.append("")
        L.append("Unavailable here: " + "; ".join(f"{n} ({why})" for n, why in meta["unavailable"].items()))
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")


def write_plot(path, meta, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in results})
    names = sorted({n for r in results for n, b in r["backends"].items() if "tflops" in b})
    series = names + ["auto"]
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(max(10, 1.6 * len(CASES)), 4.5 * len(dtypes)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, dtn in zip(axes[:, 0], dtypes):
        rows = [r for r in results if r["dtype"] == dtn]
        width = 0.85 / max(1, len(series))
        for j, n in enumerate(series):
            ys = []
            for r in rows:
                b = r.get("auto", {}) if n == "auto" else r["backends"].get(n, {})
                ys.append(b.get("tflops", 0.0))
            xs = [i + (j - len(series) / 2) * width + width / 2 for i in range(len(rows))]
            style = dict(color="black") if n == "auto" else dict(color=cmap(j % 20))
            lossy = any(r["backends"].get(n, {}).get("lossy") for r in rows)
            ax.bar(xs, ys, width, label=n + (" (lossy)" if lossy else ""), hatch="//" if lossy else None, **style)
        if meta.get("matmul_tflops"):
            ax.axhline(meta["matmul_tflops"], color="grey", ls="--", lw=1)
            ax.text(len(rows) - 0.5, meta["matmul_tflops"], " bf16 matmul peak", va="bottom", ha="right", fontsize=8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["case"] for r in rows], rotation=15, fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{meta['device']} · {dtn} · attention TFLOP/s per backend (black: auto)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=min(8, len(series)), fontsize=8, loc="lower center")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs", help="output folder (default: docs/)")
    ap.add_argument("--quick", action="store_true", help="shapes scaled down (<= 512 tokens), two repeats; runs on CPU")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--skip", default="", help="comma-separated backend names not to run")
    ap.add_argument("--repeats", type=int, default=3, help="do_bench repeats per cell (noise = their spread)")
    ap.add_argument("--sets", type=int, default=3, help="input sets to rotate over")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    ap.add_argument("--budget-s", type=float, default=0, help="stop starting new cases after this many seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--keep-autotune-cache", action="store_true",
                    help="reuse the user's autotune cache (default: a fresh, temporary one, so auto measures)")
    args = ap.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    os.makedirs(args.out, exist_ok=True)
    if not args.keep_autotune_cache:
        import tempfile
        os.environ["ATTNPATCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnpatch-bench-autotune-")
        autotune.reset_memory()
        autotune.clear_cache()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.sets = min(args.sets, 2)
        args.rep_ms = min(args.rep_ms, 20.0)
    if not cuda:
        # The CPU smoke run still exercises the measured-auto path: time with the host clock.
        ctx = autotune.override_timer(autotune.measure, devices=("cpu",))
        ctx.__enter__()
        if "flex" not in args.skip:
            args.skip.add("flex")  # compiling flex for the CPU takes longer than the whole quick run
    bench = make_bench(cuda, args.warmup_ms, args.rep_ms)

    infos = {i.name: i for i in attnpatch.backends()}
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(dev) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        capability=".".join(map(str, torch.cuda.get_device_capability(dev))) if cuda else None,
        driver=driver_version() if cuda else None, torch=torch.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if cuda else None, packages=package_versions(),
        attnpatch=attnpatch.__version__, quick=args.quick, repeats=args.repeats, sets=args.sets,
        backends={n: dict(available=i.available, version=i.version, lossy=i.lossy) for n, i in infos.items()},
        unavailable={n: i.why_not for n, i in infos.items() if not i.available},
        autotune_cache=str(autotune.cache_path()),
    )
    # The card's dense bf16 matmul rate, for "% of peak".
    n = 8192 if cuda and not args.quick else 1024
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    bm = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = statistics.median(bench(lambda: a @ bm) for _ in range(3))
    meta.update(matmul_shape=f"{n}^3", matmul_ms=t, matmul_tflops=2 * n ** 3 / t / 1e9)
    del a, bm
    print(json.dumps(meta), flush=True)

    cases = CASES
    if args.cases:
        want = args.cases.split(",")
        unknown = set(want) - {c[0] for c in CASES}
        if unknown:
            ap.error(f"unknown case(s) {sorted(unknown)}; known: {[c[0] for c in CASES]}")
        cases = [c for c in CASES if c[0] in want]
    if args.quick:
        cases = [quick_case(c) for c in cases]

    def on_term(signum, frame):
        raise Budget(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    results = []
    t_start = time.perf_counter()
    json_path = os.path.join(args.out, "BENCHMARKS.json")

    def save():
        meta["wall_s"] = time.perf_counter() - t_start
        with open(json_path, "w") as fh:
            json.dump(dict(meta=meta, results=results), fh, indent=1, default=str)

    try:
        for c in cases:
            for dtname in args.dtypes.split(","):
                if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                    meta.setdefault("skipped_for_budget", []).append(f"{c[0]}/{dtname}")
                    continue
                t0 = time.perf_counter()
                try:
                    res = run_case(c, dtname, DTYPES[dtname], args, dev, bench, meta["matmul_tflops"], infos)
                except Budget:
                    raise
                except Exception as exc:
                    traceback.print_exc()
                    res = dict(case=c[0], dtype=dtname, shape=list(c[1:7]), causal=c[7], mask=c[8], backends={},
                               error=f"{type(exc).__name__}: {exc}")
                res["wall_s"] = time.perf_counter() - t0
                results.append(res)
                save()
                a = res.get("auto", {})
                print(f"{res['case']:>20} {dtname}: fastest {res.get('fastest_exact')} "
                      f"auto={a.get('chosen')} ({a.get('source', a.get('error', ''))}) "
                      f"auto/fastest={fmt(res.get('auto_over_fastest'), '.3f')} "
                      f"seed={res.get('seed', {}).get('backend')} [{res['wall_s']:.1f}s]"
                      + (f" autotune {a['autotune_times_ms']}" if a.get("autotune_times_ms") else ""), flush=True)
    except (Budget, KeyboardInterrupt) as exc:
        meta["interrupted"] = str(exc) or type(exc).__name__
        print(f"interrupted ({meta['interrupted']}); writing what was measured", flush=True)
    finally:
        save()
        write_markdown(os.path.join(args.out, "BENCHMARKS_kernels.md"), meta, results)
        try:
            write_plot(os.path.join(args.out, "BENCHMARKS_kernels.png"), meta, results)
        except Exception as exc:  # matplotlib missing or a plotting problem must not lose the numbers
            print(f"plot failed: {type(exc).__name__}: {exc}", flush=True)
    over = [f"{r['case']}/{r['dtype']} {r['auto_over_fastest']:.3f}" + _over_note(r) for r in results
            if r.get("auto_over_fastest", 0) > 1.03]
    print(f"wrote {json_path}; shapes over the 3% target: {over or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
