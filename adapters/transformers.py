"""transformers adapter: route every attention module that dispatches through transformers'
``AttentionInterface`` to attnpatch, for the patched model only.

Mechanism (transformers >= 4.48, checked against 5.24):

* Once, at the first patch, attnpatch registers ``attn_implementation="attnpatch"`` in transformers'
  ``AttentionInterface`` (the function below) *and* in ``AttentionMaskInterface`` (transformers'
  ``sdpa_mask``: 4-D boolean masks, True = attend, or ``None`` when SDPA's ``is_causal`` suffices).
  Without the mask entry transformers would build no mask at all for a custom name and padding would
  be silently ignored. A registered name is inert for every model whose config does not select it.
* For each patched model, the configs its attention modules read (``module.config``) and the configs
  of the ``PreTrainedModel`` (sub-)models that contain them (CLIP's text and vision towers, T5's two
  stacks, Whisper's encoder and decoder) get ``_attn_implementation = "attnpatch"``. The old value is
  recorded in the patch's `UndoLog` and comes back on `remove()`. Each routed attention module gets a
  per-site class (`attnpatch.patch.site_class`: same name, pickles and copies as the original) whose one
  addition is ``_attnpatch_site``, a weak reference to its `Site`; `remove()` gives the class back. The
  call finds its site from the module it is given: under torch.compile the guards then reach the
  module's weights through the model, as stock's do, not through the position of a key in a weak
  dictionary, which shifts when another model's patch is removed (a recompilation).
* The attention function receives ``(module, query, key, value, attention_mask, scaling=, dropout=,
  **kwargs)`` in (b, h, s, d), finds the module's `Site` (``_attnpatch_site``) and calls
  `attnpatch.router.route` with the site's scope, with exactly the semantics of transformers'
  ``sdpa_attention_forward``: ``is_causal = q_len > 1 and mask is None and module.is_causal``, T5's
  ``position_bias`` folded into an additive mask, dropout only when the model passes it (training),
  GQA left to the router, output in (b, s, h, d).

* Softcapping (Gemma 2, VaultGemma, T5Gemma: ``softcap=``) and attention sinks (GPT-OSS, Granite-SWA:
  ``s_aux=``) are router features: those models declare ``_supports_sdpa = False`` only because SDPA
  lacks them, so they are routed (`SERVED_WITHOUT_SDPA`) and the router picks a backend that serves the
  feature (flex or eager for softcap; any kernel returning the log-sum-exp, or eager, for sinks).
  Sliding windows arrive inside the mask (transformers' ``sdpa_mask`` builds them), so
  ``sliding_window=`` needs nothing more.
* A call with ``output_attentions=True`` (per call or in the config) runs the model's own eager
  function, which returns the weights, and is counted in the report: never an empty tuple.
* The config's attention implementation is switched by giving each config a per-patch class whose
  ``_attn_implementation`` reads "attnpatch"; nothing is written on the config, so a deep copy, a pickle
  or ``torch.save`` of a patched model holds an unpatched model (it loads without attnpatch). A later
  ``set_attn_implementation(...)`` (or ``config._attn_implementation = ...``) on a patched model wins:
  it is warned once and shown in the report.
* "attnpatch" stays registered in transformers' interfaces only while a patch uses it.

What is not routed, and why, is reported per site: models that declare ``_supports_sdpa = False`` for
reasons attnpatch does not serve, models that transformers itself cannot switch and paged
(continuous-batching) implementations. A call that arrives with an argument attnpatch cannot honour
runs on the model's own eager function and is counted in the report as a fallback, never dropped.
Attention modules that do not use the interface fall to the generic adapter
(`attnpatch.adapters.torch_sdpa`) or are reported by it.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
import threading
import weakref
from typing import Dict, List, Optional

import torch

from attnpatch import router
from attnpatch.patch import SITE_ATTR, Adapter, Site, SiteMatch, UndoLog, extended_class, original_class, site_class

logger = logging.getLogger("attnpatch")

#: The ``attn_implementation`` name attnpatch registers in transformers.
IMPLEMENTATION = "attnpatch"

#: Keyword arguments that change the attention maths in a way attnpatch's router cannot express.
UNSUPPORTED_KWARGS = ("sinks",)

#: Model types that declare ``_supports_sdpa = False`` only for features the router serves.
SERVED_WITHOUT_SDPA = {
    "gemma2": "softcapping", "vaultgemma": "softcapping", "t5gemma": "softcapping",
    "gpt_oss": "attention sinks", "granite_swa": "attention sinks",
}

_LOCK = threading.Lock()
#: live patches using the registered implementation (it is unregistered when the last one goes)
_USERS: set = set()


def _join(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def _int_attr(obj, names) -> Optional[int]:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


# -- the attention function transformers calls ---------------------------------------------------------

def _position_bias_mask(position_bias, attention_mask, is_causal, query, key):
    """transformers' ``create_position_bias_mask``: fold T5's relative position bias into one additive
    mask (with -inf-like values where the boolean mask or causality forbids attending)."""
    min_dtype = torch.finfo(key.dtype).min
    if attention_mask is None:
        if is_causal:
            q_len, kv_len = query.shape[2], key.shape[2]
            causal = torch.arange(q_len, device=key.device)[:, None] >= torch.arange(kv_len, device=key.device)[None, :]
            out = torch.where(causal.view(1, 1, q_len, kv_len), position_bias, min_dtype)
        else:
            out = position_bias
    elif attention_mask.dtype == torch.bool:
        out = torch.where(attention_mask, position_bias, min_dtype)
    else:
        out = position_bias + attention_mask
    return out.contiguous()


def _collector():
    """transformers' output collector (``output_attentions`` per call), or None on older versions."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector


#: transformers' output collector, looked up when a model is patched (`patch_root`), never inside a call:
#: filled lazily by the first call, a torch.compile'd model recompiled at its second call (the guard
#: on the empty list failed).
_COLLECTOR = []


def _weights_requested(kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    col = _COLLECTOR[0] if _COLLECTOR else _collector()
    got = col.get() if col is not None else None
    return bool(got) and ("attentions" in got or "cross_attentions" in got)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, position_bias: Optional[torch.Tensor] = None,
                      softcap: Optional[float] = None, s_aux: Optional[torch.Tensor] = None, **kwargs):
    """transformers' attention-function signature, served by attnpatch's router.

    (b, h, s, d) in; ``(output in (b, s, h, d), None)`` out, like transformers' SDPA path. Calls from
    modules that are not patched are routed with no site setting: the controls and auto decide.
    """
    # module.__class__, not type(module): under torch.compile the guards then reuse the class check of
    # transformers' deprecate_kwarg wrapper (args[0].__class__) instead of adding two per layer
    ref = getattr(module.__class__, SITE_ATTR, None)
    site = ref() if ref is not None else None
    if kwargs.get("sinks") is not None or _weights_requested(kwargs):
        why = "sinks" if kwargs.get("sinks") is not None else "output_attentions"
        return _own_implementation(site, why, module, query, key, value, attention_mask, dropout, scaling,
                                   is_causal, position_bias, dict(kwargs, softcap=softcap, s_aux=s_aux))
    q_len = query.shape[2]
    # transformers' sdpa_attention_forward, step by step (5.24): the kwarg wins over the module flag,
    # then causal only for a prefill without an explicit mask.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if isinstance(is_causal, torch.Tensor) and torch.jit.is_tracing():  # the cheap test first: a hot path
        is_causal = bool(is_causal.item())
    if is_causal and key.shape[2] > q_len:  # empty static cache at prefill: top-left causal drops the rest
        key = key[:, :, :q_len, :]
        value = value[:, :, :q_len, :]
        if position_bias is not None:
            position_bias = position_bias[:, :, :, :q_len]
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if attention_mask is not None and attention_mask.dim() == 2:  # SDPA reads a 2-D mask as (s_q, s_kv)
        attention_mask = attention_mask[None, None]
    features = None
    if softcap is not None or s_aux is not None:
        features = router.make_features(softcap=softcap, sinks=s_aux)
    out = router.route(site.scope if site is not None else None, query, key, value, "bnsd", attention_mask,
                       is_causal, scaling, dropout, None, features, s_aux)
    return out.transpose(1, 2).contiguous(), None


