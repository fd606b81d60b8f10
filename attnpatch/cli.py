"""The ``attnpatch`` command: info, inspect, bench, recipe, explain, autotune, demo.

Every subcommand has ``--help``; ``attnpatch --version`` prints the version. User errors print one line
and a hint to stderr and exit non-zero (2 for bad input: a missing model path, a bad option value, a
missing or invalid recipe, a bad ``ATTNPATCH_*`` variable; 1 for failures); ``--debug`` (anywhere on
the line) shows the traceback.

JSON, one convention for every command that has it (info, inspect, explain, bench, demo, recipe list):
``--json`` (or ``--json -``) prints the JSON document to stdout instead of the text; ``--json FILE``
writes it to FILE and prints the text as usual. Each document has a ``schema_version``. Output paths
(``--json FILE``, ``--plot FILE``) are checked before any work starts.

Heavy libraries (diffusers, transformers, matplotlib) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .cli_common import (EXIT_FAIL, EXIT_USAGE, SCHEMA_VERSION, CliError, _dtype, _DTYPES, _time_call, _write_json,  # noqa: F401
                         add_json_option, check_output_path, emit_json, json_to_stdout, parse_shape, table)


# -- small helpers -------------------------------------------------------------------------------------

def _quiet_libraries() -> None:
    """Keep diffusers' / transformers' deprecation chatter out of the command's output."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*steps_offset.*")
    for name in ("diffusers", "transformers"):
        try:
            mod = __import__(f"{name}.utils.logging", fromlist=["set_verbosity_error"])
            mod.set_verbosity_error()
            if hasattr(mod, "disable_progress_bar"):
                mod.disable_progress_bar()
        except Exception:
            pass


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


#: Version of the JSON documents the commands write (bumped when a field changes meaning or goes).


def _device(name: Optional[str]):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CliError(f"unknown device {name!r}", "use cpu, cuda or cuda:N", EXIT_USAGE) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"device {name} was asked for but torch sees no CUDA GPU",
                       "run on a GPU machine, or use --device cpu", EXIT_USAGE)
    return dev


