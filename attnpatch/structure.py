"""Build a saved model as the class it was saved as, with or without its weights.

`attnpatch inspect` and `attnpatch recipe check --model` need only a model's module tree (which
attention sites, their paths, heads and head dims), so they build it from the saved configs on the
``meta`` device: no weight is read and no memory is used. `attnpatch demo` and `attnpatch bench
--model` run the model and load its weights.

Either way the class is the one that was saved — ``config.architectures[0]`` for a transformers model
(a ``LlamaForCausalLM`` stays one, so the site paths are those `attnpatch.apply` sees on it, not those of
a bare ``LlamaModel``), ``_class_name`` for a diffusers model and for each component of a pipeline.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch


class StructureError(Exception):
    """A saved model that cannot be built; the message says why and what to do."""


class PipelineStructure:
    """A diffusers pipeline's ``torch.nn.Module`` components, built without weights from its folder.

    ``components`` and ``config["_class_name"]`` are what `attnpatch.apply` and recipe matching read;
    ``skipped`` names the components that are not torch modules (scheduler, tokenizer, ...) or that
    could not be built, with why."""

    def __init__(self, class_name: str, components: Dict[str, torch.nn.Module], skipped: Dict[str, str]):
        self.components = components
        self.config = {"_class_name": class_name}
        self.class_name = class_name
        self.skipped = skipped
        self.model_label = class_name


def read_json(path: str) -> Dict[str, Any]:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _on_meta(build):
    """``build()`` with new parameters and buffers created on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return build()


# -- transformers --------------------------------------------------------------------------------------

def transformers_class(path: str, cfg: Dict[str, Any], trust_remote_code: bool):
    """The class a transformers model was saved as (``architectures[0]``; remote code through its
    ``auto_map`` when trusted), or ``AutoModel`` when the config names none."""
    import transformers

    archs = cfg.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else None
    auto_map = cfg.get("auto_map") or {}
    if arch is not None and trust_remote_code and auto_map:
        for ref in auto_map.values():
            ref = ref[0] if isinstance(ref, (list, tuple)) else ref
            if isinstance(ref, str) and ref.rsplit(".", 1)[-1] == arch:
                from transformers.dynamic_module_utils import get_class_from_dynamic_module

                return get_class_from_dynamic_module(ref, path, local_files_only=True)
    if arch is not None:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    return transformers.AutoModel


def build_transformers(path: str, cfg: Dict[str, Any], trust_remote_code: bool, weights: bool, dtype=None):
    import transformers

    cls = transformers_class(path, cfg, trust_remote_code)
    if weights:
        return cls.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code,
                                   **({"dtype": dtype} if dtype else {}))
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if cls is transformers.AutoModel:
        return _on_meta(lambda: transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code))
    return _on_meta(lambda: cls._from_config(config))


# -- diffusers -------------------------------------------------------------------------------------------

def diffusers_class(class_name: str):
    """The diffusers model class named ``class_name`` (a saved ``_class_name``), or None."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None


def build_diffusers_model(path: str, cfg: Dict[str, Any], trust_remote_code: bool, weights: bool, dtype=None):
    import diffusers

    cls = diffusers_class(str(cfg.get("_class_name")))
    if weights:
        loader = cls if cls is not None else diffusers.AutoModel
        return loader.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code,
                                      **({"torch_dtype": dtype} if dtype else {}))
    if cls is None:
        raise StructureError(f"{path}: diffusers has no model class {cfg.get('_class_name')!r} (config.json "
                             "_class_name); is diffusers older than the one that saved it?")
    config = cls.load_config(path)
    return _on_meta(lambda: cls.from_config(config))


def build_pipeline_structure(path: str, trust_remote_code: bool) -> PipelineStructure:
    """Every torch module component of the pipeline saved in ``path``, built without weights."""
    index = read_json(os.path.join(path, "model_index.json"))
    components: Dict[str, torch.nn.Module] = {}
    skipped: Dict[str, str] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2:
            continue
        library, class_name = entry
        if library is None or class_name is None:
            continue
        sub = os.path.join(path, name)
        cfg_file = os.path.join(sub, "config.json")
        if library == "diffusers" and diffusers_class(class_name) is not None and os.path.isfile(cfg_file):
            components[name] = build_diffusers_model(sub, read_json(cfg_file), trust_remote_code, False)
        elif library == "transformers" and os.path.isfile(cfg_file) and _is_transformers_model(class_name):
            cfg = read_json(cfg_file)
            cfg.setdefault("architectures", [class_name])
            components[name] = build_transformers(sub, cfg, trust_remote_code, False)
        else:
            skipped[name] = f"{library}.{class_name}" + ("" if _is_module_name(library, class_name)
                                                         else " (not a torch module)")
    if not components:
        raise StructureError(f"{path}: no component of this pipeline could be built from its config "
                             f"({', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'model_index.json lists none'})")
    return PipelineStructure(str(index.get("_class_name", "pipeline")), components, skipped)


def _is_transformers_model(class_name: str) -> bool:
    import transformers

    cls = getattr(transformers, class_name, None)
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module)


def _is_module_name(library: str, class_name: str) -> bool:
    try:
        mod = __import__(library)
    except ImportError:
        return True  # unknown: say nothing more
    cls = getattr(mod, class_name, None)
    return not isinstance(cls, type) or issubclass(cls, torch.nn.Module)


def saved_kind(path: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """("pipeline" | "diffusers" | "transformers" | None, the config read) for a model folder."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return "pipeline", {}
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        cfg = read_json(config)
        if "_class_name" in cfg:
            return "diffusers", cfg
        if "model_type" in cfg:
            return "transformers", cfg
    return None, {}


def load_structure(path: str, trust_remote_code: bool = False):
    """The saved model in ``path`` built without weights: (object, kind)."""
    kind, cfg = saved_kind(path)
    if kind == "pipeline":
        return build_pipeline_structure(path, trust_remote_code), kind
    if kind == "diffusers":
        return build_diffusers_model(path, cfg, trust_remote_code, False).eval(), kind
    if kind == "transformers":
        return build_transformers(path, cfg, trust_remote_code, False).eval(), kind
    raise StructureError(f"{path} is not a model folder")


def parameters_device(obj) -> Optional[torch.device]:
    """The device of the first parameter of ``obj`` (a module or a pipeline), or None."""
    comps = getattr(obj, "components", None)
    mods: List[Any] = [m for m in comps.values() if isinstance(m, torch.nn.Module)] if isinstance(comps, dict) else [obj]
    for m in mods:
        for p in m.parameters():
            return p.device
    return None
