"""Backend names from other libraries (`attnpatch.aliases`): accepted in every entry point (argument,
use_backend, apply, environment, recipe, CLI), case-insensitive, never with whitespace, refused with
what they are when attnpatch has no such kernel, and always shown as attnpatch's canonical name."""

from __future__ import annotations

import re

import pytest
import torch

import attnpatch
from attnpatch import aliases, controls, recipes, registry

from _patch_helpers import assert_restored, snapshot


def qkv(b=1, h=2, s=8, d=16):
    return torch.randn(b, h, s, d), torch.randn(b, h, s, d), torch.randn(b, h, s, d)


# -- the table -------------------------------------------------------------------------------------------

def test_every_alias_names_a_registered_backend_or_says_what_to_use():
    names = set(registry.backend_names())
    for a in aliases.ALIASES:
        assert a.name == a.name.lower() and a.name == "".join(a.name.split()), a
        assert a.name not in names, f"{a.name!r} is attnpatch's own name, not an alias"
        if a.backend is None:
            assert "use " in a.note, f"refused alias {a.name!r} must say what to use instead"
        else:
            assert a.backend in names, a
    assert len({a.name for a in aliases.ALIASES}) == len(aliases.ALIASES)
    for name, _origin in aliases.SAME_NAMES:
        assert name in names


def test_every_diffusers_backend_name_is_known():
    dispatch = pytest.importorskip("diffusers.models.attention_dispatch")
    for member in dispatch.AttentionBackendName:
        value = member.value
        if value in registry.backend_names():
            continue
        a = aliases.alias(value)
        assert a is not None, f"diffusers' {value!r} is neither an attnpatch backend nor an alias"


def test_every_transformers_attention_implementation_is_known():
    modeling_utils = pytest.importorskip("transformers.modeling_utils")
    for value in modeling_utils.AttentionInterface._global_mapping:
        assert value in registry.backend_names() or aliases.alias(value) is not None, value
    for value in ("eager", "sdpa"):
        assert value in registry.backend_names()


def test_diffsynth_and_sageattention_names_are_known():
    attention = pytest.importorskip("diffsynth.core.attention.attention")
    import inspect

    src = inspect.getsource(attention)
    for value in set(re.findall(r'ATTENTION_IMPLEMENTATION == "([a-z0-9_]+)"', src)):
        assert value in registry.backend_names() or aliases.alias(value) is not None, value
    for fn in ("sageattn", "sageattn_qk_int8_pv_fp16_cuda", "sageattn_qk_int8_pv_fp16_triton",
               "sageattn_qk_int8_pv_fp8_cuda", "sageattn_qk_int8_pv_fp8_cuda_sm90", "sageattn3"):
        assert aliases.alias(fn).backend is not None


@pytest.mark.parametrize("peer,canonical", [
    ("flash", "flash_attn"), ("native", "sdpa"), ("_native_cudnn", "sdpa_cudnn"), ("_native_flash", "sdpa_flash"),
    ("_native_efficient", "sdpa_efficient"), ("_native_math", "sdpa_math"), ("flex", "flex"),
    ("flash_attention_2", "flash_attn"), ("flash_attention_3", "flash_attn3"), ("flex_attention", "flex"),
    ("sdpa", "sdpa"), ("eager", "eager"), ("sage_attention", "sage"), ("torch", "sdpa"),
    ("sageattn_qk_int8_pv_fp16_cuda", "sage_fp16_cuda"), ("sageattn_qk_int8_pv_fp16_triton", "sage_fp16_triton"),
    ("sageattn_qk_int8_pv_fp8_cuda", "sage_fp8_cuda"), ("sageattn_qk_int8_pv_fp8_cuda_sm90", "sage_fp8_cuda_sm90"),
    ("cudnn", "sdpa_cudnn"), ("math", "sdpa_math"), ("efficient", "sdpa_efficient"), ("xformers", "xformers"),
    ("_flash_3_hub", "flash_attn3_hub"), ("SDPA", "sdpa"), ("Flash_Attention_2", "flash_attn"), ("AUTO", "auto"),
])
def test_peer_names_resolve_to_the_backend_that_runs_that_kernel(peer, canonical):
    assert aliases.canonical(peer, "test") == canonical
    expected = controls.AUTO if canonical == "auto" else (canonical,)
    assert controls.normalise_backends(peer, "test") == expected


