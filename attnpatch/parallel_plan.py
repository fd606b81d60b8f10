"""Context-parallel plans: which module inputs/outputs of a model are split along the sequence, and
where the sequence is gathered again (see `attnpatch.parallel`).

A `SequencePlan` comes from, in this order:

1. the recipe given to ``apply(..., recipe=...)``, when it has a ``parallel:`` section;
2. the model's own diffusers ``_cp_plan`` (Wan, Flux, Flux 2, LTX, Qwen-Image, ...), converted;
3. a shipped recipe that matches the model and has a ``parallel:`` section (sd15, sdxl, sd3,
   hunyuanvideo, llama, qwen2).

A model with none of these is refused with an error that says what to add. In a pipeline, only the
denoiser components (``transformer``, ``transformer_2``, ``unet``, or the section's ``components``) are
made parallel; the VAE and the text encoders run whole on every process.

Recipe section (version 1)::

    parallel:
      causal: false                 # the model's attention is causal (LLM prefill): ring uses the
                                    # load-balanced order
      cross_attention: replicated   # cross-attention keys/values (the text) stay whole on every process
                                    # (default), or "split" when the plan splits them
      components: [transformer]     # pipelines: which components (default: the denoisers)
      split:                        # where the sequence enters: module inputs or outputs to split
        - module: "layers.0"        # glob over the module path inside the component ("" = the component)
          input: hidden_states      # a forward argument, by name or position; or `output: N`
          dim: 1                    # the sequence dimension
          ndim: 3                   # optional: split only tensors with this many dims
          parts: [a, b]             # optional: the tensor is the concatenation of these earlier splits
          name: a                   # optional: the name `parts` refers to (default: the input's name)
          last: true                # optional: only the last module of each numbered list the glob matches
      gather:                       # where the whole sequence is needed again: module outputs
        - module: norm
          output: 0                 # the output (0 for a plain tensor), default 0
          dim: 1
      force:                        # optional: forward arguments given a fixed value while parallel
        - module: ""
          input: use_cache
          value: false              # e.g. a KV cache of sequence shards could not continue decoding

A tensor argument that is a tuple or list (rotary tables ``(cos, sin)``) has every tensor element split.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch


class ContextParallelError(RuntimeError):
    """A call or a model that context parallelism cannot serve exactly; the message names the site (or
    the model), what is wrong and the fix. (Also `attnpatch.parallel.ContextParallelError`.)"""


logger = logging.getLogger("attnpatch")

#: pipeline components made parallel when a plan does not name them
DENOISERS = ("transformer", "transformer_2", "unet")
CROSS_KV = ("replicated", "split")


@dataclass(frozen=True)
class SplitSpec:
    """Split one input (by name or position) or one output (by index) of the modules ``module`` matches."""

    module: str
    dim: int
    input: Union[str, int, None] = None
    output: Optional[int] = None
    ndim: Optional[int] = None
    parts: Tuple[str, ...] = ()
    name: str = ""
    last: bool = False
    line: Optional[int] = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.input is not None:
            return str(self.input)
        return f"{self.module or '<root>'}:output{self.output}"


@dataclass(frozen=True)
class GatherSpec:
    """Gather one output (by index; 0 for a plain tensor) of the modules ``module`` matches."""

    module: str
    dim: int
    output: int = 0
    ndim: Optional[int] = None
    last: bool = False
    line: Optional[int] = None


@dataclass(frozen=True)
class ForceSpec:
    """Give a forward argument of ``module`` a fixed value while the model is parallel."""

    module: str
    input: str
    value: Any
    line: Optional[int] = None


@dataclass(frozen=True)
class SequencePlan:
    splits: Tuple[SplitSpec, ...]
    gathers: Tuple[GatherSpec, ...]
    force: Tuple[ForceSpec, ...] = ()
    causal: bool = False
    cross_kv: str = "replicated"
    components: Tuple[str, ...] = ()
    source: str = "<plan>"


# -- from diffusers' _cp_plan ----------------------------------------------------------------------------------

def _is_cp_input(x) -> bool:
    return hasattr(x, "split_dim") and hasattr(x, "split_output")


def _is_cp_output(x) -> bool:
    return hasattr(x, "gather_dim")


def from_cp_plan(cp_plan: Dict[str, Any], source: str) -> SequencePlan:
    """Convert a diffusers ``_cp_plan`` (``ContextParallelInput`` / ``ContextParallelOutput`` per module
    id; ``*`` over a ModuleList) to a `SequencePlan`. Keys of an input entry are argument names (split
    before the forward) or, with ``split_output=True``, output indices (split after it)."""
    splits: List[SplitSpec] = []
    gathers: List[GatherSpec] = []
    where = f"{source}"
    for module, entry in cp_plan.items():
        if isinstance(entry, dict):
            for key, spec in entry.items():
                specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
                if not specs or not all(_is_cp_input(s) for s in specs):
                    raise ValueError(f"{where}: entry {module!r}[{key!r}] is not a ContextParallelInput")
                if len({(s.split_dim, s.expected_dims, s.split_output) for s in specs}) != 1:
                    raise ValueError(f"{where}: entry {module!r}[{key!r}] splits the elements of one argument along "
                                     "different dims; attnpatch splits every tensor of a tuple argument the same way")
                s = specs[0]
                if s.split_output:
                    if not isinstance(key, int):
                        raise ValueError(f"{where}: entry {module!r}[{key!r}] has split_output=True, so its key must "
                                         "be an output index")
                    splits.append(SplitSpec(module, s.split_dim, output=key, ndim=s.expected_dims))
                else:
                    splits.append(SplitSpec(module, s.split_dim, input=key, ndim=s.expected_dims))
        else:
            specs = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            for i, s in enumerate(specs):
                if s is None:
                    continue
                if not _is_cp_output(s):
                    raise ValueError(f"{where}: entry {module!r} is neither a dict of ContextParallelInput nor "
                                     "ContextParallelOutput")
                gathers.append(GatherSpec(module, s.gather_dim, output=i, ndim=s.expected_dims))
    cross = "split" if any(s.input == "encoder_hidden_states" for s in splits) else "replicated"
    return SequencePlan(tuple(splits), tuple(gathers), causal=False, cross_kv=cross, source=source)


# -- from a recipe's `parallel:` section ----------------------------------------------------------------------

_SECTION = {"causal": "true or false", "cross_attention": "replicated or split",
            "components": "pipeline component names (globs)", "split": "a list of splits",
            "gather": "a list of gathers", "force": "a list of fixed forward arguments"}
_SPLIT = {"module": "a module path glob ('' = the component)", "input": "a forward argument name or position",
          "output": "an output index", "dim": "the sequence dimension", "ndim": "split only tensors of this rank",
          "parts": "names of earlier splits this tensor concatenates", "name": "the name parts refer to",
          "last": "only the last module of each numbered list"}
_GATHER = {"module": "a module path glob ('' = the component)", "output": "an output index (default 0)",
           "dim": "the sequence dimension", "ndim": "gather only tensors of this rank",
           "last": "only the last module of each numbered list"}
_FORCE = {"module": "a module path glob ('' = the component)", "input": "a forward argument name",
          "value": "a plain value"}


def parse_section(c, node, source: str) -> SequencePlan:
    """Validate a recipe's ``parallel:`` section (``c`` is the recipe checker: errors name the line)."""
    f = "parallel"
    sec = c.keys(node, f, _SECTION)
    causal = c.type(sec["causal"], f + ".causal", bool, "true or false") if "causal" in sec else False
    cross = "replicated"
    if "cross_attention" in sec:
        cross = c.type(sec["cross_attention"], f + ".cross_attention", str, "replicated or split")
        if cross not in CROSS_KV:
            c.fail(sec["cross_attention"], f + ".cross_attention", f"unknown value {cross!r}; allowed: replicated, split")
    comps = c.str_list(sec["components"], f + ".components", "component names") if "components" in sec else ()
    splits = tuple(_parse_split(c, item, f"{f}.split[{i}]") for i, item in enumerate(_items(c, sec, "split", f)))
    gathers = tuple(_parse_gather(c, item, f"{f}.gather[{i}]") for i, item in enumerate(_items(c, sec, "gather", f)))
    force = tuple(_parse_force(c, item, f"{f}.force[{i}]") for i, item in
                  enumerate(_items(c, sec, "force", f, required=False)))
    names = set()
    for i, s in enumerate(splits):
        for p in s.parts:
            if p not in names:
                c.fail(_items(c, sec, "split", f)[i], f"{f}.split[{i}].parts",
                       f"{p!r} is not the name of an earlier split; earlier: {sorted(names) or 'none'}")
        names.add(s.label)
    return SequencePlan(splits, gathers, force, causal, cross, comps, source)