def _own_implementation(site: Optional[Site], arg: str, module, query, key, value, attention_mask, dropout,
                        scaling, is_causal, position_bias, kwargs):
    """Run a call attnpatch cannot honour on the model's own eager function (the masks it receives
    were built for SDPA: turn them into the additive form eager functions expect)."""
    modeling = sys.modules.get(type(module).__module__)
    eager = getattr(modeling, "eager_attention_forward", None)
    if eager is None or (arg != "output_attentions" and arg not in _parameters(eager)
                         and not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(eager).parameters.values())):
        raise NotImplementedError(
            f"attnpatch: {type(module).__name__} passed {arg}={kwargs.get(arg)!r}, which attnpatch cannot honour, "
            f"and {type(module).__module__} has no eager_attention_forward that takes {arg!r} to run it on; "
            "remove the patch from this model (attnpatch.remove(model))")
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is None and causal and q_len > 1:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()[None, None]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    extra = dict(kwargs)
    if position_bias is not None:
        extra["position_bias"] = position_bias
    if site is not None:
        why = ("output_attentions=True needs the attention weights" if arg == "output_attentions" else
               f"{arg}={kwargs.get(arg)!r} cannot be honoured by attnpatch's backends")
        site.record_bypass(f"{why}; ran {type(module).__module__}.eager_attention_forward")
    extra = {k: v for k, v in extra.items() if v is not None or k not in ("softcap", "s_aux")}
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **extra)


_PARAMS: Dict[int, frozenset] = {}


def _parameters(fn) -> frozenset:
    names = _PARAMS.get(id(fn))
    if names is None:
        names = _PARAMS[id(fn)] = frozenset(inspect.signature(fn).parameters)
    return names




# -- registration ------------------------------------------------------------------------------------

def register_implementation(user) -> None:
    """Register ``attn_implementation="attnpatch"`` (attention function and SDPA-style mask function)
    in transformers' global interfaces for ``user`` (a patch); inert for models that do not select it.
    `unregister_implementation` takes it out again when its last user is gone."""
    with _LOCK:
        if not _USERS:
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
            from transformers.modeling_utils import AttentionInterface

            AttentionInterface.register(IMPLEMENTATION, attention_forward)
            AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
        _USERS.add(user)


def unregister_implementation(user) -> None:
    with _LOCK:
        _USERS.discard(user)
        if _USERS:
            return
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        for interface in (AttentionInterface, AttentionMaskInterface):
            if interface._global_mapping.get(IMPLEMENTATION) is not None:
                del interface._global_mapping[IMPLEMENTATION]


def is_registered() -> bool:
    from transformers.modeling_utils import AttentionInterface

    return IMPLEMENTATION in AttentionInterface._global_mapping