@pytest.mark.parametrize("peer,says", [
    ("flash_hub", "use flash_attn"), ("sage_blackwell_hub", "use sage3"), ("_native_npu", "Ascend"),
    ("sageattn_qk_int8_pv_fp8_cuda++", "use sage_fp8_cuda"), ("paged|eager", "paged attention"),
    ("aiter_fa2_hub", "ROCm"),
])
def test_names_without_an_attnpatch_kernel_are_refused_with_what_they_are(peer, says):
    with pytest.raises(ValueError) as e:
        controls.normalise_backends(peer, "use_backend()")
    msg = str(e.value)
    assert msg.startswith("use_backend(): ") and f"{peer!r} is the " in msg and says in msg


@pytest.mark.parametrize("spec,says", [
    ("sdpa ", "'sdpa ' has whitespace at its start or end; backend names have none (write 'sdpa')"),
    (" sdpa", "write 'sdpa'"),
    ("sdpa flash", "contains whitespace"),
    (["sdpa "], "contains whitespace; names have no spaces; write 'sdpa'"),
    ("sdpa,,eager", "has an empty entry"),
    ("sdpa,", "has an empty entry"),
])
def test_whitespace_and_empty_entries_are_errors_that_say_so(spec, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        controls.normalise_backends(spec, "test")


def test_spaces_next_to_commas_are_list_formatting():
    assert controls.normalise_backends("sdpa_cudnn, SDPA", "test") == ("sdpa_cudnn", "sdpa")


def test_unknown_names_get_did_you_mean_including_other_libraries_names():
    with pytest.raises(ValueError, match=r"unknown attention backend 'sdpa_flsh' from test \(did you mean "
                                         r"'sdpa_flash'\?\); valid names: auto, "):
        controls.normalise_backends("sdpa_flsh", "test")
    with pytest.raises(ValueError, match=r"did you mean 'flash_attention_2' \(the transformers / DiffSynth name "
                                         r"for flash_attn\)\?"):
        controls.normalise_backends("flash_attention2", "test")


# -- every entry point ----------------------------------------------------------------------------------

def test_argument_and_use_backend_accept_aliases_and_stats_show_canonical_names():
    q, k, v = qkv()
    ref = attnpatch.attention_forward(q, k, v, backend="sdpa_math")
    attnpatch.stats(reset=True)
    out = attnpatch.attention_forward(q, k, v, backend="_native_math")
    assert torch.equal(out, ref)
    with attnpatch.use_backend("Math"):
        attnpatch.attention_forward(q, k, v)
    e = attnpatch.explain(q, k, v, backend="_NATIVE_MATH")
    assert e.backend == "sdpa_math" and e.requested == ("sdpa_math",)
    assert attnpatch.stats().calls == {"sdpa_math": 2}
    with pytest.raises(ValueError, match=r"from backend= argument \(did you mean 'sdpa_math'\?\)"):
        attnpatch.attention_forward(q, k, v, backend="sdpa_mth")


def test_environment_variables_accept_aliases_and_refuse_whitespace(monkeypatch):
    monkeypatch.setenv("ATTNPATCH_BACKEND", "Native")
    monkeypatch.setenv("ATTNPATCH_DISABLE", "_native_flash, cudnn")
    env = attnpatch.reload_env()
    assert env.backends == ("sdpa",) and env.disabled == ("sdpa_flash", "sdpa_cudnn")
    q, k, v = qkv()
    assert attnpatch.explain(q, k, v).reasons["sdpa_flash"] == ["disabled by ATTNPATCH_DISABLE"]
    monkeypatch.setenv("ATTNPATCH_BACKEND", "sdpa ")
    with pytest.raises(ValueError, match=r"environment variable ATTNPATCH_BACKEND: 'sdpa ' has whitespace"):
        attnpatch.reload_env()
    monkeypatch.setenv("ATTNPATCH_BACKEND", "flsh_attn")
    with pytest.raises(ValueError, match=r"'flsh_attn' from environment variable ATTNPATCH_BACKEND \(did you mean "
                                         r"'flash_attn'\?\)"):
        attnpatch.reload_env()
    monkeypatch.setenv("ATTNPATCH_BACKEND", "auto")
    monkeypatch.setenv("ATTNPATCH_DISABLE", "auto")
    with pytest.raises(ValueError, match="auto cannot be disabled"):
        attnpatch.reload_env()


def test_recipes_accept_aliases_and_refuse_names_without_a_kernel():
    rec = recipes.loads("version: 1\nname: t\ndefault_backend: [_native_cudnn, SDPA]\nrules:\n"
                        "  - pattern: '**'\n    backend: flash_attention_2\n", "t.yaml")
    assert rec.default_backend == ("sdpa_cudnn", "sdpa") and rec.rules[0].backend == ("flash_attn",)
    with pytest.raises(recipes.RecipeError, match=r"t.yaml:5: rules\[0\].backend: 'flash_hub' is the diffusers name "
                                                  r"for FlashAttention 2 prebuilt from the hub"):
        recipes.loads("version: 1\nname: t\nrules:\n  - pattern: '**'\n    backend: flash_hub\n", "t.yaml")
    with pytest.raises(recipes.RecipeError, match=r"rules\[0\].backend: 'sdpa ' has whitespace"):
        recipes.loads("version: 1\nname: t\nrules:\n  - pattern: '**'\n    backend: 'sdpa '\n", "t.yaml")
    with pytest.raises(recipes.RecipeError, match=r"unknown backend 'flash_atention_2' \(did you mean "
                                                  r"'flash_attention_2' \(the transformers / DiffSynth name"):
        recipes.loads("version: 1\nname: t\nrules:\n  - pattern: '**'\n    backend: [sdpa, flash_atention_2]\n", "t.yaml")


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = 2
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 32)


