"""Context parallelism (attnpatch.parallel): the parallel output of real (tiny, random-weight) models
over 2 and 4 gloo processes against their single-process output, removal bit for bit, refusals; and,
in this process, the sequence layout, the log-sum-exp merge, the configuration and the plans.

The multi-process part starts 4 processes once (tests/_cp_worker.py) and runs every case there; each
case below checks its own results (cases of 2 processes run on both halves of the world)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import attnpatch
from attnpatch import parallel, parallel_plan, recipes
from attnpatch.parallel import ContextParallel, ContextParallelError, SequenceLayout, merge_partial

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _cp_worker  # noqa: E402

WORLD = 4
TOLERANCE = 1e-5  # float32 on CPU, relative to the output's magnitude (as the router's own tests)


# -- the 4-process run ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.fail("torch.distributed with gloo is needed for the context-parallel tests (it is part of every "
                    "official torch build)")
    out = tmp_path_factory.mktemp("cp")
    init = f"file://{out}/init"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs, logs = [], []
    t0 = time.time()
    for r in range(WORLD):
        log = open(out / f"log{r}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "_cp_worker.py"), "--rank", str(r),
                                       "--world", str(WORLD), "--init", init, "--out", str(out)],
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        codes = [p.wait(timeout=900) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        codes = ["timeout"] * WORLD
    finally:
        for log in logs:
            log.close()
    elapsed = time.time() - t0
    results = []
    for r in range(WORLD):
        path = out / f"rank{r}.json"
        if codes[r] != 0 or not path.exists():
            tail = (out / f"log{r}.txt").read_text()[-3000:]
            pytest.fail(f"context-parallel worker {r} exited with {codes[r]}; log tail:\n{tail}")
        results.append(json.loads(path.read_text()))
    print(f"\ncontext-parallel workers: {len(_cp_worker.CASES)} cases on {WORLD} processes in {elapsed:.0f} s")
    return results


MODEL_CASES = [n for n in _cp_worker.CASES
               if not n.startswith(("refuse-", "reapply-", "ring-needs-lse", "pipeline-remove"))]


def _expected_mode(name: str) -> str:
    if "heads-fallback" in name:
        return "ring over the whole group (heads do not divide ulysses)"
    if "ulysses2-ring2" in name:
        return "ulysses + ring"
    if "ulysses" in name:
        return "ulysses"
    return "ring"


@pytest.mark.parametrize("name", MODEL_CASES)
def test_parallel_output_matches_single_process_and_removal_is_exact(cp_results, name):
    for rank, res in enumerate(cp_results):
        r = res[name]
        assert "error" not in r, f"rank {rank}: {r.get('traceback', r.get('error'))}"
        assert r["maxdiff"] <= TOLERANCE * max(1.0, r["scale"]), (rank, r["maxdiff"], r["scale"])
        assert r["restored"], f"rank {rank}: output after remove() differs from the unpatched output"
        assert r["restored_vars"] == "ok", f"rank {rank}: {r['restored_vars']}"  # types, vars(), state_dict()
        assert r["repeat_equal"], f"rank {rank}: a second forward (cached plans) gave another result"
        assert "context parallel:" in r["report"]
        assert r["counts"].get(_expected_mode(name), 0) > 0, (rank, r["counts"])


def test_cross_attention_keys_stay_whole_and_run_locally(cp_results):
    for case in ("wan-ulysses2", "unet-sd15-ring2", "wan-ulysses2-ring2"):
        counts = cp_results[0][case]["counts"]
        assert counts.get("cross-attention, K/V not split (local)", 0) > 0, counts


def test_pipeline_parallel_only_in_the_denoiser(cp_results):
    r = cp_results[0]["pipeline-sd15-ulysses2"]
    assert "context parallel: unet:" in r["report"]
    assert "left alone (not patched)" in r["report"]  # the sd15 recipe leaves the VAE and text encoder alone


def test_removing_the_parallel_component_removes_the_whole_patch(cp_results):
    for res in cp_results:
        r = res["pipeline-remove-one-component"]
        assert "error" not in r, r.get("traceback")
        assert r["roots"] == 3 and r["removed"] and r["planners"] == 0


def _refusal(cp_results, name):
    out = [res[name] for res in cp_results]
    assert all("error" not in r for r in out), out
    assert len({(r["error_type"], r["message"]) for r in out}) == 1, "every process must refuse the same way"
    return out[0]


def test_gradients_are_refused_with_the_fix(cp_results):
    r = _refusal(cp_results, "refuse-gradients")
    assert r["error_type"] == "ContextParallelError"
    assert "needs gradients" in r["message"] and "torch.no_grad()" in r["message"]


def test_dropout_is_refused(cp_results):
    r = _refusal(cp_results, "refuse-dropout")
    assert r["error_type"] == "ContextParallelError" and "dropout_p=0.1" in r["message"]


def test_model_without_plan_is_refused_and_left_unpatched(cp_results):
    r = _refusal(cp_results, "refuse-no-plan")
    assert r["error_type"] == "ContextParallelError"
    assert "no plan for ToyModel" in r["message"] and "_cp_plan" in r["message"] and "parallel:" in r["message"]
    assert r["unpatched"]


def test_unrouted_attention_is_refused(cp_results):
    r = _refusal(cp_results, "refuse-unrouted-site")
    assert r["error_type"] == "ContextParallelError"
    assert "routed through attnpatch" in r["message"] and "AttnProcessor" in r["message"]


def test_plan_naming_a_missing_module_is_refused_with_the_closest_paths(cp_results):
    r = _refusal(cp_results, "refuse-plan-module-missing")
    assert "'haed' matches no module of ToyModel" in r["message"] and "head" in r["message"]


def test_degrees_that_do_not_divide_the_group_are_refused(cp_results):
    r = _refusal(cp_results, "refuse-bad-degrees")
    assert r["error_type"] == "ValueError" and "ulysses=3 does not divide the group size 2" in r["message"]


def test_ring_steps_need_a_backend_that_returns_the_log_sum_exp(cp_results):
    for res in cp_results:
        r = res["ring-needs-lse-backends"]
        assert "error" not in r, r.get("traceback")
        assert r["error_type"] == "BackendUnsupportedError"
        assert "sdpa: return_lse: this kernel does not return the log-sum-exp" in r["message"]
        assert "fell back sdpa ->" in r["report"] and "return_lse: this kernel does not return" in r["report"]
        assert r["maxdiff"] <= TOLERANCE * max(1.0, r["scale"]) and r["restored"]


def test_apply_again_keeps_or_replaces_the_parallel_patch(cp_results):
    for res in cp_results:
        r = res["reapply-and-switch"]
        assert "error" not in r, r.get("traceback")
        assert r["same_patch"] and r["switched"] and r["plain"] and r["restored"]
        assert r["maxdiff"] <= TOLERANCE * max(1.0, r["scale"])


# -- in this process -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("U,R,order", [(2, 1, "contiguous"), (1, 4, "contiguous"), (2, 2, "contiguous"),
                                       (1, 2, "zigzag"), (2, 2, "zigzag"), (3, 2, "zigzag"), (1, 4, "zigzag")])
def test_layout_partitions_the_sequence_and_assembles_it_back(U, R, order):
    layout = SequenceLayout(U, R, order)
    for L in (0, 1, 5, 12, 13, 31, 64):
        positions = sorted(p for i in range(layout.W) for s, n in layout.runs(L, i) for p in range(s, s + n))
        assert positions == list(range(L))
        sizes = layout.sizes(L)
        assert max(sizes) - min(sizes) <= (1 if order == "contiguous" else 2)
        x = torch.randn(2, L, 3)
        parts = [layout.shard(x, 1, i) for i in range(layout.W)]
        assert torch.equal(layout.assemble(parts, 1, L), x)
        for g in range(R):  # a Ulysses group's all-to-all assembles its members' parts in member order
            group = [p for s, n in layout.group_runs(L, g) for p in range(s, s + n)]
            members = [p for u in range(U) for s, n in layout.runs(L, g * U + u) for p in range(s, s + n)]
            assert group == members


def test_zigzag_gives_every_ring_group_the_same_causal_work():
    L, R = 64, 4
    layout = SequenceLayout(1, R, "zigzag")
    work = []
    for g in range(R):
        pos = [p for s, n in layout.group_runs(L, g) for p in range(s, s + n)]
        work.append(sum(p + 1 for p in pos))  # keys each query attends under causal masking
    assert len(set(work)) == 1, work
    contiguous = SequenceLayout(1, R, "contiguous")
    naive = [sum(p + 1 for s, n in contiguous.group_runs(L, g) for p in range(s, s + n)) for g in range(R)]
    assert max(naive) > 3 * min(naive)  # what the load-balanced order avoids


def _attention_with_lse(q, k, v, mask=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return (p @ v), lse


def test_merge_of_partial_results_equals_attention_over_all_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))  # (b, h, s, d)
    k2, v2 = torch.randn(2, 3, 7, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    mask = torch.rand(2, 3, 5, 12, generator=g) > 0.3
    mask[0, 0, 1] = False  # a row with no key at all
    mask[1, 2, 3, :5] = False  # a row whose keys are all in the second block
    full, full_lse = _attention_with_lse(q, torch.cat([k, k2], 2), torch.cat([v, v2], 2), mask)
    o1, l1 = _attention_with_lse(q, k, v, mask[..., :5])
    o2, l2 = _attention_with_lse(q, k2, v2, mask[..., 5:])
    acc, acc_lse = o1.transpose(1, 2).contiguous(), l1.clone()
    merge_partial(acc, acc_lse, o2.transpose(1, 2), l2)
    assert torch.allclose(acc.transpose(1, 2), full, atol=1e-6)
    assert torch.equal(torch.isinf(acc_lse), torch.isinf(full_lse))
    assert torch.allclose(acc_lse[~torch.isinf(acc_lse)], full_lse[~torch.isinf(full_lse)], atol=1e-6)
    assert torch.all(acc.transpose(1, 2)[0, 0, 1] == 0)


def test_config_from_dict_and_string_and_its_errors():
    assert ContextParallel.coerce({"ulysses": 2}) == ContextParallel(ulysses=2)
    assert ContextParallel.coerce("ulysses=2, ring=2") == ContextParallel(ulysses=2, ring=2)
    with pytest.raises(ValueError, match="unknown keys \\['ulyses'\\]"):
        ContextParallel.coerce({"ulyses": 2})
    with pytest.raises(ValueError, match="expected entries like 'ulysses=2'"):
        ContextParallel.coerce("ulysses:2")
    with pytest.raises(ValueError, match="positive int"):
        ContextParallel(ring=0)
    with pytest.raises(TypeError, match="attnpatch.ContextParallel, a dict"):
        ContextParallel.coerce(2)
    assert parallel._degrees(ContextParallel(), 4, "x") == (4, 1)
    assert parallel._degrees(ContextParallel(ring=2), 4, "x") == (2, 2)
    with pytest.raises(ValueError, match="U × R must equal the group size"):
        parallel._degrees(ContextParallel(ulysses=2, ring=3), 4, "x")


def test_apply_without_a_process_group_is_refused_and_leaves_the_model_unpatched():
    from attnpatch import tiny_models

    assert not torch.distributed.is_initialized()
    model = tiny_models.build("tiny-wan")
    before = dict(vars(model))
    with pytest.raises(ContextParallelError, match="torchrun"):
        attnpatch.apply(model, parallel={"ulysses": 2})
    assert attnpatch.patch.patch_of(model) is None and vars(model) == before


def test_diffusers_cp_plan_is_converted():
    from attnpatch import tiny_models

    wan = parallel.plan_for_module(tiny_models.build("tiny-wan"))
    assert wan.source == "diffusers WanTransformer3DModel._cp_plan" and wan.cross_kv == "replicated"
    assert {(s.module, s.input, s.output, s.dim) for s in wan.splits} >= {
        ("rope", None, 0, 1), ("rope", None, 1, 1), ("blocks.0", "hidden_states", None, 1)}
    assert [(g.module, g.dim) for g in wan.gathers] == [("proj_out", 1)]
    flux = parallel.plan_for_module(tiny_models.build("tiny-flux"))
    assert ("", "txt_ids", 0) in {(s.module, s.input, s.dim) for s in flux.splits}
    assert parallel.plan_for_module(tiny_models.build("tiny-llama")).source == "llama.yaml"


def test_every_shipped_plan_resolves_against_its_small_model():
    from attnpatch import tiny_models

    models = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "hunyuanvideo": "tiny-hunyuanvideo",
              "llama": "tiny-llama", "qwen2": "tiny-qwen2"}
    assert set(parallel.shipped_with_plans()) == set(models)
    for name, tiny in models.items():
        model = tiny_models.build(tiny)
        hooks = parallel_plan.resolve(recipes.shipped(name).parallel, model)
        assert any(h.gather_outputs for h in hooks) and any(h.split_inputs or h.split_outputs for h in hooks)
    unet = parallel_plan.resolve(recipes.shipped("sdxl").parallel, tiny_models.build("tiny-sdxl"))
    gathered = sorted(h.path for h in unet if h.gather_outputs)
    assert "down_blocks.1.attentions.0.transformer_blocks.1" in gathered  # `last: true`: the last block only
    assert "down_blocks.1.attentions.0.transformer_blocks.0" not in gathered


def test_plan_section_is_validated_with_file_line_and_field():
    text = """version: 1