def _config_class(orig: type, config, sites: List[Site]) -> type:
    """The per-patch class of a config: ``_attn_implementation`` reads "attnpatch" until someone sets
    the implementation (transformers' ``set_attn_implementation`` writes ``_attn_implementation_internal``,
    ``config._attn_implementation = ...`` goes through the same attribute); that choice then wins,
    warned once and shown in the report. The value itself stays in the config's ``__dict__``."""
    state = {"overridden": False}
    key = "_attn_implementation_internal"
    patched = weakref.ref(config)  # other instances of this class (transformers builds some, e.g.
    # ``self.__class__()`` in to_diff_dict) behave as the original class

    def implementation(self):
        if state["overridden"] or self is not patched():
            return self.__dict__.get(key)
        return IMPLEMENTATION

    def set_implementation(self, value):
        orig._attn_implementation.fset(self, value)  # transformers' setter (sub-configs too)

    def internal(self):
        return self.__dict__.get(key)

    def set_internal(self, value):
        self.__dict__[key] = value
        if value == IMPLEMENTATION or state["overridden"] or self is not patched():
            return
        state["overridden"] = True
        logger.warning("attnpatch: attn_implementation of a patched %s was set to %r; attnpatch no longer "
                       "routes its attention (report() shows it; attnpatch.remove(model) restores it)",
                       orig.__name__, value)
        for site in sites:
            site.routed = False
            site.note = (f"attn_implementation set to {value!r} after apply (set_attn_implementation): "
                         "transformers runs its own implementation; apply again to route it")

    return site_class(orig, {"_attn_implementation": property(implementation, set_implementation),
                             key: property(internal, set_internal)})


# -- finding sites -------------------------------------------------------------------------------------

_USES_INTERFACE: Dict[type, bool] = {}


def _missing_interfaces() -> str:
    """Why this transformers cannot take attnpatch's implementation ("" when it can): without
    ``AttentionMaskInterface`` a custom implementation would get no masks."""
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401
        from transformers.modeling_utils import AttentionInterface  # noqa: F401
    except ImportError as exc:
        import transformers

        return (f"transformers {transformers.__version__} has no AttentionInterface/AttentionMaskInterface "
                f"({exc}); attnpatch would lose the masks, so these modules keep their implementation "
                "(needs transformers >= 4.53)")
    return ""


def uses_attention_interface(cls: type) -> bool:
    """True when ``cls.forward`` dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    hit = _USES_INTERFACE.get(cls)
    if hit is None:
        fn = getattr(cls, "forward", None)
        try:
            fn = inspect.unwrap(fn) if fn is not None else None  # decorators (deprecate_kwarg, ...)
        except ValueError:
            pass
        code = getattr(fn, "__code__", None)
        hit = code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names
        _USES_INTERFACE[cls] = hit
    return hit


def _is_cross(module, path: str) -> bool:
    flag = getattr(module, "is_cross_attention", None)
    if isinstance(flag, bool):
        return flag
    last = path.rsplit(".", 1)[-1].lower()
    name = type(module).__name__.lower()
    return "cross" in name or "cross" in last or last in ("encoder_attn", "encdecattention")


def _not_routed_reason(owner, config) -> str:
    """Why a model's attention cannot be switched to attnpatch ("" when it can)."""
    if config is None:
        return ("no transformers config found for this attention module (it has no .config and no "
                "PreTrainedModel above it)")
    missing = _missing_interfaces()
    if missing:
        return missing
    impl = getattr(config, "_attn_implementation", None)
    if owner is not None and not getattr(owner, "_supports_sdpa", False) and \
            getattr(config, "model_type", None) not in SERVED_WITHOUT_SDPA:
        return (f"{type(owner).__name__} declares _supports_sdpa=False (it needs features SDPA lacks) and "
                f"attnpatch does not know which; it keeps its own implementation {impl!r}")
    can_set = getattr(type(owner), "_can_set_attn_implementation", None) if owner is not None else None
    if can_set is not None and not can_set():
        return f"transformers cannot switch {type(owner).__name__}'s attention implementation at run time"
    if isinstance(impl, str) and impl.startswith("paged"):
        return f"attn_implementation {impl!r} (continuous batching) is left as is"
    return ""


