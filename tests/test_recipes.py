"""Recipes: the shipped ones against their small models, validation with file/line/field, safe loading,
the one matcher, rule order, blocks, excludes, and step schedules in a real (tiny) pipeline run."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

import attnpatch
from attnpatch import recipes, tiny_models
from attnpatch.patch import discover
from attnpatch.recipes import RecipeError, RecipeWarning

from _patch_helpers import recording_backend

#: every shipped recipe -> the tiny model it is tested against
SMALL_MODEL = {
    "flux": "tiny-flux", "flux2": "tiny-flux2", "sd3": "tiny-sd3", "sdxl": "tiny-sdxl", "sd15": "tiny-sd15",
    "wan": "tiny-wan", "wan-lossy": "tiny-wan", "hunyuanvideo": "tiny-hunyuanvideo", "cogvideox": "tiny-cogvideox",
    "ltx": "tiny-ltx", "qwenimage": "tiny-qwenimage", "pixart": "tiny-pixart", "sana": "tiny-sana",
    "llama": "tiny-llama", "qwen2": "tiny-qwen2", "t5": "tiny-t5", "clip": "tiny-clip",
}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny_models.build(name)
        return cache[name]
    return get


@pytest.fixture
def rec_backends():
    """Two recording backends, rec_a and rec_b, that log (backend, current step) per call."""
    log = []
    made = []
    for name in ("rec_a", "rec_b"):
        cls = recording_backend(name)
        base_build = cls.build

        def build(self, call, _base=base_build, _name=name):
            run = _base(self, call)

            def run_logged(*a):
                log.append((_name, attnpatch.current_step()))
                return run(*a)
            return run_logged

        cls.build = build
        cls.calls = []
        attnpatch.register_backend(cls, replace=True)
        made.append(name)
    yield log
    for name in made:
        attnpatch.unregister_backend(name)


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# -- the shipped recipes ------------------------------------------------------------------------------

def test_every_required_model_family_has_a_shipped_recipe():
    assert set(recipes.shipped_names()) == set(SMALL_MODEL)
    for must in ("flux", "flux2", "sd3", "sdxl", "sd15", "wan", "hunyuanvideo", "cogvideox", "ltx", "qwenimage",
                 "pixart", "sana", "llama", "qwen2", "t5", "clip"):
        assert must in recipes.shipped_names()


@pytest.mark.parametrize("name", sorted(SMALL_MODEL))
def test_shipped_recipe_loads_and_every_rule_matches_its_small_model(name, models):
    rec = recipes.shipped(name)
    assert rec.name == name and rec.version == 1 and rec.description.strip()
    model = models(SMALL_MODEL[name])
    sites = discover(model)
    plan = recipes.plan(rec, sites, [""])
    for i, rule in enumerate(rec.rules):
        assert plan.hits[i] >= 1, f"{name}: rule {rule.name} matches no site of {SMALL_MODEL[name]}"
    assert recipes.recipe_matches(rec, model)
    if not rec.lossy:  # exact recipes are picked by themselves, and only the right one
        assert recipes.find_recipe(model).name == name
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)  # no rule may be unmatched
        patch = attnpatch.apply(model, recipe=name)
    try:
        assert patch.recipe_name == name
        routed = [s for s in patch.sites if s.routed]
        assert routed and all(s.rule.startswith(f"recipe {name}: ") for s in routed)
    finally:
        patch.remove()


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan", "tiny-sd15", "tiny-llama", "tiny-clip"])
def test_auto_recipe_runs_the_model_through_the_router(name, models):
    model = models(name)
    inputs = tiny_models.example_inputs(name, model)
    with torch.no_grad():
        ref = model(**inputs)[0]
        with attnpatch.patched(model) as patch:
            out = model(**inputs)[0]
            report = patch.report()
    assert patch.recipe_name.endswith("(chosen automatically)")
    assert f"recipe: {patch.recipe_name}" in str(report)
    calls = sum(sum(r.calls.values()) for r in report.rows)
    assert calls >= len([s for s in patch.sites if s.routed])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_lossy_recipes_say_so_keep_encoders_exact_and_are_never_picked_by_themselves(models):
    lossy = [r for r in recipes.all_shipped() if r.lossy]
    assert lossy, "a lossy variant (wan-lossy) is shipped"
    for r in lossy:
        assert "lossy" in r.description.lower()
        assert "vae" in r.exclude.components
        assert any(c.startswith("text_encoder") for c in r.exclude.components)
        assert "image_encoder" in r.exclude.components
    wan = models("tiny-wan")
    assert recipes.find_recipe(wan).name == "wan"
    assert recipes.find_recipe(wan, include_lossy=True) is not None
    rec = recipes.shipped("wan-lossy")
    cross = next(r for r in rec.rules if r.patterns == ("blocks.*.attn2",))
    assert cross.allow_lossy is False
    ends = rec.rules[0]
    assert ends.steps is not None and ends.allow_lossy is False and not ends.patterns


def test_pipeline_gets_the_denoiser_recipe_and_leaves_vae_and_text_encoder_alone():
    pipe = tiny_models.build("tiny-sd15-pipeline")
    assert recipes.find_recipe(pipe).name == "sd15"
    patch = attnpatch.apply(pipe)
    try:
        assert patch.recipe_name == "sd15 (chosen automatically)"
        assert set(patch.left_alone) == {"vae", "text_encoder"}
        assert {s.component for s in patch.sites} == {"unet"}
        assert "left alone (not patched): vae, text_encoder" in str(patch.report())
        assert "forward" not in vars(pipe.vae.encoder.mid_block.attentions[0])
    finally:
        patch.remove()
    # recipe=False: no recipe, every component patched
    patch = attnpatch.apply(pipe, recipe=False)
    try:
        assert patch.recipe_name is None and not patch.left_alone
        assert {"vae", "text_encoder", "unet"} <= {s.component for s in patch.sites}
    finally:
        patch.remove()


def test_sdxl_and_sd15_unets_are_told_apart_by_config(models):
    assert recipes.find_recipe(models("tiny-sdxl")).name == "sdxl"
    assert recipes.find_recipe(models("tiny-sd15")).name == "sd15"


def test_naming_a_backend_turns_automatic_recipes_off(models, rec_backends):
    model = models("tiny-flux")
    patch = attnpatch.apply(model, backend="rec_a")
    try:
        assert patch.recipe_name is None
        assert all(s.rule == "apply()" for s in patch.sites)
    finally:
        patch.remove()


def test_an_explicit_backend_replaces_the_default_but_rules_keep_theirs(models, rec_backends):
    model = models("tiny-flux")
    rec = {"version": 1, "name": "t", "rules": [{"pattern": "single_transformer_blocks.*.attn", "backend": "rec_b"}]}
    patch = attnpatch.apply(model, recipe=rec, backend="rec_a")
    try:
        by = {s.path: s.scope.backends for s in patch.sites}
        assert by["transformer_blocks.0.attn"] == ("rec_a",)
        assert by["single_transformer_blocks.0.attn"] == ("rec_b",)
    finally:
        patch.remove()


def test_recipe_by_path_and_by_dict(tmp_path, models):
    path = write(tmp_path, "version: 1\nname: mine\nrules:\n  - pattern: 'blocks.*.attn1'\n    backend: sdpa_math\n")
    for spec in (path, {"version": 1, "name": "mine", "rules": [{"pattern": "blocks.*.attn1", "backend": "sdpa_math"}]}):
        patch = attnpatch.apply(models("tiny-wan"), recipe=spec)
        try:
            assert patch.recipe_name == "mine"
            s = {x.path: x for x in patch.sites}
            assert s["blocks.0.attn1"].scope.backends == ("sdpa_math",)
            assert s["blocks.0.attn2"].rule == "recipe mine: default_backend"
        finally:
            patch.remove()


# -- rule semantics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,path,hit", [
    ("transformer_blocks.*.attn", "transformer_blocks.0.attn", True),
    ("transformer_blocks.*.attn", "single_transformer_blocks.0.attn", False),
    ("transformer_blocks.*.attn", "transformer_blocks.0.attn.processor", False),
    ("*.attn", "blocks.0.attn", False),
    ("**.attn1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1", True),
    ("**.attn1", "attn1", True),
    ("blocks.**", "blocks", True),
    ("blocks.**.attn2", "blocks.3.attn2", True),
    ("blocks.**.attn2", "blocks3.attn2", False),
    ("blocks.?.attn?", "blocks.1.attn2", True),
    ("re:blocks\\.\\d+\\.attn[12]", "blocks.10.attn1", True),
    ("re:blocks", "blocks.10.attn1", False),  # a regex must match the whole path
])
def test_one_matcher_glob_and_full_match_regex(pattern, path, hit):
    assert recipes.match(pattern, path) is hit


def test_first_matching_rule_wins_and_kind_selects(models):
    rec = {"version": 1, "name": "t", "rules": [
        {"name": "cross-math", "kind": "cross", "backend": "sdpa_math"},
        {"name": "all-eager", "pattern": "blocks.*.*", "backend": "eager"},
        {"name": "never", "pattern": "blocks.*.attn2", "backend": "sdpa"},
    ]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)  # a shadowed rule still matches sites: no warning
        patch = attnpatch.apply(models("tiny-wan"), recipe=rec)
    try:
        s = {x.path: x for x in patch.sites}
        assert s["blocks.0.attn2"].rule == "recipe t: rule cross-math"
        assert s["blocks.0.attn2"].scope.backends == ("sdpa_math",)
        assert s["blocks.1.attn1"].rule == "recipe t: rule all-eager"
    finally:
        patch.remove()


def test_blocks_first_and_last_count_each_numbered_list(models):
    rec = {"version": 1, "name": "t", "rules": [
        {"name": "last", "pattern": "re:(single_)?transformer_blocks\\.\\d+\\.attn", "blocks": {"last": 1},
         "backend": "sdpa_math"},
        {"name": "first", "pattern": "**.attn", "blocks": {"first": 1}, "backend": "eager"},
    ]}
    patch = attnpatch.apply(models("tiny-flux"), recipe=rec)
    try:
        rule = {x.path: x.rule.split("rule ")[-1] for x in patch.sites}
        assert rule == {"transformer_blocks.0.attn": "first", "transformer_blocks.1.attn": "last",
                        "single_transformer_blocks.0.attn": "first", "single_transformer_blocks.1.attn": "last"}
    finally:
        patch.remove()


def test_exclude_sites_are_left_alone_and_reported(models):
    model = models("tiny-wan")
    attn2 = model.blocks[0].attn2
    rec = {"version": 1, "name": "t", "exclude": {"sites": ["blocks.0.attn2"]}, "default_backend": "sdpa"}
    patch = attnpatch.apply(model, recipe=rec)
    try:
        s = {x.path: x for x in patch.sites}
        assert not s["blocks.0.attn2"].routed
        assert "left alone" in s["blocks.0.attn2"].note and "exclude.sites" in s["blocks.0.attn2"].note
        assert s["blocks.1.attn2"].routed
        assert attnpatch.patch.SITE_OF.get(attn2) is None
        assert "blocks.0.attn2 [diffusers, cross] -> NOT ROUTED: left alone" in str(patch.report())
    finally:
        patch.remove()


def test_unmatched_rule_warns_with_line_and_closest_paths_and_strict_raises(tmp_path, models, monkeypatch):
    path = write(tmp_path, "version: 1\nname: t\nrules:\n  - name: typo\n    pattern: 'blocks.*.atn1'\n"
                           "    backend: sdpa\n")
    model = models("tiny-wan")
    with pytest.warns(RecipeWarning, match=r"r\.yaml:4: rules\[0\] \(typo\): pattern 'blocks\.\*\.atn1' matches no "
                                           r"attention site of WanTransformer3DModel; closest site paths: blocks"):
        attnpatch.apply(model, recipe=path).remove()
    with pytest.raises(RecipeError) as e:
        attnpatch.apply(model, recipe=path, strict=True)
    assert e.value.line == 4 and e.value.field == "rules[0]" and e.value.source == path
    assert attnpatch.patch.patch_of(model) is None  # nothing left patched
    monkeypatch.setenv("ATTNPATCH_STRICT", "1")
    attnpatch.reload_env()
    with pytest.raises(RecipeError, match="matches no attention site"):
        attnpatch.apply(model, recipe=path)


def test_component_rules_do_not_apply_to_a_bare_model(models):
    rec = {"version": 1, "name": "t", "rules": [{"components": ["transformer"], "backend": "sdpa_math"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecipeWarning)  # not "unmatched": the component is absent
        patch = attnpatch.apply(models("tiny-wan"), recipe=rec)
    try:
        assert all(s.rule == "recipe t: default_backend" for s in patch.sites)
    finally:
        patch.remove()


# -- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,line,field,needle", [
    ("version: 1\nname: t\nbakend: sdpa\n", 3, "bakend", "unknown key; allowed keys: version, name"),
    ("version: 1\nname: t\nrules:\n  - pattern: 'a.*'\n    backedn: sdpa\n", 5, "rules[0].backedn",
     "did you mean 'backend'?"),
    ("version: '1'\nname: t\n", 1, "version", "must be an int, got a string '1'"),
    ("version: 2\nname: t\n", 1, "version", "unsupported recipe version 2"),
    ("version: 1\nname: t\nallow_lossy: 'yes'\n", 3, "allow_lossy", "must be true or false, got a string"),
    ("version: 1\nname: t\nrules: {a: 1}\n", 3, "rules", "must be a list of rules, got a mapping"),
    ("version: 1\nname: t\nrules:\n  - pattern: 'a.*'\n    backend: fash_attn\n", 5, "rules[0].backend",
     "unknown backend 'fash_attn' (did you mean 'flash_attn'?); valid: auto, eager"),
    ("version: 1\nname: t\ndefault_backend: [sdpa, nope]\n", 3, "default_backend", "unknown backend 'nope'"),
    ("version: 1\nname: t\nrules:\n  - kind: selff\n    backend: sdpa\n", 4, "rules[0].kind",
     "unknown site kind 'selff'; allowed: self, cross, joint, unknown"),
    ("version: 1\nname: t\nrules:\n  - pattern: 're:blocks.(\\d'\n    backend: sdpa\n", 4, "rules[0].pattern",
     "invalid regular expression"),
    ("version: 1\nname: t\nrules:\n  - steps: {first: 0}\n    backend: sdpa\n", 4, "rules[0].steps.first",
     "must be a positive int, got 0"),
    ("version: 1\nname: t\nrules:\n  - steps: [1, {last: 2, first: 1}]\n    backend: sdpa\n", 4,
     "rules[0].steps[1]", "{first: N}, {last: N}, {from: A, to: B}"),
    ("version: 1\nname: t\nrules:\n  - steps: [{from: 5, to: 2}]\n    backend: sdpa\n", 4, "rules[0].steps[0]",
     "from 5 is after to 2"),
    ("version: 1\nname: t\nrules:\n  - blocks: {first: 2}\n    backend: sdpa\n", 4, "rules[0].blocks",
     "needs a `pattern`"),
    ("version: 1\nname: t\nrules:\n  - pattern: 'a.*'\n", 4, "rules[0]", "a rule needs `backend` and/or `allow_lossy`"),
    ("version: 1\nname: t\nname: u\n", 3, "", "duplicate key 'name'"),
    ("version: 1\n", 1, "name", "is required"),
    ("version: 1\nname: Bad Name\n", 2, "name", "is not a valid name"),
    ("version: 1\nname: t\nexclude:\n  components: vae\n  site: ['x']\n", 5, "exclude.site",
     "allowed keys: components, sites"),
])
def test_validation_errors_name_file_line_field_and_what_is_allowed(tmp_path, text, line, field, needle):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        recipes.load(path)
    err = e.value
    assert err.source == path and err.line == line and err.field == field, str(err)
    assert needle in str(err)
    assert str(err).startswith(f"{path}:{line}: " + (f"{field}: " if field else ""))


def test_malformed_yaml_gives_the_parsers_line_and_column(tmp_path):
    path = write(tmp_path, "version: 1\nname: t\nrules:\n  - pattern: [a, b\n    backend: sdpa\n")
    with pytest.raises(RecipeError) as e:
        recipes.load(path)
    assert e.value.line == 5 and "malformed YAML, column" in str(e.value)
    assert str(e.value) == (f"{path}:5: malformed YAML, column 12: expected ',' or ']', but got ':' "
                            "(while parsing a flow sequence at line 4, column 14)")
    assert "\n" not in str(e.value)


def test_python_object_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "version: 1\nname: t\ndescription: !!python/object/apply:builtins.open\n"
                           f"  - {marker}\n  - w\n")
    with pytest.raises(RecipeError) as e:
        recipes.load(path)
    assert e.value.line == 3
    assert "tag 'tag:yaml.org,2002:python/object/apply:builtins.open' is not allowed" in str(e.value)
    assert not marker.exists()
    with pytest.raises(RecipeError, match="is not allowed"):
        recipes.loads("version: 1\nname: !!python/name:os.system ''\n")
    with pytest.raises(RecipeError, match="is not allowed"):
        recipes.loads("version: 1\nname: t\ndescription: !custom x\n")


def test_dict_recipes_are_validated_too():
    with pytest.raises(RecipeError) as e:
        recipes.from_dict({"version": 1, "name": "t", "rules": [{"pattern": "a", "backend": 3}]})
    assert str(e.value).startswith("<dict>: rules[0].backend: must be a backend name or a priority list")
    with pytest.raises(RecipeError, match="must be a mapping"):
        recipes.from_dict(["version", 1])


def test_unknown_shipped_name_lists_the_shipped_ones_and_names_never_reach_importlib():
    with pytest.raises(RecipeError) as e:
        recipes.load("flx")
    assert "no shipped recipe named 'flx' (did you mean 'flux'?)" in str(e.value)
    assert "shipped: clip, cogvideox, flux" in str(e.value)
    for name in ("os", "attnpatch.cli", "__init__"):
        with pytest.raises(RecipeError, match="no shipped recipe"):
            recipes.load(name)
    with pytest.raises(RecipeError, match="no such file"):
        recipes.load("../../etc/missing.yaml")
    with pytest.raises(TypeError, match="recipe must be"):
        attnpatch.apply(torch.nn.Linear(2, 2), recipe=3)


def test_shipped_recipes_are_installed_as_package_data():
    from importlib import resources

    files = {p.name for p in resources.files("attnpatch.recipe_files").iterdir()}
    assert {f"{n}.yaml" for n in SMALL_MODEL} <= files


# -- step schedules ------------------------------------------------------------------------------------------

STEP_RECIPE = {
    "version": 1, "name": "steps", "default_backend": "rec_a",
    "exclude": {"components": ["vae", "text_encoder"]},
    "rules": [
        {"name": "ends", "steps": [{"first": 1}, {"last": 1}], "backend": "rec_a"},
        {"name": "middle-self", "pattern": "**.attn1", "backend": "rec_b"},
    ],
}


def test_step_schedule_switches_backends_at_the_right_steps_in_a_pipeline_run(rec_backends):
    log = rec_backends
    pipe = tiny_models.build("tiny-sd15-pipeline")
    kwargs = tiny_models.pipeline_call_kwargs(pipe, steps=4)
    with torch.no_grad():
        ref = pipe(**kwargs).images
    sched_vars = dict(vars(pipe.scheduler))
    patch = attnpatch.apply(pipe, recipe=STEP_RECIPE)
    assert patch.schedule is not None
    with torch.no_grad():
        out = pipe(**tiny_models.pipeline_call_kwargs(pipe, steps=4)).images
    n_self = sum(1 for s in patch.sites if s.path.endswith("attn1"))
    n_cross = sum(1 for s in patch.sites if s.path.endswith("attn2"))
    per_step = Counter(log)
    assert per_step[("rec_a", 0)] == n_self + n_cross  # first step: every site exact (rule "ends")
    assert per_step[("rec_a", 3)] == n_self + n_cross  # last of 4 steps: the same
    for step in (1, 2):  # middle steps: self-attention on rec_b, cross-attention on the default
        assert per_step[("rec_b", step)] == n_self
        assert per_step[("rec_a", step)] == n_cross
    assert set(per_step) == {("rec_a", 0), ("rec_a", 1), ("rec_a", 2), ("rec_a", 3), ("rec_b", 1), ("rec_b", 2)}
    rows = {r.site.path: r.calls for r in patch.report().rows}
    assert rows["unet.mid_block.attentions.0.transformer_blocks.0.attn1"] == {"rec_a": 2, "rec_b": 2}
    torch.testing.assert_close(out, ref)
    patch.remove()
    assert vars(pipe.scheduler).keys() == sched_vars.keys()  # set_timesteps / step wrappers removed
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)


def test_step_outside_a_pipeline_and_as_a_context_manager(rec_backends, models):
    log = rec_backends
    model = models("tiny-wan")
    inputs = tiny_models.example_inputs("tiny-wan", model)
    rec = dict(STEP_RECIPE, exclude={})
    patch = attnpatch.apply(model, recipe=rec)
    try:
        def backends_used():
            log.clear()
            with torch.no_grad():
                model(**inputs)
            return sorted({name for name, _ in log})

        assert attnpatch.current_step(model) is None
        assert backends_used() == ["rec_a", "rec_b"]  # no step known: step rules are skipped
        attnpatch.step(0, total=4)
        assert backends_used() == ["rec_a"]
        attnpatch.step(2, total=4)
        assert backends_used() == ["rec_a", "rec_b"]
        with attnpatch.step(3, target=model):
            assert attnpatch.current_step(model) == 3
            assert backends_used() == ["rec_a"]
        assert attnpatch.current_step(model) == 2  # restored on exit
        patch.update("rec_a")  # explicit settings win from then on
        attnpatch.step(2, total=4)
        assert backends_used() == ["rec_a"]
    finally:
        patch.remove()
        attnpatch.step(None)
    with pytest.raises(ValueError, match="the step must be an int >= 0"):
        attnpatch.step(-1)


def test_step_selectors():
    sel = recipes.IndexSelector((("first", 2), ("last", 1), ("range", 4, 5), ("at", -3)))
    assert [i for i in range(10) if sel.contains(i, 10)] == [0, 1, 4, 5, 7, 9]
    assert [i for i in range(10) if sel.contains(i, None)] == [0, 1, 4, 5]  # unknown total: no "last"


def test_the_readme_example_recipe_is_valid_and_matches_its_model(models):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    rec = recipes.loads(example, "README.md")
    assert rec.lossy and rec.has_steps()
    plan = recipes.plan(rec, discover(models("tiny-wan")), [""])
    assert plan.unmatched() == [] and all(plan.hits.values())
