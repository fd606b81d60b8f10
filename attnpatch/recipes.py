"""Recipes: which backend for which attention site of which model, as data (YAML).

A recipe is a versioned dataclass (`Recipe`) read from YAML with a safe loader only: no tag that
builds a Python object is accepted, and backend names are checked against the registry, never
imported. Shipped recipes live in ``recipes/*.yaml`` (installed as ``attnpatch.recipe_files``) and are
loaded by name: ``attnpatch.apply(pipe, recipe="flux")``.

Format (version 1)::

    version: 1
    name: wan-lossy
    description: ...
    match:                        # when apply() picks this recipe by itself (any entry matches)
      class_names: [WanPipeline, WanTransformer3DModel]   # class name or diffusers `_class_name`
      model_types: []             # transformers `config.model_type`
      config: {}                  # optional: config values the matched model must also have
    default_backend: auto         # sites no rule matches (a name, a priority list, or auto)
    allow_lossy: false            # the same for allow_lossy
    exclude:                      # left alone: not patched at all (checked before the rules)
      components: [vae, text_encoder]
      sites: ["**.norm_out"]
    rules:                        # ordered: for each site (and step), the FIRST matching rule wins
      - name: exact-ends
        steps: [{first: 2}, {last: 2}]
        backend: auto
      - name: dit-self
        pattern: "blocks.*.attn1"  # glob over the dotted module path, or "re:<full-match regex>"
        kind: self                # self / cross / joint / unknown, or a list
        blocks: {first: 30}       # of the numbered block list the pattern matches
        backend: [sage, auto]
        allow_lossy: true

Selectors of one rule are ANDed; a rule with no selector matches every site. Patterns are matched
against the site's path inside its pipeline component (``transformer_blocks.0.attn``, not
``transformer.transformer_blocks.0.attn``); ``components`` (globs) restricts a rule to some components.
In a glob, ``*`` matches within one path segment and ``**`` any number of segments (also none), so
``**.attn1`` matches every ``attn1``. ``blocks`` and ``steps`` take the same index selectors: an int,
``{first: N}``, ``{last: N}``, ``{from: A, to: B}`` (inclusive; negative counts from the end), or a
list of these (their union). ``blocks`` counts the first numbered list in each path
(``transformer_blocks.N``, ``blocks.N``, ``layers.N``), separately per list and component.

Step schedules: rules with ``steps`` apply only while the current denoising step is in them. A
diffusers pipeline's step is tracked automatically (its scheduler's ``set_timesteps`` resets it to
0, each ``scheduler.step`` advances it); elsewhere `step` sets it. Without a known step such rules are
skipped. A step change only swaps each affected site's precomputed `Scope` object.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import threading
import warnings
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import yaml

from . import aliases, controls, registry
from .patterns import match  # noqa: F401  (the matcher; recipes.match is its public name)
from .controls import AUTO, Scope

logger = logging.getLogger("attnpatch")

VERSION = 1
SITE_KINDS = ("self", "cross", "joint", "unknown")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")  # used with fullmatch

#: Bounds on what a recipe may cost to read (a recipe is untrusted input: see docs/THREAT_MODEL.md).
MAX_RECIPE_BYTES = 1 << 20
#: Nodes after YAML aliases are expanded (a "billion laughs" file expands to billions).
MAX_RECIPE_NODES = 100_000
#: Nesting depth of mappings and lists.
MAX_RECIPE_DEPTH = 50
#: Longest ``re:`` pattern.
MAX_REGEX_CHARS = 500
_NUM_RE = re.compile(r"^\d+$")


# -- errors -------------------------------------------------------------------------------------------

class RecipeError(ValueError):
    """A recipe that cannot be used. The message names the file, the line, the field and what is
    allowed: ``flux.yaml:12: rules[1].backend: unknown backend 'fash'; valid: auto, eager, ...``."""

    def __init__(self, message: str, source: str = "<recipe>", line: Optional[int] = None, field: str = ""):
        self.source = source
        self.line = line
        self.field = field
        self.reason = message
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


class RecipeWarning(UserWarning):
    """A recipe rule that matches no site of the model it is applied to (an error when strict)."""


# -- index selectors (blocks and steps) ------------------------------------------------------------------

@dataclass(frozen=True)
class IndexSelector:
    """A set of indices: ints, first N, last N and inclusive ranges (negative = from the end)."""

    items: Tuple[Tuple, ...]

    def needs_total(self) -> bool:
        return any(it[0] == "last" or (it[0] == "range" and (it[1] < 0 or it[2] < 0)) or
                   (it[0] == "at" and it[1] < 0) for it in self.items)

    def contains(self, i: int, total: Optional[int]) -> bool:
        for it in self.items:
            kind = it[0]
            if kind == "at":
                j = it[1]
                if j < 0:
                    if total is None:
                        continue
                    j += total
                if i == j:
                    return True
            elif kind == "first":
                if i < it[1]:
                    return True
            elif kind == "last":
                if total is not None and total - it[1] <= i < total:
                    return True
            else:
                a, b = it[1], it[2]
                if (a < 0 or b < 0) and total is None:
                    continue
                a = a + total if a < 0 else a
                b = b + total if b < 0 else b
                if a <= i <= b:
                    return True
        return False

    def describe(self) -> str:
        parts = []
        for it in self.items:
            if it[0] == "at":
                parts.append(str(it[1]))
            elif it[0] == "range":
                parts.append(f"{it[1]}..{it[2]}")
            else:
                parts.append(f"{it[0]} {it[1]}")
        return ", ".join(parts)


# -- the schema ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Match:
    class_names: Tuple[str, ...] = ()
    model_types: Tuple[str, ...] = ()
    config: Tuple[Tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Exclude:
    components: Tuple[str, ...] = ()
    sites: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One rule. ``backend`` is None for "the recipe's default_backend"; `AUTO` for auto."""

    name: str
    patterns: Tuple[str, ...] = ()
    components: Tuple[str, ...] = ()
    kinds: Tuple[str, ...] = ()
    blocks: Optional[IndexSelector] = None
    steps: Optional[IndexSelector] = None
    backend: Optional[Tuple[str, ...]] = None
    allow_lossy: Optional[bool] = None
    line: Optional[int] = None  # where it starts in its file (for messages)