def _items(c, sec, key, f, required=True):
    if key not in sec:
        if required:
            c.fail(None, f"{f}.{key}", f"is required ({_SECTION[key]}): a plan must split the sequence somewhere and "
                   "gather it again")
        return []
    node = sec[key]
    if not isinstance(node.value, list) or (required and not node.value):
        c.fail(node, f"{f}.{key}", f"must be a non-empty list ({_SECTION[key]})")
    return node.value


def _module(c, node, field) -> str:
    text = c.type(node, field, str, "a module path glob ('' = the component itself)")
    return c.pattern(node, field, text) if text else text


def _int(c, d, key, field, what="an int") -> Optional[int]:
    return c.type(d[key], f"{field}.{key}", int, what) if key in d else None


def _parse_split(c, item, field) -> SplitSpec:
    d = c.keys(item, field, _SPLIT, required=("module", "dim"))
    module = _module(c, d["module"], field + ".module")
    if ("input" in d) == ("output" in d):
        c.fail(item, field, "give exactly one of `input` (a forward argument) or `output` (an output index)")
    inp = None
    if "input" in d:
        inp = c.type(d["input"], field + ".input", (str, int), "a forward argument name or position")
    out = _int(c, d, "output", field)
    parts = c.str_list(d["parts"], field + ".parts", "split names") if "parts" in d else ()
    name = c.type(d["name"], field + ".name", str, "a string") if "name" in d else ""
    last = c.type(d["last"], field + ".last", bool, "true or false") if "last" in d else False
    return SplitSpec(module, _int(c, d, "dim", field), inp, out, _int(c, d, "ndim", field), parts, name, last,
                     item.line)


