"""Check that the fp8 kernel's autotuning is kept on disk between processes (sm90 GPU).

    python3 benchmarks/fp8_autotune_cache.py            # runs itself twice, in fresh processes

Each child times its first fp8_attention call at (1, 24, 16384, 128) (compile + autotune, or a cache
hit) and a second one, and prints them; the parent prints both children's lines.  Triton's cache
directory is a fresh temporary one, shared by the two children.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def child() -> None:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from attnpatch.kernels.fp8_attention import fp8_attention

    q, k, v = (torch.randn(1, 24, 16384, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    t0 = time.perf_counter()
    fp8_attention(q, k, v)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    fp8_attention(q, k, v)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"first call {t1 - t0:.3f} s, second call {t2 - t1:.4f} s", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
        return
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, TRITON_CACHE_DIR=d)
        for run in ("process 1 (cold cache)", "process 2 (warm cache)"):
            out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
            print(run + ":", out.stdout.strip() or out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