@dataclass(frozen=True)
class Recipe:
    version: int
    name: str
    description: str = ""
    match: Match = Match()
    default_backend: Tuple[str, ...] = AUTO
    allow_lossy: bool = False
    exclude: Exclude = Exclude()
    rules: Tuple[Rule, ...] = ()
    source: str = "<dict>"
    #: context-parallel plan (`attnpatch.parallel_plan.SequencePlan`), or None
    parallel: Any = None

    @property
    def lossy(self) -> bool:
        """True when any part of the recipe opts into lossy kernels (it is then never picked
        automatically: name it with ``recipe=``)."""
        if self.allow_lossy or any(r.allow_lossy for r in self.rules):
            return True
        names = set(self.default_backend)
        for r in self.rules:
            names.update(r.backend or ())
        return any(registry.get_backend(n).LOSSY for n in names if n in registry.backend_names())

    def has_steps(self) -> bool:
        return any(r.steps is not None for r in self.rules)


# -- YAML with line numbers ----------------------------------------------------------------------------

_SAFE_TAGS = {
    "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map",
}


class _Node:
    """A parsed value with the (1-based) line it starts on (and, for mapping values, its key's line)."""

    def __init__(self, value, line, key_line=None):
        self.value = value
        self.line = line
        self.key_line = key_line


_TAG_HINTS = {
    "tag:yaml.org,2002:merge": "YAML merge keys (<<) are not supported in recipes; write the keys out",
    "tag:yaml.org,2002:timestamp": "this value reads as a date/time; quote it to make it a string",
    "tag:yaml.org,2002:binary": "binary values are not supported in recipes",
    "tag:yaml.org,2002:set": "sets are not supported in recipes; use a list",
    "tag:yaml.org,2002:omap": "ordered maps are not supported in recipes; use a mapping",
    "tag:yaml.org,2002:pairs": "pairs are not supported in recipes; use a mapping",
}


