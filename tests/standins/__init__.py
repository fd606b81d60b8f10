"""Stand-ins for third-party attention libraries, in plain torch, for CPU contract tests.

Each stand-in implements the documented Python API of its library (same function names, argument
names and defaults, layouts, return types) and *checks* what it is given the way the real library does
(layout by shape, last-dim contiguity, dtype, GQA divisibility), so a wrapper that passes the wrong
layout or an unknown argument fails here. They compute attention in float64 with the library's own
conventions, notably flash-attn's bottom-right aligned causal mask and sliding window.

`install(monkeypatch, name, **options)` puts one into ``sys.modules`` and fakes its distribution's
version for ``importlib.metadata.version``.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
import sys
import types
from typing import Dict, Optional

import torch

CALLS: list = []  # (library function, kwargs summary) of every stand-in call, for tests to inspect
FA3_DIRECT_CALLS: list = []  # calls of the FA3 stand-in's C++ forward operator (``torch.ops.flash_attn_3.fwd``)


def _attend(q, k, v, scale, keep=None, bias=None, p=0.0, softcap=0.0):
    """q (s_q, h, d), k/v (s_kv, h_kv, d) → (s_q, h, d_v); keep (h or 1, s_q, s_kv) bool; float64 math;
    ``softcap`` > 0: flash-attn's softcapping, ``tanh(s / softcap) * softcap`` on the scaled scores."""
    hq, hk = q.shape[1], k.shape[1]
    assert hq % hk == 0, f"heads {hq} not a multiple of kv heads {hk}"
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    dead = torch.isneginf(m)
    w = torch.exp(s - torch.where(dead, torch.zeros_like(m), m))
    w = w / torch.where(dead, torch.ones_like(m), w.sum(-1, keepdim=True))
    if p > 0:
        w = torch.nn.functional.dropout(w, p)
    return torch.einsum("hqk,khd->qhd", w, v.double()).to(q.dtype)


def _fa_keep(s_q, s_kv, causal, window, device):
    """flash-attn's mask: causal bottom-right aligned; window [i + s_kv - s_q - left, i + s_kv - s_q + right]."""
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_kv, device=device)[None, :]
    shift = s_kv - s_q
    keep = torch.ones(s_q, s_kv, dtype=torch.bool, device=device)
    left, right = window
    if causal:
        right = 0
    if right >= 0:
        keep &= j <= i + shift + right
    if left >= 0:
        keep &= j >= i + shift - left
    return keep[None]


def _check_fa(q, k, v, dims):
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.dim() == dims, f"{name} must be {dims}-D, got {tuple(t.shape)}"
        assert t.stride(-1) == 1, f"{name} last dim must be contiguous"
    assert q.dtype in (torch.float16, torch.bfloat16), f"flash-attn supports fp16/bf16 only, got {q.dtype}"
    assert q.dtype == k.dtype == v.dtype


# -- flash-attn 2: module `flash_attn` -----------------------------------------------------------------

def _fa2_window(window, seqlen_k):
    """The window FlashAttention 2 applies (its C++ API, flash_api.cpp): mha_fwd drops an edge >= seqlen_k
    (-1, also where it still limited a query row: more queries than keys), then set_params_fprop turns an
    open edge beside a bounded one into seqlen_k (which limits the first rows with more queries than keys:
    H200, 2026-11-30, relative error 0.17 at 256 queries / 96 keys, window (40, None))."""
    left, right = (-1 if w >= seqlen_k else w for w in window)
    if left < 0 and right >= 0:
        left = seqlen_k
    if left >= 0 and right < 0:
        right = seqlen_k
    return left, right


def _fa3_window(window, seqlen_q, seqlen_k):
    """FlashAttention 3's API (hopper/flash_api.cpp) turns a left edge >= seqlen_k - 1 and a right edge
    >= seqlen_q - 1 into -1: edges that cover every key."""
    left, right = window
    return (-1 if left >= seqlen_k - 1 else left, -1 if right >= seqlen_q - 1 else right)


