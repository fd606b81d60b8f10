"""`Patch.report()` as people read it (text with each site's rule, repr, HTML for Jupyter, compiled
sites) and the targets `apply` takes: lists with one recipe per model, a model listed twice, a
torch.compile'd model, a module without attention; the public names and typing markers."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import attnpatch
from attnpatch import tiny_models
from attnpatch.patch import patch_of

from _patch_helpers import assert_restored, recording_backend, registered, snapshot

Recording = recording_backend("report_recording")


@pytest.fixture
def rec():
    yield from registered(Recording)


class Attn(torch.nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(Attn(), Attn())


def run(model, x):
    with torch.no_grad():
        return model(x)


# -- the report ---------------------------------------------------------------------------------------------

def test_report_text_names_each_sites_rule_and_what_it_asked_for():
    pipe = tiny_models.build("tiny-sd15-pipeline")
    patch = attnpatch.apply(pipe)
    try:
        report = patch.report()
        text = str(report)
        assert text.splitlines()[0] == "attnpatch report: 8 sites, 8 routed; 0 calls; 0 fallback calls"
        assert "recipe: sd15 (chosen automatically)" in text
        assert ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1 [diffusers, self] -> not called  "
                "[recipe sd15: rule self → auto]") in text
        assert "transformer_blocks.0.attn2 [diffusers, cross] -> not called  [recipe sd15: rule cross → auto]" in text
        assert repr(report) == text  # what Jupyter / the REPL print without print()
        row = report.rows[0]
        assert repr(row).startswith("ReportRow(site='unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1', "
                                    "calls={}, fallbacks={}, compiled={})")
        assert report.as_dicts()[0]["asked"] == ["auto"]
    finally:
        patch.remove()


def test_report_html_for_jupyter_is_a_table_with_escaped_cells(rec):
    model = net()
    patch = attnpatch.apply(model, backend="report_recording", recipe=False)
    run(model, torch.randn(1, 4, 32))
    patch.sites[0].record_bypass("a <weird> & reason")
    html = patch.report()._repr_html_()
    patch.remove()
    assert html.startswith("<div><p><b>attnpatch report: 2 sites, 2 routed; 2 calls (report_recording×2)")
    assert "<table>" in html and html.count("<tr>") == 3
    assert "<td style='text-align:left'>apply() → report_recording</td>" in html
    assert "a &lt;weird&gt; &amp; reason" in html and "<weird>" not in html


def test_compiled_sites_say_what_was_decided_and_that_calls_are_not_counted(rec):
    import torch._dynamo

    model = net()
    x = torch.randn(1, 4, 32)
    ref = run(model, x)
    patch = attnpatch.apply(model, backend="auto", recipe=False)
    torch._dynamo.reset()
    out = run(torch.compile(model, fullgraph=True, backend="eager"), x)
    torch.testing.assert_close(out, ref)
    text = str(patch.report())
    patch.remove()
    torch._dynamo.reset()
    assert "not called (compiled" not in text
    assert "0 [torch_sdpa, self] -> compiled: sdpa (auto: static table), calls not counted  [apply() → auto]" in text
    assert "; 2 sites compiled" in text.splitlines()[0]


# -- targets -----------------------------------------------------------------------------------------------

def test_a_list_gives_each_model_the_recipe_that_matches_it():
    flux, llama = tiny_models.build("tiny-flux"), tiny_models.build("tiny-llama")
    before = snapshot(llama)
    patch = attnpatch.apply([flux, llama])
    try:
        rules = {s.path: s.rule for s in patch.sites}
        assert rules["0.transformer_blocks.0.attn"] == "recipe flux: rule dual-stream"
        assert rules["1.model.layers.0.self_attn"] == "recipe llama: rule self"
        assert not any("flux" in r for p, r in rules.items() if p.startswith("1."))
        assert patch.recipe_name == ("flux (chosen automatically) for 0 (FluxTransformer2DModel); "
                                     "llama (chosen automatically) for 1 (LlamaForCausalLM)")
        assert patch_of(flux) is patch and patch_of(llama) is patch
        x = tiny_models.example_inputs("tiny-llama", llama)
        with torch.no_grad():
            llama(**x)
        assert "1.model.layers.0.self_attn [transformers, self] -> sdpa×1  [recipe llama: rule self → auto]" in str(
            patch.report())
        again = attnpatch.apply([flux, llama])  # re-applying replaces, never wraps twice
        assert again is not patch and len(again.sites) == 6 and patch.removed
        again.remove()
    finally:
        patch.remove()
    assert patch_of(flux) is None and patch_of(llama) is None
    assert_restored(llama, before)


def test_a_list_of_models_with_one_recipe_is_one_ordinary_patch():
    a, b = tiny_models.build("tiny-llama"), tiny_models.build("tiny-llama")
    patch = attnpatch.apply([a, b])
    try:
        assert patch.recipe_name == "llama (chosen automatically)"
        assert [s.path for s in patch.sites] == ["0.model.layers.0.self_attn", "0.model.layers.1.self_attn",
                                                 "1.model.layers.0.self_attn", "1.model.layers.1.self_attn"]
    finally:
        patch.remove()


def test_a_model_listed_twice_is_patched_and_reported_once(rec):
    model = net()
    before = snapshot(model)
    x = torch.randn(1, 4, 32)
    ref = run(model, x)
    patch = attnpatch.apply([model, model], backend="report_recording", recipe=False)
    assert [s.path for s in patch.sites] == ["0.0", "0.1"]
    assert torch.equal(run(model, x), ref)
    assert [r.calls for r in patch.report().rows] == [{"report_recording": 1}] * 2
    patch.remove()
    assert_restored(model, before)


def test_a_compiled_model_is_patched_through_the_module_it_compiles():
    import torch._dynamo

    llama = tiny_models.build("tiny-llama").eval()
    x = tiny_models.example_inputs("tiny-llama", llama)
    with torch.no_grad():
        ref = llama(**x).logits
    torch._dynamo.reset()
    compiled = torch.compile(llama, backend="eager")
    with torch.no_grad():
        compiled(**x)  # a graph compiled before the patch: recompiled with attnpatch's routing
    before = snapshot(llama)  # (compiling sets transformers' own _is_torch_compile flag)
    patch = attnpatch.apply(compiled)
    try:
        assert patch.recipe_name == "llama (chosen automatically)"
        assert [s.path for s in patch.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        assert patch_of(llama) is patch
        with torch.no_grad():
            out = compiled(**x).logits
        torch.testing.assert_close(out, ref)
        assert all(r.compiled == {"sdpa": "recipe llama: rule self (static table)"} for r in patch.report().rows)
    finally:
        patch.remove()
        torch._dynamo.reset()
    assert_restored(llama, before)
    assert attnpatch.remove(compiled) == 0


def test_a_target_without_attention_sites_warns_what_attnpatch_looks_for(caplog):
    with caplog.at_level(logging.WARNING, logger="attnpatch"):
        patch = attnpatch.apply(torch.nn.Linear(4, 4))
    assert patch.sites == []
    msg = caplog.text
    assert "no attention sites found in Linear, so nothing was patched" in msg
    assert "F.scaled_dot_product_attention" in msg and "AttentionInterface" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attnpatch"):
        attnpatch.apply(net(), recipe=False).remove()
    assert "no attention sites" not in caplog.text


def test_apply_raises_no_diffusers_future_warning():
    model = tiny_models.build("tiny-flux")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        patch = attnpatch.apply(model)
        patch.remove()
        attnpatch.apply(model, backend="sdpa", recipe=False).remove()


# -- public names and typing -----------------------------------------------------------------------------------

def test_report_and_scope_are_public_and_the_package_is_typed():
    import inspect
    import pathlib
    import typing

    from attnpatch import controls, report

    assert attnpatch.Report is report.Report and attnpatch.ReportRow is report.ReportRow
    assert attnpatch.Scope is controls.Scope
    assert {"Report", "ReportRow", "Scope"} <= set(attnpatch.__all__)
    assert (pathlib.Path(attnpatch.__file__).parent / "py.typed").is_file()
    hints = typing.get_type_hints(attnpatch.apply)
    assert "Module" in str(hints["target"]) and "HasComponents" in str(hints["target"])
    assert "Recipe" in str(hints["recipe"]) and "Literal[False]" in str(hints["recipe"])
    assert inspect.signature(attnpatch.patched).parameters["target"].annotation == "Target"