def _parse_yaml(text: str, source: str) -> _Node:
    """Compose ``text`` with PyYAML's safe loader and convert it to `_Node` trees (values + lines).
    Refuses any non-standard tag (``!!python/object`` and friends), duplicate keys, recursive aliases,
    and files that expand past `MAX_RECIPE_NODES` nodes or `MAX_RECIPE_DEPTH` levels."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"the recipe is {len(text)} characters, over the limit of {MAX_RECIPE_BYTES}", source)
    nul = text.find("\0")
    if nul >= 0:
        raise RecipeError("the recipe contains a NUL byte; recipes are UTF-8 text", source, text.count("\n", 0, nul) + 1)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        col = f", column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        cm = exc.context_mark
        if exc.problem and exc.context and cm is not None and cm is not mark:
            problem += f" ({exc.context} at line {cm.line + 1}, column {cm.column + 1})"
        raise RecipeError(f"malformed YAML{col}: {problem}", source, line) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # e.g. a ReaderError for a control character
        line = mark.line + 1 if mark is not None else None
        if line is None and getattr(exc, "position", None) is not None:
            line = text.count("\n", 0, exc.position) + 1
        raise RecipeError(f"malformed YAML: {exc}", source, line) from None
    if node is None:
        raise RecipeError("the file is empty; a recipe needs at least `version: 1` and `name:`", source, 1)
    constructor = yaml.SafeLoader("")
    count = [0]
    active: set = set()

    def convert(n, depth):
        line = n.start_mark.line + 1
        count[0] += 1
        if count[0] > MAX_RECIPE_NODES:
            raise RecipeError(f"the recipe expands to more than {MAX_RECIPE_NODES} values (YAML aliases that "
                              "repeat each other?); recipes are small: write the values out", source, line)
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"the recipe nests deeper than {MAX_RECIPE_DEPTH} levels", source, line)
        if n.tag not in _SAFE_TAGS:
            hint = _TAG_HINTS.get(n.tag)
            raise RecipeError(hint or (
                f"the YAML tag {n.tag!r} is not allowed: recipes are plain data (strings, numbers, booleans, "
                "lists and mappings); no tag may construct Python objects"), source, line)
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            if id(n) in active:
                raise RecipeError("a YAML alias refers to a mapping or list that contains it (a recursive "
                                  "alias); recipes are plain data", source, line)
            active.add(id(n))
            try:
                if isinstance(n, yaml.MappingNode):
                    out: Dict[str, _Node] = {}
                    for k, v in n.value:
                        key = convert(k, depth + 1)
                        if not isinstance(key.value, str):
                            raise RecipeError(f"mapping keys must be strings, got {key.value!r}", source, key.line)
                        if key.value in out:
                            raise RecipeError(f"duplicate key {key.value!r}", source, key.line)
                        out[key.value] = convert(v, depth + 1)
                        out[key.value].key_line = key.line
                    return _Node(out, line)
                return _Node([convert(x, depth + 1) for x in n.value], line)
            finally:
                active.discard(id(n))
        return _Node(constructor.construct_object(n, deep=True), line)

    return convert(node, 0)


def _wrap_plain(value, line=None) -> _Node:
    """A dict recipe as `_Node`s (no line numbers)."""
    if isinstance(value, dict):
        return _Node({k: _wrap_plain(v) for k, v in value.items()}, line)
    if isinstance(value, (list, tuple)):
        return _Node([_wrap_plain(v) for v in value], line)
    return _Node(value, line)


# -- validation ----------------------------------------------------------------------------------------

class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, node: Optional[_Node], field: str, message: str):
        line = None
        if node is not None:
            line = getattr(node, "key_line", None) or node.line
        raise RecipeError(message, self.source, line, field)

    def keys(self, node: _Node, field: str, allowed: Dict[str, str], required: Sequence[str] = ()):
        if not isinstance(node.value, dict):
            self.fail(node, field or "(top level)", f"must be a mapping, got {_type_name(node.value)}")
        for k, v in node.value.items():
            if k not in allowed:
                close = difflib_close(k, allowed)
                hint = f" (did you mean {close!r}?)" if close else ""
                self.fail(v, _join(field, k), f"unknown key{hint}; allowed keys: {', '.join(allowed)}")
        for k in required:
            if k not in node.value:
                self.fail(node, _join(field, k), f"is required ({allowed[k]})")
        return node.value

    def type(self, node: _Node, field: str, types, what: str):
        v = node.value
        if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            self.fail(node, field, f"must be {what}, got a boolean ({v!r})")
        if not isinstance(v, types):
            self.fail(node, field, f"must be {what}, got {_type_name(v)} {v!r}")
        return v

    def str_list(self, node: _Node, field: str, what: str) -> Tuple[str, ...]:
        """A string or a list of strings."""
        if isinstance(node.value, str):
            return (node.value,)
        if not isinstance(node.value, list):
            self.fail(node, field, f"must be {what} (a string or a list of strings), got {_type_name(node.value)}")
        out = []
        for i, item in enumerate(node.value):
            out.append(self.type(item, f"{field}[{i}]", str, "a string"))
        return tuple(out)

    def backend(self, node: _Node, field: str) -> Tuple[str, ...]:
        names = self.str_list(node, field, "a backend name or a priority list of names")
        valid = ", ".join(["auto"] + sorted(registry.backend_names()))
        if not names:
            self.fail(node, field, f"is an empty list; give a backend name, a priority list or auto; valid: {valid}")
        try:
            return controls.normalise_backends(list(names) if len(names) > 1 else names[0], "recipe")
        except aliases.BackendNameError as exc:  # other libraries' names are accepted (attnpatch.aliases)
            if not exc.unknown:
                self.fail(node, field, exc.reason)
            hint = aliases.suggestion(exc.name)
            self.fail(node, field, f"unknown backend {exc.name!r}" + (f" (did you mean {hint}?)" if hint else "")
                      + f"; valid: {valid}")
        except (ValueError, TypeError):
            pass
        self.fail(node, field, f"{list(names)} is not a valid backend list: 'auto' must stand alone; valid names: {valid}")

    def pattern(self, node: _Node, field: str, text: str) -> str:
        if not text:
            self.fail(node, field, "an empty pattern matches nothing; use '**' for every site")
        if text.startswith("re:"):
            why = unsafe_regex(text[3:])
            if why:
                self.fail(node, field, f"regular expression {text[3:]!r} {why}")
        elif ".." in text or text.startswith(".") or text.endswith("."):
            self.fail(node, field, f"glob {text!r} has an empty path segment; segments are separated by single dots")
        return text

    def selector(self, node: _Node, field: str) -> IndexSelector:
        allowed = "an int, {first: N}, {last: N}, {from: A, to: B}, or a list of these"
        items = node.value if isinstance(node.value, list) else [node]
        if isinstance(node.value, list) and not items:
            self.fail(node, field, f"is an empty list; give {allowed}")
        out = []
        for i, item in enumerate(items):
            f = f"{field}[{i}]" if isinstance(node.value, list) else field
            v = item.value
            if isinstance(v, bool) or not isinstance(v, (int, dict)):
                self.fail(item, f, f"must be {allowed}, got {_type_name(v)} {v!r}")
            if isinstance(v, int):
                out.append(("at", v))
                continue
            self.keys(item, f, {"first": "N", "last": "N", "from": "A", "to": "B"})
            if set(v) in ({"first"}, {"last"}):
                k = next(iter(v))
                n = self.type(v[k], _join(f, k), int, "a positive int")
                if n < 1:
                    self.fail(v[k], _join(f, k), f"must be a positive int, got {n}")
                out.append((k, n))
            elif set(v) == {"from", "to"}:
                a = self.type(v["from"], _join(f, "from"), int, "an int")
                b = self.type(v["to"], _join(f, "to"), int, "an int")
                if a >= 0 and b >= 0 and a > b:
                    self.fail(item, f, f"from {a} is after to {b} (the range is inclusive)")
                out.append(("range", a, b))
            else:
                self.fail(item, f, f"must be {allowed}; got keys {sorted(v)}")
        return IndexSelector(tuple(out))


def _unbounded_repeats(tree, inside: bool) -> Optional[str]:
    """Walk a parsed regex (``re._parser``): the first unbounded repeat nested in another, or None."""
    try:
        from re import _constants as c  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_constants as c
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT}
    possessive = getattr(c, "POSSESSIVE_REPEAT", None)
    for op, av in tree:
        if op in repeats or op == possessive:
            lo, hi, sub = av
            unbounded = hi == c.MAXREPEAT or hi > 100
            if inside and op != possessive and (unbounded or lo != hi):
                return "a repeated group contains another variable repeat (like (a+)+ or (a{1,3})+)"
            found = _unbounded_repeats(sub, inside or (unbounded and op != possessive))
            if found:
                return found
        elif op == c.SUBPATTERN:
            found = _unbounded_repeats(av[-1], inside)
            if found:
                return found
        elif op == c.BRANCH:
            if inside:
                firsts = [b[0] if len(b) else None for b in av[1]]
                chars = [f[1] for f in firsts if f is not None and f[0] == c.LITERAL]
                if len(chars) != len(firsts) or len(set(chars)) != len(chars):
                    return "a repeated group contains alternatives that can match the same text (like (a|ab)+)"
            for branch in av[1]:
                found = _unbounded_repeats(branch, inside)
                if found:
                    return found
        elif op in (c.ASSERT, c.ASSERT_NOT):
            found = _unbounded_repeats(av[1], inside)
            if found:
                return found
        elif op == c.GROUPREF_EXISTS:
            for branch in av[1:]:
                if branch is not None:
                    found = _unbounded_repeats(branch, inside)
                    if found:
                        return found
    return None


def unsafe_regex(pattern: str) -> Optional[str]:
    r"""Why ``pattern`` is refused as a recipe regex, or None. Refused: invalid ones, ones longer than
    `MAX_REGEX_CHARS`, backreferences, and nested unbounded repeats (``(a+)+``, ``([\w.]+)+Z``), whose
    matching time can grow exponentially with the path (Python's ``re`` has no time limit)."""
    if len(pattern) > MAX_REGEX_CHARS:
        return f"is {len(pattern)} characters, over the limit of {MAX_REGEX_CHARS}"
    try:
        re.compile(pattern)
        try:
            from re import _parser as parser
        except ImportError:  # pragma: no cover
            import sre_parse as parser
        tree = parser.parse(pattern)
    except (re.error, RecursionError) as exc:
        return f"is an invalid regular expression: {exc}"
    if re.search(r"\\[1-9]|\(\?P=", pattern):
        return "uses a backreference, which recipes do not allow (matching time is unbounded)"
    nested = _unbounded_repeats(tree, False)
    if nested:
        return (f"is refused: {nested}, which can take exponential time to match; write it without the "
                "nesting (e.g. (a+)+ as a+) or use a glob")
    return None


def _type_name(v) -> str:
    if v is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an int",
            float: "a float"}.get(type(v), type(v).__name__)


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def difflib_close(word: str, options: Iterable[str]) -> Optional[str]:
    import difflib

    m = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return m[0] if m else None


