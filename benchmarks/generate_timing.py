"""`generate` through attnpatch vs stock transformers (issue 15): decode cost per token.

    python benchmarks/generate_timing.py --out DIR [--models qwen2.5-0.5b,llama-8b] [--new-tokens 128]

Random-weight models built from real configs (Qwen2.5-0.5B, Llama-3-8B; bf16 on CUDA), greedy
generation of ``--new-tokens`` tokens from a 32-token prompt, batch 1: stock (attn_implementation
"sdpa") vs the same model patched with ``attnpatch.apply`` (auto, the shipped recipe), with the
dynamic cache and, for the small model, with transformers' static cache under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs). Reports the median time of a few runs, ms
per generated token, the first run (compile included where there is one), whether the tokens are
identical, and attnpatch's decisions per generated token. Writes DIR/generate_timing.json and .md.
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnpatch  # noqa: E402
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, ids, new_tokens, device, repeats, **kw):
    outs, times = [], []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
        _sync(device)
        times.append(time.perf_counter() - t0)
        outs.append(out)
    return {"first_s": times[0], "median_s": statistics.median(times[1:]),
            "ms_per_token": statistics.median(times[1:]) / new_tokens * 1e3}, outs[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="qwen2.5-0.5b,llama-8b")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compiled", default="qwen2.5-0.5b", help="models also run with static cache + reduce-overhead")
    p.add_argument("--compiled-only", action="store_true", help="skip the patched dynamic-cache row (stock is the "
                   "reference for identical tokens and is always run)")
    p.add_argument("--append", action="store_true", help="keep the rows of an earlier run's generate_timing.json in --out")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    import transformers
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "new_tokens": args.new_tokens, "models": {}}
    os.makedirs(args.out, exist_ok=True)
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
        print(f"running: {name} dynamic cache / stock", flush=True)
        stock, ref = timed_generate(model, ids, args.new_tokens, device, args.repeats)
        rows["dynamic cache / stock"] = stock
        save()
        if not args.compiled_only:
            print(f"running: {name} dynamic cache / attnpatch", flush=True)
            with attnpatch.patched(model) as patch:
                before = router.DECISIONS_MADE[0]
                r, out = timed_generate(model, ids, args.new_tokens, device, args.repeats)
                r["decisions"] = router.DECISIONS_MADE[0] - before
                r["identical_tokens"] = bool(torch.equal(out, ref))
                r["backends"] = sorted({n for row in patch.report().rows for n in row.calls})
                rows["dynamic cache / attnpatch"] = r
            save()
        if name in args.compiled.split(","):
            import torch._dynamo as dynamo
            for who in ("stock", "attnpatch"):
                print(f"running: {name} static cache + reduce-overhead / {who}", flush=True)
                dynamo.reset()
                patch = attnpatch.apply(model) if who == "attnpatch" else None
                fwd = model.forward
                model.forward = torch.compile(fwd, mode="reduce-overhead", fullgraph=False)
                try:
                    r, out = timed_generate(model, ids, args.new_tokens, device, args.repeats,
                                            cache_implementation="static")
                    r["identical_tokens"] = bool(torch.equal(out, ref))
                    r["graphs"] = dynamo.utils.counters["stats"].get("unique_graphs", 0)
                    r["graph_breaks"] = sum(dynamo.utils.counters["graph_break"].values())
                    rows[f"static cache + reduce-overhead / {who}"] = r
                finally:
                    model.forward = fwd
                    if "forward" in vars(model):
                        del model.forward
                    if patch is not None:
                        patch.remove()
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
        base = {"dynamic": rows["dynamic cache / stock"]["median_s"],
                "static": rows.get("static cache + reduce-overhead / stock", {}).get("median_s")}
        for label, r in rows.items():
            b = base["static" if label.startswith("static") else "dynamic"]
            ratio = f"{r['median_s'] / b:.3f}" if b else "-"
            lines.append(f"| {name} | {label} | {r['first_s']:.2f} | {r['median_s']:.3f} | {r['ms_per_token']:.2f} | "
                         f"{ratio} | {r.get('identical_tokens', '-')} | {r.get('decisions', '-')} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "generate_timing.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
