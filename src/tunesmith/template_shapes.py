"""Render a chat template once per conversation shape, where its output cannot depend on contents.

Most chat templates only paste each message's content between fixed markers chosen by the
roles. For such a template the text of a plain role/content conversation is a function of its
shape (the roles' values in order, whether a generation prompt follows, the tokenizer's special
tokens) with the contents put in at fixed places. `ShapeMemo` renders each shape once with placeholder
contents and then builds every conversation of that shape by joining strings: a render drops
from about 12.6 to 4.5 us, where the store's tokenizing workers spent 14% of a row rendering
(bench/RESULTS.md).

`contents_pasted_only` decides from the template's syntax tree whether that holds. Every rule
is an allow-list, so what it does not know it refuses:

- statements: output, `for` (not recursive), `if`, `set` of a name or a namespace attribute;
  no blocks, macros, call or filter blocks, captures, includes or autoescape changes;
- a content (`m['content']` or `m.content` of a message) goes only into the output, alone or
  joined by `~`, or by `+` with string constants, roles, special-token names, other contents and
  `~` expressions (so no filter, test, comparison, method or branch sees it, and `+` never meets
  a Markup string that would escape it);
- the message list may be iterated, indexed or sliced by constants, counted (`length`,
  `count`), its first or last taken, tested for truth or type, or given another name; a message
  may give its `role` or `content`, be tested for truth or type, or be given another name;
  nothing else (no whole message or list reaches a filter, a call or the output, where its
  contents could be printed or inspected);
- `loop` gives only its counters and first/last flags (not the neighbouring messages);
- the only global functions are `raise_exception`, `namespace` and `range`, called by name
  (no clock, no random), only allow-listed filters and tests run (no identity test, which would
  tell two equal role strings apart), an attribute is read only from a message, `loop` or a
  namespace or to call a method (a bare method would print its address), and none of the names
  the rules rely on is bound again.

Every shape's first conversation is also rendered by the template and compared; a difference
turns the memo off for that template.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from jinja2 import nodes

# Placeholder contents: private-use characters. A conversation whose roles hold one is rendered
# by the template (a role is written into the pieces, where it would read as a slot); contents
# may hold them, since they are only ever joined in. A template that writes one itself fails its
# shapes' first check.
_OPEN, _CLOSE = "\ue000", "\ue001"
_SLOT = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
MAX_SHAPES = 4096  # beyond this many shapes (very long, varied chats) new shapes are rendered directly

_NODES = {nodes.Template, nodes.Output, nodes.TemplateData, nodes.For, nodes.If, nodes.Assign, nodes.Continue,
          nodes.Break, nodes.Name, nodes.Const, nodes.Getitem, nodes.Getattr, nodes.Slice, nodes.Concat, nodes.Add,
          nodes.Sub, nodes.Mul, nodes.Div, nodes.FloorDiv, nodes.Mod, nodes.Pow, nodes.Compare, nodes.Operand,
          nodes.And, nodes.Or, nodes.Not, nodes.Neg, nodes.Pos, nodes.CondExpr, nodes.Test, nodes.Filter, nodes.Call,
          nodes.Keyword, nodes.List, nodes.Tuple, nodes.Dict, nodes.Pair, nodes.NSRef}
_CALLS = {"raise_exception", "namespace", "range"}
# Filters that return a value, never an iterator (`reverse`, `unique`, `items` return generators,
# whose printed form holds a memory address: a different text at every render).
_FILTERS = {"length", "count", "first", "last", "trim", "upper", "lower", "capitalize", "title", "string", "tojson",
            "join", "default", "d", "replace", "int", "float", "list", "indent", "abs", "round", "sort", "min",
            "max", "sum", "dictsort", "wordcount", "e", "escape", "safe"}
_TESTS = {"defined", "undefined", "none", "string", "number", "integer", "float", "mapping", "iterable", "sequence",
          "boolean", "true", "false", "odd", "even", "lower", "upper", "divisibleby", "eq", "ne", "lt", "le", "gt",
          "ge", "in", "equalto"}
_TYPE_TESTS = {"defined", "undefined", "none", "string", "number", "mapping", "iterable", "sequence"}
_SPECIAL_TOKENS = {"bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"}
_LOOP_ATTRS = {"index", "index0", "revindex", "revindex0", "first", "last", "length", "depth", "depth0"}
_MESSAGE_KEYS = {"role", "content"}
_IMPLICIT = {"self", "caller", "varargs", "kwargs"}  # names Jinja itself provides inside a template
# Names the rules rely on: never bound again by the template.
_PROTECTED = {"messages", "loop", "add_generation_prompt", "tools", "documents"} | _IMPLICIT | _SPECIAL_TOKENS
_TRUTH_PARENTS = (nodes.Not, nodes.And, nodes.Or)
Parents = dict[nodes.Node, tuple[nodes.Node | None, str]]  # node -> (its parent, the parent's field holding it)


def contents_pasted_only(source: str, environment: Any) -> bool:
    """True when the template provably only pastes message contents into its output."""
    if environment.autoescape is not False or environment.finalize is not None:
        return False  # every output would be transformed, contents included
    try:
        tree = environment.parse(source)
    except Exception:
        return False
    parents = _parent_map(tree)
    if any(type(node) not in _NODES for node in parents):
        return False
    kinds = _message_names(tree, set(environment.globals))
    if kinds is None:
        return False
    check = _Check(parents, kinds, set(environment.globals) | _IMPLICIT, _namespace_names(tree))
    return all(check.allowed(node) for node in parents)


def _bindings(tree: nodes.Node) -> Iterator[tuple[str, nodes.Node, bool]]:
    """(name, value, looped) for every name a `set` or a `for` binds: the assigned expression, or
    the loop's iterable when looped. Namespace attributes (`set ns.x = ...`) are not names."""
    for node in tree.find_all((nodes.Assign, nodes.For)):
        value = node.node if isinstance(node, nodes.Assign) else node.iter
        targets = [node.target] if isinstance(node.target, nodes.Name) else node.target.find_all(nodes.Name)
        for target in targets:
            yield target.name, value, isinstance(node, nodes.For)