_TOP = {"version": "1", "name": "a name such as 'flux'", "description": "text",
        "match": "class_names / model_types / config", "default_backend": "a backend name, list or auto",
        "allow_lossy": "true or false", "exclude": "components / sites", "rules": "a list of rules",
        "parallel": "a context-parallel plan (split / gather)"}
_MATCH = {"class_names": "class names or diffusers _class_name values", "model_types": "transformers model_type values",
          "config": "config values the model must have"}
_EXCLUDE = {"components": "pipeline component names (globs)", "sites": "site patterns"}
_RULE = {"name": "a label for reports", "pattern": "a glob or re:regex (or a list)",
         "components": "component name globs", "kind": "self, cross, joint or unknown (or a list)",
         "blocks": "an index selector", "steps": "an index selector", "backend": "a name, list or auto",
         "allow_lossy": "true or false"}


def _build(root: _Node, source: str) -> Recipe:
    c = _Checker(source)
    top = c.keys(root, "", _TOP, required=("version", "name"))
    version = c.type(top["version"], "version", int, "an int")
    if version != VERSION:
        c.fail(top["version"], "version", f"unsupported recipe version {version}; this attnpatch reads version {VERSION}")
    name = c.type(top["name"], "name", str, "a string")
    if not _NAME_RE.fullmatch(name):
        c.fail(top["name"], "name", f"{name!r} is not a valid name; use lower-case letters, digits, '-', '_' and '.'")
    description = c.type(top["description"], "description", str, "a string") if "description" in top else ""

    match = Match()
    if "match" in top and top["match"].value is not None:
        m = c.keys(top["match"], "match", _MATCH)
        cfg = ()
        if "config" in m:
            if not isinstance(m["config"].value, dict):
                c.fail(m["config"], "match.config", "must be a mapping of config keys to values, got "
                       f"{_type_name(m['config'].value)}")
            cmap = m["config"].value
            for k, v in cmap.items():
                if isinstance(v.value, (dict, list)):
                    c.fail(v, f"match.config.{k}", "must be a plain value (string, number, boolean or null)")
            cfg = tuple((k, v.value) for k, v in cmap.items())
        match = Match(
            class_names=c.str_list(m["class_names"], "match.class_names", "class names") if "class_names" in m else (),
            model_types=c.str_list(m["model_types"], "match.model_types", "model types") if "model_types" in m else (),
            config=cfg,
        )

    default = c.backend(top["default_backend"], "default_backend") if "default_backend" in top else AUTO
    allow_lossy = c.type(top["allow_lossy"], "allow_lossy", bool, "true or false") if "allow_lossy" in top else False

    exclude = Exclude()
    if "exclude" in top and top["exclude"].value is not None:
        e = c.keys(top["exclude"], "exclude", _EXCLUDE)
        comps = c.str_list(e["components"], "exclude.components", "component names") if "components" in e else ()
        sites = c.str_list(e["sites"], "exclude.sites", "site patterns") if "sites" in e else ()
        for i, p in enumerate(sites):
            c.pattern(e["sites"].value[i] if isinstance(e["sites"].value, list) else e["sites"], f"exclude.sites[{i}]", p)
        exclude = Exclude(comps, sites)

    rules = []
    if "rules" in top and top["rules"].value is not None:
        rnode = top["rules"]
        if not isinstance(rnode.value, list):
            c.fail(rnode, "rules", f"must be a list of rules, got {_type_name(rnode.value)}")
        seen = set()
        for i, item in enumerate(rnode.value):
            f = f"rules[{i}]"
            r = c.keys(item, f, _RULE)
            label = c.type(r["name"], f + ".name", str, "a string") if "name" in r else f
            if label in seen:
                c.fail(r["name"], f + ".name", f"duplicate rule name {label!r}; rule names must be unique")
            seen.add(label)
            patterns = ()
            if "pattern" in r:
                patterns = c.str_list(r["pattern"], f + ".pattern", "a pattern or a list of patterns")
                for j, p in enumerate(patterns):
                    c.pattern(r["pattern"], f + ".pattern", p)
            kinds = ()
            if "kind" in r:
                kinds = c.str_list(r["kind"], f + ".kind", "a site kind or a list of kinds")
                for k in kinds:
                    if k not in SITE_KINDS:
                        c.fail(r["kind"], f + ".kind", f"unknown site kind {k!r}; allowed: {', '.join(SITE_KINDS)}")
            comps = c.str_list(r["components"], f + ".components", "component names") if "components" in r else ()
            blocks = c.selector(r["blocks"], f + ".blocks") if "blocks" in r else None
            if blocks is not None and not patterns:
                c.fail(r["blocks"], f + ".blocks", "needs a `pattern`: blocks count the numbered list the pattern matches")
            steps = c.selector(r["steps"], f + ".steps") if "steps" in r else None
            backend = c.backend(r["backend"], f + ".backend") if "backend" in r else None
            lossy = c.type(r["allow_lossy"], f + ".allow_lossy", bool, "true or false") if "allow_lossy" in r else None
            if backend is None and lossy is None:
                c.fail(item, f, "a rule needs `backend` and/or `allow_lossy` (what it gives the sites it selects)")
            rules.append(Rule(label, patterns, comps, kinds, blocks, steps, backend, lossy, item.line))
    parallel = None
    if "parallel" in top:
        from . import parallel_plan

        parallel = parallel_plan.parse_section(c, top["parallel"], source)
    return Recipe(version, name, description, match, default, allow_lossy, exclude, tuple(rules), source, parallel)


