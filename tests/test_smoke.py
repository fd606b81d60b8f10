"""Smoke tests of the public API: the seed's example and the basics every other test builds on."""

import torch
import torch.nn.functional as F

import attnpatch


def seed_attention(query, key, value):
    scale_factor = 1 / query.size(-1) ** 0.5
    attn_weight = query @ key.transpose(-2, -1) * scale_factor
    attn_weight = torch.softmax(attn_weight, dim=-1)
    return attn_weight @ value


def test_seed_example_runs_with_attnpatch():
    # The seed document's example, with CPU tensors instead of CUDA ones.
    query = torch.rand(32, 8, 128, 64, dtype=torch.bfloat16)
    key = torch.rand(32, 8, 128, 64, dtype=torch.bfloat16)
    value = torch.rand(32, 8, 128, 64, dtype=torch.bfloat16)
    output_1 = seed_attention(query, key, value)
    output_2 = attnpatch.attention_forward(query, key, value)
    diff = (output_1 - output_2).abs().mean().item()
    assert diff < 5e-3, diff


def test_auto_on_cpu_matches_sdpa_and_counts():
    q, k, v = (torch.randn(2, 4, 17, 32) for _ in range(3))
    out = attnpatch.attention_forward(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert attnpatch.stats().calls == {"sdpa": 1}


def test_backends_lists_builtins_with_reasons():
    infos = {b.name: b for b in attnpatch.backends()}
    for name in ("sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "eager"):
        assert name in infos
    assert infos["sdpa"].available and infos["sdpa"].backward and not infos["sdpa"].lossy
