"""`generate` through attnpatch vs stock transformers (issue 15): decode cost per token.

    python benchmarks/generate_timing.py --out DIR [--models qwen2.5-0.5b,llama-8b] [--new-tokens 128]

Random-weight models built from real configs (Qwen2.5-0.5B, Llama-3-8B; bf16 on CUDA), greedy
generation of ``--new-tokens`` tokens from a 32-token prompt, batch 1: stock (attn_implementation
"sdpa") vs the same model patched with ``attnpatch.apply`` (auto, the shipped recipe), with the
dynamic cache and, for the small model, with transformers' static cache, whose decoding forward
``generate`` compiles itself on CUDA (``mode="reduce-overhead"``: CUDA graphs). Reports the median time of a few runs, ms
per generated token, the first run (compile included where there is one), whether the tokens are
identical, and attnpatch's decisions per generated token. Writes DIR/generate_timing.json and .md.

``--fresh-processes`` runs every row in its own Python process (what a user who generates once per
process pays: CUDA start-up, torch's per-length cuDNN graph builds, attnpatch's decisions), one after
the other, each adding its row to DIR/generate_timing.json; stock's tokens are kept in DIR for the
patched rows to compare with. ``--patched auto,sdpa_flash`` adds a row per backend setting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnpatch  # noqa: E402
from _timing import sync  # noqa: E402
from attnpatch import router  # noqa: E402

CONFIGS = {
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True)),
    "llama-8b": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)),
}


def build(name, device, dtype):
    import transformers

    cls, cfg_cls, cfg = CONFIGS[name]
    config = getattr(transformers, cfg_cls)(attn_implementation="sdpa", **cfg)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, cls)(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)




def timed_generate(model, ids, new_tokens, device, repeats, **kw):
    outs, times = [], []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
        sync(device)
        times.append(time.perf_counter() - t0)
        outs.append(out)
    return {"first_s": times[0], "median_s": statistics.median(times[1:]),
            "ms_per_token": statistics.median(times[1:]) / new_tokens * 1e3}, outs[-1]


def _kernel_profile(model, ids, new_tokens, **kw) -> str:
    """The CUDA kernels of one ``generate`` (torch.profiler), by total device time, with counts and
    µs per generated token: what a compiled, graph-replayed decoding step runs."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof, torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    rows.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in rows)
    lines = [f"{new_tokens} new tokens; self device time of all kernels {total / new_tokens:.1f} us/token",
             f"{'count/token':>12} {'us/token':>9}  name"]
    for e in rows[:40]:
        lines.append(f"{e.count / new_tokens:12.2f} {e.self_device_time_total / new_tokens:9.2f}  {e.key[:140]}")
    return "\n".join(lines) + "\n"


def _compiled_interleaved(model, ids, new_tokens, device, rounds, control=False) -> dict:
    """Static cache + transformers' own compiled decoding, stock and attnpatch in alternation: a second
    copy of the model (same weights) is patched, both are compiled by their first ``generate`` and
    warmed, then each round times one ``generate`` of each, the order rotating from round to round.
    (Switching one model between patched and stock would recompile at every switch.) With ``control``,
    a third copy, unpatched ("stock copy"), runs in the same rotation: its ratio to stock is what a second
    compiled copy costs by itself (an A/A test), the floor under attnpatch's ratio. Rows: median seconds,
    ms/token, and the ratio."""
    import copy

    import torch._dynamo as dynamo

    dynamo.reset()
    for attr in ("_compiled_call", "_last_compile_config"):
        if attr in vars(model):
            delattr(model, attr)
    patched = copy.deepcopy(model)
    runs = [("stock", model), ("attnpatch", patched)]
    if control:
        runs.append(("stock copy", copy.deepcopy(model)))
    patch = attnpatch.apply(patched)
    times = {who: [] for who, _ in runs}
    outs = {}
    try:
        for i in range(rounds + 2):  # two untimed rounds: compilation, CUDA graph recording
            k = i % len(runs)
            for who, m in runs[k:] + runs[:k]:
                sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    outs[who] = m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False, cache_implementation="static")
                sync(device)
                if i >= 2:
                    times[who].append(time.perf_counter() - t0)
        decisions = sorted({str(row.compiled) for row in patch.report().rows})
    finally:
        patch.remove()
        del patched, runs
    med = {who: statistics.median(t) for who, t in times.items()}
    out = {}
    for who in times:
        out[f"static cache + reduce-overhead, interleaved / {who}"] = {
            "first_s": None, "median_s": med[who], "ms_per_token": med[who] / new_tokens * 1e3,
            "times_s": times[who], "rounds": rounds, "vs_stock": med[who] / med["stock"]}
    out["static cache + reduce-overhead, interleaved / attnpatch"].update(
        identical_to_stock_static=bool(torch.equal(outs["stock"], outs["attnpatch"])), compiled_decisions=decisions)
    return out