# -- loading --------------------------------------------------------------------------------------------

def loads(text: str, source: str = "<string>") -> Recipe:
    """Parse and validate a recipe from YAML text (safe loading only)."""
    return _build(_parse_yaml(text, source), source)


def from_dict(data: Dict[str, Any], source: str = "<dict>") -> Recipe:
    """Validate a recipe given as a dict (the same schema as the YAML)."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping, got {_type_name(data)}", source)
    return _build(_wrap_plain(data), source)


def load_file(path: Union[str, "os.PathLike[str]"]) -> Recipe:
    """Read and validate the recipe file at ``path``."""
    path = os.fspath(path)
    import pathlib

    from . import diskfile

    p = pathlib.Path(path)
    try:
        text = diskfile.read_text(p.resolve() if p.is_symlink() else p, MAX_RECIPE_BYTES)
    except diskfile.Refused as exc:
        line = None
        msg = str(exc)
        if "not UTF-8" in msg:
            try:
                raw = pathlib.Path(path).read_bytes()[:MAX_RECIPE_BYTES]
                bad = raw.decode("utf-8", errors="replace").find("\ufffd")
                line = raw[:max(bad, 0)].count(b"\n") + 1 if bad >= 0 else None
            except OSError:
                pass
        raise RecipeError(f"cannot read the recipe: {msg}", path, line) from None
    if text is None:
        raise RecipeError("no such file; give a shipped recipe name "
                          f"({', '.join(shipped_names())}) or a path to a .yaml file", path)
    return loads(text, path)


def _recipe_dir():
    """The shipped recipes: the installed ``attnpatch.recipe_files`` package, or, in a source checkout
    that is not installed, the repository's ``recipes/`` folder."""
    from importlib import resources

    try:
        return resources.files("attnpatch.recipe_files")
    except ModuleNotFoundError:
        import pathlib

        here = pathlib.Path(__file__).resolve().parent.parent / "recipes"
        if here.is_dir():
            return here
        raise


@lru_cache(maxsize=1)
def _shipped_files() -> Dict[str, Any]:
    out = {}
    for entry in _recipe_dir().iterdir():
        n = entry.name
        if n.endswith(".yaml") and entry.is_file():
            out[n[:-5]] = entry
    return dict(sorted(out.items()))


def shipped_names() -> List[str]:
    """The names of the recipes shipped with attnpatch."""
    return list(_shipped_files())


def shipped_path(name: str) -> str:
    f = _shipped_files().get(name)
    if f is None:
        raise RecipeError(f"no shipped recipe named {name!r}; shipped: {', '.join(shipped_names())}", "recipe")
    return str(f)


