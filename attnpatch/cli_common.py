"""What every ``attnpatch`` subcommand module shares: exit codes, the user-facing error, the table
printer, the ``--json`` convention, dtype and shape parsing, and the timing loop (`attnpatch.cli` and
`attnpatch.cli_parallel` import these; neither imports the other's internals at import time)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple


EXIT_FAIL = 1


EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: one line, a hint, and an exit code."""

    def __init__(self, message: str, hint: str = "", code: int = EXIT_FAIL):
        super().__init__(message)
        self.hint = hint
        self.code = code


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain text table (left-aligned columns)."""
    cells = [[str(h) for h in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


SCHEMA_VERSION = 1


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="JSON instead of text: to stdout (no FILE, or -), or to FILE (the text is then "
                             "printed as usual)")


def json_to_stdout(args) -> bool:
    """Whether the JSON document replaces the text on stdout."""
    return getattr(args, "json", None) == "-"


def check_output_path(path: Optional[str], option: str) -> None:
    """Fail now (exit 2) when ``path`` cannot be written, before any work is done."""
    if not path or path == "-":
        return
    if os.path.isdir(path):
        raise CliError(f"{option} {path}: is a folder", "give a file path", EXIT_USAGE)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{option} {path}: the folder {folder} does not exist", "create it or give another path",
                       EXIT_USAGE)
    if (os.path.exists(path) and not os.access(path, os.W_OK)) or not os.access(folder, os.W_OK):
        raise CliError(f"{option} {path}: not writable here", "give a path you can write", EXIT_USAGE)


def emit_json(args, doc: Dict[str, Any]) -> None:
    """Print ``doc`` (with its schema version) to stdout or write it to the ``--json`` FILE."""
    doc = {"schema_version": SCHEMA_VERSION, **doc}
    if json_to_stdout(args):
        print(json.dumps(doc, indent=2, default=str))
        return
    _write_json(args.json, doc)
    print(f"wrote {args.json}")


_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float32": "float32", "fp32": "float32", "float": "float32", "float64": "float64"}


def _dtype(name: str):
    import torch

    key = _DTYPES.get(name.lower())
    if key is None:
        raise CliError(f"unknown dtype {name!r}", f"use one of: {', '.join(sorted(set(_DTYPES.values())))}", EXIT_USAGE)
    return getattr(torch, key)


def parse_shape(text: str) -> Tuple[int, int, int, int]:
    """``b,h,s,d`` (also with x or spaces) -> a tuple of four positive ints."""
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 4 or min(vals) < 1:
        raise CliError(f"--shape {text!r} is not four positive integers b,h,s,d",
                       "e.g. --shape 1,24,4608,128 (batch, heads, sequence length, head dim)", EXIT_USAGE)
    return vals  # type: ignore[return-value]


def _time_call(fn, device, warmup: int, repeat: int) -> List[float]:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _write_json(path: str, doc) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}", "check the folder exists and is writable",
                       EXIT_FAIL) from None
