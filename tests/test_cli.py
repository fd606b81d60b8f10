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
