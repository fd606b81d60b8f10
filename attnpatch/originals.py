"""attnpatch's per-site classes (`attnpatch.patch.site_class`) remember the class they were made from;
these read it. A leaf module, so that plan resolution can unwrap classes without importing the patch
machinery."""

from __future__ import annotations

#: The attribute of a per-site class that holds the class it was made from.
ORIGINAL_CLASS = "_attnpatch_orig"


def original_class(cls: type) -> type:
    """The class attnpatch's per-site class was made from (``cls`` itself when it is not one)."""
    return cls.__dict__.get(ORIGINAL_CLASS, cls)


def is_site_class(cls: type) -> bool:
    return ORIGINAL_CLASS in cls.__dict__
