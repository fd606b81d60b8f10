"""Split module inputs/outputs along the sequence and gather them again, per a context-parallel plan
(`attnpatch.parallel_plan`), for one patched model.

Each module the plan names gets a per-module class (`attnpatch.patch.site_class`, through the patch's
`UndoLog`) whose ``forward`` wraps the class's own:

1. at the model's root: the region starts (`attnpatch.parallel.Region.begin`);
2. forced arguments get their value (``use_cache=False`` for a transformers decoder);
3. the inputs the plan splits are replaced by this process's part (`Region.split`);
4. the original forward runs;
5. the outputs the plan splits are split, and the outputs it gathers are gathered (`Region.gather`);
6. at the root: the region ends (an error if the sequence was split and never gathered).

Nothing is written on the module instances; a copy or pickle of a patched model is an unpatched model
(the per-module class copies as the original class). A module whose ``forward`` is an instance attribute
(another library's hook, e.g. accelerate's offloading) is refused: the class-level wrapper would not run.
"""

from __future__ import annotations

import functools
import logging
from typing import List

import torch

from attnpatch.parallel import ContextParallelError, Region
from attnpatch.parallel_plan import ModuleHooks
from attnpatch.patch import UndoLog, extended_class

logger = logging.getLogger("attnpatch")

def install(hooks: List[ModuleHooks], region: Region, undo: UndoLog) -> None:
    """Give every module in ``hooks`` its wrapped forward (recorded in ``undo``)."""
    for h in hooks:
        m = h.module
        if "forward" in m.__dict__:
            raise ContextParallelError(
                f"{h.path or '<root>'} ({type(m).__name__}): its forward is an instance attribute set by another "
                f"library ({type(m.__dict__['forward']).__name__}, e.g. accelerate offloading hooks); context "
                "parallelism cannot wrap it: remove that hook (e.g. no enable_model_cpu_offload) first")
        wrapped = _wrap_forward(type(m).forward, h, region)
        undo.set_class(m, extended_class(type(m), {"forward": wrapped}))  # an adapter's functions are kept


def _replace_arg(h: ModuleHooks, arg, args: list, kwargs: dict, fn) -> None:
    """Apply ``fn`` to forward argument ``arg`` (a name or a position) where the caller passed it."""
    if isinstance(arg, str):
        if arg in kwargs:
            kwargs[arg] = fn(kwargs[arg])
            return
        if arg in h.parameters:
            i = h.parameters.index(arg)
            if i < len(args):
                args[i] = fn(args[i])
        return
    if arg < len(args):
        args[arg] = fn(args[arg])


def _split_value(region: Region, value, spec, where: str):
    """This process's part of a tensor, or of every tensor of a tuple/list; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if spec.ndim is not None and value.dim() != spec.ndim:
            return value  # the plan splits only tensors of this rank (as diffusers' expected_dims)
        return region.split(value, spec.dim, spec.label, spec.parts)
    if isinstance(value, (tuple, list)):
        return type(value)(_split_value(region, v, spec, where) if isinstance(v, torch.Tensor) else v for v in value)
    raise ContextParallelError(f"{where}: the plan splits {spec.label!r}, which is a {type(value).__name__}, not a "
                               "tensor or a tuple of tensors")


def _pick(out, index: int, where: str):
    if isinstance(out, torch.Tensor):
        if index != 0:
            raise ContextParallelError(f"{where}: the plan names output {index}, but the module returns one tensor")
        return out
    if isinstance(out, (tuple, list)):
        if index >= len(out):
            raise ContextParallelError(f"{where}: the plan names output {index}, but the module returns {len(out)}")
        return out[index]
    raise ContextParallelError(f"{where}: the module returns a {type(out).__name__}; plans split or gather tensor "
                               "outputs or elements of a tuple")


def _put(out, index: int, value):
    if isinstance(out, torch.Tensor):
        return value
    items = list(out)
    items[index] = value
    return type(out)(items) if isinstance(out, tuple) and type(out) is tuple else (
        items if isinstance(out, list) else type(out)(*items))


def _wrap_forward(forward, h: ModuleHooks, region: Region):
    where = f"{region.plan.source}: {h.path or '<root>'} ({type(h.module).__name__})"
    warned: set = set()

    def force(kwargs: dict, args: list) -> None:
        for fs in h.force:
            given = kwargs.get(fs.input, None)
            if fs.input in h.parameters and h.parameters.index(fs.input) < len(args):
                i = h.parameters.index(fs.input)
                given = args[i]
                args[i] = fs.value
            else:
                kwargs[fs.input] = fs.value
            if given is not None and given != fs.value and fs.input not in warned:
                warned.add(fs.input)
                logger.warning("attnpatch: context parallel: %s=%r is replaced by %r (%s)", fs.input, given, fs.value,
                               where)

    @functools.wraps(forward)
    def parallel_forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            raise ContextParallelError(f"{where}: torch.compile of a context-parallel model is not supported; "
                                       "compile without parallel=")
        if h.is_root:
            region.begin()
        completed = False
        try:
            if h.force or h.split_inputs:
                args = list(args)
                force(kwargs, args)
                for spec, arg in h.split_inputs:
                    _replace_arg(h, arg, args, kwargs, lambda v, s=spec: _split_value(region, v, s, where))
            out = forward(self, *args, **kwargs)
            for spec in h.split_outputs:
                out = _put(out, spec.output, _split_value(region, _pick(out, spec.output, where), spec, where))
            for gs in h.gather_outputs:
                t = _pick(out, gs.output, where)
                if isinstance(t, torch.Tensor) and (gs.ndim is None or t.dim() == gs.ndim):
                    out = _put(out, gs.output, region.gather(t, gs.dim))
            completed = True
            return out
        except BaseException:
            region.reset()
            raise
        finally:
            if h.is_root:
                region.end(completed)

    return parallel_forward