def _progress(items: List[Any], desc: str, enabled: bool):
    """tqdm over ``items`` when installed (on stderr); else a plain counter on stderr."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr, leave=False, disable=None)  # off when not a terminal
    except ImportError:
        def gen():
            for i, it in enumerate(items):
                print(f"\r{desc}: {i + 1}/{len(items)}", end="", file=sys.stderr, flush=True)
                yield it
            print(file=sys.stderr)
        return gen()


# -- model loading -------------------------------------------------------------------------------------

def load_model(spec: str, trust_remote_code: bool = False, device=None, dtype=None, weights: bool = True):
    """Resolve MODEL: a built-in tiny model name, a local folder (diffusers pipeline or model,
    transformers model), or a hub id (needs network). Returns (object, kind, label) with kind
    "pipeline", "diffusers", "transformers" or "tiny". A saved model is built as the class it was saved
    as (`attnpatch.structure`); with ``weights=False`` (inspect, recipe check) it is built from its
    configs on the meta device, without reading any weight."""
    from . import tiny_models

    if spec in tiny_models.NAMES:
        _quiet_libraries()
        obj = tiny_models.build(spec)
        kind = "pipeline" if spec.endswith("-pipeline") else "tiny"
        return _to(obj, device, dtype), kind, spec
    if os.path.isdir(spec):
        return _load_local(spec, trust_remote_code, device, dtype, weights)
    if os.path.exists(spec):
        raise CliError(f"{spec} is a file; MODEL must be a folder (a diffusers pipeline or model, or a "
                       "transformers model) or a built-in demo model",
                       "single-file checkpoints are not supported: load them in Python and call attnpatch.apply",
                       EXIT_USAGE)
    looks_like_hub = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and " " not in spec
    names = ", ".join(tiny_models.NAMES)
    if not looks_like_hub:
        raise CliError(f"no such model folder: {spec}",
                       f"give a local folder, a hub id (org/name; needs network) or a built-in model: {names}",
                       EXIT_USAGE)
    return _load_hub(spec, trust_remote_code, device, dtype, weights)


def _to(obj, device, dtype):
    if device is None and dtype is None:
        return obj
    kw = {}
    if device is not None:
        kw["device"] = device
    if dtype is not None:
        kw["dtype"] = dtype
    if hasattr(obj, "components"):
        obj.to(**({"device": device} if device is not None else {}))
        if dtype is not None:
            obj.to(dtype)
        return obj
    return obj.to(**kw)


def _load_local(path: str, trust: bool, device, dtype, weights: bool = True):
    from . import structure

    _quiet_libraries()
    try:
        kind, cfg = structure.saved_kind(path)
        if kind == "transformers" and cfg.get("auto_map") and not trust:
            raise CliError(f"{path} ships its own model code (auto_map in config.json); attnpatch does "
                           "not run remote code unless asked", "pass --trust-remote-code if you trust it",
                           EXIT_USAGE)
        if kind is not None and not weights:
            obj, kind = structure.load_structure(path, trust)
            return obj, kind, path
        if kind == "pipeline":
            import diffusers

            pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True, trust_remote_code=trust,
                                                               **({"torch_dtype": dtype} if dtype else {}))
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            return _to(pipe, device, None), "pipeline", path
        if kind == "diffusers":
            model = structure.build_diffusers_model(path, cfg, trust, True, dtype)
            return _to(model.eval(), device, None), "diffusers", path
        if kind == "transformers":
            model = structure.build_transformers(path, cfg, trust, True, dtype)
            return _to(model.eval(), device, None), "transformers", path
    except CliError:
        raise
    except json.JSONDecodeError as exc:
        raise CliError(f"a config file in {path} (model_index.json or config.json) is not valid JSON: {exc}",
                       "check the file", EXIT_FAIL) from None
    except Exception as exc:  # library loaders raise many types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc):
            raise CliError(f"loading {path} needs its own code: {msg}", "pass --trust-remote-code if you trust it",
                           EXIT_USAGE) from None
        raise CliError(f"could not load {path}: {type(exc).__name__}: {msg}",
                       "check that the folder is a complete diffusers or transformers save", EXIT_FAIL) from None
    raise CliError(f"{path} is not a model folder: it has neither model_index.json (a diffusers pipeline) nor "
                   "config.json (a diffusers or transformers model)",
                   "point MODEL at the folder that holds model_index.json or config.json", EXIT_USAGE)


def _load_hub(repo: str, trust: bool, device, dtype, weights: bool = True):
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise CliError(f"{repo!r} is not a local folder, and HF_HUB_OFFLINE is set, so the hub cannot be used",
                       "download the model first and pass its folder", EXIT_USAGE)
    patterns = ["*.json", "*.txt", "*.model", "*.safetensors"] if weights else ["*.json", "*.txt"]
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, allow_patterns=patterns, etag_timeout=10)
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        offline = any(w in text for w in ("Connection", "resolve", "offline", "Offline", "Timeout", "Max retries",
                                           "LocalEntryNotFound", "Network"))
        if offline:
            raise CliError(f"cannot reach the Hugging Face Hub to fetch {repo!r} (no network here?)",
                           "give a local folder, or a built-in demo model (attnpatch inspect --help lists them)",
                           EXIT_USAGE) from None
        raise CliError(f"could not fetch {repo!r} from the hub: {text.splitlines()[0]}",
                       "check the id, or give a local folder", EXIT_USAGE) from None
    return _load_local(local, trust, device, dtype, weights)


def model_device(obj):
    """(device, dtype) of the model's first parameter. A model built without weights (on the meta
    device) answers with the device it would run on here (cuda when present, else cpu) and bfloat16 on
    cuda, float32 on cpu."""
    import torch

    mods = [m for m in getattr(obj, "components", {}).values() if isinstance(m, torch.nn.Module)] or [obj]
    for m in mods:
        for p in m.parameters():
            if p.device.type == "meta":
                cuda = torch.cuda.is_available()
                return torch.device("cuda" if cuda else "cpu"), (torch.bfloat16 if cuda else torch.float32)
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


# -- info ---------------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    import torch

    import attnpatch

    info: Dict[str, Any] = {
        "attnpatch": attnpatch.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": None, "gpus": [],
    }
    try:
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        pass
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            info["gpus"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                 "capability": f"{cap[0]}.{cap[1]}"})
    from importlib import metadata

    libs = {}
    for lib in ("diffusers", "transformers", "triton", "flash-attn", "xformers", "sageattention"):
        try:
            libs[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            libs[lib] = None
    info["libraries"] = libs
    from . import aliases, installs

    info["backends"] = [{
        "name": b.name, "available": b.available, "why_not": b.why_not or None, "version": b.version,
        "lossy": b.lossy, "backward": b.backward, "package": b.package, "disabled": b.disabled,
        "auto_note": b.auto_note,
        "how_to_get": installs.how_to_get(b), "aliases": [a.name for a in aliases.aliases_of(b.name)],
    } for b in attnpatch.backends()]
    info["extras"] = dict(installs.EXTRAS)
    info["aliases"] = [{"name": a.name, "origin": a.origin, "backend": a.backend, "note": a.note or None}
                       for a in aliases.ALIASES]
    if args.json:
        emit_json(args, info)
        if json_to_stdout(args):
            return 0
    print(f"attnpatch {info['attnpatch']}  python {info['python']}  torch {info['torch']}")
    print(f"CUDA {info['cuda'] or 'none (CPU build)'}  cuDNN {info['cudnn'] or 'none'}")
    if info["gpus"]:
        for g in info["gpus"]:
            print(f"GPU {g['index']}: {g['name']} (compute capability {g['capability']})")
    else:
        print("GPU: none (torch.cuda.is_available() is False)")
    print("libraries: " + ", ".join(f"{k} {v or '-'}" for k, v in libs.items()))
    print()
    rows = [(b["name"], "yes" if b["available"] else "no", b["version"] or "-", "yes" if b["lossy"] else "no",
             "yes" if b["backward"] else "no", ("DISABLED by ATTNPATCH_DISABLE; " if b["disabled"] else "")
             + (b["why_not"] or b["auto_note"] or "")) for b in info["backends"]]
    print(table(rows, ["backend", "available", "version", "lossy", "backward", "why not"]))
    missing = [b for b in info["backends"] if not b["available"] and b["how_to_get"]]
    if missing:
        print("\nhow to get the backends that are not available here:")
        width = max(len(b["name"]) for b in missing)
        for b in missing:
            print(f"  {b['name'].ljust(width)}  {b['how_to_get']}")
    print("\nextras (pip install 'attnpatch[EXTRA]'):")
    width = max(len(k) for k in installs.EXTRAS)
    for k, what in installs.EXTRAS.items():
        print(f"  {k.ljust(width)}  {what}")
    print("\nnames from other libraries (any case; reports and stats show attnpatch's name):")
    by_backend: Dict[str, List[str]] = {}
    for name, origin, backend, _note in aliases.describe_table():
        if backend != "-":
            by_backend.setdefault(backend, []).append(f"{name} ({origin})")
    width = max(len(k) for k in by_backend)
    for backend, names in by_backend.items():
        print(f"  {backend.ljust(width)}  <- {', '.join(names)}")
    print("  refused (no attnpatch backend runs that kernel):")
    for a in aliases.ALIASES:
        if a.backend is None:
            print(f"    {a.name} ({a.origin}): {a.note}")
    return 0


# -- inspect ---------------------------------------------------------------------------------------------

def _auto_pick(site: Dict[str, Any], device, dtype, cache) -> Tuple[Optional[str], Optional[str]]:
    """(backend, None) the router would choose for a representative call of this site (1 x heads x 1024
    x head_dim) under the rule that holds when no step is known (the last candidate), or (None, why not)."""
    import torch

    import attnpatch
    from .controls import Scope

    heads, d = site["heads"], site["head_dim"]
    kv = site["kv_heads"] or heads
    if not site["routed"]:
        return None, None
    if not heads or not d:
        return None, "heads or head_dim unknown for this site"
    cand = site["candidates"][-1]
    names = () if cand["backend"] == ["auto"] else tuple(cand["backend"])
    key = (heads, kv, d, names, cand["allow_lossy"])
    if key not in cache:
        try:
            q = torch.randn(1, heads, 1024, d, device=device, dtype=dtype)
            k = torch.randn(1, kv, 1024, d, device=device, dtype=dtype)
            scope = Scope(backends=names, allow_lossy=cand["allow_lossy"])
            cache[key] = (attnpatch.explain(q, k, k, site=scope).backend, None)
        except Exception as exc:
            cache[key] = (None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return cache[key]


def _site_docs(target, recipe, backend, allow_lossy):
    """(recipe or None, one dict per site as `attnpatch inspect --json` writes it: data, no display text)."""
    from . import applying

    rec, rows = applying.explain_sites(target, recipe=recipe, backend=backend, allow_lossy=allow_lossy)
    docs = []
    for r in rows:
        cands = r["candidates"]
        left_alone = r["rule"] if r["routed"] and not cands else None
        docs.append({
            "path": r["path"], "component": r["component"] or None, "adapter": r["adapter"], "kind": r["kind"],
            "heads": r["heads"], "kv_heads": r["kv_heads"], "head_dim": r["head_dim"],
            "module_class": r["module_class"], "routed": bool(r["routed"] and cands),
            "left_alone": left_alone, "not_routable": None if r["routed"] else (r["note"] or "not routable"),
            "candidates": cands, "picks": None, "picks_error": None,
        })
    return rec, docs


def _recipe_arg(args):
    if getattr(args, "no_recipe", False):
        return False
    return getattr(args, "recipe", None)


def _candidates_text(site: Dict[str, Any]) -> Tuple[str, str, str]:
    """(rule, backend, steps) columns of `attnpatch inspect` for one site."""
    cands = site["candidates"]
    if site["left_alone"]:
        return site["left_alone"], "(left alone)", ""
    if not cands:
        return "-", "-", ""
    rule = " | ".join(c["rule"] for c in cands)
    backend = " | ".join(",".join(c["backend"]) for c in cands) + (
        " (lossy ok)" if any(c["allow_lossy"] for c in cands) else "")
    steps = " | ".join(f"steps {c['steps']}" if c["steps"] else "other steps" for c in cands) if len(cands) > 1 else ""
    return rule, backend, steps


def cmd_inspect(args) -> int:
    _quiet_libraries()
    check_output_path(args.json, "--json")
    obj, kind, label = load_model(args.model, args.trust_remote_code, weights=False)
    device, dtype = model_device(obj)
    rec, sites = _site_docs(obj, _recipe_arg(args), args.backend, args.allow_lossy)
    cache: Dict[Any, Tuple[Optional[str], Optional[str]]] = {}
    for site in sites:
        site["picks"], site["picks_error"] = _auto_pick(site, device, dtype, cache)
    dt = str(dtype).replace("torch.", "")
    chosen = _recipe_arg(args) is None
    skipped = getattr(obj, "skipped", {}) or {}
    if args.json:
        emit_json(args, {
            "model": label, "kind": kind, "class": getattr(obj, "class_name", None) or type(obj).__name__,
            "recipe": rec.name if rec else None, "recipe_chosen_automatically": chosen if rec else None,
            "recipe_lossy": rec.lossy if rec else None,
            "backend": None if rec else list(_names_or_auto(args.backend, "--backend")),
            "picks_for": {"shape": "1 x heads x 1024 x head_dim", "device": device.type, "dtype": dt},
            "components_not_built": skipped, "sites": sites,
        })
        if json_to_stdout(args):
            return 0
    built = "built-in, random weights" if label in _tiny_names() else "structure only, no weights loaded"
    print(f"model: {label} ({getattr(obj, 'class_name', None) or type(obj).__name__}, {kind}; {built})")
    if skipped:
        print("not built (no attention to route): " + ", ".join(f"{k} ({v})" for k, v in skipped.items()))
    if rec is not None:
        print(f"recipe: {rec.name}" + (" (chosen automatically)" if chosen else "") + (" — LOSSY" if rec.lossy else ""))
    else:
        print("recipe: none" + (" matches this model" if chosen else "") + f"; every site gets backend={args.backend}")
    if not sites:
        print("no attention sites found")
        return 0
    trows = []
    for site in sites:
        rule, backend, steps = _candidates_text(site)
        routed = "yes" if site["routed"] else ("no: " + site["not_routable"] if site["not_routable"] else "no")
        pick = site["picks"] or (f"none ({site['picks_error']})" if site["picks_error"] else ("?" if site["routed"] else "-"))
        trows.append((site["path"], site["kind"], site["heads"] or "?", site["head_dim"] or "?", site["adapter"], routed,
                      rule, backend, steps, pick))
    print(table(trows, ["site", "kind", "heads", "head_dim", "adapter", "routed", "rule", "backend", "steps",
                        f"picks (1x h x 1024 x d, {dt} on {device.type})"]))
    n_routed = sum(1 for site in sites if site["routed"])
    print(f"\n{len(sites)} sites, {n_routed} would be routed")
    return 0


def _names_or_auto(spec: str, option: str) -> Tuple[str, ...]:
    """Canonical backend names of an option (["auto"] for auto)."""
    from . import controls

    return controls.normalise_backends(spec, option) or ("auto",)


def _tiny_names():
    from . import tiny_models

    return tiny_models.NAMES


# -- explain --------------------------------------------------------------------------------------------

def _make_inputs(shape, dtype, device, kv_heads=None, seq_kv=None, mask="none", layout="bnsd", seed=0):
    import torch

    b, h, s, d = shape
    hk = kv_heads or h
    sk = seq_kv or s
    if h % hk:
        raise CliError(f"--kv-heads {hk} does not divide the {h} query heads", "use a divisor of the heads", EXIT_USAGE)
    g = torch.Generator("cpu").manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, hk, sk, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, hk, sk, d, generator=g).to(device=device, dtype=dtype)
    m = None
    if mask == "bool":
        m = (torch.rand(b, 1, s, sk, generator=g) > 0.2).to(device)
        m[..., 0] = True
    elif mask == "additive":
        m = (torch.randn(b, 1, s, sk, generator=g) * 0.5).to(device=device, dtype=dtype)
    elif mask == "padding":  # a key-padding mask, 4-D (b, 1, 1, s_kv): a 2-D one is ambiguous when b == s_q
        m = torch.ones(b, 1, 1, sk, dtype=torch.bool)
        if sk > 1:
            m[..., sk - max(1, sk // 8):] = False
        m = m.to(device)
    elif mask != "none":
        raise CliError(f"unknown --mask {mask!r}", "use none, bool, additive or padding", EXIT_USAGE)
    if layout == "bsnd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return q, k, v, m


@contextlib.contextmanager
def _lossy_scope(allow_lossy: bool, strict: bool = False):
    import attnpatch

    if allow_lossy or strict:
        with attnpatch.use_backend(None, allow_lossy=allow_lossy or None, strict=strict or None):
            yield
    else:
        yield


def cmd_explain(args) -> int:
    import attnpatch

    check_output_path(args.json, "--json")
    shape = parse_shape(args.shape)
    q, k, v, m = _make_inputs(shape, _dtype(args.dtype), _device(args.device), args.kv_heads, args.seq_kv, args.mask,
                              args.layout)
    with _lossy_scope(args.allow_lossy, args.strict):
        e = attnpatch.explain(q, k, v, layout=args.layout, attn_mask=m, is_causal=args.causal, backend=args.backend)
    if args.json:
        emit_json(args, {"call": e.call.describe(), "backend": e.backend, "source": e.source,
                         "requested": list(e.requested),
                         "fallback": [{"from": n, "reason": why} for n, why in e.fallback], "reasons": e.reasons})
        if json_to_stdout(args):
            return 0
    print(e)
    return 0


# -- bench -----------------------------------------------------------------------------------------------


def _flops(b, h, s, sk, d, causal) -> float:
    f = 4.0 * b * h * s * sk * d
    return f / 2 if causal else f


class _Capture:
    """A temporary backend that records the distinct call shapes a model makes (and runs SDPA)."""

    def __init__(self):
        self.calls: Dict[tuple, list] = {}

    def backend(self):
        import torch.nn.functional as F

        from .registry import Backend

        capture = self

        class CaptureBackend(Backend):
            NAME = "cli_capture"
            DESCRIPTION = "attnpatch bench --model: records call shapes"
            AUTO_PRIORITY: Dict[str, int] = {}
            SUPPORTS_DROPOUT = True

            def build(self, call):
                key = (call.batch, call.heads_q, call.seq_q, call.head_dim, call.heads_kv, call.seq_kv,
                       str(call.dtype).replace("torch.", ""), call.is_causal, call.mask_kind)
                entry = capture.calls.setdefault(key, [0])

                def run(q, k, v, m, c, s, p):
                    entry[0] += 1
                    if q.shape[1] != k.shape[1]:
                        rep = q.shape[1] // k.shape[1]
                        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=c, scale=s, dropout_p=p)
                return run

        return CaptureBackend


def run_model_once(obj, kind: str, label: str, steps: int = 2, size: Optional[int] = None, seed: int = 0):
    """One inference of a MODEL (pipeline: a short generation; model: one forward on example inputs).
    Returns a tensor to compare."""
    import torch

    from . import tiny_models

    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        if kind == "pipeline":
            if label in tiny_models.NAMES:
                kw = tiny_models.pipeline_call_kwargs(obj, steps=steps, seed=seed)
                if size:
                    kw.update(height=size, width=size)
            else:
                kw = dict(prompt="a photo of a red fox in the snow", num_inference_steps=steps, output_type="pt",
                          generator=g)
                if size:
                    kw.update(height=size, width=size)
            out = obj(**kw)
            return _first_tensor(out)
        if kind == "tiny":
            try:
                kw = tiny_models.example_inputs(label, obj)
            except KeyError:
                raise CliError(f"the built-in model {label} has no example inputs to run",
                               "use one of: " + ", ".join(n for n in tiny_models.NAMES
                                                          if n in tiny_models._INPUTS or n.endswith("-pipeline")),
                               EXIT_USAGE) from None
            device, dtype = model_device(obj)
            kw = {k: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                      if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            return _first_tensor(obj(**kw))
        if kind == "transformers":
            device, _ = model_device(obj)
            vocab = int(getattr(obj.config, "vocab_size", 1000) or 1000)
            ids = torch.randint(0, vocab, (1, 32), generator=g).to(device)
            return _first_tensor(obj(input_ids=ids))
    raise CliError(f"{label} is a single diffusers model; running it needs its inputs",
                   "give the pipeline folder (with model_index.json) instead, or use `attnpatch inspect`", EXIT_USAGE)


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for attr in ("images", "frames", "sample", "logits", "last_hidden_state"):
        v = getattr(out, attr, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise CliError("the model returned no tensor to compare", "", EXIT_FAIL)


def _captured_shapes(args) -> List[dict]:
    import attnpatch
    from . import registry

    _quiet_libraries()
    obj, kind, label = load_model(args.model, args.trust_remote_code, device=_device(args.device),
                                  dtype=_dtype(args.dtype) if args.dtype else None)
    cap = _Capture()
    backend = registry.register_backend(cap.backend(), replace=True)
    try:
        with attnpatch.patched(obj, recipe=False), attnpatch.use_backend(backend.NAME):
            run_model_once(obj, kind, label, steps=1)
    finally:
        registry.unregister_backend(backend.NAME)
    out = []
    for (b, h, s, d, hk, sk, dt, causal, mask), (n,) in cap.calls.items():
        out.append(dict(shape=(b, h, s, d), kv_heads=hk, seq_kv=sk, dtype=dt, causal=causal,
                        mask="none" if mask == "none" else ("bool" if mask == "bool" else "additive"), calls=n))
    if not out:
        raise CliError(f"running {label} once made no routed attention call", "try `attnpatch inspect` on it", EXIT_FAIL)
    return out


def cmd_bench(args) -> int:
    if getattr(args, "parallel", None):  # context parallelism: attnpatch/cli_parallel.py
        from . import cli_parallel

        return cli_parallel.bench(args)
    import torch
    import torch.nn.functional as F

    import attnpatch
    from . import controls

    check_output_path(args.json, "--json")
    check_output_path(args.plot, "--plot")
    if args.plot:
        _matplotlib()  # fail now, not after the run
    device = _device(args.device)
    if args.model:
        cases = _captured_shapes(args)
    else:
        if not args.shape:
            raise CliError("bench needs --shape b,h,s,d (repeatable) or --model MODEL",
                           "e.g. attnpatch bench --shape 1,24,4608,128 --dtype bfloat16", EXIT_USAGE)
        dt = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        cases = [dict(shape=parse_shape(s), kv_heads=None, seq_kv=None, dtype=dt, causal=args.causal, mask=args.mask,
                      calls=None) for s in args.shape]
    if args.backends:
        try:
            names = list(controls.normalise_backends(args.backends, "--backends") or ())
        except ValueError as exc:
            raise CliError(str(exc), "`attnpatch info` lists the backends", EXIT_USAGE) from None
        if not names:
            raise CliError("--backends auto: bench times named backends (auto's pick is marked with *)",
                           "leave --backends out to time every available backend", EXIT_USAGE)
    else:
        names = [b.name for b in attnpatch.backends() if b.available and not b.disabled]
    work = [(c, n) for c in cases for n in names]
    results = []
    refs: Dict[int, Any] = {}
    inputs: Dict[int, Any] = {}
    for c, name in _progress(work, "bench", not args.no_progress):
        i = id(c)
        if i not in inputs:
            q, k, v, m = _make_inputs(c["shape"], _dtype(c["dtype"]), device, c["kv_heads"], c["seq_kv"], c["mask"])
            inputs[i] = (q, k, v, m)
            rep = q.shape[1] // k.shape[1]
            kr, vr = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if rep > 1 else (k, v)
            mm = m[:, None, None, :] if m is not None and m.dim() == 2 else m
            ref = F.scaled_dot_product_attention(q.double(), kr.double(), vr.double(),
                                                 attn_mask=mm.double() if mm is not None and mm.is_floating_point() else mm,
                                                 is_causal=c["causal"]).float() if device.type == "cpu" else \
                F.scaled_dot_product_attention(q.float(), kr.float(), vr.float(),
                                               attn_mask=mm.float() if mm is not None and mm.is_floating_point() else mm,
                                               is_causal=c["causal"])
            refs[i] = ref
            with _lossy_scope(args.allow_lossy):
                try:
                    c["auto"] = attnpatch.explain(q, k, v, attn_mask=m, is_causal=c["causal"]).backend
                except Exception as exc:
                    c["auto"] = f"none ({type(exc).__name__})"
        q, k, v, m = inputs[i]
        b, h, s, d = c["shape"]
        sk = c["seq_kv"] or s
        row = dict(shape=list(c["shape"]), kv_heads=c["kv_heads"] or h, seq_kv=sk, dtype=c["dtype"],
                   causal=c["causal"], mask=c["mask"], calls=c["calls"], backend=name, auto=c["auto"] == name,
                   eligible=False, reasons=[], median_ms=None, tflops=None, relerr=None)
        try:
            e = attnpatch.explain(q, k, v, attn_mask=m, is_causal=c["causal"], backend=name)
        except Exception as exc:
            row["reasons"] = [f"{type(exc).__name__}: {exc}"]
            results.append(row)
            continue
        if e.backend != name:
            row["reasons"] = list(e.reasons.get(name, [])) or [f"the router would use {e.backend} instead"]
            results.append(row)
            continue
        row["eligible"] = True

        def fn(q=q, k=k, v=v, m=m, name=name, causal=c["causal"]):
            return attnpatch.attention_forward(q, k, v, attn_mask=m, is_causal=causal, backend=name)

        try:
            with torch.no_grad():
                out = fn()
                times = _time_call(fn, device, args.warmup, args.repeat)
        except Exception as exc:
            row["eligible"] = False
            row["reasons"] = [f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"]
            results.append(row)
            continue
        med = statistics.median(times)
        ref = refs[i]
        err = (out.float() - ref).norm().item() / max(ref.norm().item(), 1e-30)
        row.update(median_ms=med * 1e3, tflops=_flops(b, h, s, sk, d, c["causal"]) / med / 1e12, relerr=err,
                   **spread(times))
        results.append(row)
    doc = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
           platform.processor() or platform.machine(), "torch": torch.__version__, "warmup": args.warmup,
           "repeat": args.repeat, "model": args.model, "spread_warn_above": SPREAD_WARN, "results": results}
    quiet = json_to_stdout(args)
    if not quiet:
        _print_bench(results)
    noisy = [r for r in results if r["eligible"] and r["spread"] is not None and r["spread"] > SPREAD_WARN]
    for r in noisy:
        print(f"attnpatch: warning: {_case_label(r)} {r['backend']}: times spread by {r['spread']:.0%} of the median "
              f"(IQR; min {r['min_ms']:.3f} ms, max {r['max_ms']:.3f} ms over {args.repeat} runs); the machine is "
              "busy or the runs are too short: compare with care, or use more --warmup/--repeat", file=sys.stderr)
    if args.json:
        if not quiet:
            print()
        emit_json(args, doc)
    if args.plot:
        _plot_bench(results, args.plot, doc)
        print(f"wrote {args.plot}", file=sys.stderr if quiet else sys.stdout)
    return 0


#: `attnpatch bench` warns when a backend's interquartile range of times exceeds this share of its median.
SPREAD_WARN = 0.10


def spread(times: List[float]) -> Dict[str, Optional[float]]:
    """min / max / quartiles (ms) of ``times`` (seconds) and ``spread`` = IQR / median (None for fewer than
    two runs)."""
    ms = sorted(t * 1e3 for t in times)
    out: Dict[str, Optional[float]] = {"min_ms": ms[0], "max_ms": ms[-1], "q1_ms": None, "q3_ms": None, "spread": None}
    if len(ms) >= 2:
        q1, _q2, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        med = statistics.median(ms)
        out.update(q1_ms=q1, q3_ms=q3, spread=(q3 - q1) / med if med > 0 else None)
    return out


def _case_label(r) -> str:
    b, h, s, d = r["shape"]
    extra = []
    if r["kv_heads"] != h:
        extra.append(f"kv{r['kv_heads']}")
    if r["seq_kv"] != s:
        extra.append(f"skv{r['seq_kv']}")
    if r["causal"]:
        extra.append("causal")
    if r["mask"] != "none":
        extra.append(f"mask={r['mask']}")
    return f"{b}x{h}x{s}x{d} {r['dtype']}" + (" " + " ".join(extra) if extra else "")


def _print_bench(results) -> None:
    rows = []
    for r in results:
        if r["eligible"]:
            spread_txt = f"±{r['spread'] / 2:.0%}" if r["spread"] is not None else "-"
            rows.append((_case_label(r), r["backend"] + (" *" if r["auto"] else ""), f"{r['median_ms']:.3f}",
                         spread_txt, f"{r['min_ms']:.3f}-{r['max_ms']:.3f}", f"{r['tflops']:.3f}",
                         f"{r['relerr']:.1e}", ""))
        else:
            rows.append((_case_label(r), r["backend"] + (" *" if r["auto"] else ""), "-", "-", "-", "-", "-",
                         "; ".join(r["reasons"])[:90]))
    print(table(rows, ["shape (b x h x s x d)", "backend", "median ms", "spread", "min-max ms", "TFLOP/s", "rel.err",
                       "not run because"]))
    print("* = the backend auto picks for this call; spread = ± half the interquartile range, relative to the "
          "median; rel.err = |out - fp32/fp64 reference| / |reference|")


def _matplotlib():
    """matplotlib.pyplot with the Agg backend, or a CliError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib, which is not installed",
                       "pip install 'attnpatch[plot]' (or leave --plot out)", EXIT_USAGE) from None
    return plt