_SHIPPED_CACHE: Dict[str, Tuple[int, Recipe]] = {}


def shipped(name: str) -> Recipe:
    """A shipped recipe by name (validated against the backends registered now)."""
    f = _shipped_files().get(name)
    if f is None or not _NAME_RE.fullmatch(name):
        close = difflib_close(name, shipped_names())
        hint = f" (did you mean {close!r}?)" if close else ""
        raise RecipeError(f"no shipped recipe named {name!r}{hint}; shipped: {', '.join(shipped_names())}; "
                          "or give a path to a .yaml file", "recipe")
    key = len(registry.backend_names())
    hit = _SHIPPED_CACHE.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    recipe = loads(f.read_text(encoding="utf-8"), f"{name}.yaml")
    _SHIPPED_CACHE[name] = (key, recipe)
    return recipe


def all_shipped() -> List[Recipe]:
    return [shipped(n) for n in shipped_names()]


def load(recipe) -> Recipe:
    """A `Recipe` from a shipped name, a path (str or PathLike, ``.yaml``/``.yml``), a dict or a
    `Recipe`."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return from_dict(recipe)
    if isinstance(recipe, os.PathLike):
        return load_file(recipe)
    if isinstance(recipe, str):
        if recipe.endswith((".yaml", ".yml")) or os.sep in recipe or "/" in recipe or os.path.isfile(recipe):
            return load_file(recipe)
        return shipped(recipe)
    raise TypeError(f"recipe must be a shipped name, a path to a .yaml file, a dict, a Recipe, None or False; "
                    f"got {type(recipe).__name__}")


# -- matching models to recipes --------------------------------------------------------------------------

_DENOISERS = ("transformer", "unet", "transformer_2", "prior", "decoder")


def _config_of(obj) -> Any:
    return getattr(obj, "config", None)


def _config_get(cfg, key, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except TypeError:
            pass
    return getattr(cfg, key, default)


_ABSENT = object()


def recipe_matches(recipe: Recipe, obj) -> bool:
    """Whether ``recipe.match`` selects ``obj`` (a pipeline or a model) itself."""
    m = recipe.match
    cfg = _config_of(obj)
    names = {type(obj).__name__}
    cn = _config_get(cfg, "_class_name")
    if isinstance(cn, str):
        names.add(cn)
    hit = bool(names & set(m.class_names))
    mt = _config_get(cfg, "model_type")
    if not hit and isinstance(mt, str) and mt in m.model_types:
        hit = True
    if not hit:
        return False
    for key, want in m.config:
        have = _config_get(cfg, key, _ABSENT)
        if have is _ABSENT or have != want:
            if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)) and list(have) == list(want):
                continue
            return False
    return True


def _candidates(target) -> List[Any]:
    """The objects a recipe can match, most specific first: a pipeline, its denoiser(s), the rest."""
    comps = getattr(target, "components", None)
    if isinstance(comps, dict):
        first = [comps[n] for n in _DENOISERS if comps.get(n) is not None]
        rest = [m for n, m in comps.items() if n not in _DENOISERS and m is not None]
        return [target] + first + rest
    if isinstance(target, (list, tuple)):
        out = []
        for t in target:
            out.extend(_candidates(t))
        return out
    return [target]


def find_recipe(target, include_lossy: bool = False) -> Optional[Recipe]:
    """The shipped recipe that matches ``target`` (a pipeline: itself, then its denoiser, then the other
    components), or None. Lossy recipes are never picked automatically unless ``include_lossy``."""
    recipes = [r for r in all_shipped() if include_lossy or not r.lossy]
    for obj in _candidates(target):
        for r in recipes:
            if recipe_matches(r, obj):
                return r
    return None


# -- the matcher ------------------------------------------------------------------------------------------

# `match` (and its compiled-pattern cache) lives in attnpatch.patterns; re-exported here.


def relative_path(site) -> str:
    """A site's path inside its pipeline component (the path patterns are matched against)."""
    comp = site.component
    if comp and site.path.startswith(comp + "."):
        return site.path[len(comp) + 1:]
    if comp and site.path == comp:
        return ""
    return site.path


def _block_of(rel: str) -> Optional[Tuple[str, int]]:
    segs = rel.split(".") if rel else []
    for j, s in enumerate(segs):
        if _NUM_RE.match(s):
            return ".".join(segs[:j]), int(s)
    return None


def _component_ok(rule: Rule, component: str) -> bool:
    """A rule with ``components`` applies only inside a pipeline, to the components it names."""
    if not rule.components:
        return True
    return bool(component) and any(fnmatch.fnmatchcase(component, c) for c in rule.components)


def _static_match(rule: Rule, site) -> bool:
    if not _component_ok(rule, site.component):
        return False
    if rule.kinds and site.kind not in rule.kinds:
        return False
    if rule.patterns:
        rel = relative_path(site)
        if not any(match(p, rel) for p in rule.patterns):
            return False
    return True


def excluded_by(recipe: Recipe, site) -> Optional[str]:
    """The exclude entry that leaves ``site`` alone, or None."""
    comp = site.component
    for c in recipe.exclude.components:
        if comp and fnmatch.fnmatchcase(comp, c):
            return f"exclude.components {c!r}"
    rel = relative_path(site)
    for p in recipe.exclude.sites:
        if match(p, rel):
            return f"exclude.sites {p!r}"
    return None