def _namespace_names(tree: nodes.Node) -> set[str]:
    """Names bound only ever to `namespace(...)`."""
    made, other = set(), set()
    for name, value, looped in _bindings(tree):
        is_namespace = not looped and isinstance(value, nodes.Call) and isinstance(value.node, nodes.Name) and \
            value.node.name == "namespace"
        (made if is_namespace else other).add(name)
    return made - other


def _children(node: nodes.Node) -> Iterator[tuple[str, nodes.Node]]:
    for field, value in node.iter_fields():
        if isinstance(value, nodes.Node):
            yield field, value
        elif isinstance(value, list):
            yield from ((field, item) for item in value if isinstance(item, nodes.Node))


def _parent_map(tree: nodes.Node) -> Parents:
    parents: Parents = {tree: (None, "")}
    stack = [tree]
    while stack:
        node = stack.pop()
        for field, child in _children(node):
            parents[child] = (node, field)
            stack.append(child)
    return parents


def _message_names(tree: nodes.Node, global_names: set[str]) -> dict[str, str] | None:
    """name -> 'list' (the message list or a slice of it) or 'message', for every name the
    template binds to one; None when such a name is also bound to anything else, or when a
    protected or global name is bound at all."""
    # A message or the list assigned to a namespace attribute is refused where it is used.
    bindings = list(_bindings(tree))
    if any(name in _PROTECTED or name in global_names for name, _, _ in bindings):
        return None

    def kind_of(value: nodes.Node, looped: bool) -> str | None:
        kind = _kind(value, kinds)
        return ("message" if kind == "list" else None) if looped else kind

    kinds: dict[str, str] = {"messages": "list"}
    changed = True
    while changed:  # aliases of aliases: `set turns = messages[1:]`, then `for m in turns`
        changed = False
        for name, value, looped in bindings:
            kind = kind_of(value, looped)
            if kind is not None and name not in kinds:
                kinds[name] = kind
                changed = True
    if any(name in kinds and kind_of(value, looped) != kinds[name] for name, value, looped in bindings):
        return None
    return kinds