def _plot_bench(results, path: str, doc) -> None:
    plt = _matplotlib()
    cases = list(dict.fromkeys(_case_label(r) for r in results))
    backends = list(dict.fromkeys(r["backend"] for r in results))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases) * max(1, len(backends)) ** 0.5 + 2), 4.8))
    width = 0.8 / max(1, len(backends))
    for j, name in enumerate(backends):
        xs, ys, errs, autos = [], [], [], []
        for i, case in enumerate(cases):
            r = next((r for r in results if _case_label(r) == case and r["backend"] == name), None)
            if r is None or not r["eligible"]:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(r["tflops"])
            errs.append(r["relerr"])
            autos.append(r["auto"])
        bars = ax.bar(xs, ys, width, label=name)
        for bar, e, a in zip(bars, errs, autos):
            if a:
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
            ax.annotate(f"{e:.0e}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("TFLOP/s (higher is better)")
    ax.set_title(f"attnpatch bench on {doc['device_name'] or doc['device']} — bold edge: auto's pick; "
                 "labels: relative error", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}", "check the folder exists and is writable",
                       EXIT_FAIL) from None
    finally:
        plt.close(fig)


# -- recipe --------------------------------------------------------------------------------------------

def recipe_source(arg: str) -> Tuple[str, str]:
    """("file", path) or ("shipped", name) for a recipe argument of the CLI: an argument that looks like a
    path (it has a folder separator or ends in .yaml/.yml) or names an existing file is a file (it must
    exist); anything else is a shipped recipe's name. So ``flux`` is the shipped recipe even where a file
    ``flux.yaml`` exists, and ``flux.yaml`` is that file (an error when there is none)."""
    path_like = os.sep in arg or "/" in arg or arg.endswith((".yaml", ".yml"))
    if path_like or os.path.isfile(arg):
        if not os.path.isfile(arg):
            from . import recipes

            shipped = arg.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]
            shipped = shipped[: -len(".yaml")] if shipped.endswith(".yaml") else shipped
            hint = (f"for the shipped recipe give its name: {shipped}" if shipped in recipes.shipped_names()
                    else "give a path to a recipe file or a shipped name (`attnpatch recipe list`)")
            raise CliError(f"no such recipe file: {arg}", hint, EXIT_USAGE)
        return "file", arg
    return "shipped", arg


