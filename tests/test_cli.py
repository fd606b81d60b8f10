"""The `attnpatch` command, run in subprocesses: output, files and exit codes, including user errors
(one line and a hint, no traceback)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from attnpatch import cli, recipes, tiny_models


def run(*args, env=None, timeout=240):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNPATCH_")}
    full_env.update({"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    full_env.update(env or {})
    p = subprocess.run([sys.executable, "-m", "attnpatch.cli", *args], capture_output=True, text=True,
                       env=full_env, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def main(capsys, *args, env=None, monkeypatch=None):
    """`attnpatch ARGS` in this process (for the variants of a command already run in a subprocess)."""
    try:
        rc = cli.main(list(args))
    except SystemExit as e:  # argparse's --help / usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, code, *needles):
    assert rc == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("attnpatch: error: ") and lines[1].startswith("  hint: "), err
    for n in needles:
        assert n in err


def test_console_script_points_at_cli_main():
    from importlib import metadata

    eps = [e for e in metadata.entry_points(group="console_scripts") if e.name == "attnpatch"]
    assert [e.value for e in eps] == ["attnpatch.cli:main"]


@pytest.mark.parametrize("argv", [[], ["info"], ["inspect"], ["bench"], ["recipe"], ["recipe", "list"],
                                  ["recipe", "show"], ["recipe", "check"], ["explain"], ["autotune"], ["demo"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: attnpatch") and "--help" in out


def test_help_in_a_subprocess_lists_the_commands():
    rc, out, _ = run("--help")
    assert rc == 0
    for cmd in ("info", "inspect", "bench", "recipe", "explain", "autotune", "demo"):
        assert re.search(rf"^\s+{cmd}\s", out, re.M), cmd


def test_info_table():
    import torch

    rc, out, err = run("info")
    assert rc == 0, err
    assert f"torch {torch.__version__}" in out and "cuDNN" in out
    assert re.search(r"^sdpa\s+yes\s+", out, re.M)
    assert "GPU: none" in out or "compute capability" in out

def test_info_json(capsys):
    import torch

    rc, out, err = main(capsys, "info", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["torch"] == torch.__version__
    b = {x["name"]: x for x in info["backends"]}
    assert b["sdpa"]["available"] and b["sdpa"]["backward"] and not b["sdpa"]["lossy"]
    assert {"why_not", "version", "lossy", "backward"} <= set(b["eager"])
    assert not b["flash_attn"]["available"] == bool(b["flash_attn"]["why_not"]) or b["flash_attn"]["available"]


def test_inspect_builtin_model_lists_sites_rules_and_backends():
    rc, out, err = run("inspect", "tiny-flux")
    assert rc == 0, err
    assert "recipe: flux (chosen automatically)" in out
    assert re.search(r"^transformer_blocks\.0\.attn\s+joint\s+2\s+16\s+diffusers\s+yes\s+dual-stream\s+auto", out, re.M)
    assert re.search(r"^single_transformer_blocks\.1\.attn\s+\S+\s+2\s+16\s+.*single-stream\s+auto\s+sdpa", out, re.M)
    assert "4 sites, 4 would be routed" in out


def test_inspect_a_local_transformers_folder_with_a_recipe_and_json(tmp_path, capsys):
    model = tiny_models.build("tiny-llama")
    model.save_pretrained(tmp_path / "llama")
    rc, out, err = main(capsys, "inspect", str(tmp_path / "llama"), "--recipe", "llama", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["schema_version"] == 1 and doc["kind"] == "transformers" and doc["recipe"] == "llama"
    # the saved architecture (LlamaForCausalLM), so the paths are those apply() sees on the loaded model
    assert doc["class"] == "LlamaForCausalLM"
    assert [s["path"] for s in doc["sites"]] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(s["candidates"] == [{"rule": "self", "backend": ["auto"], "allow_lossy": False, "steps": None}]
               and s["kind"] == "self" and s["heads"] == 4 for s in doc["sites"])


def test_inspect_refuses_remote_code_unless_asked(tmp_path, capsys):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mystery", "auto_map": {"AutoModel": "m.M"}}))
    (folder / "m.py").write_text("raise SystemExit('remote code ran')\n")
    rc, out, err = main(capsys, "inspect", str(folder))
    assert_user_error(rc, err, 2, "ships its own model code", "--trust-remote-code")


def test_inspect_user_errors_missing_path_and_offline_hub_id(capsys, monkeypatch):
    rc, out, err = run("inspect", "/no/such/model")
    assert_user_error(rc, err, 2, "no such model folder: /no/such/model", "tiny-flux")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, out, err = main(capsys, "inspect", "someorg/somemodel")
    assert_user_error(rc, err, 2, "'someorg/somemodel' is not a local folder", "HF_HUB_OFFLINE")
    rc, out, err = main(capsys, "inspect", "tiny-flux", "--recipe", "nope")
    assert_user_error(rc, err, 2, "no shipped recipe named 'nope'")


def test_bench_shapes_writes_json_and_a_png(tmp_path):
    jf, pf = tmp_path / "b.json", tmp_path / "b.png"
    rc, out, err = run("bench", "--shape", "1,2,64,16", "--shape", "2,2,32,8", "--causal", "--backends",
                       "sdpa,sdpa_math,flash_attn", "--warmup", "1", "--repeat", "2", "--json", str(jf),
                       "--plot", str(pf), "--no-progress")
    assert rc == 0, err
    # median, spread, min-max, TFLOP/s, rel.err
    assert re.search(r"^1x2x64x16 float32 causal\s+sdpa \*\s+[\d.]+\s+±\d+%\s+[\d.]+-[\d.]+\s+[\d.]+\s+\d\.\de-\d\d",
                     out, re.M)
    doc = json.loads(jf.read_text())
    rows = doc["results"]
    assert len(rows) == 6 and doc["device"] in ("cpu", "cuda")
    by = {(tuple(r["shape"]), r["backend"]): r for r in rows}
    r = by[((1, 2, 64, 16), "sdpa_math")]
    assert r["eligible"] and r["median_ms"] > 0 and r["tflops"] > 0 and r["relerr"] < 1e-5 and r["causal"]
    assert by[((1, 2, 64, 16), "sdpa")]["auto"] is True
    fa = by[((2, 2, 32, 8), "flash_attn")]
    if not fa["eligible"]:
        assert fa["reasons"] and fa["median_ms"] is None
    from PIL import Image

    with Image.open(pf) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200


def test_bench_on_shapes_captured_from_a_model(tmp_path, capsys):
    jf = tmp_path / "m.json"
    rc, out, err = main(capsys, "bench", "--model", "tiny-wan", "--backends", "sdpa,eager", "--repeat", "1", "--warmup", "0",
                       "--json", str(jf), "--no-progress")
    assert rc == 0, err
    rows = json.loads(jf.read_text())["results"]
    shapes = {(tuple(r["shape"]), r["seq_kv"]) for r in rows}
    assert ((1, 2, 32, 16), 32) in shapes  # self-attention: 2 frames x 4 x 4 patches
    assert ((1, 2, 32, 16), 8) in shapes  # cross-attention to 8 text tokens
    assert all(r["calls"] == 2 for r in rows)  # each shape is called by two blocks


def test_bench_and_explain_bad_arguments(capsys):
    rc, out, err = run("bench", "--shape", "1,2,3")
    assert_user_error(rc, err, 2, "--shape '1,2,3' is not four positive integers b,h,s,d")
    rc, out, err = main(capsys, "bench")
    assert_user_error(rc, err, 2, "bench needs --shape")
    rc, out, err = main(capsys, "explain", "--shape", "1,4,64,16", "--backend", "nope")
    assert_user_error(rc, err, 2, "unknown attention backend 'nope'", "valid names: auto")
    rc, out, err = main(capsys, "bench", "--shape", "1,2,8,8", "--mask", "weird")
    assert_user_error(rc, err, 2, "invalid choice: 'weird'")
    rc, out, err = main(capsys, "recipe")
    assert_user_error(rc, err, 2, "recipe needs a subcommand")
    rc, out, err = main(capsys, "frobnicate")
    assert rc == 2 and "invalid choice: 'frobnicate'" in err


def test_explain_says_which_backend_and_where_the_choice_came_from(capsys):
    def cli_main_in_process(*args):
        return main(capsys, *args)

    rc, out, err = cli_main_in_process("explain", "--shape", "1,4,128,32", "--kv-heads", "2", "--causal")
    assert rc == 0, err
    assert "q=(b=1, h=4, s=128, d=32) kv=(h=2, s=128, d_v=32)" in out and "causal=True" in out
    assert re.search(r"^chosen: \S+ \(decided by auto", out, re.M)
    rc, out, err = run("explain", "--shape", "1,4,128,32", "--json", env={"ATTNPATCH_BACKEND": "sdpa_math"})
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["backend"] == "sdpa_math" and doc["source"] == "ATTNPATCH_BACKEND"
    assert doc["reasons"]["sdpa_math"] == [] and "eager" in doc["reasons"]


def test_recipe_list_and_show(capsys):
    rc, out, err = run("recipe", "list")
    assert rc == 0, err
    for name in recipes.shipped_names():
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name
    assert re.search(r"^wan-lossy\s+LOSSY", out, re.M)
    rc, out, err = main(capsys, "recipe", "show", "flux")
    assert rc == 0, err
    assert "name: flux" in out and "single_transformer_blocks.*.attn" in out
    rc, out, err = main(capsys, "recipe", "show", "fluxx")
    assert_user_error(rc, err, 2, "no shipped recipe named 'fluxx' (did you mean 'flux'?)")


def test_recipe_check_reports_errors_with_line_and_unmatched_rules(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: t\nrules:\n  - pattern: 'blocks.*.attn1'\n    backend: fash\n")
    rc, out, err = run("recipe", "check", str(bad))
    assert_user_error(rc, err, 2, f"{bad}:5: rules[0].backend: unknown backend 'fash'")
    odd = tmp_path / "odd.yaml"
    odd.write_text("version: 1\nname: t\nrules:\n  - name: self\n    pattern: 'blocks.*.attn1'\n    backend: sdpa\n"
                   "  - name: typo\n    pattern: 'blocks.*.atn2'\n    backend: sdpa\n")
    rc, out, err = main(capsys, "recipe", "check", str(odd), "--model", "tiny-wan", "--strict")
    assert "rule self: 2 sites" in out and "rule typo: no sites" in out
    assert f"{odd}:7: rules[1] (typo): pattern 'blocks.*.atn2' matches no attention site" in err
    assert_user_error(rc, err.split("\n", 1)[1], 1, "1 rule(s) match no site of tiny-wan")
    rc, out, err = main(capsys, "recipe", "check", recipes.shipped_path("wan-lossy"), "--model", "tiny-wan")
    assert rc == 0, err
    assert "valid recipe 'wan-lossy'" in out and "LOSSY" in out and "rule self-lossy: 2 sites" in out


def test_autotune_clear_uses_the_autotune_module(tmp_path):
    rc, out, err = run("autotune", "--clear", env={"ATTNPATCH_CACHE_DIR": str(tmp_path)})
    assert rc == 0, err
    assert re.match(r"cleared \d+ cached autotune entr", out) and str(tmp_path) in out
    assert "Traceback" not in err


def test_demo_runs_the_tiny_pipeline_stock_and_patched():
    rc, out, err = run("demo", "--steps", "2", "--repeat", "1")
    assert rc == 0, err + out
    assert "recipe: sd15 (chosen automatically)" in out
    assert "left alone (not patched): vae, text_encoder" in out
    rows = re.findall(r"^(unet\.\S+)\s+(self|cross)\s+\d+\s+16\s+recipe sd15: rule (self|cross)\s+(\S+)×(\d+)", out, re.M)
    assert len(rows) == 8 and all(int(n) > 0 for *_, n in rows)
    assert re.search(r"^stock:\s+[\d.]+ ms", out, re.M) and re.search(r"^patched:\s+[\d.]+ ms", out, re.M)
    diff = float(re.search(r"largest output difference: (\S+)", out).group(1))
    assert diff < 1e-4 and "outputs match" in out


def test_demo_with_another_model_and_a_missing_model_path(capsys):
    rc, out, err = main(capsys, "demo", "--model", "tiny-llama", "--repeat", "1")
    assert rc == 0, err + out
    assert "recipe: llama (chosen automatically)" in out and "outputs match" in out
    rc, out, err = main(capsys, "demo", "--model", "/definitely/missing")
    assert_user_error(rc, err, 2, "no such model folder: /definitely/missing")


# -- usability: version, --debug, environment, exit codes ------------------------------------------------------

def test_version_and_debug_anywhere_on_the_line(capsys):
    import attnpatch

    rc, out, err = run("--version")
    assert rc == 0 and out.strip() == f"attnpatch {attnpatch.__version__}"
    rc, out, err = main(capsys, "explain", "--shape", "1,2,3")
    assert_user_error(rc, err, 2, "--shape '1,2,3'")
    with pytest.raises(cli.CliError, match="--shape '1,2,3'"):  # --debug: the exception itself, not one line
        cli.main(["explain", "--shape", "1,2,3", "--debug"])
    with pytest.raises(cli.CliError):
        cli.main(["--debug", "explain", "--shape", "1,2,3"])
    rc, out, err = main(capsys, "info", "--debug")
    assert rc == 0, err


@pytest.mark.parametrize("var,value,says", [
    ("ATTNPATCH_BACKEND", "bogus", "unknown attention backend 'bogus' from environment variable ATTNPATCH_BACKEND"),
    ("ATTNPATCH_BACKEND", "sdpa ", "ATTNPATCH_BACKEND: 'sdpa ' has whitespace"),
    ("ATTNPATCH_STRICT", "maybe", "ATTNPATCH_STRICT='maybe' is not a boolean"),
])
def test_a_bad_environment_variable_is_bad_input_for_every_command(var, value, says, capsys, monkeypatch):
    monkeypatch.setenv(var, value)
    rc, out, err = main(capsys, "info")
    assert_user_error(rc, err, 2, says, "fix or unset the variable")
    assert out == ""
    if var == "ATTNPATCH_BACKEND" and value == "bogus":
        rc, out, err = run("info", env={var: value})
        assert_user_error(rc, err, 2, says)


def test_bad_counts_are_bad_input_with_clear_messages(capsys):
    for argv, says in [
        (["demo", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["demo", "--repeat", "0"], "argument --repeat: must be at least 1, got 0"),
        (["bench", "--shape", "1,2,8,8", "--repeat", "0"], "argument --repeat: must be at least 1, got 0"),
        (["bench", "--shape", "1,2,8,8", "--warmup", "-1"], "argument --warmup: must be 0 or more, got -1"),
        (["explain", "--shape", "1,2,8,8", "--kv-heads", "0"], "argument --kv-heads: must be at least 1, got 0"),
        (["explain", "--shape", "1,2,8,8", "--seq-kv", "0"], "argument --seq-kv: must be at least 1, got 0"),
        (["explain", "--shape", "1,2,8,8", "--seq-kv", "x"], "argument --seq-kv: 'x' is not an integer"),
    ]:
        rc, out, err = main(capsys, *argv)
        assert rc == 2 and says in err and "Traceback" not in err, (argv, err)


def test_missing_or_invalid_recipe_files_exit_2(tmp_path, capsys):
    rc, out, err = main(capsys, "inspect", "tiny-flux", "--recipe", str(tmp_path / "none.yaml"))
    assert_user_error(rc, err, 2, "none.yaml: no such file")
    rc, out, err = main(capsys, "recipe", "check", str(tmp_path / "none.yaml"))
    assert_user_error(rc, err, 2, "no such recipe file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: t\nrules: 3\n")
    rc, out, err = main(capsys, "demo", "--model", "tiny-llama", "--recipe", str(bad), "--repeat", "1")
    assert_user_error(rc, err, 2, f"{bad}:3: rules: must be a list of rules")


def test_recipe_show_reads_a_path_as_a_file_and_a_name_as_the_shipped_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flux.yaml").write_text("version: 1\nname: my-local-flux\n")
    rc, out, err = main(capsys, "recipe", "show", "flux")
    assert rc == 0, err
    assert out.startswith(f"# {recipes.shipped_path('flux')} (shipped)") and "name: flux" in out
    rc, out, err = main(capsys, "recipe", "show", "flux.yaml")
    assert rc == 0, err
    assert out.splitlines() == ["# flux.yaml", "version: 1", "name: my-local-flux"]
    (tmp_path / "flux.yaml").unlink()
    rc, out, err = main(capsys, "recipe", "show", "flux.yaml")
    assert_user_error(rc, err, 2, "no such recipe file: flux.yaml", "for the shipped recipe give its name: flux")


def test_padding_masks_work_when_batch_equals_sequence_length(capsys, tmp_path):
    # a 2-D (b, s_kv) mask with b == s_q is ambiguous and refused by the router: the CLI builds it 4-D
    rc, out, err = main(capsys, "explain", "--shape", "4,2,4,8", "--mask", "padding", "--json")
    assert rc == 0, err
    assert "mask=bool (4, 1, 1, 4) (key padding)" in json.loads(out)["call"]
    rc, out, err = main(capsys, "bench", "--shape", "4,2,4,8", "--mask", "padding", "--backends", "sdpa,eager",
                        "--repeat", "2", "--warmup", "0", "--no-progress", "--json")
    assert rc == 0, err
    rows = json.loads(out)["results"]
    assert all(r["eligible"] and r["relerr"] < 1e-5 for r in rows), rows


# -- output paths and optional packages are checked before the run ----------------------------------------------

def test_unwritable_outputs_and_missing_matplotlib_fail_before_the_run(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_time_call", lambda *a, **k: calls.append(a) or [0.001])
    rc, out, err = main(capsys, "bench", "--shape", "1,2,8,8", "--json", str(tmp_path / "no" / "b.json"))
    assert_user_error(rc, err, 2, "--json", "does not exist")
    rc, out, err = main(capsys, "bench", "--shape", "1,2,8,8", "--plot", str(tmp_path))
    assert_user_error(rc, err, 2, "--plot", "is a folder")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, out, err = main(capsys, "bench", "--shape", "1,2,8,8", "--plot", str(tmp_path / "b.png"))
    assert_user_error(rc, err, 2, "--plot needs matplotlib, which is not installed", "attnpatch[plot]")
    assert out == "" and calls == []  # nothing was timed
    rc, out, err = main(capsys, "inspect", "tiny-flux", "--json", str(tmp_path / "no" / "i.json"))
    assert_user_error(rc, err, 2, "does not exist")
    rc, out, err = main(capsys, "demo", "--json", str(tmp_path / "no" / "d.json"))
    assert_user_error(rc, err, 2, "does not exist")


# -- one --json convention ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["info"], ["explain", "--shape", "1,2,16,8"], ["recipe", "list"], ["inspect", "tiny-llama"],
    ["bench", "--shape", "1,2,16,8", "--backends", "sdpa", "--repeat", "2", "--warmup", "0", "--no-progress"],
    ["demo", "--model", "tiny-llama", "--repeat", "1"],
])
def test_json_goes_to_stdout_or_to_a_file_the_same_way_in_every_command(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flag in (["--json"], ["--json", "-"], ["--json=-"]):
        rc, out, err = main(capsys, *argv, *flag)
        assert rc == 0, err
        doc = json.loads(out)  # stdout is the JSON document and nothing else
        assert doc["schema_version"] == 1
    f = tmp_path / "out.json"
    rc, out, err = main(capsys, *argv, "--json", str(f))
    assert rc == 0, err
    assert json.loads(f.read_text())["schema_version"] == 1
    assert out.strip() and f"wrote {f}" in out  # the text output, and where the JSON went
    assert not (tmp_path / "-").exists()


def test_demo_json_has_the_times_the_match_and_the_sites(capsys):
    rc, out, err = main(capsys, "demo", "--model", "tiny-llama", "--repeat", "2", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["model"] == "tiny-llama" and doc["recipe"] == "llama (chosen automatically)"
    assert doc["outputs_match"] is True and doc["max_abs_diff"] <= doc["tolerance"]
    assert doc["stock"]["median_ms"] > 0 and doc["patched"]["min_ms"] <= doc["patched"]["max_ms"]
    assert [s["path"] for s in doc["sites"]] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(s["calls"] == {"sdpa": 3} and s["asked"] == ["auto"] for s in doc["sites"])


def test_inspect_json_is_data_with_nulls_not_display_strings(capsys):
    rc, out, err = main(capsys, "inspect", "tiny-sd15-pipeline", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["recipe"] == "sd15" and doc["recipe_chosen_automatically"] is True and doc["backend"] is None
    sites = {s["path"]: s for s in doc["sites"]}
    enc = sites["text_encoder.encoder.layers.0.self_attn"]
    assert enc["routed"] is False and enc["left_alone"] == "exclude.components 'text_encoder*'"
    assert enc["candidates"] == [] and enc["picks"] is None and enc["picks_error"] is None
    unet = sites["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    assert unet["routed"] is True and unet["left_alone"] is None and unet["not_routable"] is None
    assert unet["candidates"] == [{"rule": "self", "backend": ["auto"], "allow_lossy": False, "steps": None}]
    assert unet["picks"] == "sdpa" and unet["component"] == "unet"
    assert "(left alone)" not in out and '"-"' not in out


def test_inspect_step_rules_as_data(capsys):
    rc, out, err = main(capsys, "inspect", "tiny-wan", "--recipe", "wan-lossy", "--json")
    assert rc == 0, err
    site = json.loads(out)["sites"][0]
    assert [c["rule"] for c in site["candidates"]] == ["exact-first-last-steps", "self-lossy"]
    assert site["candidates"][0]["steps"] == "first 2, last 2" and site["candidates"][1]["steps"] is None


# -- bench spread ------------------------------------------------------------------------------------------------

def test_bench_reports_the_spread_and_warns_when_it_is_large(capsys, monkeypatch):
    rc, out, err = main(capsys, "bench", "--shape", "1,2,16,8", "--backends", "sdpa", "--repeat", "3", "--warmup", "0",
                        "--no-progress", "--json")
    assert rc == 0, err
    r = json.loads(out)["results"][0]
    assert r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"] and r["spread"] >= 0
    monkeypatch.setattr(cli, "_time_call", lambda *a, **k: [0.001, 0.001, 0.002, 0.030])
    rc, out, err = main(capsys, "bench", "--shape", "1,2,16,8", "--backends", "sdpa", "--repeat", "4", "--no-progress")
    assert rc == 0, err
    assert re.search(r"sdpa \*\s+1\.500\s+±\d+%\s+1\.000-30\.000", out)
    assert "warning: 1x2x16x8 float32 sdpa: times spread by" in err and "min 1.000 ms, max 30.000 ms over 4 runs" in err
    monkeypatch.setattr(cli, "_time_call", lambda *a, **k: [0.001, 0.001, 0.001, 0.001])
    rc, out, err = main(capsys, "bench", "--shape", "1,2,16,8", "--backends", "sdpa", "--repeat", "4", "--no-progress")
    assert rc == 0 and "warning" not in err


def test_bench_takes_other_libraries_names_and_refuses_auto(capsys):
    rc, out, err = main(capsys, "bench", "--shape", "1,2,16,8", "--backends", "_native_math,Eager", "--repeat", "1",
                        "--warmup", "0", "--no-progress", "--json")
    assert rc == 0, err
    assert [r["backend"] for r in json.loads(out)["results"]] == ["sdpa_math", "eager"]
    rc, out, err = main(capsys, "bench", "--shape", "1,2,16,8", "--backends", "auto")
    assert_user_error(rc, err, 2, "--backends auto")


# -- inspect / recipe check: the saved architecture, without weights ------------------------------------------------

def _corrupt_weights(folder):
    for f in folder.rglob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")


def test_inspect_builds_the_saved_architecture_without_reading_weights(tmp_path, capsys):
    tiny_models.build("tiny-llama").save_pretrained(tmp_path / "llama")
    tiny_models.build("tiny-flux").save_pretrained(tmp_path / "flux")
    tiny_models.build("tiny-sd15-pipeline").save_pretrained(tmp_path / "pipe")
    for name in ("llama", "flux", "pipe"):
        _corrupt_weights(tmp_path / name)  # a weight load would fail: inspect must not need them
    rc, out, err = main(capsys, "inspect", str(tmp_path / "llama"))
    assert rc == 0, err
    assert "(LlamaForCausalLM, transformers; structure only, no weights loaded)" in out
    assert "recipe: llama (chosen automatically)" in out and re.search(r"^model\.layers\.1\.self_attn\s+self", out, re.M)
    rc, out, err = main(capsys, "inspect", str(tmp_path / "flux"))
    assert rc == 0, err
    assert "recipe: flux (chosen automatically)" in out and "4 sites, 4 would be routed" in out
    rc, out, err = main(capsys, "inspect", str(tmp_path / "pipe"), "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["class"] == "StableDiffusionPipeline" and doc["recipe"] == "sd15"
    assert sum(s["routed"] for s in doc["sites"]) == 8 and "scheduler" in doc["components_not_built"]
    rc, out, err = main(capsys, "demo", "--model", str(tmp_path / "llama"), "--repeat", "1")
    assert rc == 1 and "could not load" in err  # running needs the weights, and says so


def test_recipe_check_matches_the_rules_against_the_saved_architecture(tmp_path, capsys):
    tiny_models.build("tiny-llama").save_pretrained(tmp_path / "llama")
    r = tmp_path / "r.yaml"
    r.write_text("version: 1\nname: t\nrules:\n  - name: lm\n    pattern: 'model.layers.*.self_attn'\n    backend: sdpa\n")
    rc, out, err = main(capsys, "recipe", "check", str(r), "--model", str(tmp_path / "llama"), "--strict")
    assert rc == 0, err
    assert "rule lm: 2 sites" in out and "(LlamaForCausalLM)" in out
