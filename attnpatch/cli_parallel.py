"""``attnpatch demo --parallel`` and ``attnpatch bench --parallel``: context parallelism from the command
line. Both run under torchrun, one process per GPU (or per CPU process with gloo)::

    torchrun --nproc-per-node 2 -m attnpatch demo --parallel ulysses=2
    torchrun --nproc-per-node 2 -m attnpatch demo --model tiny-wan --parallel ring=2 --device cpu
    torchrun --nproc-per-node 2 -m attnpatch bench --parallel ulysses=2 --shape 1,12,32760,128

The demo runs a model whole on every process (the single-process reference and its time), then
patched with ``parallel=`` (each process holds its slice of the sequence), and prints the report, both
times and the largest output difference (process 0 prints; the others stay quiet). The bench times one
attention call of the whole shape on one process against the same call split over the processes
(`attnpatch.parallel.ContextParallelAttention`), with each one's error against a float32 reference.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
from typing import Any, List, Tuple

from .cli_common import (EXIT_FAIL, EXIT_USAGE, CliError, _dtype, _time_call, check_output_path, emit_json,
                         json_to_stdout, parse_shape, table)

LAUNCH_HINT = "e.g. torchrun --nproc-per-node 2 -m attnpatch demo --parallel ulysses=2 (add --device cpu for gloo)"


def setup(args) -> Tuple[Any, Any, bool]:
    """(the ContextParallel, this process's device, whether it is process 0); starts the process group
    from torchrun's environment when none is running."""
    import torch
    import torch.distributed as dist

    from .parallel import ContextParallel

    try:
        spec = ContextParallel.coerce(args.parallel)
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc), "e.g. --parallel ulysses=2 or --parallel ulysses=2,ring=2", EXIT_USAGE) from None
    want = (args.device or "auto").lower()
    cuda = want.startswith("cuda") or (want == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise CliError("--device cuda, but this torch sees no CUDA device", "use --device cpu (gloo)", EXIT_USAGE)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise CliError("--parallel needs several processes started by torchrun", LAUNCH_HINT, EXIT_USAGE)
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return spec, device, dist.get_rank() == 0


def _quiet_unless(main: bool):
    return contextlib.nullcontext() if main else contextlib.redirect_stdout(io.StringIO())


def demo(args, body) -> int:
    """Run the demo (``body``: cli.cmd_demo) with ``parallel=`` on every process; process 0 prints."""
    import torch.distributed as dist

    spec, device, main = setup(args)
    args.device = str(device)
    args.parallel_config = spec
    if not main:
        args.json = None  # process 0 writes the JSON document; the others would race for the same file
    try:
        with _quiet_unless(main):
            return body(args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def bench(args) -> int:
    """Time one attention call of each --shape whole on one process and split over the processes."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import attnpatch
    from .parallel import ContextParallelAttention

    if args.model:
        raise CliError("bench --parallel times attention calls of --shape b,h,s,d split over the processes",
                       "for a whole model use: torchrun ... -m attnpatch demo --model MODEL --parallel ...", EXIT_USAGE)
    if not args.shape:
        raise CliError("bench --parallel needs --shape b,h,s,d (repeatable)",
                       "e.g. --shape 1,12,32760,128 (Wan2.1-1.3B 480p x 81 frames)", EXIT_USAGE)
    check_output_path(args.json, "--json")
    spec, device, main = setup(args)
    dtype = _dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cpa = ContextParallelAttention(spec, causal=args.causal)
    rows, results = [], []
    try:
        for text in args.shape:
            b, h, s, d = parse_shape(text)
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, v = (torch.randn(b, h, s, d, generator=g).to(device, dtype) for _ in range(3))
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=args.causal)
                single = attnpatch.attention_forward(q, k, v, is_causal=args.causal)
                t_single = _time_call(lambda: attnpatch.attention_forward(q, k, v, is_causal=args.causal), device,
                                      args.warmup, args.repeat)
                ql, kl, vl = (cpa.shard(t, 2) for t in (q, k, v))
                out = cpa.gather(cpa(ql, kl, vl, is_causal=args.causal), 2)
                dist.barrier()
                t_par = _time_call(lambda: cpa(ql, kl, vl, is_causal=args.causal), device, args.warmup, args.repeat)
            err_single = ((single.float() - ref).norm() / ref.norm()).item()
            err_par = ((out.float() - ref).norm() / ref.norm()).item()
            ms1, ms2 = statistics.median(t_single) * 1e3, statistics.median(t_par) * 1e3
            results.append(dict(shape=[b, h, s, d], dtype=str(dtype).replace("torch.", ""), causal=args.causal,
                                parallel=cpa.groups.describe(), single_ms=ms1, parallel_ms=ms2, speedup=ms1 / ms2,
                                relerr_single=err_single, relerr_parallel=err_par))
            rows.append((text, f"{ms1:.3f}", f"{ms2:.3f}", f"{ms1 / ms2:.2f}x", f"{err_single:.2e}", f"{err_par:.2e}"))
        if main:
            if args.json:
                emit_json(args, {"device": str(device), "torch": torch.__version__, "results": results})
            if not json_to_stdout(args):
                print(f"context parallel: {cpa.groups.describe()}, {device.type}, {str(dtype).replace('torch.', '')}"
                      + (", causal" if args.causal else ""))
                print(table(rows, ["shape (whole)", "one process ms", "parallel ms", "speed-up", "relerr one",
                                   "relerr parallel"]))
        bad = [r for r in results if not r["relerr_parallel"] <= max(2 * r["relerr_single"], 1e-5) + 1e-3]
        return EXIT_FAIL if bad else 0
    finally:
        dist.barrier()
        dist.destroy_process_group()


def report_lines(notes: List[str]) -> List[str]:
    return [n for n in notes if n.startswith("context parallel")]