def _load_recipe_arg(arg: str):
    from . import recipes

    where, value = recipe_source(arg)
    return recipes.load_file(value) if where == "file" else recipes.shipped(value)


def cmd_recipe(args) -> int:
    from . import recipes

    if args.recipe_cmd == "list":
        check_output_path(args.json, "--json")
        rs = recipes.all_shipped()
        if args.json:
            emit_json(args, {"recipes": [{
                "name": r.name, "lossy": r.lossy, "description": r.description,
                "class_names": list(r.match.class_names), "model_types": list(r.match.model_types),
                "rules": [x.name for x in r.rules]} for r in rs]})
            if json_to_stdout(args):
                return 0
        rows = []
        for r in rs:
            matches = ", ".join(list(r.match.class_names)[-1:] + list(r.match.model_types)[:3])
            rows.append((r.name, "LOSSY" if r.lossy else "exact", len(r.rules), matches,
                         _short(r.description, 70)))
        print(table(rows, ["recipe", "", "rules", "matches", "description"]))
        print("\n`attnpatch recipe show NAME` prints one; apply(model) picks an exact one that matches by itself.")
        return 0
    if args.recipe_cmd == "show":
        where, value = recipe_source(args.name)
        rec = _load_recipe_arg(args.name)  # validates
        path = recipes.shipped_path(rec.name) if where == "shipped" else value
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
        print(f"# {path}" + (" (shipped)" if where == "shipped" else ""))
        print(text.rstrip())
        return 0
    if args.recipe_cmd == "check":
        rec = _load_recipe_arg(args.file)
        print(f"{args.file}: valid recipe {rec.name!r} (version {rec.version}, {len(rec.rules)} rules"
              + (", LOSSY" if rec.lossy else "") + ")")
        if not args.model:
            return 0
        _quiet_libraries()
        obj, kind, label = load_model(args.model, args.trust_remote_code, weights=False)
        from . import patch as _patch

        sites = _patch.discover(obj)
        plan = recipes.plan(rec, sites, [c for c, _ in _patch._components(obj)])
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            msgs = recipes.check_unmatched(plan, sites, False, label)
        for i, r in enumerate(rec.rules):
            n = plan.hits.get(i, 0)
            state = f"{n} sites" if n else ("no sites" if plan.applicable(r) else "not applicable (component absent)")
            print(f"  rule {r.name}: {state}")
        excluded = len(plan.excluded) + sum(1 for s in sites if s.component in plan.skip_components)
        print(f"  {len(sites)} sites in {label} ({getattr(obj, 'class_name', None) or type(obj).__name__}); "
              f"{excluded} left alone by exclude")
        if msgs:
            for m in msgs:
                print(f"attnpatch: warning: {m}", file=sys.stderr)
            if args.strict:
                raise CliError(f"{len(msgs)} rule(s) match no site of {label}", "fix the patterns (see "
                               f"`attnpatch inspect {args.model}`) or drop --strict", EXIT_FAIL)
        return 0
    raise CliError("recipe needs a subcommand: list, show NAME or check FILE", "attnpatch recipe --help", EXIT_USAGE)


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# -- autotune ----------------------------------------------------------------------------------------------

