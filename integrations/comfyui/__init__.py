"""attnpatch's ComfyUI custom nodes. Copy or symlink this folder into ``ComfyUI/custom_nodes/`` and
install attnpatch into the Python that runs ComfyUI (``python -m pip install /path/to/attnpatch``).

* "Attention (attnpatch)": MODEL → MODEL; sets ``transformer_options["optimized_attention_override"]``
  on a clone, so the diffusion model's attention goes through ``attnpatch.router.route``.
* "Attention report (attnpatch)": after the sampler, what ran (also logged after every sampler run).
"""

try:
    import attnpatch  # noqa: F401
except ImportError as exc:  # ComfyUI shows this message when it loads custom nodes
    raise ImportError(
        "the attnpatch ComfyUI nodes need the attnpatch package in the Python that runs ComfyUI: "
        "python -m pip install /path/to/attnpatch (or -e for a checkout)") from exc

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