@dataclass
class RulePlan:
    """Which rules can apply to which sites (decided once per model, before patching)."""

    recipe: Recipe
    #: site key (component, path) -> indices of the rules whose static selectors match it, in order
    candidates: Dict[Tuple[str, str], List[int]]
    #: site key -> the exclude entry that leaves it alone
    excluded: Dict[Tuple[str, str], str]
    #: rule index -> how many sites it selects (ignoring steps and earlier rules)
    hits: Dict[int, int]
    #: component names excluded as a whole that exist in the target
    skip_components: Tuple[str, ...]

    #: every component name of the target ("" for a bare model)
    components: Tuple[str, ...] = ()

    def applicable(self, rule: Rule) -> bool:
        """False for a rule restricted to components the target does not have (a recipe for a
        pipeline applied to its bare transformer): such a rule is not "unmatched"."""
        return not rule.components or any(
            c and fnmatch.fnmatchcase(c, pat) for c in self.components for pat in rule.components)

    def unmatched(self) -> List[int]:
        return [i for i, r in enumerate(self.recipe.rules) if not self.hits.get(i) and self.applicable(r)]


def plan(recipe: Recipe, sites: Sequence[Any], components: Sequence[str] = ()) -> RulePlan:
    """Decide which rules may apply to each site (path, kind, component, blocks); steps stay dynamic."""
    skip = tuple(c for c in components if c and any(fnmatch.fnmatchcase(c, e) for e in recipe.exclude.components))
    excluded: Dict[Tuple[str, str], str] = {}
    live = []
    for s in sites:
        why = excluded_by(recipe, s)
        if why:
            excluded[(s.component, s.path)] = why
        else:
            live.append(s)
    candidates: Dict[Tuple[str, str], List[int]] = {(s.component, s.path): [] for s in live}
    hits: Dict[int, int] = {}
    for i, rule in enumerate(recipe.rules):
        chosen = [s for s in live if _static_match(rule, s)]
        if rule.blocks is not None:
            chosen = _select_blocks(rule.blocks, chosen)
        hits[i] = len(chosen)
        for s in chosen:
            candidates[(s.component, s.path)].append(i)
    return RulePlan(recipe, candidates, excluded, hits, skip, tuple(components))


def _select_blocks(sel: IndexSelector, sites: Sequence[Any]) -> List[Any]:
    lists: Dict[Tuple[str, str], set] = {}
    where = {}
    for s in sites:
        b = _block_of(relative_path(s))
        if b is None:
            continue
        key = (s.component, b[0])
        lists.setdefault(key, set()).add(b[1])
        where[id(s)] = (key, b[1])
    keep = []
    for s in sites:
        if id(s) not in where:
            continue
        key, n = where[id(s)]
        ordered = sorted(lists[key])
        if sel.contains(ordered.index(n), len(ordered)):
            keep.append(s)
    return keep


# -- scopes and step schedules ----------------------------------------------------------------------------

def _rule_scope(recipe: Recipe, rule: Optional[Rule], site, backend_override, allow_lossy: bool, strict: bool) -> Scope:
    if rule is None:
        names = backend_override if backend_override is not None else recipe.default_backend
        lossy = recipe.allow_lossy or allow_lossy
        label = f"recipe {recipe.name}: default_backend"
    else:
        names = rule.backend if rule.backend is not None else (
            backend_override if backend_override is not None else recipe.default_backend)
        lossy = rule.allow_lossy if rule.allow_lossy is not None else (recipe.allow_lossy or allow_lossy)
        label = f"recipe {recipe.name}: rule {rule.name}"
    return Scope(backends=names, strict=strict, allow_lossy=lossy, source=label, site=site)


class StepSchedule:
    """Switches the scopes of sites whose rules depend on the denoising step.

    For each such site it holds the candidate (step selector, Scope) pairs in rule order, ending with
    the one that applies when no step rule does. `set` finds, once per (step, total), the scope of every
    site, then assigns ``site.scope``: a step change is a few attribute writes."""

    def __init__(self, entries: List[Tuple[Any, List[Tuple[Optional[IndexSelector], Scope]]]]):
        self.entries = entries
        self.step: Optional[int] = None
        self.total: Optional[int] = None
        self.active = True
        self._memo: Dict[Tuple[Optional[int], Optional[int]], List[Scope]] = {}
        self._lock = threading.Lock()

    def _scopes_for(self, step: Optional[int], total: Optional[int]) -> List[Scope]:
        key = (step, total)
        hit = self._memo.get(key)
        if hit is None:
            hit = []
            for _site, cands in self.entries:
                for sel, scope in cands:
                    if sel is None or (step is not None and sel.contains(step, total)):
                        hit.append(scope)
                        break
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def set(self, step: Optional[int], total: Optional[int] = None) -> None:
        """Make ``step`` (0-based; None = unknown) of ``total`` steps current."""
        with self._lock:
            self.step, self.total = step, total
            if not self.active:
                return
            for (site, _), scope in zip(self.entries, self._scopes_for(step, total)):
                if site.scope is not scope:
                    site.scope = scope
                    site.rule = scope.source

    def advance(self) -> None:
        if self.step is not None:
            self.set(self.step + 1, self.total)


_SCHEDULES: "weakref.WeakSet[StepSchedule]" = weakref.WeakSet()