def cmd_autotune(args) -> int:
    try:
        from . import autotune
    except ImportError:
        raise CliError("autotuning is not part of this attnpatch install (attnpatch.autotune is missing)",
                       "update attnpatch; nothing to clear", EXIT_FAIL) from None
    clear = getattr(autotune, "clear_cache", None)
    where = getattr(autotune, "cache_path", None)
    if args.clear:
        if clear is None:
            raise CliError("this attnpatch.autotune has no clear_cache()", "update attnpatch", EXIT_FAIL)
        n = clear()
        print(f"cleared {n} cached autotune entr{'y' if n == 1 else 'ies'}" + (f" ({where()})" if where else ""))
        return 0
    print(f"autotune cache: {where() if where else '(unknown location)'}")
    print("`attnpatch autotune --clear` removes it; ATTNPATCH_AUTOTUNE=0 turns measuring off")
    return 0


# -- demo -------------------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    if getattr(args, "parallel", None) and getattr(args, "parallel_config", None) is None:
        from . import cli_parallel  # context parallelism: runs this function on every process

        return cli_parallel.demo(args, cmd_demo)
    import torch

    import attnpatch

    _quiet_libraries()
    check_output_path(args.json, "--json")
    quiet = json_to_stdout(args)
    say = (lambda *a: print(*a, file=sys.stderr)) if quiet else print
    device = _device(args.device)
    dtype = _dtype(args.dtype) if args.dtype else None
    spec = args.model or "tiny-sd15-pipeline"
    obj, kind, label = load_model(spec, args.trust_remote_code, device=device, dtype=dtype)
    dev, dt = model_device(obj)
    say(f"attnpatch demo: {label} ({type(obj).__name__}) on {dev}"
        + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "") + f", {str(dt).replace('torch.', '')}")
    steps, size = args.steps, args.size

    def run():
        out = run_model_once(obj, kind, label, steps=steps, size=size, seed=args.seed)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out

    def timed():
        out = run()  # warm-up (and the output to compare)
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)
        return out, ts

    ref, t_stock = timed()
    attnpatch.stats(reset=True)
    patch = attnpatch.apply(obj, recipe=_recipe_arg(args), backend=args.backend, allow_lossy=args.allow_lossy,
                            parallel=getattr(args, "parallel_config", None))
    try:
        out, t_patched = timed()
        report = patch.report()
        parallel_notes = [n for n in report.notes if n.startswith("context parallel")]
        recipe_line = patch.recipe_name or "none (every site: backend=" + str(patch.settings.backend) + ")"
    finally:
        patch.remove()
    rows = []
    for r in report.rows:
        s = r.site
        used = r.ran()
        for (a, b, why), c in sorted(r.fallbacks.items()):
            used += f"; fell back {a}->{b}: {why}"
        rows.append((s.path, s.kind, s.heads or "?", s.head_dim or "?", s.rule or "-",
                     used if s.routed else f"not routed: {s.note}"))
    diff = (out.float() - ref.float()).abs().max().item() if out.shape == ref.shape else float("nan")
    scale = ref.float().abs().max().item()
    n_calls = sum(attnpatch.stats().calls.values())
    tol = 1e-3 if dt in (torch.float32, torch.float64) else 5e-2
    ok = math.isfinite(diff) and diff <= tol * max(1.0, scale)
    if args.json:
        emit_json(args, {
            "model": label, "kind": kind, "class": type(obj).__name__, "device": str(dev),
            "dtype": str(dt).replace("torch.", ""), "steps": steps if kind == "pipeline" else None,
            "recipe": patch.recipe_name, "left_alone": list(patch.left_alone), "repeat": args.repeat,
            "stock": {"median_ms": statistics.median(t_stock) * 1e3, **spread(t_stock)},
            "patched": {"median_ms": statistics.median(t_patched) * 1e3, **spread(t_patched)},
            "attention_calls_routed": n_calls,
            "max_abs_diff": diff if math.isfinite(diff) else None, "output_max_abs": scale,
            "tolerance": tol, "outputs_match": ok, "sites": report.as_dicts(), "notes": list(report.notes),
        })
        if quiet:
            return 0 if ok else EXIT_FAIL
    print(f"recipe: {recipe_line}")
    if patch.left_alone:
        print(f"left alone (not patched): {', '.join(patch.left_alone)}")
    for line in parallel_notes:
        print(line)
    print()
    print(table(rows, ["site", "kind", "heads", "head_dim", "rule", "backend used (calls)"]))
    print()
    print(f"stock:   {statistics.median(t_stock) * 1e3:9.1f} ms per run (median of {args.repeat})")
    print(f"patched: {statistics.median(t_patched) * 1e3:9.1f} ms per run ({n_calls} attention calls routed in "
          f"{args.repeat + 1} runs)")
    print(f"largest output difference: {diff:.3e} (output magnitude {scale:.3e})")
    print("outputs match" if ok else f"outputs DIFFER by more than {tol:g} (relative)")
    return 0 if ok else EXIT_FAIL


