"""Where a patched decode step spends its time, beside stock transformers (issue 15).

    python benchmarks/profile_decode.py --out DIR [--models qwen2.5-0.5b] [--steps 32]

For each model (random weights, real config, bf16 on CUDA; see generate_timing.py): a 32-token
prefill, then decode steps called directly (``model(next_token, past_key_values=cache)``), stock
(``attn_implementation="sdpa"``) and under ``attnpatch.patched(model)``:

* time per decode step (median over ``--steps`` steps, each synchronised);
* the first host-device synchronisation inside one decode step, with its Python stack
  (``torch.cuda.set_sync_debug_mode("error")``), or "none";
* the aten operators and CUDA kernels of 8 decode steps (torch.profiler, counts and times);
* the Python functions of 8 decode steps by own time (cProfile).

Writes DIR/profile_decode.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attnpatch  # noqa: E402
from _timing import sync  # noqa: E402
from generate_timing import build  # noqa: E402


class Decoder:
    """A prefilled cache and one decode step at a time (the same token each step, so stock and patched
    see the same shapes)."""

    def __init__(self, model, device):
        self.model = model
        self.device = device
        ids = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            out = model(ids, use_cache=True)
        self.cache = out.past_key_values
        self.token = out.logits[:, -1:].argmax(-1)
        # kept on the device and advanced there: the step itself makes no host-to-device copy
        self.position = torch.tensor([ids.shape[1]], device=device)

    def step(self):
        with torch.no_grad():
            out = self.model(self.token, past_key_values=self.cache, use_cache=True, cache_position=self.position)
        self.position = self.position + 1
        return out.logits


def _step_times(model, device, steps):
    dec = Decoder(model, device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        dec.step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def profile(model, device, steps, label, lines):
    lines.append(f"\n## {label}\n")
    # the same key lengths twice: the first pass meets each length for the first time (as a new prompt
    # does), the second meets lengths seen before (as a benchmark repeating one prompt does)
    for which in ("new key lengths", "key lengths seen before"):
        times = _step_times(model, device, steps)
        lines.append(f"decode step, {which}: median {statistics.median(times):.3f} ms, min {min(times):.3f} ms "
                     f"over {steps} steps (each synchronised)")
    dec = Decoder(model, device)
    for _ in range(4):
        dec.step()
    # the same steps back to back, one sync at the end (what generate's queue sees)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        dec.step()
    sync(device)
    lines.append(f"back to back: {(time.perf_counter() - t0) * 1e3 / steps:.3f} ms per step")

    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            dec.step()
            lines.append("host-device sync inside a decode step: none")
        except RuntimeError as exc:
            lines.append(f"host-device sync inside a decode step: {exc}".strip())
            lines.append("".join(traceback.format_tb(exc.__traceback__)[-8:]))
        finally:
            torch.cuda.set_sync_debug_mode("default")

    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(8):
            dec.step()
        sync(device)
    events = prof.key_averages()
    lines.append("\ntorch.profiler, 8 decode steps, by count:\n")
    lines.append(events.table(sort_by="count", row_limit=40, max_name_column_width=70))
    lines.append("\nattention operators and kernels of the same 8 steps:\n")
    for e in sorted(events, key=lambda e: -e.count):
        name = e.key.lower()
        if any(w in name for w in ("attention", "fmha", "flash", "cudnn", "softmax", "bmm", "repeat", "expand",
                                   "cutlass", "gqa", "masked", "where", "sdpa")):
            lines.append(f"  {e.count:6d}  cpu {e.cpu_time_total / max(e.count, 1):9.1f} us/call  "
                         f"device {getattr(e, 'device_time_total', getattr(e, 'cuda_time_total', 0)) / max(e.count, 1):8.1f} us/call  {e.key[:150]}")
    shown = [e for e in prof.key_averages(group_by_input_shape=True) if "scaled_dot_product" in e.key]
    for e in shown[:4]:
        lines.append(f"  shapes {e.key}: {e.input_shapes} x{e.count}")

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(8):
        dec.step()
    sync(device)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    lines.append("\ncProfile, 8 decode steps, by own time:\n")
    lines.append(s.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="qwen2.5-0.5b")
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    import transformers
    lines = [f"# decode step profile: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}"]
    for name in args.models.split(","):
        model = build(name, device, dtype)
        profile(model, device, args.steps, f"{name} / stock", lines)
        with attnpatch.patched(model) as patch:
            profile(model, device, args.steps, f"{name} / attnpatch", lines)
            lines.append("\nreport:\n" + str(patch.report()))
        del model
        if cuda:
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "profile_decode.txt"), "w") as f:
        f.write(text)
    print(text[:20000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