class TransformersAdapter(Adapter):
    NAME = "transformers"
    PRIORITY = 20

    def available(self) -> bool:
        try:
            return importlib.util.find_spec("transformers") is not None
        except (ImportError, ValueError):  # a broken or blocked install counts as missing
            return False

    def find_sites(self, root: torch.nn.Module, prefix: str) -> List[SiteMatch]:
        if "transformers" not in sys.modules:  # no transformers model can be in the tree
            return []
        from transformers import PretrainedConfig
        from transformers.modeling_utils import PreTrainedModel

        owner_of: Dict[str, Optional[torch.nn.Module]] = {}
        found = []
        for name, module in root.named_modules():
            parent = owner_of.get(name.rsplit(".", 1)[0] if "." in name else "", None) if name else None
            owner = module if isinstance(module, PreTrainedModel) else parent
            owner_of[name] = owner
            if isinstance(module, PreTrainedModel) or not uses_attention_interface(type(module)):
                continue
            config = getattr(module, "config", None)
            if not isinstance(config, PretrainedConfig):
                config = getattr(owner, "config", None)
            found.append((name, module, owner, config))
        # Decide per config: every module that reads a config must be routable, or none is.
        reasons: Dict[int, str] = {}
        for _, _, owner, config in found:
            why = _not_routed_reason(owner, config)
            if why and not reasons.get(id(config)):
                reasons[id(config)] = why
            reasons.setdefault(id(config), "")
        out = []
        for name, module, owner, config in found:
            heads = _int_attr(module, ("num_heads", "num_attention_heads", "n_heads")) or _int_attr(
                config, ("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads"))
            kv_heads = _int_attr(module, ("num_key_value_heads", "num_kv_heads")) or _int_attr(
                config, ("num_key_value_heads",))
            groups = _int_attr(module, ("num_key_value_groups",))
            if kv_heads is None and heads and groups:
                kv_heads = heads // groups
            head_dim = _int_attr(module, ("head_dim", "attention_head_size", "key_value_proj_dim")) or _int_attr(
                config, ("head_dim", "d_kv"))
            why = reasons[id(config)]
            owners = []
            path = name
            while True:  # every PreTrainedModel above the module (their configs build the masks)
                o = owner_of.get(path)
                if o is not None and (not owners or owners[-1] is not o):
                    owners.append(o)
                if not path:
                    break
                path = path.rsplit(".", 1)[0] if "." in path else ""
            out.append(SiteMatch(
                module, _join(prefix, name), kind="cross" if _is_cross(module, name) else "self", heads=heads,
                kv_heads=kv_heads or heads, head_dim=head_dim, routed=not why,
                note=why or f"transformers attn_implementation {IMPLEMENTATION!r} "
                            f"(was {getattr(config, '_attn_implementation', None)!r})",
                data=(config, owners)))
        return out

    def patch_root(self, root: torch.nn.Module, matches: List[SiteMatch], undo: UndoLog) -> None:
        if not matches:
            return
        configs: Dict[int, object] = {}
        for m in matches:
            config, owners = m.data
            configs.setdefault(id(config), config)
            for o in owners:
                c = getattr(o, "config", None)
                if c is not None:
                    configs.setdefault(id(c), c)
        if not _COLLECTOR:
            _COLLECTOR.append(_collector())
        token = object()
        register_implementation(token)
        undo.call(lambda: unregister_implementation(token), "unregister attnpatch from transformers' interfaces")
        sites: List[Site] = []  # filled by patch_site: the sites a later set_attn_implementation stops
        for m in matches:
            _SITES_OF_MATCH[m.module] = sites
        for config in configs.values():
            if type(config).__dict__.get("_attnpatch_orig") is not None:
                continue  # already switched (shared with another patched root)
            orig = original_class(type(config))
            undo.set_class(config, _config_class(orig, config, sites))

    def patch_site(self, match: SiteMatch, site: Site, undo: UndoLog) -> None:
        # the config switch routes the module; the function finds the site on the module it is given
        undo.set_class(match.module, extended_class(type(match.module), {SITE_ATTR: weakref.ref(site)}))
        sites = _SITES_OF_MATCH.pop(match.module, None)
        if sites is not None:
            sites.append(site)


_SITES_OF_MATCH: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


ADAPTER = TransformersAdapter
