"""transformers models at full fidelity (issue 15): decoding reuses plans (no re-decision per token),
softcap / sliding windows / attention sinks / packed sequences are routed and equal transformers' own
eager attention, ``output_attentions`` is served, removal unregisters, and a later
``set_attn_implementation`` is warned and reported."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import attnpatch
from attnpatch import router

transformers = pytest.importorskip("transformers")

torch.set_num_threads(min(2, torch.get_num_threads()))


def _lm(cls_name, cfg_name, impl="eager", seed=0, **cfg):
    torch.manual_seed(seed)
    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, attn_implementation=impl)
    base.update(cfg)
    config = getattr(transformers, cfg_name)(**base)
    model = getattr(transformers, cls_name)(config).eval()
    for name, p in model.named_parameters():
        if name.endswith("sinks"):
            torch.nn.init.normal_(p)  # GPT-OSS sinks start at zero; make them matter
    return model


MODELS = {
    "llama": lambda impl: _lm("LlamaForCausalLM", "LlamaConfig", impl),
    "qwen2": lambda impl: _lm("Qwen2ForCausalLM", "Qwen2Config", impl),
    "mistral (sliding window)": lambda impl: _lm("MistralForCausalLM", "MistralConfig", impl, sliding_window=4),
    "gemma2 (softcap, local/global)": lambda impl: _lm("Gemma2ForCausalLM", "Gemma2Config", impl, sliding_window=4,
                                                       attn_logit_softcapping=5.0),
    "gemma3 (local/global)": lambda impl: _lm("Gemma3ForCausalLM", "Gemma3TextConfig", impl, sliding_window=4),
    "gpt_oss (sinks)": lambda impl: _lm("GptOssForCausalLM", "GptOssConfig", impl, intermediate_size=32,
                                        num_local_experts=2, num_experts_per_tok=1, sliding_window=4),
}


def _inputs(b=2, s=9, pad=3):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    if b > 1 and pad:
        mask[1, :pad] = 0  # left padding, as for generation
    return ids, mask


@pytest.mark.parametrize("name", sorted(MODELS))
def test_routed_outputs_equal_transformers_eager(name):
    model = MODELS[name]("eager")
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    with attnpatch.patched(model) as patch:
        assert patch.sites and all(s.routed for s in patch.sites), [s.note for s in patch.sites]
        with torch.no_grad():
            out = model(ids, attention_mask=mask).logits
        calls = {n for r in patch.report().rows for n in r.calls}
        assert calls and not any(r.site.bypassed for r in patch.report().rows)
    keep = mask.bool()[:, :, None].expand_as(ref)  # padded positions are undefined in every implementation
    torch.testing.assert_close(out[keep], ref[keep], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["gemma2 (softcap, local/global)", "gpt_oss (sinks)"])
def test_softcap_and_sinks_reach_a_backend_that_serves_them(name):
    model = MODELS[name]("eager")
    ids, mask = _inputs(b=1, pad=0)
    with attnpatch.patched(model) as patch:
        with torch.no_grad():
            model(ids)
        for row in patch.report().rows:
            (backend,) = row.calls
            b = attnpatch.registry.get_backend(backend)
            assert b.SUPPORTS_SOFTCAP if "gemma2" in name else (b.SUPPORTS_SINKS or b.SUPPORTS_LSE), backend


@pytest.mark.parametrize("name", ["llama", "gemma2 (softcap, local/global)", "gpt_oss (sinks)"])
def test_greedy_generate_tokens_are_identical(name):
    model = MODELS[name]("eager")
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        with attnpatch.patched(model):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)


def test_decoding_makes_no_decision_after_the_first_token_of_a_bucket():
    model = MODELS["llama"]("sdpa")
    ids = torch.randint(3, 100, (1, 5))
    layers = model.config.num_hidden_layers
    made = []

    class Count(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            made.append((input_ids.shape[1], router.DECISIONS_MADE[0]))
            return scores

    with attnpatch.patched(model), torch.no_grad():
        model.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40,
                       logits_processor=transformers.LogitsProcessorList([Count()]))
    # made[i] = (tokens so far, decisions so far) after step i; step i+1 attends over tokens so far
    from attnpatch.call import length_bucket
    decode = made[1:]  # made[0]: after the prefill; the first decode step is a new kind of call
    for (n0, d0), (n1, d1) in zip(decode, decode[1:]):
        if length_bucket(n1) == length_bucket(n0):
            assert d1 == d0, f"a decode step at {n1} keys re-decided (bucket {length_bucket(n1)})"
    assert made[-1][1] - made[0][1] <= layers * 4  # one decision per layer per new bucket


def test_per_call_output_attentions_is_served():
    model = MODELS["llama"]("sdpa")
    ids, mask = _inputs()
    with torch.no_grad():
        ref = _lm("LlamaForCausalLM", "LlamaConfig", "eager")(ids, attention_mask=mask, output_attentions=True)
    with attnpatch.patched(model) as patch, torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
        plain = model(ids, attention_mask=mask)
    assert len(out.attentions) == 2 and all(a is not None for a in out.attentions)
    for a, r in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, r)
    assert plain.attentions is None
    bypassed = [why for r in patch.report().rows for why in r.site.bypassed]
    assert bypassed and all("output_attentions" in why for why in bypassed)


def test_removal_unregisters_and_set_attn_implementation_is_reported(caplog):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = MODELS["llama"]("sdpa")
    ids, _ = _inputs(b=1, pad=0)
    patch = attnpatch.apply(model, backend="sdpa_math")
    assert "attnpatch" in ALL_ATTENTION_FUNCTIONS
    with caplog.at_level(logging.WARNING, logger="attnpatch"):
        model.set_attn_implementation("eager")
    assert any("no longer routes" in r.getMessage() for r in caplog.records)
    assert model.config._attn_implementation == "eager"
    attnpatch.stats(reset=True)
    with torch.no_grad():
        model(ids)
    assert attnpatch.stats().calls == {}
    text = str(patch.report())
    assert "NOT ROUTED" in text and "set_attn_implementation" in text
    patch.remove()
    assert "attnpatch" not in ALL_ATTENTION_FUNCTIONS
    assert model.config._attn_implementation == "eager"  # the user's later choice stays


def test_packed_sequences_never_attend_across_sequences():
    model = MODELS["llama"]("sdpa")
    torch.manual_seed(3)
    a, b = torch.randint(3, 100, (1, 5)), torch.randint(3, 100, (1, 7))
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        alone = [model(x).logits for x in (a, b)]
        with attnpatch.patched(model, backend="sdpa_math"):
            out = model(packed, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(out[:, :5], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 5:], alone[1], atol=1e-5, rtol=1e-5)


def test_window_softcap_and_sinks_in_the_router_match_eager():
    from attnpatch.backends.eager import eager_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    sinks = torch.randn(4)
    for kw in (dict(window=(3, 0)), dict(window=(2, 1), is_causal=True), dict(softcap=3.0),
               dict(softcap=3.0, window=(3, None))):
        ref = eager_attention(q.double(), k.double(), v.double(), **kw).float()
        for backend in ("sdpa", "sdpa_math", "sdpa_flash", "eager", "flex"):
            try:
                out = attnpatch.attention_forward(q, k, v, backend=backend, **kw)
            except attnpatch.BackendUnsupportedError:
                continue
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    ref = eager_attention(q.double(), k.double(), v.double(), sinks=sinks.double(), is_causal=True).float()
    for backend in ("eager", "sdpa_flash"):  # native sinks; rescaled by the flash kernel's log-sum-exp
        out = attnpatch.attention_forward(q, k, v, backend=backend, sinks=sinks, is_causal=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert attnpatch.stats().calls.get("sdpa_flash", 0) >= 1


def test_return_lse_matches_the_reference():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 9, 16)
    ref = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * 16 ** -0.5, dim=-1)
    for backend in ("eager", "sdpa_flash", "flex"):
        out, lse = attnpatch.attention_forward(q, k, k, backend=backend, return_lse=True)
        assert lse.dtype == torch.float32 and lse.shape == (1, 2, 6)
        torch.testing.assert_close(lse.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, k), atol=1e-5, rtol=1e-5)
    with pytest.raises(attnpatch.BackendUnsupportedError, match="does not return the log-sum-exp"):
        with attnpatch.use_backend("sdpa_math", strict=True):
            attnpatch.attention_forward(q, k, k, return_lse=True)


def test_new_instances_of_a_patched_configs_class_do_not_turn_routing_off(caplog):
    """transformers builds fresh configs of the config's own class (``self.__class__()`` in
    to_diff_dict, used when a config is printed or saved): that must not count as the user switching
    the implementation (seen with transformers 5.17 during generate)."""
    model = MODELS["llama"]("sdpa")
    ids, _ = _inputs(b=1, pad=0)
    with caplog.at_level(logging.WARNING, logger="attnpatch"), attnpatch.patched(model, backend="sdpa_math") as p:
        fresh = type(model.config)()
        assert fresh._attn_implementation != "attnpatch"
        model.config.to_diff_dict()
        repr(model.config)
        with torch.no_grad():
            model(ids)
        assert all(s.routed for s in p.sites)
        assert {n for r in p.report().rows for n in r.calls} == {"sdpa_math"}
    assert not any("no longer routes" in r.getMessage() for r in caplog.records)


# -- masked GQA decoding on CUDA: the query heads fold into the query length, the cache is not copied ----

def _cuda_decode_call(q, k, mask, **kw):
    """attnpatch's Call for these CPU tensors, as if they were on an sm90 GPU (the runner only uses
    torch ops that run on both)."""
    import dataclasses

    from attnpatch.call import build_call

    call, _ = build_call(q, k, k, "bnsd", mask, False, None, 0.0, False)
    return dataclasses.replace(call, device_type="cuda", capability=(9, 0), **kw)


def test_masked_gqa_decoding_packs_query_heads_instead_of_repeating_the_cache(monkeypatch):
    """transformers' padded batch decoding on CUDA: one query token, GQA, a (b, 1, 1, s_kv) padding
    mask. Torch's fused kernels take no GQA with a mask, so the runner used to repeat the key/value
    heads (a copy of the whole cache per layer per token); it now runs q (b, h_q, 1, d) as
    (b, h_kv, h_q / h_kv, d), exactly."""
    from attnpatch.backends.sdpa import SdpaBackend

    torch.manual_seed(0)
    q = torch.randn(3, 8, 1, 16)
    k = torch.randn(3, 2, 37, 16)
    v = torch.randn(3, 2, 37, 16)
    mask = torch.ones(3, 1, 1, 37, dtype=torch.bool)
    mask[0, ..., :5] = False  # left padding of the first sequence
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask)

    backend = SdpaBackend()
    call = _cuda_decode_call(q, k, mask)
    assert backend._packs_gqa(call)
    run = backend.build(call)

    def no_repeat(*a, **kw):
        raise AssertionError("the key/value heads were repeated")
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_repeat)
    torch.testing.assert_close(run(q, k, v, mask, False, None, 0.0), ref)
    monkeypatch.undo()

    # not packed (each needs every query row as it is): causal, two query tokens, a per-head mask
    assert not backend._packs_gqa(_cuda_decode_call(q, k, mask, is_causal=True))
    q2 = torch.randn(3, 8, 2, 16)
    assert not backend._packs_gqa(_cuda_decode_call(q2, k, mask))
    per_head = torch.ones(3, 8, 1, 37, dtype=torch.bool)
    per_head[:, 3, :, :9] = False
    call = _cuda_decode_call(q, k, per_head)
    assert not backend._packs_gqa(call)
    torch.testing.assert_close(
        backend.build(call)(q, k, v, per_head, False, None, 0.0),
        F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=per_head))


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral (sliding window)"])
def test_static_cache_generate_eager_and_compiled_by_transformers(name):
    """transformers' static cache (k/v of the cache's full length, a mask over the unfilled part) and
    the compiled decoding forward generate compiles itself (CompileConfig; forced on the CPU, dynamo
    with the eager backend, fullgraph): the same greedy tokens as stock, no graph break, and the
    compiled sites report their trace-time decision."""
    import torch._dynamo as dynamo

    model = MODELS[name]("sdpa")
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(1))
    config = transformers.CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True

    def generate(**kw):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  cache_implementation="static", **kw)

    def fresh_compile():
        dynamo.reset()
        dynamo.utils.counters.clear()
        for attr in ("_compiled_call", "_last_compile_config"):
            if attr in vars(model):
                delattr(model, attr)

    stock = generate()
    fresh_compile()
    stock_compiled = generate(compile_config=config)
    assert "_compiled_call" in vars(model)
    with attnpatch.patched(model) as patch:
        assert torch.equal(generate(), stock)
        fresh_compile()
        patched_compiled = generate(compile_config=config)
        assert "_compiled_call" in vars(model)
        rows = patch.report().rows
    assert not dynamo.utils.counters["graph_break"]
    assert torch.equal(patched_compiled, stock_compiled)
    assert torch.equal(patched_compiled, stock)
    assert all(row.compiled for row in rows), [row.compiled for row in rows]
    fresh_compile()


def test_a_compiled_patched_model_survives_other_patches_coming_and_going():
    """The compiled forward of a patched model reaches each attention module's site through the module
    itself: patching and removing other models (which reorders attnpatch's weak site dictionary) must
    neither recompile it nor change its output. The site was once found through that dictionary, and
    dynamo guarded the module's weights by their key's position in it."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    others = [MODELS["llama"]("sdpa") for _ in range(2)]
    model = MODELS["qwen2"]("sdpa")
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(1))
    dynamo.reset()
    first = attnpatch.apply(others[0])
    with attnpatch.patched(model):
        second = attnpatch.apply(others[1])
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        with torch.no_grad():
            ref = compiled(ids).logits
            first.remove()  # the entries before this model's go
            again = compiled(ids).logits
            second.remove()
            third = compiled(ids).logits
        assert counter.frame_count == 1, f"recompiled {counter.frame_count - 1} times"
        assert torch.equal(again, ref) and torch.equal(third, ref)
    dynamo.reset()
