"""What a torch.compile'd decoding step costs on the host besides its graph: dynamo's guards and wrapper,
stock transformers against attnpatch (issue 15).

    python benchmarks/compiled_guard_overhead.py [--layers 24] [--rounds 4] [--calls 200] [--kinds]

A Qwen2 model with the given number of layers and a tiny width (random weights, CPU, a static cache of
64 positions) is compiled with a backend that runs the captured graph once and then returns that
result for every call: a compiled call then costs only dynamo's guard evaluation and its wrapper. Under
CUDA graphs (``mode="reduce-overhead"``) a small model's decoding step is host-bound, so this is the part
of its time attnpatch can add (docs/GENERATE.md, fourth run: 1.050x stock on an H200 for Qwen2.5-0.5B).

Timings on a shared CPU are noisy; the counts printed first are deterministic and rank changes:

* guard tree nodes (dynamo's checks and the accessors that reach the checked values; each costs every
  compiled call, in C++), per kind with ``--kinds``;
* Python calls per compiled call (cProfile), and of those the ones in dynamo's guards module: lambda
  guards, which call Python in every compiled call;
* graph inputs (placeholders): under CUDA graphs the inputs that are not static are copied every replay.

Then the guard check alone (dynamo's guard tree evaluated in a loop, stock and patched interleaved: far
less noisy than whole calls), and whole compiled calls in alternating rounds (the minimum over 5 batches
of ``--calls`` calls each).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import sys
import time
from collections import Counter

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


class Compiled:
    """A model compiled with `frozen`, its static cache and inputs, and what dynamo built for it: the
    guard manager of the last compilation and the frame locals it was checked against, the graph inputs."""

    def __init__(self, model):
        import torch._dynamo.guards as dynamo_guards
        import transformers

        self.cache = transformers.StaticCache(config=model.config, max_cache_len=64)
        self.ids, self.pos = torch.randint(3, 90, (1, 1)), torch.tensor([5])
        self.placeholders = []
        self.guards = None  # (guard manager, frame locals) where this torch has the testing hook
        hooked = hasattr(dynamo_guards, "guard_manager_testing_hook_fn")

        def backend(gm, inputs):
            self.placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
            return frozen(gm, inputs)

        def keep(manager, scope, _builder):  # a copy: the frame's kwargs dict is changed after the check
            self.guards = (manager, {k: dict(v) if type(v) is dict else v for k, v in scope.items()})

        if hooked:
            dynamo_guards.guard_manager_testing_hook_fn = keep
        try:
            self.fn = torch.compile(model, backend=backend, fullgraph=True)
            for _ in range(3):
                self()
        finally:
            if hooked:
                dynamo_guards.guard_manager_testing_hook_fn = None

    def __call__(self):
        with torch.no_grad():
            return self.fn(self.ids, past_key_values=self.cache, cache_position=self.pos, use_cache=True)

    def check_guards(self, n: int) -> float:
        """µs per evaluation of the guard tree (n evaluations)."""
        manager, scope = self.guards
        with torch.no_grad():  # the tree checks the grad mode
            t0 = time.perf_counter()
            for _ in range(n):
                manager.root.check(scope)
            return (time.perf_counter() - t0) / n * 1e6


def guard_nodes(manager) -> Counter:
    """The guard tree's nodes by kind: checks ("leaf ID_MATCH") and accessors ("via GetAttrGuardAccessor")."""
    out: Counter = Counter()

    def walk(mgr):
        for g in mgr.get_leaf_guards():
            out["leaf " + type(g).__name__] += 1
        if type(mgr).__name__ == "DictGuardManager":
            for pair in mgr.get_key_value_managers().values():
                for m in pair:
                    if m is not None:
                        out["via dict key/value"] += 1
                        walk(m)
        for accessor, child in zip(mgr.get_accessors(), mgr.get_child_managers()):
            out["via " + accessor.repr().split("(")[0]] += 1
            walk(child)

    walk(manager.root)
    return out


def python_calls(compiled: Compiled, calls: int = 100):
    """(Python calls per compiled call, those in dynamo's guards module)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        compiled()
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(s[1] for s in stats.values())
    in_guards = sum(s[1] for (path, _, _), s in stats.items() if path.replace("\\", "/").endswith("_dynamo/guards.py"))
    return total / calls, in_guards / calls


def time_calls(compiled: Compiled, calls: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            compiled()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--kinds", action="store_true", help="guard tree nodes per kind where stock and attnpatch differ")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    stock_model = build(args.layers)
    patched_model = copy.deepcopy(stock_model)  # a copy stays unpatched: both stay compiled side by side
    attnpatch.apply(patched_model)
    import torch._dynamo as dynamo

    dynamo.reset()
    runs = {"stock": Compiled(stock_model), "attnpatch": Compiled(patched_model)}
    print(f"{args.layers} layers, torch {torch.__version__}")
    nodes = {}
    for who, c in runs.items():
        nodes[who] = guard_nodes(c.guards[0]) if c.guards else Counter()
        total, in_guards = python_calls(c)
        print(f"{who:10s} guard tree nodes {sum(nodes[who].values()) or '?'}, Python calls per compiled call "
              f"{total:.0f} (in dynamo's guards module: {in_guards:.0f}), graph inputs {len(c.placeholders)}")
    if args.kinds:
        for kind in sorted(set(nodes["stock"]) | set(nodes["attnpatch"])):
            a, b = nodes["stock"][kind], nodes["attnpatch"][kind]
            if a != b:
                print(f"  {kind:40s} stock {a:5d}  attnpatch {b:5d}  ({b - a:+d})")
    if all(c.guards for c in runs.values()):
        checks = {who: [] for who in runs}
        for _ in range(40 * args.rounds):
            for who, c in runs.items():
                checks[who].append(c.check_guards(50))
        print("guard check alone, µs (min / median of interleaved batches): " + ", ".join(
            f"{who} {min(t):.1f} / {sorted(t)[len(t) // 2]:.1f}" for who, t in checks.items()))
    res = {who: [] for who in runs}
    for _ in range(args.rounds):
        for who, c in runs.items():
            res[who].append(time_calls(c, args.calls))
    for who, ts in res.items():
        print(f"{who:10s} µs per compiled call (guards + wrapper), per round: " + ", ".join(f"{t:.0f}" for t in ts))
    print(f"attnpatch - stock, min over rounds: {min(res['attnpatch']) - min(res['stock']):+.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