def _fa2_module(fa3_edges=False):
    m = types.ModuleType("flash_attn")

    def edges(window, s_q, s_kv):
        return _fa3_window(window, s_q, s_kv) if fa3_edges else _fa2_window(window, s_kv)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        _check_fa(q, k, v, 4)
        CALLS.append(("flash_attn_func", dict(causal=causal, window_size=tuple(window_size), dropout_p=dropout_p,
                                              softcap=softcap)))
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        keep = _fa_keep(q.shape[1], k.shape[1], causal, edges(window_size, q.shape[1], k.shape[1]), q.device)
        out = torch.stack([_attend(q[b], k[b], v[b], scale, keep, p=dropout_p, softcap=softcap)
                           for b in range(q.shape[0])])
        return (out, None, None) if return_attn_probs else out

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        _check_fa(q, k, v, 3)
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        CALLS.append(("flash_attn_varlen_func", dict(causal=causal, window_size=tuple(window_size), softcap=softcap)))
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert len(cq) == len(ck) and cq[-1] <= q.shape[0] and ck[-1] <= k.shape[0]
        out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
        for b in range(len(cq) - 1):
            qs, ks = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]]
            assert qs.shape[0] <= max_seqlen_q and ks.shape[0] <= max_seqlen_k
            if ks.shape[0] == 0:
                continue  # flash-attn writes zeros for an empty key sequence
            keep = _fa_keep(qs.shape[0], ks.shape[0], causal, edges(window_size, max_seqlen_q, max_seqlen_k), q.device)
            out[cq[b]:cq[b + 1]] = _attend(qs, ks, v[ck[b]:ck[b + 1]], scale, keep, p=dropout_p, softcap=softcap)
        return (out, None, None) if return_attn_probs else out

    m.flash_attn_func = flash_attn_func
    m.flash_attn_varlen_func = flash_attn_varlen_func
    m.__version__ = "2.8.3"
    return m


# -- flash-attn 3: module `flash_attn_interface` ---------------------------------------------------------