def test_apply_and_update_store_and_report_canonical_names():
    model = torch.nn.Sequential(_Attn(), _Attn())
    before = snapshot(model)
    patch = attnpatch.apply(model, backend="_NATIVE_MATH", recipe=False)
    assert patch.settings.backend == "sdpa_math" and "backend='sdpa_math'" in repr(patch)
    with torch.no_grad():
        model(torch.randn(1, 4, 32))
    text = str(patch.report())
    assert "0 [torch_sdpa, self] -> sdpa_math×1  [apply() → sdpa_math]" in text
    patch.update(backend=["cudnn", "Math"])
    assert patch.settings.backend == ("sdpa_cudnn", "sdpa_math")
    assert "[apply() → sdpa_cudnn,sdpa_math]" in str(patch.report())
    with pytest.raises(ValueError, match=r"attnpatch.apply\(backend=...\): 'paged\|eager' is the transformers name"):
        attnpatch.apply(model, backend="paged|eager", recipe=False)
    patch.remove()
    assert_restored(model, before)


def test_cli_takes_aliases_and_shows_the_table(capsys):
    from attnpatch import cli

    rc = cli.main(["explain", "--shape", "1,2,16,16", "--backend", "_native_math", "--json"])
    out = capsys.readouterr().out
    import json

    assert rc == 0 and json.loads(out)["backend"] == "sdpa_math"
    rc = cli.main(["info"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^  sdpa_cudnn\s+<- _native_cudnn \(diffusers\)", out, re.M)
    assert "flash_hub (diffusers): FlashAttention 2 prebuilt from the hub" in out
    rc = cli.main(["explain", "--shape", "1,2,16,16", "--backend", "sdpa "])
    err = capsys.readouterr().err
    assert rc == 2 and "'sdpa ' has whitespace" in err
