"""Triton kernels of the 8-bit attention (imported lazily by fp8_attention.py).

The math is documented in fp8_emulation.py, which is this file's exact twin.
Kernels:
  _kv_stats_kernel  per-(b, kv-head) partial sums of K and V, max/min of V
  _quant_q_kernel   per-token int8 Q (scale*log2e folded in)
  _quant_kv_kernel  K smoothed + int8 per 128-token block; V smoothed + fp8 per
                    channel, stored transposed (b, h, d, s_pad) so the fp8 P@V
                    wgmma gets a K-major B operand
  _attn_fwd_kernel  flash-attention forward: int8 QK^T (int32 acc), online base-2
                    softmax, fp8 P @ fp8 V (fp32 acc)
"""
import os

import triton
import triton.language as tl

KV_BLOCK = 128
LOG2_P_SCALE = tl.constexpr(8.807354922057604)  # log2(448)
TINY = tl.constexpr(2.0 ** -40)
SENTINEL = tl.constexpr(-1073741824)  # below any int8*int8*d dot (|.| <= 127*127*256 < 2**22)


# --------------------------------------------------------------------------- stats
@triton.jit
def _kv_stats_kernel(K, V, KP, PART,
                     stride_kb, stride_kh, stride_ks, stride_kd,
                     stride_vb, stride_vh, stride_vs, stride_vd, stride_kpb,
                     HKV, SKV, TOK_PER_SPLIT, NSPLIT,
                     D: tl.constexpr, BS: tl.constexpr, HAS_KP: tl.constexpr):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_s = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    ksum = tl.zeros([BS, D], dtype=tl.float32)
    vsum = tl.zeros([BS, D], dtype=tl.float32)
    vmax = tl.full([BS, D], float("-inf"), dtype=tl.float32)
    vmin = tl.full([BS, D], float("inf"), dtype=tl.float32)
    cnt = tl.zeros([BS], dtype=tl.float32)
    t0 = split * TOK_PER_SPLIT
    t1 = tl.minimum(t0 + TOK_PER_SPLIT, SKV)
    for s0 in range(t0, t1, BS):
        rows = s0 + offs_s
        rv = rows < t1
        if HAS_KP:
            rv = rv & (tl.load(KP + b * stride_kpb + rows, mask=rv, other=0) != 0)
        m = rv[:, None]
        cnt += rv.to(tl.float32)
        kk = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                     mask=m, other=0.0).to(tl.float32)
        vv = tl.load(v_base + rows[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                     mask=m, other=0.0).to(tl.float32)
        ksum += kk
        vsum += vv
        vmax = tl.maximum(vmax, tl.where(m, vv, float("-inf")))
        vmin = tl.minimum(vmin, tl.where(m, vv, float("inf")))
    base = PART + (bh * NSPLIT + split) * 5 * D + offs_d
    tl.store(base, tl.sum(ksum, 0))
    tl.store(base + D, tl.sum(vsum, 0))
    tl.store(base + 2 * D, tl.max(vmax, 0))
    tl.store(base + 3 * D, tl.min(vmin, 0))
    tl.store(base + 4 * D, tl.zeros([D], dtype=tl.float32) + tl.sum(cnt, 0))


@triton.jit
def _round_to_bf16(x):
    # fp32 -> nearest-even bf16 value, kept in fp32 (bit trick; x finite)
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_half_away(y):
    return (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int32)


# ------------------------------------------------------------------------------ Q
@triton.jit
def _quant_q_kernel(Q, Q8, QS, qmul,
                    stride_qb, stride_qh, stride_qs, stride_qd,
                    H, SQ,
                    D: tl.constexpr, BM: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    m = (rows < SQ)[:, None]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs
                + offs_d[None, :] * stride_qd, mask=m, other=0.0).to(tl.float32)
    q = q * qmul
    amax = tl.maximum(tl.max(tl.abs(q), 1), TINY)
    inv = tl.math.div_rn(tl.full([BM], 127.0, tl.float32), amax)
    qs = tl.math.div_rn(amax, tl.full([BM], 127.0, tl.float32))
    r = _round_half_away(q * inv[:, None])
    r = tl.minimum(tl.maximum(r, -127), 127)
    tl.store(Q8 + (bh * SQ + rows[:, None]) * D + offs_d[None, :], r.to(tl.int8), mask=m)
    tl.store(QS + bh * SQ + rows, qs, mask=rows < SQ)


# ---------------------------------------------------------------------------- K, V
@triton.jit
def _quant_kv_kernel(K, V, KP, PART, K8, KS, VT8, VS, VM,
                     stride_kb, stride_kh, stride_ks, stride_kd,
                     stride_vb, stride_vh, stride_vs, stride_vd, stride_kpb,
                     HKV, SKV, SKV_PAD, NSPLIT,
                     D: tl.constexpr, BN: tl.constexpr, NSPLIT_P2: tl.constexpr,
                     QUANT_V: tl.constexpr, HAS_KP: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_d = tl.arange(0, D)
    # ---- reduce the partial statistics of this (b, h)
    sp = tl.arange(0, NSPLIT_P2)
    pm = (sp < NSPLIT)[:, None]
    pbase = PART + (bh * NSPLIT + sp[:, None]) * 5 * D + offs_d[None, :]
    ksum = tl.sum(tl.load(pbase, mask=pm, other=0.0), 0)
    cnt = tl.sum(tl.load(pbase + 4 * D, mask=pm, other=0.0), 0)
    cnt_safe = tl.maximum(cnt, 1.0)
    km = _round_to_bf16(tl.math.div_rn(ksum, cnt_safe))
    # ---- K block: smooth, int8 per block
    rows = pid * BN + tl.arange(0, BN)
    rv = rows < SKV
    if HAS_KP:
        rv = rv & (tl.load(KP + b * stride_kpb + rows, mask=rv, other=0) != 0)
    rm = rv[:, None]
    kk = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_ks
                 + offs_d[None, :] * stride_kd, mask=rm, other=0.0).to(tl.float32)
    kc = tl.where(rm, kk - km[None, :], 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(kc), 1), 0), TINY)
    inv = tl.math.div_rn(127.0, amax)
    ks = tl.math.div_rn(amax, 127.0)
    r = _round_half_away(kc * inv)
    r = tl.minimum(tl.maximum(r, -127), 127)
    tl.store(K8 + (bh * SKV_PAD + rows[:, None]) * D + offs_d[None, :], r.to(tl.int8))
    tl.store(KS + bh * (SKV_PAD // BN) + pid, ks)
    if QUANT_V:
        vsum = tl.sum(tl.load(pbase + D, mask=pm, other=0.0), 0)
        vmax = tl.max(tl.load(pbase + 2 * D, mask=pm, other=float("-inf")), 0)
        vmin = tl.min(tl.load(pbase + 3 * D, mask=pm, other=float("inf")), 0)
        vm = _round_to_bf16(tl.math.div_rn(vsum, cnt_safe))
        vamax = tl.maximum(tl.maximum(vmax - vm, vm - vmin), TINY)
        vinv = tl.math.div_rn(tl.full([D], 448.0, tl.float32), vamax)
        vsc = tl.math.div_rn(vamax, tl.full([D], 448.0, tl.float32))
        vv = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vs
                     + offs_d[None, :] * stride_vd, mask=rm, other=0.0).to(tl.float32)
        y = (vv - vm[None, :]) * vinv[None, :]
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        y = tl.where(rm, y, 0.0).to(tl.float8e4nv)
        yt = tl.trans(y)  # (D, BN)
        tl.store(VT8 + (bh * D + offs_d[:, None]) * SKV_PAD + rows[None, :], yt)
        if pid == 0:
            tl.store(VS + bh * D + offs_d, vsc)
            tl.store(VM + bh * D + offs_d, vm)


# ------------------------------------------------------------------------ attention
@triton.jit
def _exp2_f16(x):
    return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x],
                                     dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _attn_block(acc, l_i, m_i, q, qs, k_base, ks_base, v_base, kp_base,
                start_n, offs_m, offs_n, offs_d,
                SKV, SKV_PAD, stride_vs, stride_vd,
                D: tl.constexpr, BN: tl.constexpr,
                MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KP: tl.constexpr,
                EXP_F16: tl.constexpr, MAGIC: tl.constexpr, PV_FP8: tl.constexpr):
    cols = start_n + offs_n
    k = tl.load(k_base + cols[:, None] * D + offs_d[None, :])  # (BN, D) int8, padded
    ks = tl.load(ks_base + start_n // BN)
    qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32)  # (BM, BN) int32, exact
    c = qs * ks
    if MASKED or HAS_KP:
        valid = (cols < SKV)[None, :]
        if MASKED and IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        if HAS_KP:
            kp = tl.load(kp_base + cols, mask=cols < SKV, other=0)
            valid = valid & (kp != 0)[None, :]
        mx = tl.max(tl.where(valid, qk, SENTINEL), 1)
        m_blk = tl.where(mx == SENTINEL, float("-inf"), mx.to(tl.float32) * c)
    else:
        m_blk = tl.max(qk, 1).to(tl.float32) * c
    m_new = tl.maximum(m_i, m_blk)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    if MAGIC:
        fb = (qk + 0x4B400000).to(tl.float32, bitcast=True)
        arg = fb * c[:, None] - (c * 12582912.0 + (m_use - LOG2_P_SCALE))[:, None]
    else:
        arg = qk.to(tl.float32) * c[:, None] - (m_use - LOG2_P_SCALE)[:, None]
    if MASKED or HAS_KP:
        arg = tl.where(valid, arg, float("-inf"))
    if EXP_F16:
        p16 = _exp2_f16(arg.to(tl.float16))
        l_i = l_i * alpha + tl.sum(p16.to(tl.float32), 1)
        acc = acc * alpha[:, None]
        if PV_FP8:
            vt = tl.load(v_base + offs_d[:, None] * SKV_PAD + cols[None, :])  # (D, BN) fp8
            acc = tl.dot(p16.to(tl.float8e4nv), tl.trans(vt), acc)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=(cols < SKV)[:, None], other=0.0)
            acc = tl.dot(p16.to(v.dtype), v, acc)
    else:
        p = tl.math.exp2(arg)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if PV_FP8:
            vt = tl.load(v_base + offs_d[:, None] * SKV_PAD + cols[None, :])  # (D, BN) fp8
            acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=(cols < SKV)[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(Q8, QS, K8, KS, VQ, VS, VM, KP, O,
                     stride_vb, stride_vh, stride_vs, stride_vd,
                     stride_ob, stride_oh, stride_os, stride_od,
                     stride_kpb,
                     H, GROUP, SQ, SKV, SKV_PAD,
                     SQ_BUCKET, SKV_BUCKET,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, HAS_KP: tl.constexpr,
                     EXP_F16: tl.constexpr, MAGIC: tl.constexpr, PV_FP8: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    bhk = b * (H // GROUP) + hk
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    qm = offs_m < SQ
    q = tl.load(Q8 + (bh * SQ + offs_m[:, None]) * D + offs_d[None, :], mask=qm[:, None], other=0)
    qs = tl.load(QS + bh * SQ + offs_m, mask=qm, other=1.0)
    k_base = K8 + bhk * SKV_PAD * D
    ks_base = KS + bhk * (SKV_PAD // BN)
    if PV_FP8:
        v_base = VQ + bhk * D * SKV_PAD
    else:
        v_base = VQ + b * stride_vb + hk * stride_vh
    kp_base = KP + b * stride_kpb
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    if IS_CAUSAL:
        hi = tl.minimum(SKV, (pid_m + 1) * BM)
        full_end = tl.minimum((SKV // BN) * BN, ((pid_m * BM + 1) // BN) * BN)
    else:
        hi = SKV
        full_end = (SKV // BN) * BN
    for start_n in range(0, full_end, BN):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qs, k_base, ks_base, v_base, kp_base,
                                    start_n, offs_m, offs_n, offs_d,
                                    SKV, SKV_PAD, stride_vs, stride_vd,
                                    D, BN, False, IS_CAUSAL, HAS_KP, EXP_F16, MAGIC, PV_FP8)
    for start_n in range(full_end, hi, BN):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qs, k_base, ks_base, v_base, kp_base,
                                    start_n, offs_m, offs_n, offs_d,
                                    SKV, SKV_PAD, stride_vs, stride_vd,
                                    D, BN, True, IS_CAUSAL, HAS_KP, EXP_F16, MAGIC, PV_FP8)
    pos = l_i > 0
    l_safe = tl.where(pos, l_i, 1.0)
    o = acc / l_safe[:, None]
    if PV_FP8:
        vs = tl.load(VS + bhk * D + offs_d)
        vm = tl.load(VM + bhk * D + offs_d)
        o = o * vs[None, :] + vm[None, :]
    o = tl.where(pos[:, None], o, 0.0)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
             + offs_d[None, :] * stride_od, o.to(O.dtype.element_ty), mask=qm[:, None])


# ---------------------------------------------------------------- configs / tuning
#: The config measured fastest on every shape of the sweeps, per compute capability: (64 rows, 4 warps,
#: 3 stages) on the H100 (docs/FP8_KERNEL.md) and the autotuner's own pick on the H200 at the Wan and Flux
#: shapes (docs/GPU_BACKENDS.md, 2026-11-30). On these cards the autotuner is skipped (one config
#: compiles, none is timed): on the H200 a fresh process's first call at (1, 24, 16384, 128) went from
#: 14.3 s to 9.6 s with an empty Triton cache and from 6.1 s to 4.5 s with a warm one.
MEASURED_CONFIG = {(9, 0): {"BM": 64, "num_warps": 4, "num_stages": 3}}


def _configs():
    # ATTNPATCH_FP8_AUTOTUNE: "0" = always the first config, "1" = always autotune, unset = the measured
    # config on the cards in MEASURED_CONFIG, autotune elsewhere.
    if os.environ.get("ATTNPATCH_FP8_AUTOTUNE") == "0":
        return [triton.Config({"BM": 64}, num_warps=4, num_stages=3)]
    return [
        triton.Config({"BM": 64}, num_warps=4, num_stages=3),
        triton.Config({"BM": 64}, num_warps=4, num_stages=2),
        triton.Config({"BM": 128}, num_warps=8, num_stages=3),
        triton.Config({"BM": 128}, num_warps=8, num_stages=2),
    ]


def measured_config(capability) -> "tuple | None":
    """(BM, num_warps, num_stages) measured fastest on a card of this compute capability, or None (then
    the autotuner times the configs). ATTNPATCH_FP8_AUTOTUNE=1 always autotunes."""
    if os.environ.get("ATTNPATCH_FP8_AUTOTUNE") == "1":
        return None
    c = MEASURED_CONFIG.get(tuple(capability))
    return None if c is None else (c["BM"], c["num_warps"], c["num_stages"])


def _prune(configs, named_args, **kwargs):
    # no point in 128-row tiles for tiny query counts
    sq = named_args["SQ"]
    out = [c for c in configs if c.kwargs["BM"] <= max(64, triton.next_power_of_2(sq))]
    return out or configs[:1]


def _disk_cache_kwargs():
    # Triton >= 3.3 can keep the autotuner's choice per key on disk (in its cache dir,
    # keyed by the kernel's source and the configs), so a new process does not re-time.
    import inspect
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


_attn_fwd = triton.autotune(
    configs=_configs(),
    key=["D", "SQ_BUCKET", "SKV_BUCKET", "IS_CAUSAL", "HAS_KP", "EXP_F16", "MAGIC", "PV_FP8"],
    prune_configs_by={"early_config_prune": _prune},
    **_disk_cache_kwargs(),
)(_attn_fwd_kernel)