def _fa3_dequantize(q, k, v, q_descale, k_descale, v_descale):
    """FA3's fp8 path: e4m3 q, k, v (all three), head dims a multiple of 16, descales float32 (b, h_k) or
    None (= 1); the kernel computes on x8 * descale and returns bf16. Here: dequantised to bf16."""
    assert q.dtype == k.dtype == v.dtype == torch.float8_e4m3fn, (q.dtype, k.dtype, v.dtype)
    assert q.shape[-1] % 16 == 0 and v.shape[-1] % 16 == 0, "head_size should be a multiple of 16"
    b, hk = q.shape[0], k.shape[2]
    CALLS.append(("flash_attn_func fp8", dict(descales=tuple(d is not None for d in (q_descale, k_descale, v_descale)))))

    def deq(x, descale):
        if descale is None:
            return x.to(torch.bfloat16)
        assert descale.dtype == torch.float32 and tuple(descale.shape) == (b, hk), (descale.dtype, descale.shape)
        per_head = descale.repeat_interleave(x.shape[2] // hk, dim=1)[:, None, :, None]
        return (x.float() * per_head).to(torch.bfloat16)

    return deq(q, q_descale), deq(k, k_descale), deq(v, v_descale)


#: FlashAttention 3's forward operator as hopper/flash_api.cpp declares it (flash-attention 0251105a)
FA3_FWD_SCHEMA = (
    "fwd(Tensor q, Tensor k, Tensor v, Tensor(k_new!)? k_new = None, Tensor(v_new!)? v_new = None, "
    "Tensor? q_v = None, Tensor(out!)? out = None, Tensor? cu_seqlens_q = None, Tensor? cu_seqlens_k = None, "
    "Tensor? cu_seqlens_k_new = None, Tensor? seqused_q = None, Tensor? seqused_k = None, "
    "int? max_seqlen_q = None, int? max_seqlen_k = None, Tensor? page_table = None, "
    "Tensor? kv_batch_idx = None, Tensor? leftpad_k = None, Tensor? rotary_cos = None, "
    "Tensor? rotary_sin = None, Tensor? seqlens_rotary = None, Tensor? q_descale = None, "
    "Tensor? k_descale = None, Tensor? v_descale = None, float? softmax_scale = None, "
    "bool is_causal = False, int window_size_left = -1, int window_size_right = -1, "
    "int attention_chunk = 0, float softcap = 0.0, bool is_rotary_interleaved = False, "
    "Tensor? scheduler_metadata = None, int num_splits = 0, bool? pack_gqa = None, "
    "int sm_margin = 0) -> (Tensor(out!), Tensor, Tensor, Tensor)")


def _schema_names(schema: str):
    args = schema[schema.index("(") + 1:schema.index(") ->")]
    return [re.match(r"\s*\S+\s+(\w+)", a).group(1) for a in args.split(",")]


def _fa3_forward_call(fa2, names):
    """The body of ``torch.ops.flash_attn_3.fwd`` for a stand-in: called positionally, it reads each argument
    by its name in ``names`` (so a caller that puts one in the wrong place computes something else) and
    refuses what attnpatch never passes."""
    unused = ("k_new", "v_new", "q_v", "out", "cu_seqlens_k_new", "seqused_q", "seqused_k", "page_table",
              "kv_batch_idx", "leftpad_k", "rotary_cos", "rotary_sin", "seqlens_rotary", "q_descale", "k_descale",
              "v_descale", "scheduler_metadata", "pack_gqa")

    def fwd(*args):
        assert len(args) == len(names), (len(args), len(names))
        a = dict(zip(names, args))
        assert all(a[n] is None for n in unused), {n: a[n] for n in unused if a[n] is not None}
        assert a["attention_chunk"] == 0 and a["num_splits"] == 1 and a["sm_margin"] == 0
        assert isinstance(a["softmax_scale"], float) and isinstance(a["is_causal"], bool)
        FA3_DIRECT_CALLS.append(dict(varlen=a["cu_seqlens_q"] is not None))
        kw = dict(softmax_scale=a["softmax_scale"], causal=a["is_causal"], softcap=a["softcap"],
                  window_size=(a["window_size_left"], a["window_size_right"]))
        if a["cu_seqlens_q"] is None:
            out = fa2.flash_attn_func(a["q"], a["k"], a["v"], **kw)
        else:
            out = fa2.flash_attn_varlen_func(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"],
                                             a["max_seqlen_q"], a["max_seqlen_k"], **kw)
        return out, torch.zeros(1), None, None

    return fwd


class _Operator:
    """A callable with a ``_schema`` (what attnpatch reads of a torch OpOverload)."""

    def __init__(self, fn, names):
        self._fn = fn
        self._schema = types.SimpleNamespace(arguments=[types.SimpleNamespace(name=n) for n in names])

    def __call__(self, *args):
        return self._fn(*args)


def _fa3_module(returns_lse: bool, fwd_schema: Optional[str] = FA3_FWD_SCHEMA):
    """``flash_attn_interface``; ``fwd_schema``: its C++ forward operator's (None: a module without one)."""
    m = types.ModuleType("flash_attn_interface")
    fa2 = _fa2_module(fa3_edges=True)

    def _ret(out, lse_shape, return_attn_probs):
        lse = torch.zeros(lse_shape)
        if returns_lse:  # early FA3 releases always returned (out, softmax_lse)
            return out, lse
        return (out, lse) if return_attn_probs else out

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
        if q.dtype == torch.float8_e4m3fn:
            q, k, v = _fa3_dequantize(q, k, v, q_descale, k_descale, v_descale)
        out = fa2.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                  softcap=softcap)
        return _ret(out, (q.shape[0], q.shape[2], q.shape[1]), return_attn_probs)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                               return_attn_probs=False):
        assert seqused_q is None and seqused_k is None
        out = fa2.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                         softcap=softcap)
        return _ret(out, (q.shape[1], q.shape[0]), return_attn_probs)

    m.flash_attn_func = flash_attn_func
    m.flash_attn_varlen_func = flash_attn_varlen_func
    if fwd_schema is not None:
        names = _schema_names(fwd_schema)
        fwd = _Operator(_fa3_forward_call(fa2, names), names)
        m.flash_attn_3_gpu = types.SimpleNamespace(fwd=types.SimpleNamespace(default=fwd))
    return m