def padded_prompts(ids, batch):
    """``batch`` prompts from ``ids`` (1, n), prompt i left-padded over its first 4·i tokens (token 0,
    mask 0): a batch of prompts of different lengths, as a server or an eval loop batches them.
    (ids, attention_mask)."""
    n = ids.shape[1]
    ids = ids.repeat(batch, 1)
    mask = torch.ones_like(ids)
    for i in range(batch):
        pad = min(4 * i, n - 1)
        ids[i, :pad] = 0
        mask[i, :pad] = 0
    return ids, mask


def interleaved(model, ids, new_tokens, device, backends, rounds, vary_prompt=False, mask=None):
    """Steady state without drift: after one warm-up generate per setting, ``rounds`` rounds that each
    run stock and every patched setting once, in turn. With ``vary_prompt`` each round's prompt is one
    token longer than the last (every setting of a round gets the same one), so no round replays the
    previous round's key lengths and allocations. ``mask``: the prompts' attention mask (padded batch).
    {label: {"min_s", "median_s", "ms_per_token"}}."""
    settings = ["stock"] + list(backends)
    times = {s: [] for s in settings}
    base, base_mask = ids, mask
    for r in range(rounds + 1):
        if vary_prompt:
            ids = torch.cat([base, base[:, -r:] if r else base[:, :0]], dim=1)
            if base_mask is not None:
                mask = torch.cat([base_mask, torch.ones_like(base_mask[:, :r])], dim=1)
        kw = {} if mask is None else {"attention_mask": mask, "pad_token_id": 0}
        for s in settings:
            patch = attnpatch.apply(model, backend=s) if s != "stock" else None
            try:
                sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
                sync(device)
                if r:
                    times[s].append(time.perf_counter() - t0)
            finally:
                if patch is not None:
                    patch.remove()
    out = {}
    for s, ts in times.items():
        label = "dynamic cache / stock" if s == "stock" else _patched_label(s)
        out[label] = {"min_s": min(ts), "median_s": statistics.median(ts),
                      "ms_per_token": statistics.median(ts) / new_tokens * 1e3, "rounds": rounds}
    return out