def _parse_gather(c, item, field) -> GatherSpec:
    d = c.keys(item, field, _GATHER, required=("module", "dim"))
    module = _module(c, d["module"], field + ".module")
    out = _int(c, d, "output", field)
    last = c.type(d["last"], field + ".last", bool, "true or false") if "last" in d else False
    return GatherSpec(module, _int(c, d, "dim", field), 0 if out is None else out, _int(c, d, "ndim", field), last,
                      item.line)


def _parse_force(c, item, field) -> ForceSpec:
    d = c.keys(item, field, _FORCE, required=("module", "input", "value"))
    module = _module(c, d["module"], field + ".module")
    inp = c.type(d["input"], field + ".input", str, "a forward argument name")
    value = d["value"].value
    if isinstance(value, (dict, list)):
        c.fail(d["value"], field + ".value", "must be a plain value (string, number, boolean or null)")
    return ForceSpec(module, inp, value, item.line)


# -- resolving a plan against a model --------------------------------------------------------------------------------

@dataclass(eq=False)
class ModuleHooks:
    """Everything the plan does at one module."""

    module: torch.nn.Module
    path: str
    is_root: bool = False
    split_inputs: List[Tuple[SplitSpec, Union[str, int]]] = field(default_factory=list)
    split_outputs: List[SplitSpec] = field(default_factory=list)
    gather_outputs: List[GatherSpec] = field(default_factory=list)
    force: List[ForceSpec] = field(default_factory=list)
    parameters: Tuple[str, ...] = ()   # positional parameter names of forward (self excluded)
    keyword_only: Tuple[str, ...] = ()
    var_keyword: bool = False


_NUM = re.compile(r"^\d+$")