# -- calibrate -------------------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    """Run MODEL's workload exact, measure every site's error on its own activations, write the fastest
    recipe within the bound (attnpatch.calibrate) to --out, and print the report."""
    import torch

    import attnpatch
    from . import tiny_models

    _quiet_libraries()
    device = _device(args.device)
    obj, kind, label = load_model(args.model, args.trust_remote_code, device=device,
                                  dtype=_dtype(args.dtype) if args.dtype else None)
    if kind == "diffusers":
        raise CliError(f"{label} is a single diffusers model; calibrating runs a workload",
                       "give the pipeline folder (with model_index.json) instead", EXIT_USAGE)
    if args.prompt and (kind != "pipeline" or label in tiny_models.NAMES):
        print(f"note: --prompt is not used for {label} (built-in pipelines take fixed prompt embeddings; "
              "models run their example inputs)", file=sys.stderr)

    def run(target):
        if kind == "pipeline" and args.prompt and label not in tiny_models.NAMES:
            kw = dict(prompt=args.prompt, num_inference_steps=args.steps, output_type="pt",
                      generator=torch.Generator("cpu").manual_seed(args.seed))
            if args.size:
                kw.update(height=args.size, width=args.size)
            with torch.no_grad():
                return _first_tensor(target(**kw))
        return run_model_once(target, kind, label, steps=args.steps, size=args.size, seed=args.seed)

    bar = None
    if not args.no_progress and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=1, desc="calibrate", file=sys.stderr, leave=False)
        except ImportError:
            bar = None

    def progress(done: int, total: int, phase: str) -> None:
        if args.no_progress:
            return
        if bar is None:
            print(f"calibrate [{min(done + 1, total)}/{total}] {phase}", file=sys.stderr, flush=True)
            return
        bar.total, bar.n = total, done
        bar.set_description(f"calibrate: {phase}")
        bar.refresh()

    candidates = [n.strip() for n in args.candidates.split(",") if n.strip()] if args.candidates else None
    try:
        cal = attnpatch.calibrate(obj, run, candidates=candidates, min_psnr=args.min_psnr, max_error=args.max_error,
                                  bound_on=args.bound_on, step_buckets=args.step_buckets, seed=args.seed,
                                  recipe=_recipe_arg(args), progress=progress)
    finally:
        if bar is not None:
            bar.close()
    try:
        cal.save(args.out)
    except OSError as exc:
        raise CliError(f"cannot write {args.out}: {exc.strerror or exc}", "check the folder exists and is writable",
                       EXIT_FAIL) from None
    print(cal.report())
    print(f"\nwrote {args.out}; use it with attnpatch.apply(pipe, recipe={args.out!r})")
    if args.json:
        _write_json(args.json, cal.as_dict())
        print(f"wrote {args.json}")
    return 0


# -- parser -------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors plus a hint (exit 2)."""

    def error(self, message):
        hint = f"{self.prog} --help"
        if "the following arguments are required" in message and "--json" in sys.argv[1:] + _ARGV:
            hint = "--json takes an optional FILE: put it after the other arguments, or write --json=- " + \
                   f"for stdout ({hint})"
        self.exit(EXIT_USAGE, f"attnpatch: error: {message}\n  hint: {hint}\n")