# -- flash-attn 4: module `flash_attn.cute` ---------------------------------------------------------------

def _fa4_module():
    m = types.ModuleType("flash_attn.cute")
    fa2 = _fa2_module()

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                        softcap=0.0, num_splits=1, pack_gqa=None):
        out = fa2.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)
        return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])  # FA4 always returns (out, lse)

    m.flash_attn_func = flash_attn_func
    return m


# -- xformers: module `xformers.ops` ----------------------------------------------------------------------

def _xformers_module():
    m = types.ModuleType("xformers.ops")

    class AttentionBias:
        pass

    class LowerTriangularMask(AttentionBias):
        """Top-left aligned causal mask (xformers' LowerTriangularMask, also for s_q != s_kv)."""

        def materialize(self, shape, dtype=torch.float32, device="cpu"):
            t = torch.ones(shape[-2:], dtype=torch.float32, device=device).tril()
            return torch.log(t).to(dtype)

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                   output_dtype=None):
        for name, t in (("query", query), ("key", key), ("value", value)):
            assert t.dim() in (4, 5), f"{name}: BMHK or BMGHK expected, got {tuple(t.shape)}"
            assert t.stride(-1) == 1
        assert query.dim() == key.dim() == value.dim()
        five = query.dim() == 5
        if five:  # [B, M, G, H, K]: must be broadcast already (xformers does not broadcast)
            assert key.shape[2:4] == query.shape[2:4], "BMGHK: key must be expanded to the query's heads"
            B, Mq, G, Hg, K = query.shape
            q, k, v = (t.reshape(t.shape[0], t.shape[1], G * Hg, t.shape[-1]) for t in (query, key, value))
        else:
            assert key.shape[2] == query.shape[2], "BMHK: xformers does not broadcast heads"
            q, k, v = query, key, value
        B, Mq, H, K = q.shape
        Mk = k.shape[1]
        scale = scale if scale is not None else K ** -0.5
        bias = None
        if isinstance(attn_bias, torch.Tensor):
            assert attn_bias.dtype == query.dtype, f"bias dtype {attn_bias.dtype} != query dtype {query.dtype}"
            assert attn_bias.stride(-1) == 1
            assert attn_bias.stride(-2) % 8 == 0, "attn_bias is not correctly aligned (stride(-2) % 8 != 0)"
            if five:
                assert attn_bias.shape == (B, G, Hg, Mq, Mk)
                bias = attn_bias.reshape(B, G * Hg, Mq, Mk)
            else:
                assert attn_bias.shape == (B, H, Mq, Mk), f"bias shape {tuple(attn_bias.shape)} != {(B, H, Mq, Mk)}"
                bias = attn_bias
        elif isinstance(attn_bias, LowerTriangularMask):
            bias = attn_bias.materialize((Mq, Mk), dtype=torch.float64).expand(B, H, Mq, Mk)
        else:
            assert attn_bias is None, f"unsupported attn_bias {attn_bias!r}"
        CALLS.append(("memory_efficient_attention", dict(bias=type(attn_bias).__name__, five=five, p=p)))
        out = torch.stack([_attend(q[b], k[b], v[b], scale, bias=None if bias is None else bias[b], p=p)
                           for b in range(B)])
        if bias is not None:  # like the CUDA kernels: an all -inf row is NaN, not zeros
            out = torch.where(torch.isneginf(bias.double()).all(-1).permute(0, 2, 1)[..., None],
                              torch.full((), float("nan"), dtype=out.dtype), out)
        return out.reshape(query.shape[:-1] + (value.shape[-1],))

    m.AttentionBias = AttentionBias
    m.LowerTriangularMask = LowerTriangularMask
    m.memory_efficient_attention = memory_efficient_attention
    return m