def _kind(expr: nodes.Node, kinds: dict[str, str]) -> str | None:
    """'list' for the message list or a slice of it, 'message' for one message, 'index' for a
    subscript of the list by anything but constants, else None."""
    if isinstance(expr, nodes.Name):
        return kinds.get(expr.name)
    if isinstance(expr, nodes.Getitem) and _kind(expr.node, kinds) == "list":
        if isinstance(expr.arg, nodes.Slice):
            bounds = (expr.arg.start, expr.arg.stop, expr.arg.step)
            return "list" if all(b is None or _constant_int(b) for b in bounds) else "index"
        return "message" if _constant_int(expr.arg) else "index"
    if isinstance(expr, nodes.Filter) and expr.name in ("first", "last") and expr.node is not None \
            and _kind(expr.node, kinds) == "list":
        return "message"
    return None


def _constant_int(expr: nodes.Node) -> bool:
    if isinstance(expr, nodes.Neg):
        expr = expr.node
    return isinstance(expr, nodes.Const) and type(expr.value) is int


def _key(node: nodes.Node) -> str | None:
    """The constant key a subscript or attribute reads, if any."""
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None


class _Check:
    """The per-node rules of `contents_pasted_only`."""

    def __init__(self, parents: Parents, kinds: dict[str, str], global_names: set[str], namespaces: set[str]) -> None:
        self.parents = parents
        self.kinds = kinds
        self.global_names = global_names
        self.namespaces = namespaces

    def allowed(self, node: nodes.Node) -> bool:
        parent, field = self.parents[node]
        if isinstance(node, nodes.Const) and node.value == "content":
            # Only as the key of a content read (checked there); elsewhere ('content' in m,
            # map(attribute='content')) it names the content to something that may inspect it.
            return isinstance(parent, nodes.Getitem) and field == "arg"
        if _key(node) == "content" and not self._pasted(node):
            return False
        if not self._known_operation(node, parent, field):
            return False
        if isinstance(node, nodes.Name) and node.ctx == "store":
            return True  # every binding was checked by _message_names
        kind = _kind(node, self.kinds)
        if kind is None or parent is None:
            return True
        return kind != "index" and self._use_allowed(kind, parent, field)

    def _known_operation(self, node: nodes.Node, parent: nodes.Node | None, field: str) -> bool:
        """Filters, tests and calls from the allow-lists; loop counters; globals only called."""
        if isinstance(node, nodes.Filter | nodes.Test | nodes.Call) and (node.dyn_args or node.dyn_kwargs):
            return False
        if isinstance(node, nodes.Filter):
            return node.name in _FILTERS
        if isinstance(node, nodes.Test):
            return node.name in _TESTS
        if isinstance(node, nodes.Call):
            called = node.node
            return isinstance(called, nodes.Getattr) or isinstance(called, nodes.Name) and called.name in _CALLS
        if isinstance(node, nodes.For):
            return not node.recursive
        if isinstance(node, nodes.Getattr):  # a message's keys and loop's counters are checked where read
            base = node.node
            return isinstance(parent, nodes.Call) and field == "node" or _kind(base, self.kinds) == "message" or (
                isinstance(base, nodes.Name) and (base.name == "loop" or base.name in self.namespaces))
        if isinstance(node, nodes.Name) and node.ctx == "load":
            if node.name == "loop":
                return isinstance(parent, nodes.Getattr) and field == "node" and parent.attr in _LOOP_ATTRS
            if node.name in self.global_names:
                return node.name in _CALLS and isinstance(parent, nodes.Call) and field == "node"
        return True

    def _use_allowed(self, kind: str, parent: nodes.Node, field: str) -> bool:
        """Where the message list or a message may appear: nowhere its contents could leak from."""
        if self._truth_test(parent, field):
            return True
        if isinstance(parent, nodes.Test) and field == "node":
            return parent.name in _TYPE_TESTS and not parent.args and not parent.kwargs
        if isinstance(parent, nodes.Assign) and field == "node":
            return isinstance(parent.target, nodes.Name)
        if kind == "message":
            return isinstance(parent, nodes.Getitem | nodes.Getattr) and field == "node" and \
                _key(parent) in _MESSAGE_KEYS
        if isinstance(parent, nodes.Getitem) and field == "node":
            return True  # by constants, a message or a list (checked where used); else refused as 'index'
        if isinstance(parent, nodes.For) and field == "iter":
            return isinstance(parent.target, nodes.Name)
        if isinstance(parent, nodes.Filter) and field == "node":
            return parent.name in ("length", "count", "first", "last") and not parent.args and not parent.kwargs
        return False

    def _truth_test(self, parent: nodes.Node, field: str) -> bool:
        """Whether only the truth of the value is used: an if's, a ternary's or a loop filter's
        test, directly or through not/and/or."""
        while isinstance(parent, _TRUTH_PARENTS):
            parent, field = self.parents[parent]
        return isinstance(parent, nodes.If | nodes.CondExpr | nodes.For) and field == "test"

    def _pasted(self, node: nodes.Node) -> bool:
        """A content read written to the output verbatim: through `~` and `+` of plain strings only."""
        parent, field = self.parents[node]
        while isinstance(parent, nodes.Add | nodes.Concat):
            if isinstance(parent, nodes.Add) and not self._plain_string(parent):
                return False
            parent, field = self.parents[parent]
        return isinstance(parent, nodes.Output) and field == "nodes"

    def _plain_string(self, expr: nodes.Node) -> bool:
        """An expression that is a plain str (never Markup, which `+` would make escape the other side)."""
        if isinstance(expr, nodes.Add):
            return self._plain_string(expr.left) and self._plain_string(expr.right)
        if isinstance(expr, nodes.Const):
            return type(expr.value) is str
        if isinstance(expr, nodes.Name):
            return expr.name in _SPECIAL_TOKENS
        if isinstance(expr, nodes.Getitem | nodes.Getattr):
            return _key(expr) in _MESSAGE_KEYS and _kind(expr.node, self.kinds) == "message"
        return isinstance(expr, nodes.Concat)


