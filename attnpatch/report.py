"""`Report`: what `Patch.report()` returns — per attention site, the rule that set its backend, the
backends that ran and how often, fallbacks with their reasons, calls left to the library's own code,
and what was decided for calls compiled by torch.compile (those are not counted).

It reads as text (``print(patch.report())``, also its ``repr``), as an HTML table in Jupyter
(``_repr_html_``) and as data (`Report.as_dicts`, `Report.rows`).
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from . import controls


def describe_scope(scope) -> str:
    """The backend setting of a site's `Scope`, for people ("auto", "sdpa_cudnn,sdpa", or not set)."""
    if scope is None or scope.backends is None:
        return "(not set: use_backend / ATTNPATCH_BACKEND / auto)"
    if scope.backends == controls.AUTO:
        return "auto"
    return ",".join(scope.backends)


@dataclass
class ReportRow:
    """One site of a report. ``calls``: backend name -> calls that ran on it; ``fallbacks``: (refused
    backend, used backend, reason) -> calls; ``compiled``: backend name -> how it was decided, for calls
    traced under torch.compile (not counted); ``traced`` is the sorted names of ``compiled``."""

    site: Any  # attnpatch.patch.Site
    calls: Dict[str, int]
    fallbacks: Dict[Tuple[str, str, str], int]
    traced: List[str]
    compiled: Dict[str, str] = field(default_factory=dict)

    def ran(self) -> str:
        """What ran at this site, in words: "sdpa×4", "compiled: sdpa (…)", "not called" or "NOT ROUTED: …"."""
        s = self.site
        if not s.routed:
            return f"NOT ROUTED: {s.note}"
        parts = []
        if self.calls:
            parts.append(", ".join(f"{n}×{c}" for n, c in sorted(self.calls.items())))
        if self.compiled:
            parts.append("compiled: " + ", ".join(f"{n} ({self._how(how)})" for n, how in sorted(self.compiled.items()))
                         + ", calls not counted")
        return "; ".join(parts) or "not called"

    def _how(self, how: str) -> str:
        """How a compiled call's backend was decided, without the site's own rule (shown beside it):
        "auto: static table", "as the rule asks", or who else decided ("use_backend()", ...)."""
        rule = self.site.rule or ""
        if rule and how.startswith(rule):
            rest = how[len(rule):].strip()
            if not rest:
                return "as the rule asks"
            return "auto: " + rest.strip("()") if rest.startswith("(") else rest
        return how

    def rule(self) -> str:
        """The recipe rule (or ``apply()``) that set this site's backend, and what it asks for."""
        s = self.site
        if not s.routed:
            return s.rule or ""
        return f"{s.rule or 'apply()'} → {describe_scope(s.scope)}"

    def __repr__(self) -> str:
        return (f"ReportRow(site={self.site.path!r}, calls={self.calls!r}, fallbacks={self.fallbacks!r}, "
                f"compiled={self.compiled!r})")


@dataclass
class Report:
    """Per site: the rule, the backends that ran, fallbacks, unrouted calls. ``recipe`` names the
    recipe(s) in use; ``notes`` are lines for the whole patch (components left alone, ...)."""

    rows: List[ReportRow]
    recipe: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def totals(self) -> Tuple[Counter, int]:
        """(calls per backend over every site, number of fallback calls)."""
        calls: Counter = Counter()
        fell = 0
        for r in self.rows:
            calls.update(r.calls)
            fell += sum(r.fallbacks.values())
        return calls, fell

    def summary(self) -> str:
        """One line: sites, routed sites, calls per backend, fallbacks."""
        if not self.rows:
            return "attnpatch report: no attention sites"
        calls, fell = self.totals()
        routed = sum(1 for r in self.rows if r.site.routed)
        ran = ", ".join(f"{n}×{c}" for n, c in sorted(calls.items()))
        compiled = sum(1 for r in self.rows if r.compiled)
        return (f"attnpatch report: {len(self.rows)} sites, {routed} routed; {sum(calls.values())} calls"
                + (f" ({ran})" if ran else "") + f"; {fell} fallback calls"
                + (f"; {compiled} sites compiled" if compiled else ""))

    def as_dicts(self) -> List[Dict[str, Any]]:
        """One dict per site: the site's fields, ``calls``, ``fallbacks``, ``compiled`` (names) and
        ``compiled_decisions`` (name -> how), ``asked`` (the backend names its rule asks for, ``["auto"]``,
        or None when not set)."""
        out = []
        for r in self.rows:
            d = r.site.as_dict()
            d["calls"] = r.calls
            d["fallbacks"] = [{"from": a, "to": b, "reason": why, "calls": n} for (a, b, why), n in r.fallbacks.items()]
            d["compiled"] = r.traced
            d["compiled_decisions"] = dict(r.compiled)
            scope = r.site.scope
            d["asked"] = None if scope is None or scope.backends is None else (
                ["auto"] if scope.backends == controls.AUTO else list(scope.backends))
            out.append(d)
        return out

    def __str__(self) -> str:
        head = [self.summary()]
        if self.recipe:
            head.append(f"recipe: {self.recipe}")
        head += list(self.notes)
        lines = []
        for r in self.rows:
            s = r.site
            rule = r.rule()
            line = f"{s.path or '<root>'} [{s.adapter}, {s.kind}] -> {r.ran()}"
            lines.append(line + (f"  [{rule}]" if s.routed and rule else ""))
            for (a, b, why), n in sorted(r.fallbacks.items()):
                lines.append(f"    fell back {a} -> {b} ×{n}: {why}")
            for why, n in sorted(s.bypassed.items()):
                lines.append(f"    not routed ×{n} (ran the library's own code): {why}")
        return "\n".join(head + lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        """An HTML table (Jupyter shows it for ``patch.report()``)."""
        e = html.escape
        out = [f"<div><p><b>{e(self.summary())}</b></p>"]
        if self.recipe:
            out.append(f"<p>recipe: {e(self.recipe)}</p>")
        out += [f"<p>{e(n)}</p>" for n in self.notes]
        if self.rows:
            out.append("<table><thead><tr><th>site</th><th>adapter</th><th>kind</th><th>rule → backend asked</th>"
                       "<th>ran</th><th>fallbacks and unrouted calls</th></tr></thead><tbody>")
            for r in self.rows:
                s = r.site
                extra = [f"fell back {a} → {b} ×{n}: {why}" for (a, b, why), n in sorted(r.fallbacks.items())]
                extra += [f"not routed ×{n}: {why}" for why, n in sorted(s.bypassed.items())]
                out.append("<tr>" + "".join(f"<td style='text-align:left'>{e(str(c))}</td>" for c in (
                    s.path or "<root>", s.adapter, s.kind, r.rule(), r.ran())) +
                    "<td style='text-align:left'>" + "<br>".join(e(x) for x in extra) + "</td></tr>")
            out.append("</tbody></table>")
        out.append("</div>")
        return "".join(out)