name: mine
parallel:
  split:
    - {module: "blocks.0", input: x, dim: 1}
    - {module: "blocks.*", input: mask, dim: 3, parts: [y]}
  gather:
    - {module: head, dim: 1}
"""
    with pytest.raises(attnpatch.RecipeError, match=r"mine.yaml:6: parallel.split\[1\].parts: 'y' is not the name"):
        recipes.loads(text, "mine.yaml")
    with pytest.raises(attnpatch.RecipeError, match=r"parallel.gather: is required"):
        recipes.loads("version: 1\nname: a\nparallel:\n  split:\n    - {module: x, input: a, dim: 1}\n", "a.yaml")
    with pytest.raises(attnpatch.RecipeError, match=r"a.yaml:5: parallel.split\[0\]: give exactly one of `input`"):
        recipes.loads("version: 1\nname: a\nparallel:\n  split:\n    - {module: x, dim: 1}\n  gather:\n"
                      "    - {module: y, dim: 1}\n", "a.yaml")
    with pytest.raises(attnpatch.RecipeError, match=r"parallel.cross_attention: unknown value 'whole'"):
        recipes.loads("version: 1\nname: a\nparallel:\n  cross_attention: whole\n  split:\n"
                      "    - {module: x, input: a, dim: 1}\n  gather:\n    - {module: y, dim: 1}\n", "a.yaml")
    with pytest.raises(attnpatch.RecipeError, match=r"a.yaml:5: parallel.split\[0\].modul: unknown key \(did you mean 'module'\?\)"):
        recipes.loads("version: 1\nname: a\nparallel:\n  split:\n    - {modul: x, input: a, dim: 1}\n  gather:\n"
                      "    - {module: y, dim: 1}\n", "a.yaml")
    ok = recipes.loads(text.replace("parts: [y]", "parts: [x]"), "mine.yaml")
    assert ok.parallel.splits[1].parts == ("x",) and ok.parallel.gathers[0].module == "head"


def test_compiled_context_parallel_site_is_refused():
    from attnpatch import router
    from attnpatch.patch import Site
    from attnpatch.controls import Scope

    site = Site(path="blocks.0.attn1", adapter="test")
    scope = Scope(site=site)
    router.SITE_PLANNERS[site] = lambda *a: None
    try:
        q = torch.randn(1, 2, 8, 16)
        fn = torch.compile(lambda q: router.route(scope, q, q, q), backend="eager", fullgraph=True)
        with pytest.raises(Exception, match="torch.compile of a context-parallel model is not supported"):
            fn(q)
    finally:
        router.SITE_PLANNERS.pop(site, None)
        torch._dynamo.reset()


def test_cli_parallel_without_torchrun_is_a_usage_error_with_the_command_to_copy(capsys, monkeypatch):
    from attnpatch import cli

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["demo", "--parallel", "ulysses=2", "--device", "cpu"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "needs several processes started by torchrun" in err and "torchrun --nproc-per-node 2 -m attnpatch" in err
    assert cli.main(["bench", "--parallel", "ulysses=2", "--device", "cpu"]) == cli.EXIT_USAGE
    assert "needs --shape" in capsys.readouterr().err
    assert cli.main(["demo", "--parallel", "ulysses:2", "--device", "cpu"]) == cli.EXIT_USAGE
    assert "expected entries like 'ulysses=2'" in capsys.readouterr().err
