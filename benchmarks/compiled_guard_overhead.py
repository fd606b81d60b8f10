"""What a torch.compile'd decoding step costs on the host besides its graph: dynamo's guards and wrapper,
stock transformers against attnpatch (issue 15).

    python benchmarks/compiled_guard_overhead.py [--layers 24] [--rounds 4] [--calls 200]

A Qwen2 model with the given number of layers and a tiny width (random weights, CPU, a static cache of
64 positions) is compiled with a backend that runs the captured graph once and then returns that
result for every call: a compiled call then costs only dynamo's guard evaluation and its wrapper. Stock
and patched are timed in alternating rounds (the minimum over 5 batches of ``--calls`` calls each). Under CUDA graphs (``mode="reduce-overhead"``)
a small model's decoding step is host-bound, so this is the part of its time attnpatch can add
(docs/GENERATE.md, fourth run: 1.050x stock on an H200 for Qwen2.5-0.5B).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnpatch  # noqa: E402


def build(layers: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      attn_implementation="sdpa")
    return transformers.Qwen2ForCausalLM(config).eval()


def frozen(gm, inputs):
    """A dynamo backend whose compiled function returns the graph's first result every time."""
    outs = gm(*inputs)
    return lambda *args: outs


def time_compiled(model, calls: int):
    import torch._dynamo as dynamo
    import transformers

    dynamo.reset()
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    ids, pos = torch.randint(3, 90, (1, 1)), torch.tensor([5])
    fn = torch.compile(model, backend=frozen, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            fn(ids, past_key_values=cache, cache_position=pos, use_cache=True)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(ids, past_key_values=cache, cache_position=pos, use_cache=True)
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = build(args.layers)
    res = {"stock": [], "attnpatch": []}
    for _ in range(args.rounds):
        res["stock"].append(time_compiled(model, args.calls))
        with attnpatch.patched(model):
            res["attnpatch"].append(time_compiled(model, args.calls))
    for who, ts in res.items():
        print(f"{who:10s} µs per compiled call (guards + wrapper), per round: " + ", ".join(f"{t:.0f}" for t in ts))
    print(f"attnpatch - stock, min over rounds: {min(res['attnpatch']) - min(res['stock']):+.0f} µs "
          f"({args.layers} layers, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
