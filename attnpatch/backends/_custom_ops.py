"""Third-party attention kernels as `torch.library.custom_op`s, so `torch.compile(fullgraph=True)` sees
one opaque node per attention call instead of breaking the graph at a foreign C++/Triton call.

Every wrapped backend gets the same pair of ops:

* ``attnpatch::<name>(q, k, v, mask?, is_causal, scale?, dropout_p, window?, softcap?) -> out`` — runs
  the backend's *kernel function* (a plain Python function ``kernel(module, q, k, v, mask, is_causal,
  scale, dropout_p)`` in the backend's native layout) with the library module imported by name; for
  backends that declare a sliding window or softcapping, ``window`` ([left, right], -1 = unbounded) and
  ``softcap`` reach it as keyword arguments when given. Its fake
  implementation returns an empty tensor of shape ``q.shape[:-1] + (v.shape[-1],)``, contiguous; the
  real implementation returns a contiguous tensor too, so the strides the compiler assumes are the
  strides it gets.
* ``attnpatch::<name>_backward(grad, q, k, v, mask?, is_causal, scale?, window?, softcap?) -> (dq, dk, dv)`` — registered
  as the forward op's autograd formula for backends with a backward. It recomputes the forward with the
  library's own autograd (flash-attn's and xformers' backward kernels) and returns the input gradients.
  The recompute costs one extra forward in the backward pass; in exchange it uses only the libraries'
  public, stable entry points. Dropout cannot be replayed this way, so the backends refuse dropout
  together with gradients under ``torch.compile`` (eager calls go straight to the library, whose own
  autograd handles dropout).

Eager calls do not go through these ops (the dispatcher round trip costs host time); the router's
compile path does (see `ThirdPartyBackend.build`).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

#: op name -> the forward custom op (``attnpatch::<name>``)
OPS: Dict[str, Callable] = {}


def _output_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty(tuple(q.shape[:-1]) + (v.shape[-1],))


def encode_window(window) -> Optional[List[int]]:
    """A call's ``window`` (left, right; None = unbounded) as the ops' ``int[]?`` argument (-1 = unbounded)."""
    return None if window is None else [-1 if w is None else int(w) for w in window]


def features(window: Optional[List[int]], softcap: Optional[float]) -> dict:
    """The keyword arguments a kernel function gets for the ops' ``window`` and ``softcap``."""
    out = {}
    if window is not None:
        out["window"] = tuple(None if w < 0 else w for w in window)
    if softcap is not None:
        out["softcap"] = softcap
    return out


@contextlib.contextmanager
def _autograd_inside_op():
    """Turn autograd back on inside a custom op's implementation.

    A custom op's implementation runs below the autograd dispatch keys (they are in the thread's
    exclude set), so a recompute there would record nothing. This removes the autograd keys from the
    exclude set for the block, leaving the rest (autocast stays off) as it was."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor"):
        k = getattr(torch._C.DispatchKey, key, None)
        if k is not None:
            exclude = exclude.remove(k)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def attention_op(name: str, kernel: Callable, module_name: str, backward: bool) -> Callable:
    """Define (once per process) ``attnpatch::<name>`` around ``kernel`` and return it.

    ``kernel(module, q, k, v, mask, is_causal, scale, dropout_p)`` is called with
    ``importlib.import_module(module_name)``; only at run time, never at definition time."""
    if name in OPS:
        return OPS[name]
    qualname = f"attnpatch::{name}"

    def impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
             is_causal: bool, scale: Optional[float], dropout_p: float, window: Optional[List[int]] = None,
             softcap: Optional[float] = None) -> torch.Tensor:
        module = importlib.import_module(module_name)
        with torch.no_grad():
            out = kernel(module, q, k, v, mask, is_causal, scale, dropout_p, **features(window, softcap))
        return out.contiguous()

    op = torch.library.custom_op(qualname, impl, mutates_args=())

    @op.register_fake
    def _fake(q, k, v, mask, is_causal, scale, dropout_p, window=None, softcap=None):
        return _output_like(q, v)

    if backward:
        def bwd_impl(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Optional[torch.Tensor], is_causal: bool, scale: Optional[float],
                     window: Optional[List[int]] = None,
                     softcap: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            module = importlib.import_module(module_name)
            with _autograd_inside_op():
                leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
                out = kernel(module, *leaves, mask, is_causal, scale, 0.0, **features(window, softcap))
                grads = torch.autograd.grad(out, leaves, grad)
            return tuple(g.contiguous() for g in grads)

        bwd = torch.library.custom_op(qualname + "_backward", bwd_impl, mutates_args=())

        @bwd.register_fake
        def _fake_bwd(grad, q, k, v, mask, is_causal, scale, window=None, softcap=None):
            return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

        def setup_context(ctx, inputs, output):
            q, k, v, mask, is_causal, scale, dropout_p, window, softcap = inputs
            ctx.save_for_backward(q, k, v, mask)
            ctx.is_causal, ctx.scale, ctx.dropout_p, ctx.window, ctx.softcap = is_causal, scale, dropout_p, window, softcap

        def backward_formula(ctx, grad):
            if ctx.dropout_p > 0:
                raise RuntimeError(
                    f"{qualname}: the recompute backward cannot replay dropout (dropout_p={ctx.dropout_p}); "
                    "the backend refuses this call when routed (this op was called directly)")
            q, k, v, mask = ctx.saved_tensors
            dq, dk, dv = bwd(grad, q, k, v, mask, ctx.is_causal, ctx.scale, ctx.window, ctx.softcap)
            return dq, dk, dv, None, None, None, None, None, None

        op.register_autograd(backward_formula, setup_context=setup_context)
    OPS[name] = op
    return op