def _matches(pattern: str, paths: Sequence[str], last: bool) -> List[str]:
    from .patterns import match

    hits = [p for p in paths if (p == "" if pattern == "" else (p != "" and match(pattern, p)))]
    if not last:
        return hits
    best: Dict[str, Tuple[int, str]] = {}
    for p in hits:
        segs = p.split(".")
        idx = max((i for i, s in enumerate(segs) if _NUM.match(s)), default=None)
        if idx is None:
            best[p] = (0, p)
            continue
        key = ".".join(segs[:idx]) + "|" + ".".join(segs[idx + 1:])
        n = int(segs[idx])
        if key not in best or best[key][0] < n:
            best[key] = (n, p)
    keep = {p for _, p in best.values()}
    return [p for p in hits if p in keep]


def _where(plan: SequencePlan, line: Optional[int], what: str) -> str:
    return f"{plan.source}{f':{line}' if line else ''}: {what}"


def resolve(plan: SequencePlan, root: torch.nn.Module) -> List[ModuleHooks]:
    """The hooks of ``plan`` on the modules of ``root`` (the root always gets one, to reset the region at
    each forward). Every entry must match a module and name an argument its forward takes."""
    from .originals import original_class

    modules = dict(root.named_modules())
    paths = list(modules)
    hooks: Dict[str, ModuleHooks] = {}

    def hook_of(path: str) -> ModuleHooks:
        h = hooks.get(path)
        if h is None:
            m = modules[path]
            fwd = getattr(original_class(type(m)), "forward", None)
            params, kw_only, var_kw = _signature(fwd)
            h = hooks[path] = ModuleHooks(m, path, is_root=path == "", parameters=params, keyword_only=kw_only,
                                          var_keyword=var_kw)
        return h

    def targets(pattern: str, last: bool, line, what: str) -> List[str]:
        hits = _matches(pattern, paths, last)
        if not hits:
            import difflib

            close = difflib.get_close_matches(pattern.replace("*", "0"), [p for p in paths if p], n=3, cutoff=0.4)
            hint = f"; closest module paths: {', '.join(close)}" if close else ""
            raise ContextParallelError(_where(plan, line, f"{what} module {pattern!r} matches no module of "
                                                         f"{type(root).__name__}{hint}"))
        return hits

    for s in plan.splits:
        for p in targets(s.module, s.last, s.line, "split"):
            h = hook_of(p)
            if s.input is not None:
                _check_argument(plan, h, s.input, s.line, type(h.module).__name__)
                h.split_inputs.append((s, s.input))
            else:
                h.split_outputs.append(s)
    for gs in plan.gathers:
        for p in targets(gs.module, gs.last, gs.line, "gather"):
            hook_of(p).gather_outputs.append(gs)
    for fs in plan.force:
        for p in targets(fs.module, False, fs.line, "force"):
            h = hook_of(p)
            _check_argument(plan, h, fs.input, fs.line, type(h.module).__name__)
            h.force.append(fs)
    hook_of("")
    return list(hooks.values())


def _signature(fwd) -> Tuple[Tuple[str, ...], Tuple[str, ...], bool]:
    """(positional parameter names, keyword-only names, takes **kwargs) of a forward (self excluded)."""
    if fwd is None:
        return (), (), True
    try:
        sig = inspect.signature(fwd)
    except (TypeError, ValueError):
        return (), (), True
    params = list(sig.parameters.values())[1:]  # self
    positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    keyword_only = tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    return positional, keyword_only, var_kw


def _check_argument(plan: SequencePlan, h: ModuleHooks, arg, line, cls: str) -> None:

    if isinstance(arg, int):
        if arg < 0 or (arg >= len(h.parameters) and not h.var_keyword):
            raise ContextParallelError(_where(plan, line, f"{cls}.forward ({h.path or '<root>'}) has no positional "
                                                          f"argument {arg}; its arguments: {', '.join(h.parameters)}"))
        return
    if arg not in h.parameters and arg not in h.keyword_only and not h.var_keyword:
        raise ContextParallelError(_where(plan, line, f"{cls}.forward ({h.path or '<root>'}) takes no argument {arg!r}; "
                                                      f"its arguments: {', '.join(h.parameters + h.keyword_only)}"))


def with_source(plan: SequencePlan, source: str) -> SequencePlan:
    return replace(plan, source=source)
