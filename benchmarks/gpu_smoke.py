"""A one-minute check of the routed fp8 backend on a real Hopper GPU: layouts (bnsd and a bsnd view),
a key-padding mask, the lossy opt-in of auto, and the error against the exact kernel.

    python benchmarks/gpu_smoke.py
"""

import torch

import attnpatch


def relerr(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    print(torch.cuda.get_device_name(), torch.__version__)
    b, h, s, d = 1, 8, 16384, 128
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    exact = attnpatch.attention_forward(q, k, v, backend="sdpa")
    out = attnpatch.attention_forward(q, k, v, backend="fp8")
    print("fp8 bnsd relerr", round(relerr(out, exact), 4))
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))  # bsnd views
    out_s = attnpatch.attention_forward(qs, ks, vs, layout="bsnd", backend="fp8")
    print("fp8 bsnd relerr", round(relerr(out_s.transpose(1, 2), exact), 4))
    keep = torch.ones(b, s, dtype=torch.bool, device=dev)
    keep[:, 100:3000] = False
    m_exact = attnpatch.attention_forward(q, k, v, attn_mask=keep, backend="sdpa")
    m_out = attnpatch.attention_forward(q, k, v, attn_mask=keep, backend="fp8")
    print("fp8 key-padding relerr", round(relerr(m_out, m_exact), 4))
    print("auto without opt-in:", attnpatch.explain(q, k, v).backend)
    with attnpatch.use_backend(allow_lossy=True):
        print("auto with allow_lossy:", attnpatch.explain(q, k, v).backend)
    print(attnpatch.stats())


if __name__ == "__main__":
    main()