# -- SageAttention: module `sageattention` (1.x and 2.x APIs) --------------------------------------------

def _sage_module(version: int, mutate_k: bool):
    m = types.ModuleType("sageattention")
    core = types.ModuleType("sageattention.core")

    def _sage(fn, q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
        assert q.device == k.device == v.device
        assert q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "Last dim of qkv must be contiguous."
        assert tensor_layout in ("HND", "NHD")
        if version == 1:
            assert q.size(-1) in (64, 96, 128), "headdim should be in [64, 96, 128]."
        seq_dim = 1 if tensor_layout == "NHD" else 2
        if smooth_k:
            km = k.mean(dim=seq_dim, keepdim=True)
            if mutate_k:
                k -= km  # sageattention 1.x does exactly this, on the caller's tensor
            else:
                k = k - km
        CALLS.append((fn, dict(tensor_layout=tensor_layout, is_causal=is_causal, smooth_k=smooth_k, **kwargs)))
        if tensor_layout == "HND":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
        keep = None
        if is_causal:
            assert q.shape[1] == k.shape[1], "causal only for qo_len == kv_len"
            keep = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()[None]
        out = torch.stack([_attend(q[b], k[b], v[b], scale, keep) for b in range(q.shape[0])])
        return out.transpose(1, 2).contiguous() if tensor_layout == "HND" else out

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
        return _sage("sageattn", q, k, v, tensor_layout, is_causal, sm_scale, smooth_k)

    m.sageattn = sageattn
    if version >= 2:
        def explicit(name, **defaults):
            def fn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, return_lse=False,
                   **kwargs):
                out = _sage(name, q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, **kwargs)
                return (out, None) if return_lse else out
            fn.__name__ = name
            return fn
        for name in ("sageattn_qk_int8_pv_fp16_triton", "sageattn_qk_int8_pv_fp16_cuda",
                     "sageattn_qk_int8_pv_fp8_cuda", "sageattn_qk_int8_pv_fp8_cuda_sm90"):
            setattr(m, name, explicit(name))
        core.SM80_ENABLED = core.SM89_ENABLED = core.SM90_ENABLED = True
    m.core = core
    return m


def _sage3_module():
    m = types.ModuleType("sageattn3")

    def sageattn3_blackwell(q, k, v, attn_mask=None, is_causal=False, per_block_mean=True, **kwargs):
        assert attn_mask is None
        assert q.shape[1] == k.shape[1], "sageattn3: equal head counts"
        k -= k.mean(dim=-2, keepdim=True)  # as upstream: in place
        CALLS.append(("sageattn3_blackwell", dict(is_causal=is_causal)))
        scale = q.shape[-1] ** -0.5  # fixed: no scale argument upstream
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()[None] if is_causal else None
        return torch.stack([_attend(qt[b], kt[b], vt[b], scale, keep) for b in range(q.shape[0])]).transpose(1, 2).contiguous()

    m.sageattn3_blackwell = sageattn3_blackwell
    return m


