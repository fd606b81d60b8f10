"""Backend names: attnpatch's own, and the names users bring from other libraries.

Every place that takes a backend name (``backend=``, `use_backend`, ``ATTNPATCH_BACKEND`` /
``ATTNPATCH_DISABLE``, recipes, the CLI) turns it into attnpatch's canonical name with `canonical`, so
reports, `attnpatch.stats()` and explanations always show the canonical name.

Rules:

* Case does not matter (``SDPA`` is ``sdpa``).
* Whitespace is never part of a name: ``'sdpa '`` is an error that says so (in a comma-separated
  list, spaces next to the commas are list formatting and allowed: ``"sdpa_cudnn, sdpa"``).
* A name from another library (`ALIASES`: diffusers' ``AttentionBackendName`` values, transformers'
  ``attn_implementation`` values, DiffSynth's ``DIFFSYNTH_ATTENTION_IMPLEMENTATION`` values,
  SageAttention's function names as KJNodes offers them, torch's ``SDPBackend`` names) means the
  attnpatch backend that runs the same kernel. A name that has no such backend is refused with what it
  is and what to use instead.
* An unknown name is an error with the closest valid name ("did you mean ...?") and the valid names.

The table is data; `attnpatch info` shows it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import registry


class BackendNameError(ValueError):
    """A backend name that cannot be used. ``reason`` is the message without where the name came from;
    ``unknown`` is True when ``name`` is neither attnpatch's nor another library's (recipes then word
    their own message)."""

    def __init__(self, message: str, reason: str, unknown: bool, name: str = ""):
        super().__init__(message)
        self.reason = reason
        self.unknown = unknown
        self.name = name


@dataclass(frozen=True)
class Alias:
    """Another library's name for an attention kernel.

    ``backend`` is the attnpatch backend that runs the same kernel, or None when attnpatch has none (the
    name is then refused and ``note`` says what it is and what to use). ``origin`` names the library
    (or libraries) that use the name."""

    name: str
    origin: str
    backend: Optional[str]
    note: str = ""


_D = "diffusers"
_T = "transformers"
_DS = "DiffSynth"
_SA = "SageAttention / KJNodes"
_TORCH = "torch SDPBackend"
_COMFY = "ComfyUI"

#: Other libraries' names, lower-case. Read from diffusers 0.42 ``AttentionBackendName``, transformers
#: 5.x ``AttentionInterface`` / ``FLASH_ATTN_KERNEL_FALLBACK``, DiffSynth-Studio 2.1
#: ``core/attention/attention.py``, KJNodes' "Patch Sage Attention" modes and SageAttention's API.
ALIASES: Tuple[Alias, ...] = (
    # diffusers: PyTorch native
    Alias("native", _D, "sdpa", "F.scaled_dot_product_attention, torch picks the kernel"),
    Alias("_native_cudnn", _D, "sdpa_cudnn"),
    Alias("_native_flash", _D, "sdpa_flash"),
    Alias("_native_efficient", _D, "sdpa_efficient"),
    Alias("_native_math", _D, "sdpa_math"),
    Alias("_native_npu", _D, None, "torch_npu's fused attention on Ascend NPUs; attnpatch runs on CPU and CUDA "
          "only: use sdpa"),
    Alias("_native_xla", _D, None, "torch_xla's flash attention on TPUs; attnpatch runs on CPU and CUDA only: "
          "use sdpa"),
    # diffusers: flash-attn
    Alias("flash", _D, "flash_attn", "FlashAttention 2 from the flash-attn package"),
    Alias("flash_varlen", _D, "flash_attn", "flash-attn's varlen entry point; attnpatch's flash_attn uses it "
          "for key-padding masks"),
    Alias("flash_hub", _D, None, "FlashAttention 2 prebuilt from the hub (kernels-community/flash-attn2); "
          "attnpatch has no hub route for FlashAttention 2: use flash_attn (the flash-attn package) or "
          "flash_attn3_hub"),
    Alias("flash_varlen_hub", _D, None, "FlashAttention 2's varlen kernel prebuilt from the hub "
          "(kernels-community/flash-attn2); attnpatch has no hub route for FlashAttention 2: use flash_attn "
          "or flash_attn3_hub"),
    Alias("flash_4_hub", _D, None, "FlashAttention 4 prebuilt from the hub (kernels-community/flash-attn4); "
          "attnpatch runs FlashAttention 4 from the flash-attn-4 package: use flash_attn4"),
    Alias("_flash_3", _D, "flash_attn3"),
    Alias("_flash_varlen_3", _D, "flash_attn3", "FlashAttention 3's varlen entry point; attnpatch's "
          "flash_attn3 uses it for key-padding masks"),
    Alias("_flash_3_hub", _D, "flash_attn3_hub"),
    Alias("_flash_3_varlen_hub", _D, "flash_attn3_hub"),
    Alias("aiter_fa2_hub", _D, None, "AMD's FlashAttention 2 (aiter CK kernels) for ROCm from the hub; attnpatch "
          "has no ROCm kernel backend: use sdpa"),
    # diffusers: SageAttention
    Alias("sage_blackwell_hub", _D, None, "SageAttention 3 prebuilt from the hub (SageAttention/sage-blackwell); "
          "attnpatch runs SageAttention 3 from the sageattn3 package: use sage3"),
    Alias("sage_varlen", _D, None, "sageattention's sageattn_varlen (key-padding masks); attnpatch's Sage "
          "backends take no masks and send masked calls to an exact kernel: use sage"),
    Alias("_sage_qk_int8_pv_fp8_cuda", _D, "sage_fp8_cuda"),
    Alias("_sage_qk_int8_pv_fp8_cuda_sm90", _D, "sage_fp8_cuda_sm90"),
    Alias("_sage_qk_int8_pv_fp16_cuda", _D, "sage_fp16_cuda"),
    Alias("_sage_qk_int8_pv_fp16_triton", _D, "sage_fp16_triton"),
    # transformers (attn_implementation) and DiffSynth (DIFFSYNTH_ATTENTION_IMPLEMENTATION)
    Alias("flash_attention_2", f"{_T} / {_DS}", "flash_attn"),
    Alias("flash_attention_3", f"{_T} / {_DS}", "flash_attn3"),
    Alias("flash_attention_4", f"{_T} / {_DS}", "flash_attn4"),
    Alias("flex_attention", _T, "flex"),
    Alias("paged|eager", _T, None, "transformers' paged attention for continuous batching; attnpatch leaves "
          "paged attention to transformers (reported): use sdpa or auto for the ordinary attention"),
    Alias("paged|sdpa", _T, None, "transformers' paged attention for continuous batching; attnpatch leaves "
          "paged attention to transformers (reported): use sdpa"),
    Alias("paged|flash_attention_2", _T, None, "transformers' paged attention for continuous batching; attnpatch "
          "leaves paged attention to transformers (reported): use flash_attn"),
    Alias("kernels-community/flash-attn3", _T, "flash_attn3_hub"),
    Alias("kernels-community/vllm-flash-attn3", _T, None, "vLLM's build of FlashAttention 3 from the hub; "
          "attnpatch's hub route loads kernels-community/flash-attn3: use flash_attn3_hub"),
    Alias("kernels-community/flash-attn2", _T, None, "FlashAttention 2 prebuilt from the hub; attnpatch has no "
          "hub route for FlashAttention 2: use flash_attn"),
    Alias("kernels-community/flash-attn4", _T, None, "FlashAttention 4 prebuilt from the hub; use flash_attn4 "
          "(the flash-attn-4 package)"),
    Alias("sage_attention", _DS, "sage", "sageattention's sageattn"),
    Alias("torch", _DS, "sdpa", "F.scaled_dot_product_attention"),
    Alias("customized_fa_kernel", _DS, None, "DiffSynth's FlashAttention from DIFFSYNTH_FLASH_ATTN_KERNEL_REPO_ID "
          "(a hub kernel); use flash_attn3_hub for kernels-community/flash-attn3"),
    # SageAttention's functions, as KJNodes' "Patch Sage Attention" offers them
    Alias("sageattn", _SA, "sage"),
    Alias("sageattn_qk_int8_pv_fp16_cuda", _SA, "sage_fp16_cuda"),
    Alias("sageattn_qk_int8_pv_fp16_triton", _SA, "sage_fp16_triton"),
    Alias("sageattn_qk_int8_pv_fp8_cuda", _SA, "sage_fp8_cuda", "attnpatch accumulates P·V in fp32+fp32"),
    Alias("sageattn_qk_int8_pv_fp8_cuda_sm90", _SA, "sage_fp8_cuda_sm90"),
    Alias("sageattn_qk_int8_pv_fp8_cuda++", _SA, None, "KJNodes' sageattn_qk_int8_pv_fp8_cuda with "
          "pv_accum_dtype='fp32+fp16' (faster, less accurate); attnpatch runs that kernel with fp32+fp32 "
          "accumulation: use sage_fp8_cuda"),
    Alias("sageattn3", _SA, "sage3", "sageattn3_blackwell with per_block_mean=True (its default; KJNodes' "
          "'sageattn3' mode passes False)"),
    Alias("sageattn3_blackwell", _SA, "sage3"),
    Alias("sageattn3_per_block_mean", _SA, "sage3"),
    Alias("sageattn_varlen", _SA, None, "sageattention's varlen entry point (key-padding masks); attnpatch's "
          "Sage backends take no masks and send masked calls to an exact kernel: use sage"),
    Alias("disabled", _SA, None, "KJNodes' switch that turns its Sage patch off; with attnpatch, leave the model "
          "unpatched (attnpatch.remove) or use auto"),
    # torch's SDPBackend names (torch.nn.attention.sdpa_kernel) and common short names
    Alias("math", _TORCH, "sdpa_math"),
    Alias("flash_attention", _TORCH, "sdpa_flash", "torch's built-in flash kernel (SDPBackend.FLASH_ATTENTION)"),
    Alias("efficient_attention", _TORCH, "sdpa_efficient"),
    Alias("cudnn_attention", _TORCH, "sdpa_cudnn"),
    Alias("cudnn", _TORCH, "sdpa_cudnn"),
    Alias("efficient", _TORCH, "sdpa_efficient"),
    Alias("mem_efficient", _TORCH, "sdpa_efficient", "torch.backends.cuda.enable_mem_efficient_sdp"),
    # ComfyUI's command-line attention choices
    Alias("pytorch", _COMFY, "sdpa", "--use-pytorch-cross-attention"),
    Alias("split", _COMFY, None, "ComfyUI's sliced attention (--use-split-cross-attention), a memory saver; "
          "use sdpa_efficient for exact memory-efficient attention"),
    Alias("quad", _COMFY, None, "ComfyUI's sub-quadratic chunked attention (--use-quad-cross-attention), a memory "
          "saver; use sdpa_efficient for exact memory-efficient attention"),
    # xformers
    Alias("memory_efficient_attention", "xformers", "xformers", "xformers.ops.memory_efficient_attention"),
)

_BY_NAME: Dict[str, Alias] = {a.name: a for a in ALIASES}
#: Peer names that are also attnpatch's own (listed by `attnpatch info`; resolved as attnpatch's).
SAME_NAMES: Tuple[Tuple[str, str], ...] = (
    ("sdpa", _T), ("eager", _T), ("flex", _D), ("sage", _D), ("sage_hub", _D), ("xformers", f"{_D} / {_DS}"),
)


def alias(name: str) -> Optional[Alias]:
    """The `Alias` entry for ``name`` (any case), or None."""
    return _BY_NAME.get(name.lower())


def aliases_of(backend: str) -> List[Alias]:
    """The other libraries' names that mean ``backend``."""
    return [a for a in ALIASES if a.backend == backend]


