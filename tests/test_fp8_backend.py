"""The `fp8` backend's registry entry and refusals (CPU). The kernel itself: tests/test_fp8_kernel.py."""

import dataclasses

import pytest
import torch

import attnpatch
from attnpatch.backends.fp8 import Fp8Backend
from attnpatch.call import Call
from attnpatch.kernels.fp8_emulation import emulate_fp8_attention


def _call(**kw):
    base = dict(layout="bnsd", device_type="cuda", device_index=0, capability=(9, 0), dtype=torch.bfloat16,
                batch=1, heads_q=24, heads_kv=24, seq_q=32760, seq_kv=32760, head_dim=128, head_dim_v=128)
    base.update(kw)
    return Call(**base)


def _fp8():
    """A fresh fp8 backend that counts as available (its declarations are what is tested here, on a
    machine that may have no GPU)."""
    b = Fp8Backend()
    b._availability = []
    return b


def test_registered_as_lossy_forward_only():
    info = {b.name: b for b in attnpatch.backends()}["fp8"]
    assert info.lossy and not info.backward


@pytest.mark.parametrize("change, expected", [
    (dict(capability=(8, 9)), "below the minimum 9.0"),
    (dict(capability=(10, 0)), "above the maximum 9.0"),
    (dict(head_dim=80, head_dim_v=80), "head_dim=80"),
    (dict(head_dim=64, head_dim_v=64), "not faster than cuDNN"),
    (dict(seq_q=4608, seq_kv=4608), "seq_kv=4608 is below 16384"),
    (dict(dtype=torch.float32), "dtype=float32"),
    (dict(needs_grad=True), "forward-only"),
    (dict(mask_kind="additive", mask_shape=(1, 1, 1, 32760), key_padding=True), "mask kind additive"),
    (dict(mask_kind="bool", mask_shape=(1, 1, 32760, 32760), key_padding=False), "not a key-padding mask"),
    (dict(device_type="cpu", device_index=None, capability=None), "device cpu"),
])
def test_refusals_name_the_value(change, expected):
    reasons = _fp8().not_supported_reasons(_call(**change))
    assert any(expected in r for r in reasons), reasons


def test_accepts_long_hopper_call():
    assert _fp8().not_supported_reasons(_call()) == []
    assert _fp8().not_supported_reasons(_call(heads_kv=8, is_causal=True)) == []


def test_auto_never_picks_it_without_opt_in_on_cpu():
    q = torch.randn(1, 2, 16, 64, dtype=torch.bfloat16)
    e = attnpatch.explain(q, q, q)
    assert e.backend != "fp8"
    assert any("device cpu" in r for r in e.reasons["fp8"])


def test_runner_translates_key_padding_and_scale():
    # The runner calls the registered op; on CPU the op runs the plain-torch twin of the kernel.
    torch.manual_seed(0)
    b, h, s, d = 2, 2, 40, 64
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.bfloat16) for _ in range(3))
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[1, 5:17] = False  # padding that does not start at position 0
    call = dataclasses.replace(_call(), device_type="cpu", device_index=None, capability=None, batch=b,
                               heads_q=h, heads_kv=h, seq_q=s, seq_kv=s, head_dim=d, head_dim_v=d,
                               mask_kind="bool", mask_shape=(b, 1, 1, s), key_padding=True)
    run = Fp8Backend().build(call)
    out = run(q, k, v, keep[:, None, None, :], False, 0.2, 0.0)
    want = emulate_fp8_attention(q, k, v, scale=0.2, key_padding=keep)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
