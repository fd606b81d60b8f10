"""Adapters: one module per model family, each routing a model's attention calls to
`attnpatch.attention_forward`. Installed as ``attnpatch.adapters``."""