_ARGV: List[str] = []  # the arguments main() parses (for error hints)


def build_parser() -> argparse.ArgumentParser:
    from . import tiny_models

    p = _Parser(prog="attnpatch", description="Run models' attention on the fastest correct kernel: "
                "inspect, benchmark, explain, and try it on a demo model.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors (accepted anywhere on the line)")
    p.add_argument("--version", action="version", version=f"attnpatch {_version()}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("info", help="versions, GPU and every backend's availability",
                       description="torch / CUDA / cuDNN versions, the GPUs and their compute capability, and every "
                                   "backend: available?, why not, version, lossy?, backward?")
    add_json_option(s)
    s.set_defaults(func=cmd_info)

    models_help = ("MODEL: a local folder (diffusers pipeline with model_index.json, diffusers or transformers model "
                   "with config.json), a hub id org/name (needs network), or a built-in demo model: "
                   + ", ".join(tiny_models.NAMES))

    s = sub.add_parser("inspect", help="list a model's attention sites and what each would get",
                       description="List the attention sites of MODEL with kind, heads, head dim, and the recipe rule "
                                   "and backend each would get. Nothing is run. " + models_help)
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--recipe", help="a shipped recipe name or a .yaml path (default: the shipped one that matches)")
    s.add_argument("--no-recipe", action="store_true", help="use no recipe")
    s.add_argument("--backend", default="auto", help="backend for sites no rule sets (default auto)")
    s.add_argument("--allow-lossy", action="store_true", help="let auto pick lossy kernels")
    s.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code to run")
    add_json_option(s)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("bench", help="time backends on shapes or on a model's captured shapes",
                       description="Time every available backend (or --backends) on --shape b,h,s,d, or on the "
                                   "shapes captured from running --model once: median time, TFLOP/s, relative error "
                                   "against an fp32 (fp64 on CPU) reference, and which one auto picks.")
    s.add_argument("--shape", action="append", help="b,h,s,d (batch, heads, seq, head dim); repeatable")
    s.add_argument("--model", help="capture the shapes from one run of MODEL instead (" + models_help + ")")
    s.add_argument("--dtype", help="float16, bfloat16 or float32 (default: bfloat16 on GPU, float32 on CPU)")
    s.add_argument("--causal", action="store_true", help="causal attention")
    s.add_argument("--mask", default="none", choices=["none", "bool", "additive", "padding"], help="mask kind")
    s.add_argument("--backends", help="comma-separated backends to time (default: every available one)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if present)")
    s.add_argument("--warmup", type=non_negative_int, default=2, help="untimed runs per backend (default 2)")
    s.add_argument("--repeat", type=positive_int, default=10,
                   help="timed runs per backend (default 10); the spread across them is reported")
    s.add_argument("--allow-lossy", action="store_true", help="let auto pick lossy kernels (the * column)")
    add_json_option(s)
    s.add_argument("--plot", metavar="FILE.png", help="write a bar chart (needs matplotlib: attnpatch[plot])")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code to run")
    s.add_argument("--parallel", metavar="SPEC", help="under torchrun: time each --shape split over the processes "
                   "(ulysses=N,ring=M) against one process")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("recipe", help="list, show and check recipes",
                       description="Recipes say which backend each attention site of a model gets (YAML).")
    rs = s.add_subparsers(dest="recipe_cmd", metavar="SUBCOMMAND", parser_class=_Parser)
    r = rs.add_parser("list", help="the shipped recipes", description="List the shipped recipes.")
    add_json_option(r)
    r = rs.add_parser("show", help="print a recipe",
                      description="Print a shipped recipe (by name) or a recipe file (a path: it has a folder "
                                  "separator or ends in .yaml/.yml, or names an existing file).")
    r.add_argument("name", metavar="NAME")
    r = rs.add_parser("check", help="validate a recipe file (and match it against a model)",
                      description="Validate FILE; with --model, also list how many sites each rule selects and warn "
                                  "about rules that select none (an error with --strict).")
    r.add_argument("file", metavar="FILE")
    r.add_argument("--model", help="a MODEL to match the rules against (" + models_help + ")")
    r.add_argument("--strict", action="store_true", help="a rule that matches no site is an error")
    r.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code to run")
    s.set_defaults(func=cmd_recipe)

    s = sub.add_parser("explain", help="which backend a call would get, and why",
                       description="Which backend attnpatch would use for one call of the given shape, where that "
                                   "choice came from (argument, use_backend, ATTNPATCH_BACKEND, auto), and every "
                                   "other backend's reasons.")
    s.add_argument("--shape", required=True, help="b,h,s,d of the query")
    s.add_argument("--kv-heads", type=positive_int, help="key/value heads (GQA); default: the query heads")
    s.add_argument("--seq-kv", type=positive_int, help="key/value length; default: the query length")
    s.add_argument("--dtype", default="float32", help="float16, bfloat16, float32 (default float32)")
    s.add_argument("--device", default="auto", help="cpu, cuda (default: cuda if present)")
    s.add_argument("--layout", default="bnsd", choices=["bnsd", "bsnd"], help="tensor layout")
    s.add_argument("--causal", action="store_true")
    s.add_argument("--mask", default="none", choices=["none", "bool", "additive", "padding"])
    s.add_argument("--backend", help="a backend name or comma-separated priority list to ask for")
    s.add_argument("--allow-lossy", action="store_true", help="let auto pick lossy kernels")
    s.add_argument("--strict", action="store_true", help="fail instead of falling back")
    add_json_option(s)
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("autotune", help="show or clear the autotune cache",
                       description="Auto measures the eligible backends once per call signature on CUDA and keeps "
                                   "the fastest in a cache file. Without options: show where it is.")
    s.add_argument("--clear", action="store_true", help="delete the cached measurements")
    s.set_defaults(func=cmd_autotune)

    s = sub.add_parser("calibrate", help="measure lossy kernels on a model's own activations, write a recipe",
                       description="Run MODEL's workload exact, measure every candidate backend (lossy and exact) on "
                                   "samples of each attention site's real inputs per step range, pick the fastest "
                                   "within the bound, validate the whole run against the exact one (backing off "
                                   "where the bound is missed), and write the recipe as YAML. " + models_help)
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--out", required=True, help="the recipe file to write (.yaml)")
    s.add_argument("--min-psnr", type=float, help="the bound: output PSNR vs the exact run, dB (default 35 when "
                                                  "--max-error is not given either)")
    s.add_argument("--max-error", type=float, help="the bound: output relative L2 vs the exact run")
    s.add_argument("--bound-on", default="output", choices=["output", "step"],
                   help="check the bound on the free-running output (default) or on every teacher-forced step")
    s.add_argument("--steps", type=int, default=8, help="denoising steps for pipelines (default 8)")
    s.add_argument("--step-buckets", type=int, default=4, help="step ranges calibrated separately (default 4)")
    s.add_argument("--prompt", help="the prompt for a local pipeline (default: a fixed one)")
    s.add_argument("--size", type=int, help="image size for pipelines")
    s.add_argument("--candidates", help="comma-separated backends to consider (default: every available one)")
    s.add_argument("--recipe", help="base recipe whose exclude list is kept (default: the shipped one that matches)")
    s.add_argument("--no-recipe", action="store_true", help="no base recipe: every site is calibrated")
    s.add_argument("--device", default="auto", help="cpu, cuda (default: cuda if present)")
    s.add_argument("--dtype", help="cast the model (default: as built/saved)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    s.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    s.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code to run")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("demo", help="run a small model stock and patched, and compare",
                       description="Build a small diffusion pipeline with random weights (no download), patch it "
                                   "with the recipe that matches, run it stock and patched, and print the site table, "
                                   "the backend each site used, both times and the largest output difference. Uses the "
                                   "GPU when there is one. --model runs the same on a real local model.")
    s.add_argument("--model", help="default tiny-sd15-pipeline; " + models_help)
    s.add_argument("--recipe", help="a recipe name or .yaml path (default: the shipped one that matches)")
    s.add_argument("--no-recipe", action="store_true", help="use no recipe")
    s.add_argument("--backend", default="auto", help="backend for sites no rule sets (default auto)")
    s.add_argument("--allow-lossy", action="store_true", help="let auto pick lossy kernels")
    s.add_argument("--device", default="auto", help="cpu, cuda (default: cuda if present)")
    s.add_argument("--dtype", help="cast the model (default: as built/saved)")
    s.add_argument("--steps", type=positive_int, default=4, help="denoising steps for pipelines (default 4)")
    s.add_argument("--size", type=positive_int, help="image size for pipelines")
    s.add_argument("--repeat", type=positive_int, default=3, help="timed runs of each, after one warm-up (default 3)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code to run")
    add_json_option(s)
    s.add_argument("--parallel", metavar="SPEC", help="under torchrun: context parallelism (ulysses=N,ring=M) for "
                   "the patched run; e.g. torchrun --nproc-per-node 2 -m attnpatch demo --parallel ulysses=2")
    s.set_defaults(func=cmd_demo)
    return p


