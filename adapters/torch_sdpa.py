"""Generic adapter: any nn.Module whose own ``forward`` calls ``scaled_dot_product_attention`` (timm,
open_clip, hand-written modules).

Each such module gets an instance ``forward`` that runs a copy of its class's forward whose global
``F`` / ``torch`` / imported ``scaled_dot_product_attention`` resolve to this site's router call (see
`attnpatch.rebind`). Nothing outside the patched modules changes. Attention-like modules that compute
softmax(q·kᵀ) themselves are reported as not routed.
"""

from __future__ import annotations

import types
from typing import List, Optional

import torch

from attnpatch.patch import Adapter, Site, SiteMatch, UndoLog, original_class, own_attr, site_class
from attnpatch.rebind import calls_sdpa, rebind, sdpa_for_site, sdpa_replacements

_MATMUL_NAMES = {"matmul", "bmm", "baddbmm", "einsum", "transpose"}


def join_path(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def first_attr(module, names) -> Optional[int]:
    for n in names:
        v = own_attr(module, n)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def computes_attention_itself(module: torch.nn.Module) -> bool:
    """An attention-named module whose forward does softmax over matmuls without SDPA."""
    name = type(module).__name__.lower()
    if "attention" not in name and "attn" not in name:
        return False
    fwd = getattr(type(module), "forward", None)
    code = getattr(fwd, "__code__", None)
    if code is None:
        return False
    names = set(code.co_names)
    return "softmax" in names and bool(names & _MATMUL_NAMES)


def forward_function(module: torch.nn.Module):
    """The plain function that ``module.forward`` runs, or None when another library wrapped it."""
    inst = module.__dict__.get("forward")
    if inst is None:
        return original_class(type(module)).forward
    if isinstance(inst, types.MethodType) and inst.__self__ is module:
        return inst.__func__
    return None


class TorchSdpaAdapter(Adapter):
    NAME = "torch_sdpa"
    PRIORITY = 1000  # after every library adapter

    def find_sites(self, root: torch.nn.Module, prefix: str) -> List[SiteMatch]:
        out = []
        for name, module in root.named_modules():
            path = join_path(prefix, name)
            fn = forward_function(module)
            heads = first_attr(module, ("num_heads", "heads", "n_heads", "num_attention_heads"))
            kv = first_attr(module, ("num_key_value_heads", "num_kv_heads", "n_kv_heads")) or heads
            head_dim = first_attr(module, ("head_dim", "attention_head_size", "dim_head"))
            if fn is not None and calls_sdpa(fn):
                out.append(SiteMatch(module, path, kind="self", heads=heads, kv_heads=kv, head_dim=head_dim, data=fn))
            elif fn is None and calls_sdpa(type(module).forward):
                out.append(SiteMatch(module, path, heads=heads, routed=False,
                                     note="its forward is wrapped by another library (instance attribute "
                                          f"{type(module.__dict__['forward']).__name__}); remove that wrapper first"))
            elif isinstance(module, torch.nn.MultiheadAttention):
                out.append(SiteMatch(module, path, heads=module.num_heads, routed=False,
                                     note="torch.nn.MultiheadAttention runs F.multi_head_attention_forward / "
                                          "torch's fused fast path, which attnpatch does not reach"))
            elif computes_attention_itself(module):
                out.append(SiteMatch(module, path, heads=heads, routed=False,
                                     note="computes softmax(q·kᵀ) itself instead of calling scaled_dot_product_attention"))
        return out

    def patch_site(self, match: SiteMatch, site: Site, undo: UndoLog) -> None:
        fn = match.data
        sdpa = sdpa_for_site(site)
        new = rebind(fn, sdpa_replacements(fn, sdpa), site)
        module = match.module
        if "forward" in module.__dict__:  # a bound method of its own class's forward, set on the instance
            undo.set_attr(module, "forward", types.MethodType(new, module))
            return
        # the module gets a per-site class whose forward is the routed copy: nothing is written on the
        # instance, and a copy or pickle of the module is an unpatched module of the original class
        undo.set_class(module, site_class(original_class(type(module)), {"forward": new}))


ADAPTER = TorchSdpaAdapter