class step:
    """Set the current denoising step of patched models whose recipe has ``steps:`` rules.

    ``attnpatch.step(3)`` (or ``attnpatch.step(3, total=30)``, needed for ``last``/negative selectors)
    sets it for every such model, or only for ``target`` (a model, pipeline or `Patch`). Used as a
    context manager it restores the previous step on exit. ``attnpatch.step(None)`` makes it unknown
    (rules with ``steps`` are then skipped). Diffusers pipelines track their step themselves."""

    def __init__(self, i: Optional[int], total: Optional[int] = None, target=None):
        if i is not None and (isinstance(i, bool) or not isinstance(i, int) or i < 0):
            raise ValueError(f"attnpatch.step: the step must be an int >= 0 or None, got {i!r}")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ValueError(f"attnpatch.step: total must be a positive int or None, got {total!r}")
        self._schedules = _schedules_of(target)
        self._saved = [(s, s.step, s.total) for s in self._schedules]
        for s in self._schedules:
            s.set(i, total if total is not None else s.total)

    def __enter__(self) -> "step":
        return self

    def __exit__(self, *exc) -> None:
        for s, i, total in self._saved:
            s.set(i, total)


#: target -> its patches; set by `attnpatch.patch` when it is imported (recipes never imports patch).
PATCHES_OF: Optional[Callable[[Any], List[Any]]] = None


def _schedules_of(target) -> List[StepSchedule]:
    if target is None:
        return [s for s in list(_SCHEDULES) if s.active]
    patches = PATCHES_OF(target) if PATCHES_OF is not None else []
    return [p.schedule for p in patches if p.schedule is not None]


def current_step(target=None) -> Optional[int]:
    """The current step of ``target``'s schedule (or of the first live schedule)."""
    scheds = _schedules_of(target)
    return scheds[0].step if scheds else None


def _track_pipeline_steps(target, patch, schedule: StepSchedule) -> bool:
    """Wrap the pipeline scheduler's ``set_timesteps`` (step := 0) and ``step`` (step += 1), recorded in
    the patch's undo log. Returns False when the target has no such scheduler."""
    sched = getattr(target, "scheduler", None)
    if sched is None or not callable(getattr(sched, "set_timesteps", None)) or not callable(getattr(sched, "step", None)):
        return False
    ref = weakref.ref(sched)
    # an instance attribute (another library's wrapper) is called as it is; else the class's function
    inst_set, inst_step = sched.__dict__.get("set_timesteps"), sched.__dict__.get("step")
    cls_set, cls_step = type(sched).set_timesteps, type(sched).step
    orig_set = inst_set if inst_set is not None else cls_set
    orig_step = inst_step if inst_step is not None else cls_step

    def set_timesteps(*args, **kwargs):
        s = ref()
        out = inst_set(*args, **kwargs) if inst_set is not None else cls_set(s, *args, **kwargs)
        ts = getattr(s, "timesteps", None)
        total = len(ts) if ts is not None and hasattr(ts, "__len__") else None
        schedule.set(0, total)
        return out

    def step_(*args, **kwargs):
        out = inst_step(*args, **kwargs) if inst_step is not None else cls_step(ref(), *args, **kwargs)
        schedule.advance()
        return out

    set_timesteps.__wrapped__ = orig_set
    step_.__wrapped__ = orig_step
    patch._undo_extra.set_attr(sched, "set_timesteps", set_timesteps)
    patch._undo_extra.set_attr(sched, "step", step_)
    return True


# -- applying ----------------------------------------------------------------------------------------------

def _strict_recipes(strict: bool) -> bool:
    if strict:
        return True
    try:
        return controls.env_settings().strict
    except ValueError:
        return False


def check_unmatched(p: RulePlan, sites: Sequence[Any], strict: bool, model_label: str) -> List[str]:
    """Warn (or, strict, raise `RecipeError`) for each rule that selects no site; returns the messages.
    Each names the rule, its selectors and the closest site paths."""
    msgs = []
    first = None
    for i in p.unmatched():
        rule = p.recipe.rules[i]
        sel = []
        if rule.patterns:
            sel.append("pattern " + ", ".join(repr(x) for x in rule.patterns))
        if rule.kinds:
            sel.append("kind " + "/".join(rule.kinds))
        if rule.components:
            sel.append("components " + ", ".join(rule.components))
        if rule.blocks:
            sel.append(f"blocks {rule.blocks.describe()}")
        close = []
        for pat in rule.patterns:
            close += [c for c in closest_paths(pat, sites) if c not in close]
        hint = f"; closest site paths: {', '.join(close[:3])}" if close else (
            "; the model has no attention sites attnpatch recognises" if not sites else "")
        where = p.recipe.source if rule.line is None else f"{p.recipe.source}:{rule.line}"
        label = f"rules[{i}]" + (f" ({rule.name})" if rule.name != f"rules[{i}]" else "")
        msg = (f"{label}: {'; '.join(sel) or 'no selector'} matches no attention site of "
               f"{model_label}{hint}")
        msgs.append(f"{where}: {msg}")
        if first is None:
            first = (i, rule, msg)
    if first is not None and strict:
        i, rule, msg = first
        more = f" (and {len(msgs) - 1} more unmatched rules)" if len(msgs) > 1 else ""
        raise RecipeError(msg.split(": ", 1)[1] + more + "; `attnpatch inspect MODEL` lists the sites",
                          p.recipe.source, rule.line, f"rules[{i}]")
    for m in msgs:
        warnings.warn(m, RecipeWarning, stacklevel=4)
    return msgs


def closest_paths(pattern: str, sites: Sequence[Any], n: int = 3) -> List[str]:
    import difflib

    paths = sorted({relative_path(s) for s in sites})
    return difflib.get_close_matches(pattern.replace("re:", ""), paths, n=n, cutoff=0.3)