def _version() -> str:
    from . import __version__

    return __version__


def _check_environment() -> None:
    """Bad ATTNPATCH_* values are bad input: say which variable and what is allowed (exit 2)."""
    from . import controls

    try:
        controls.read_env()
    except ValueError as exc:
        raise CliError(str(exc).splitlines()[0], "fix or unset the variable (the README lists the values)",
                       EXIT_USAGE) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ATTNPATCH_DEBUG", "") == "1"
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    _ARGV[:] = argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help()
        return EXIT_USAGE
    if args.cmd == "recipe" and not getattr(args, "recipe_cmd", None):
        _print_error("recipe needs a subcommand: list, show NAME or check FILE", "attnpatch recipe --help")
        return EXIT_USAGE
    try:
        _check_environment()
        return int(args.func(args) or 0)
    except CliError as exc:
        _print_error(str(exc), exc.hint)
        if debug:
            raise
        return exc.code
    except KeyboardInterrupt:
        _print_error("interrupted", "")
        return 130
    except Exception as exc:
        from .recipes import RecipeError
        from .router import BackendUnsupportedError

        if debug:
            raise
        if isinstance(exc, RecipeError):  # a missing or invalid recipe is bad input
            _print_error(str(exc), "`attnpatch recipe --help`; the format is in the README (Recipes)")
            return EXIT_USAGE
        if isinstance(exc, BackendUnsupportedError):
            lines = str(exc).splitlines()
            _print_error(lines[0], "; ".join(l.strip() for l in lines[1:4]))
            return EXIT_FAIL
        if isinstance(exc, (ValueError, TypeError)):
            _print_error(str(exc).splitlines()[0], "see `attnpatch " + args.cmd + " --help`")
            return EXIT_USAGE
        _print_error(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                     "run again with --debug for the traceback")
        return EXIT_FAIL


def _print_error(message: str, hint: str) -> None:
    print(f"attnpatch: error: {message}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
