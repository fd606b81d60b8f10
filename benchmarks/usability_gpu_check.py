"""A two-minute GPU check of the usability work (issue 16 / 14) where CPU tests cannot reach: other
libraries' backend names routing to the CUDA kernels, `attnpatch info` / `inspect` / `bench` / `explain`
on a GPU machine, and the report of a patched model compiled with inductor.

    python benchmarks/usability_gpu_check.py --out "$OUT"

Writes under OUT: usability_gpu.txt (everything printed, with PASS/FAIL per check), info.json,
inspect_llama.json, bench.json, explain_padding.json. Exits 1 when a check fails. ``--allow-cpu`` runs
it on a CPU machine (a dry run of the script itself; the CUDA-only checks then report SKIP).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile

import torch

import attnpatch
from attnpatch import cli, tiny_models

FAILED = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))
    if not ok:
        FAILED.append(name)


def run_cli(*argv: str) -> tuple:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def names_on_cuda(dev: str) -> None:
    q, k, v = (torch.randn(1, 8, 2048, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    pairs = [("_native_cudnn", "sdpa_cudnn"), ("_native_flash", "sdpa_flash"), ("efficient_attention", "sdpa_efficient"),
             ("native", "sdpa"), ("MATH", "sdpa_math"), ("flash_attention_2", "flash_attn"), ("sageattn", "sage")]
    for alias, canonical in pairs:
        b = attnpatch.registry.get_backend(canonical)
        if not b.available:
            print(f"SKIP {alias} -> {canonical}: {'; '.join(b.availability())}")
            continue
        attnpatch.stats(reset=True)
        ref = attnpatch.attention_forward(q, k, v, backend=canonical)
        out = attnpatch.attention_forward(q, k, v, backend=alias)
        calls = attnpatch.stats().calls
        check(f"alias {alias} runs {canonical}", torch.equal(out, ref) and calls == {canonical: 2}, str(calls))


def compiled_report(dev: str) -> None:
    import torch._dynamo

    llama = tiny_models.build("tiny-llama").to(dev, torch.bfloat16).eval()
    x = {k: v.to(dev) for k, v in tiny_models.example_inputs("tiny-llama", llama).items()}
    with torch.no_grad():
        ref = llama(**x).logits
    torch._dynamo.reset()
    compiled = torch.compile(llama)
    patch = attnpatch.apply(compiled)
    try:
        with torch.no_grad():
            out = compiled(**x).logits
        text = str(patch.report())
        print(text)
        check("compiled tiny-llama (inductor) matches eager", torch.allclose(out.float(), ref.float(), atol=3e-2, rtol=3e-2),
              f"max abs diff {(out.float() - ref.float()).abs().max().item():.3e}")
        check("compiled sites say what was decided", "compiled: " in text and "calls not counted" in text
              and "_orig_mod" not in text)
    finally:
        patch.remove()
        torch._dynamo.reset()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--allow-cpu", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA device; pass --allow-cpu for a dry run", file=sys.stderr)
        return 2
    dev = "cuda" if cuda else "cpu"
    print(torch.__version__, torch.cuda.get_device_name() if cuda else "cpu")

    rc, out, err = run_cli("info", "--json", os.path.join(args.out, "info.json"))
    print(out)
    check("attnpatch info", rc == 0, err.strip())

    with tempfile.TemporaryDirectory() as d:
        tiny_models.build("tiny-llama").save_pretrained(os.path.join(d, "llama"))
        rc, out, err = run_cli("inspect", os.path.join(d, "llama"), "--json", os.path.join(args.out, "inspect_llama.json"))
        print(out)
        doc = json.load(open(os.path.join(args.out, "inspect_llama.json")))
        check("inspect builds LlamaForCausalLM without weights and picks for this device",
              rc == 0 and doc["class"] == "LlamaForCausalLM" and doc["picks_for"]["device"] == dev
              and all(s["picks"] for s in doc["sites"]), json.dumps(doc["picks_for"]) + " " + err.strip())

    if cuda:
        names_on_cuda(dev)
    else:
        print("SKIP aliases on CUDA kernels: no CUDA device")

    rc, out, err = run_cli("bench", "--shape", "1,8,4096,64", "--backends", "_native_cudnn,_native_flash,native" if cuda
                           else "native,math", "--no-progress", "--json", os.path.join(args.out, "bench.json"))
    print(out, err)
    rows = json.load(open(os.path.join(args.out, "bench.json")))["results"]
    check("bench reports canonical names and the spread", rc == 0 and all(
        r["backend"] in ("sdpa_cudnn", "sdpa_flash", "sdpa", "sdpa_math") and (not r["eligible"] or r["spread"] is not None)
        for r in rows))

    rc, out, err = run_cli("explain", "--shape", "4,8,4,64", "--mask", "padding", "--dtype", "bfloat16" if cuda else "float32",
                           "--json", os.path.join(args.out, "explain_padding.json"))
    print(out, err)
    check("explain --mask padding with batch == seq", rc == 0)

    compiled_report(dev)
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            sys.__stdout__.write(s)
            buf.write(s)
            return len(s)

    sys.stdout = Tee()
    try:
        code = main()
    finally:
        sys.stdout = sys.__stdout__
        out_dir = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--out=")), None) or (
            sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else os.environ.get("OUT", "."))
        with open(os.path.join(out_dir, "usability_gpu.txt"), "w", encoding="utf-8") as f:
            f.write(buf.getvalue())
    sys.exit(code)
