"""`fp8`: attnpatch's own 8-bit attention kernel for Hopper (Triton; `attnpatch.kernels.fp8_attention`).

int8 Q·Kᵀ (per-token Q, per-block K after smoothing K by its token mean) and fp8-e4m3 P·V with fp32
accumulation. Lossy (3.4-4.8% relative error on random normal inputs, measured on an H100 and an
H200; see docs/FP8_KERNEL.md), forward only, sm90 only. Where it takes a call, it was measured
1.08-1.35x faster than cuDNN bf16 on an H100, quantization included. It declines calls where it was
measured slower than cuDNN's bf16 kernel (sequences below 16384 tokens, head_dim 64), so auto with
``allow_lossy=True`` and recipes fall back to the exact kernels there. The kernel module (and Triton) load at first use.
"""

from __future__ import annotations

import importlib.util
from typing import List

import torch

from ..call import Call
from ..registry import Backend


def _kernels():
    from ..kernels import fp8_attention as k
    return k


class Fp8Backend(Backend):
    NAME = "fp8"
    DESCRIPTION = "attnpatch's int8-QK / fp8-PV Triton kernel for Hopper (lossy, forward only)"
    LOSSY = True
    SUPPORTS_BACKWARD = False
    SUPPORTS_DROPOUT = False
    SUPPORTS_V_HEAD_DIM_DIFFERENT = False
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    SUPPORTED_MASKS = frozenset({"none", "bool"})
    KEY_PADDING_MASKS_ONLY = True
    MIN_HEAD_DIM = 64
    MAX_HEAD_DIM = 128
    HEAD_DIM_MULTIPLE = 64
    CUDA_MIN_CAPABILITY = (9, 0)
    CUDA_MAX_CAPABILITY = (9, 0)
    #: measured slower than cuDNN bf16 below this on an H100 and an H200 (docs/FP8_KERNEL.md)
    MIN_SEQ_KV = 16384
    MIN_SEQ_KV_WHY = "where it beats cuDNN bf16 (below, cuDNN is faster)"
    NATIVE_LAYOUT = "bnsd"
    AUTO_PRIORITY = {"cuda_sm90": 5}  # ahead of cuDNN, but only ever with the lossy opt-in
    TOLERANCE = {torch.float16: 5e-2, torch.bfloat16: 5e-2}

    def probe(self) -> List[str]:
        if importlib.util.find_spec("triton") is None:
            return ["package triton is not installed (it ships with CUDA builds of torch)"]
        return []

    def version(self):
        try:
            import triton
            return f"triton {triton.__version__}"
        except ImportError:
            return None

    def extra_reasons(self, call: Call) -> List[str]:
        k = _kernels()
        reasons = []
        if call.head_dim not in k.SPEED_HEAD_DIMS:
            reasons.append(f"head_dim={call.head_dim} is correct but not faster than cuDNN bf16 here (faster at: 128)")
        if call.seq_q < k.MIN_SEQ_LEN_Q:
            reasons.append(f"seq_q={call.seq_q} is below {k.MIN_SEQ_LEN_Q}, where cuDNN bf16 is faster")
        return reasons

    def build(self, call: Call):
        op = _kernels()
        scale = call.scale if call.scale is not None else call.head_dim ** -0.5
        batch, seq_kv = call.batch, call.seq_kv
        fn = torch.ops.attnpatch.fp8_attention

        def run(q, k, v, m, c, s, p):
            pad = None if m is None else m[:, 0, 0, :].expand(batch, seq_kv)
            return fn(q, k, v, pad, scale if s is None else float(s), bool(c), "bnsd", True)
        return run
