"""`flash_attn3_hub`: FlashAttention 3 as the prebuilt ``kernels-community/flash-attn3`` kernel from the
Hugging Face hub, loaded through the `kernels` package (the build diffusers' ``_flash_3_hub`` backend
and transformers' ``kernels-community/flash-attn3`` attention use: version 1).

The kernel module has FA3's own entry points (``flash_attn_func``, ``flash_attn_varlen_func``; read in
kernels-community's ``flash-attn3/torch-ext/flash_attn3/flash_attn_interface.py``), so this backend
runs `flash_attn3`'s kernel function on it unchanged: bsnd, SDPA's top-left causal translated,
key-padding masks through the varlen entry point, no dropout. It is never downloaded to answer "is it
available?": see `_hub_common` for where it is looked for and how to opt in to a download.

Arch rule: the kernels-community build compiles FA3's sm80 kernels (which run on sm8x) and its sm90a
kernels (``flash-attn3/build.toml``), so sm80–sm90; once loaded, the archs in the build's
``metadata.json`` are checked too.

No ``AUTO_PRIORITY``: auto never picks it; name it (``backend="flash_attn3_hub"``, a recipe,
``ATTNPATCH_BACKEND``). These binaries have not been run on our GPU box (it cannot reach the hub), so
neither their correctness there nor their speed against cuDNN (which beats FA2 by 1.8× on Hopper, see
DESIGN.md) is measured; and where FA3 is wanted, the locally built `flash_attn3` already has an auto
slot behind cuDNN. A downloaded binary earns an auto slot after it has been measured.
"""

from __future__ import annotations

from ._hub_common import HubKernelBackend, make_hub_kernel
from ._third_party import register_op
from .flash_attn3 import FlashAttn3Backend, flash_attn3_kernel


class FlashAttn3HubBackend(HubKernelBackend, FlashAttn3Backend):
    NAME = "flash_attn3_hub"
    DESCRIPTION = ("FlashAttention 3, prebuilt from the hub (kernels-community/flash-attn3 via kernels; loaded only "
                   "when present locally or downloads are allowed): exact, key-padding masks via varlen")
    REPO_ID = "kernels-community/flash-attn3"
    REPO_VERSION = 1
    REQUIRED_ATTRS = ("flash_attn_func", "flash_attn_varlen_func")
    CUDA_MIN_CAPABILITY = (8, 0)
    CUDA_MAX_CAPABILITY = (9, 0)
    ARCH_NOTE = "kernels-community/flash-attn3 builds FA3's sm80 kernels (sm8x) and its sm90a kernels"
    AUTO_PRIORITY = {}  # see the module docstring
    # `flash_attn3`'s sliding window and softcap are not wired through the hub's loader (nor run on a GPU)
    SUPPORTS_WINDOW = False
    SUPPORTS_SOFTCAP = False
    KERNEL_FN = staticmethod(flash_attn3_kernel)
    kernel = staticmethod(make_hub_kernel("flash_attn3_hub", flash_attn3_kernel))


register_op(FlashAttn3HubBackend)