#: backend name -> (module names to install, distribution name, version, factory)
LIBRARIES = {
    "flash_attn": ("flash-attn", "2.8.3"),
    "flash_attn3": ("flash_attn_3", "3.0.0b1"),
    "flash_attn3_fp8": ("flash_attn_3", "3.0.0b1"),
    "flash_attn4": ("flash-attn-4", "4.0.0b36"),
    "xformers": ("xformers", "0.0.35"),
    "sage": ("sageattention", "1.0.6"),
    "sage_fp16_triton": ("sageattention", "2.2.0"),
    "sage_fp16_cuda": ("sageattention", "2.2.0"),
    "sage_fp8_cuda": ("sageattention", "2.2.0"),
    "sage_fp8_cuda_sm90": ("sageattention", "2.2.0"),
    "sage3": ("sageattn3", "1.0.0"),
}


def _fa3_config_module(disabled) -> types.ModuleType:
    """FA3's ``flash_attn_config`` as its setup.py writes it, with the FLASHATTENTION_DISABLE_<X> switches
    of ``disabled`` (names such as "SOFTCAP", "BACKWARD", "HDIM256") on."""
    switches = ("BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16", "FP8", "VARLEN",
                "CLUSTER", "HDIM64", "HDIM96", "HDIM128", "HDIM192", "HDIM256", "SM8x")
    unknown = set(disabled) - set(switches)
    assert not unknown, unknown
    m = types.ModuleType("flash_attn_config")
    m.CONFIG = {"build_flags": {f"FLASHATTENTION_DISABLE_{x}": x in disabled for x in switches}}
    return m


def modules_for(backend: str, *, fa3_returns_lse: bool = False, sage_version: Optional[int] = None,
                sage_mutates_k: bool = True, fa3_disabled=None,
                fa3_fwd_schema: Optional[str] = FA3_FWD_SCHEMA) -> Dict[str, types.ModuleType]:
    """The sys.modules entries that stand in for ``backend``'s library. ``fa3_disabled``: FA3's build
    switches that were on (a ``flash_attn_config`` is written then; None: a build without that file).
    ``fa3_fwd_schema``: the schema of FA3's C++ forward operator (None: the module exposes none)."""
    if backend == "flash_attn":
        return {"flash_attn": _fa2_module()}
    if backend in ("flash_attn3", "flash_attn3_fp8"):
        mods = {"flash_attn_interface": _fa3_module(fa3_returns_lse, fa3_fwd_schema)}
        mods["flash_attn_config"] = _fa3_config_module(fa3_disabled) if fa3_disabled is not None else None
        return mods
    if backend == "flash_attn4":
        pkg = types.ModuleType("flash_attn")
        cute = _fa4_module()
        pkg.cute = cute
        return {"flash_attn": pkg, "flash_attn.cute": cute}
    if backend == "xformers":
        pkg = types.ModuleType("xformers")
        ops = _xformers_module()
        pkg.ops = ops
        return {"xformers": pkg, "xformers.ops": ops}
    if backend.startswith("sage") and backend != "sage3":
        ver = sage_version if sage_version is not None else (1 if backend == "sage" else 2)
        m = _sage_module(ver, mutate_k=sage_mutates_k and ver == 1)
        return {"sageattention": m, "sageattention.core": m.core}
    if backend == "sage3":
        return {"sageattn3": _sage3_module()}
    raise KeyError(backend)


def fake_versions(monkeypatch, versions: Dict[str, Optional[str]]) -> None:
    """Make importlib.metadata.version report ``versions`` (None = not installed) for those names."""
    real = importlib.metadata.version

    def version(name):
        key = name.replace("_", "-").lower()
        for dist, ver in versions.items():
            if dist.replace("_", "-").lower() == key:
                if ver is None:
                    raise importlib.metadata.PackageNotFoundError(name)
                return ver
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def install(monkeypatch, backend: str, version: Optional[str] = None, **options) -> Dict[str, types.ModuleType]:
    """Put the stand-in library of ``backend`` into sys.modules and fake its installed version."""
    dist, default = LIBRARIES[backend]
    if backend == "sage" and options.get("sage_version") == 2:
        default = "2.2.0"
    mods = modules_for(backend, **options)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    fake_versions(monkeypatch, {dist: version or default})
    return mods