class ShapeMemo:
    """One template's texts per conversation shape, as pieces with numbered content slots."""

    def __init__(self) -> None:
        self._shapes: dict[tuple[Any, ...], list[str | int]] = {}
        self.enabled = True

    def render(self, messages: list[dict[str, Any]], generation: bool, variant: str,
               direct: Callable[[list[dict[str, Any]], bool], str]) -> str:
        """The text of a plain conversation. `direct` renders with the template itself;
        `variant` names whatever else it reads (the tokenizer's special tokens), so that two
        tokenizers never share a shape. A generation flag that is not a bool (1, say) goes to the
        template, which may tell it from True."""
        if not self.enabled or type(generation) is not bool or any(_OPEN in m["role"] for m in messages):
            return direct(messages, generation)
        key = (variant, generation, *[m["role"] for m in messages])
        pieces = self._shapes.get(key)
        if pieces is not None:
            return _join(pieces, messages)
        text = direct(messages, generation)  # raises where the template does
        if len(self._shapes) < MAX_SHAPES:
            try:  # a template that writes placeholder-like text itself fails here
                pieces = _pieces(messages, generation, direct)
                same = _join(pieces, messages) == text
            except Exception:
                same = False
            if same:
                self._shapes[key] = pieces
            else:
                self.enabled = False
                self._shapes.clear()
        return text


def _join(pieces: list[str | int], messages: list[dict[str, Any]]) -> str:
    return "".join([p if type(p) is str else messages[p]["content"] for p in pieces])


def _pieces(messages: list[dict[str, Any]], generation: bool,
            direct: Callable[[list[dict[str, Any]], bool], str]) -> list[str | int]:
    """The shape's text cut at its contents: fixed strings, and message indices where a content goes."""
    placeholders = [{"role": m["role"], "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
    split = _SLOT.split(direct(placeholders, generation))
    return [int(piece) if i % 2 else piece for i, piece in enumerate(split) if i % 2 or piece]