def _registered_lower() -> Dict[str, str]:
    out: Dict[str, str] = {}
    for n in registry.backend_names():
        out.setdefault(n.lower(), n)
    return out


def suggestion(name: str) -> Optional[str]:
    """The closest valid name to ``name`` as a hint ("'flash_attn'", or "'flash_attention_2' (the
    transformers / DiffSynth name for flash_attn)"), or None."""
    low = name.strip().lower()
    regs = _registered_lower()
    close = difflib.get_close_matches(low, list(regs) + [a.name for a in ALIASES if a.backend], n=1, cutoff=0.6)
    if not close:
        return None
    if close[0] in regs:
        return repr(regs[close[0]])
    a = _BY_NAME[close[0]]
    return f"{a.name!r} (the {a.origin} name for {a.backend})"


def valid_names() -> str:
    return ", ".join(["auto"] + sorted(registry.backend_names()))


def canonical(name: str, source: str) -> str:
    """attnpatch's name for backend ``name`` ("auto" stays "auto"), or `BackendNameError` naming
    ``source`` (where the name came from) and the fix."""
    if not isinstance(name, str):
        raise TypeError(f"{source}: backend names must be strings, got {type(name).__name__} {name!r}")
    if not name or name != "".join(name.split()):
        fixed = "".join(name.split())
        hint = f"; write {fixed!r}" if fixed and (fixed.lower() == "auto" or fixed.lower() in _registered_lower()
                                                  or alias(fixed) is not None) else ""
        what = "is empty" if not name.strip() else "contains whitespace"
        reason = (f"backend name {name!r} {what}; names have no spaces{hint} (a priority list is "
                  "comma-separated: 'sdpa_cudnn,sdpa')")
        raise BackendNameError(f"{source}: {reason}", reason, False)
    low = name.lower()
    if low == "auto":
        return "auto"
    if name in registry.backend_names():
        return name
    regs = _registered_lower()
    if low in regs:
        return regs[low]
    a = _BY_NAME.get(low)
    if a is not None:
        if a.backend is None:
            reason = f"{name!r} is the {a.origin} name for {a.note}"
            raise BackendNameError(f"{source}: {reason}", reason, False)
        if a.backend in registry.backend_names():
            return a.backend
    hint = suggestion(name)
    reason = (f"unknown attention backend {name!r}" + (f" (did you mean {hint}?)" if hint else ""))
    tail = (f"; valid names: {valid_names()}; names from diffusers, transformers, DiffSynth and SageAttention "
            "(e.g. '_native_cudnn', 'flash_attention_2', 'sage_attention') are accepted too: `attnpatch info` "
            "lists them")
    raise BackendNameError(f"unknown attention backend {name!r} from {source}"
                           + (f" (did you mean {hint}?)" if hint else "") + tail, reason + tail, True, name)


def describe_table() -> List[Tuple[str, str, str, str]]:
    """(name, origin, attnpatch backend or "-", note) for every alias, for `attnpatch info`."""
    rows = [(n, origin, n, "the same name") for n, origin in SAME_NAMES]
    rows += [(a.name, a.origin, a.backend or "-", a.note) for a in ALIASES]
    return rows
