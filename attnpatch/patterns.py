"""The one path matcher of recipes and context-parallel plans: a glob over a dotted module path
(``*`` within a segment, ``**`` any number of segments) or, written ``re:…``, a regex that must match
the whole path. Patterns come from recipe files: `attnpatch.recipes` refuses unsafe regexes before they
get here."""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> "re.Pattern[str]":
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    parts = pattern.split(".")
    rx = []
    n = len(parts)
    for i, seg in enumerate(parts):
        last = i == n - 1
        if seg == "**":
            if n == 1:
                rx.append(r".*")
            elif last:
                rx.append(r"(?:\.[^.]+)*")
            else:
                rx.append(r"(?:[^.]+\.)*")
            continue
        body = "".join("[^.]*" if ch == "*" else "[^.]" if ch == "?" else re.escape(ch) for ch in seg)
        rx.append(body)
        trailing_any = i + 1 == n - 1 and parts[i + 1] == "**"  # "a.**": the ** part brings its own dots
        if not last and not trailing_any:
            rx.append(r"\.")
    return re.compile("".join(rx))


def match(pattern: str, path: str) -> bool:
    """The one matcher: ``pattern`` is a glob over the dotted path (``*`` within a segment, ``**``
    any number of segments) or, written ``re:…``, a regex that must match the whole path."""
    return _compile(pattern).fullmatch(path) is not None