def _patched_label(backend: str) -> str:
    return "dynamic cache / attnpatch" + ("" if backend == "auto" else f" backend={backend}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="qwen2.5-0.5b,llama-8b")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--patched", default="auto", help="backend settings for the patched dynamic-cache rows, comma "
                   "separated (auto, or a backend name such as sdpa_flash); empty: no patched row")
    p.add_argument("--compiled", default="qwen2.5-0.5b", help="models also run with static cache + reduce-overhead")
    p.add_argument("--compiled-only", action="store_true", help="skip the patched dynamic-cache rows (stock is the "
                   "reference for identical tokens and is always run)")
    p.add_argument("--compiled-interleaved", type=int, default=0, metavar="ROUNDS",
                   help="also time the compiled static-cache rows in alternation (stock / attnpatch on two "
                   "copies of the model), ROUNDS rounds after two untimed ones")
    p.add_argument("--compiled-control", action="store_true", help="with --compiled-interleaved: a third, unpatched "
                   "copy in the rotation (A/A: what a second compiled copy costs by itself)")
    p.add_argument("--profile-compiled", action="store_true", help="also write the CUDA kernels of one static-"
                   "cache generate per compiled row (profile_static_<model>_<who>.txt)")
    p.add_argument("--append", action="store_true", help="keep the rows of an earlier run's generate_timing.json in --out")
    p.add_argument("--fresh-processes", action="store_true", help="run every row in a new Python process")
    p.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                   help="instead: steady state, stock and each --patched setting in turn for ROUNDS rounds, "
                   "one process; writes generate_interleaved.json/.md")
    p.add_argument("--vary-prompt", action="store_true", help="with --interleaved: each round's prompt one "
                   "token longer than the last (no round replays another's lengths)")
    p.add_argument("--padded-batch", type=int, default=0, metavar="B",
                   help="with --interleaved: B prompts, prompt i left-padded by 4·i tokens (masked decoding)")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row only (used by --fresh-processes)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.fresh_processes:
        base = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--new-tokens", str(args.new_tokens),
                "--repeats", str(args.repeats), "--patched", args.patched, "--compiled", args.compiled]
        rows = ["stock"] + ([] if args.compiled_only else [b for b in args.patched.split(",") if b])
        first = not args.append
        for name in args.models.split(","):
            for row in rows:
                cmd = base + ["--models", name, "--row", row] + ([] if first else ["--append"])
                first = False
                print("running:", " ".join(cmd[2:]), flush=True)
                subprocess.run(cmd, check=False)
        return 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    import transformers
    if args.interleaved:
        return _interleaved_main(args, device, dtype)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "new_tokens": args.new_tokens,
           "fresh_processes": args.row is not None, "models": {}}
    # results are written after every row, so a run that dies (a crash inside a compiled graph) keeps the
    # rows before it; the row that was running is printed first
    previous = os.path.join(args.out, "generate_timing.json")
    if args.append and os.path.exists(previous):
        with open(previous) as f:
            res["models"] = json.load(f).get("models", {})

    def save():
        with open(previous, "w") as f:
            json.dump(res, f, indent=1)

    for name in args.models.split(","):
        model = build(name, device, dtype)
        ids = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
        rows = res["models"].setdefault(name, {})
        tokens_file = os.path.join(args.out, f"tokens_{name}.pt")
        ref = None
        if args.row in (None, "stock"):
            print(f"running: {name} dynamic cache / stock", flush=True)
            stock, ref = timed_generate(model, ids, args.new_tokens, device, args.repeats)
            rows["dynamic cache / stock"] = stock
            torch.save(ref.cpu(), tokens_file)
            save()
        elif os.path.exists(tokens_file):
            ref = torch.load(tokens_file).to(device)
        patched_rows = [b for b in args.patched.split(",") if b] if args.row is None else (
            [] if args.row == "stock" else [args.row])
        for backend in ([] if args.compiled_only else patched_rows):
            label = _patched_label(backend)
            print(f"running: {name} {label}", flush=True)
            with attnpatch.patched(model, backend=backend) as patch:
                before = router.DECISIONS_MADE[0]
                r, out = timed_generate(model, ids, args.new_tokens, device, args.repeats)
                r["decisions"] = router.DECISIONS_MADE[0] - before
                r["identical_tokens"] = bool(torch.equal(out, ref)) if ref is not None else None
                r["backends"] = sorted({n for row in patch.report().rows for n in row.calls})
                rows[label] = r
            save()
        if args.row is None and name in args.compiled.split(","):
            import torch._dynamo as dynamo
            static_ref = None
            for who in ("stock", "attnpatch"):
                # transformers' own way: with a static cache on CUDA, generate compiles the decoding
                # forward itself (CompileConfig: mode="reduce-overhead", CUDA graphs). Wrapping
                # model.forward in torch.compile as well nested two compilations (the H200 runs of
                # 2026-11-30 timed out or died with a segmentation fault in the stock row).
                print(f"running: {name} static cache + reduce-overhead / {who}", flush=True)
                dynamo.reset()
                dynamo.utils.counters.clear()
                for attr in ("_compiled_call", "_last_compile_config"):
                    if attr in vars(model):
                        delattr(model, attr)
                patch = attnpatch.apply(model) if who == "attnpatch" else None
                try:
                    r, out = timed_generate(model, ids, args.new_tokens, device, args.repeats,
                                            cache_implementation="static")
                    r["identical_tokens"] = bool(torch.equal(out, ref))
                    if who == "stock":
                        static_ref = out
                    else:  # the compiled graphs differ from eager in rounding: compare like with like
                        r["identical_to_stock_static"] = (bool(torch.equal(out, static_ref))
                                                          if static_ref is not None else None)
                        r["compiled_decisions"] = sorted({str(row.compiled) for row in patch.report().rows})
                    r["compiled_by_transformers"] = "_compiled_call" in vars(model)
                    r["graphs"] = dynamo.utils.counters["stats"].get("unique_graphs", 0)
                    r["graph_breaks"] = sum(dynamo.utils.counters["graph_break"].values())
                    if args.profile_compiled and cuda:
                        with open(os.path.join(args.out, f"profile_static_{name}_{who}.txt"), "w") as f:
                            f.write(_kernel_profile(model, ids, args.new_tokens, cache_implementation="static"))
                    rows[f"static cache + reduce-overhead / {who}"] = r
                finally:
                    if patch is not None:
                        patch.remove()
                save()
        if args.row is None and args.compiled_interleaved and name in args.compiled.split(","):
            rows.update(_compiled_interleaved(model, ids, args.new_tokens, device, args.compiled_interleaved,
                                              control=args.compiled_control))
            save()
        print(name, json.dumps(rows, indent=1), flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    lines = [f"# generate: stock vs attnpatch ({res['device']}, torch {res['torch']}, transformers "
             f"{res['transformers']}, {res['date']})", "",
             f"Greedy, batch 1, 32-token prompt, {args.new_tokens} new tokens; median of {args.repeats} runs after one.", "",
             "| model | run | first run (s) | median (s) | ms/token | vs stock | identical tokens | decisions |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for name, rows in res["models"].items():
        base = {"dynamic": rows.get("dynamic cache / stock", {}).get("median_s"),
                "static": rows.get("static cache + reduce-overhead / stock", {}).get("median_s"),
                "interleaved": rows.get("static cache + reduce-overhead, interleaved / stock", {}).get("median_s")}
        for label, r in rows.items():
            b = base["interleaved" if "interleaved" in label else "static" if label.startswith("static") else "dynamic"]
            ratio = f"{r['median_s'] / b:.3f}" if b else "-"
            first = "-" if r["first_s"] is None else f"{r['first_s']:.2f}"
            lines.append(f"| {name} | {label} | {first} | {r['median_s']:.3f} | {r['ms_per_token']:.2f} | "
                         f"{ratio} | {r.get('identical_tokens', '-')} | {r.get('decisions', '-')} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "generate_timing.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def _interleaved_main(args, device, dtype) -> int:
    import transformers

    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "new_tokens": args.new_tokens, "models": {}}
    backends = [b for b in args.patched.split(",") if b]
    lines = [f"# generate, steady state, interleaved ({res['device']}, torch {res['torch']}, transformers "
             f"{res['transformers']}, {res['date']})", "",
             f"Greedy, batch {args.padded_batch or 1}, 32-token prompt, {args.new_tokens} new tokens; one warm-up round, then "
             f"{args.interleaved} rounds each running every setting once, in turn, in one process"
             + ("; each round's prompt one token longer than the last" if args.vary_prompt else "")
             + (f"; batch {args.padded_batch}, prompt i left-padded by 4·i tokens (masked decoding)" if args.padded_batch
                else "") + ".", "",
             "| model | run | min (s) | median (s) | ms/token | median vs stock |", "|---|---|---:|---:|---:|---:|"]
    for name in args.models.split(","):
        model = build(name, device, dtype)
        ids = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
        mask = None
        if args.padded_batch:
            ids, mask = padded_prompts(ids, args.padded_batch)
            mask = mask.to(device)
        rows = interleaved(model, ids, args.new_tokens, device, backends, args.interleaved, args.vary_prompt, mask)
        res["models"][name] = rows
        base = rows["dynamic cache / stock"]["median_s"]
        for label, r in rows.items():
            lines.append(f"| {name} | {label} | {r['min_s']:.3f} | {r['median_s']:.3f} | {r['ms_per_token']:.2f} | "
                         f"{r['median_s'] / base:.3f} |")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "generate_interleaved.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "generate_interleaved.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
