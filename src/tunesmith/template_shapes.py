"""Render a chat template once per conversation shape, where its output cannot depend on contents.

Most chat templates only paste each message's content between fixed markers chosen by the
roles. For such a template the text of a plain role/content conversation is a function of its
shape (the roles in order, and whether a generation prompt follows) with the contents put in at
fixed places. `ShapeMemo` renders each shape once with placeholder contents and then builds
every conversation of that shape by joining strings, which is what a tokenization of millions
of rows spends a seventh of its time on otherwise (bench/RESULTS.md).

`contents_pasted_only` decides from the template's syntax tree whether that holds, and refuses
whenever it cannot prove it:

- a content is read only as `x['content']` or `x.content`, and only as an operand of `+` or `~`
  chains written straight to the output (no filter, test, comparison, method, `set` or branch
  sees it, so no content can change which branches run or how it is printed);
- the message list and each message are used only to read a key, iterate, index, slice, count
  or test for truth, key membership or type (so no whole message reaches a filter or the
  output, where its content would be printed or inspected);
- no block filters or captures output, no other template is included, and the only functions
  called by name are `raise_exception`, `namespace` and `range` (a clock or a random filter
  would make the same shape render differently).

Every shape's first conversation is also rendered by the template itself and compared; a
difference turns the memo off for that template.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from jinja2 import nodes

# Placeholder contents: private-use characters no template writes itself. A conversation whose
# contents hold one is rendered by the template.
_OPEN, _CLOSE = "\ue000", "\ue001"
_SLOT = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
MAX_SHAPES = 4096  # beyond this many shapes (very long, varied chats) new shapes are rendered directly

_ALLOWED_CALLS = {"raise_exception", "namespace", "range"}
_IMPURE_FILTERS = {"random", "shuffle"}
_REFUSED_NODES = (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends, nodes.Macro, nodes.CallBlock,
                  nodes.FilterBlock, nodes.AssignBlock, nodes.EvalContextModifier, nodes.ScopedEvalContextModifier)
_DICT_METHODS = {"items", "values", "keys", "get", "copy", "pop", "popitem", "setdefault", "update", "clear"}
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
    if any(isinstance(node, _REFUSED_NODES) for node in parents):
        return False
    lists, messages = _message_names(tree)
    for node, (parent, field) in parents.items():
        if not _node_allowed(node, parent, field, parents, lists, messages):
            return False
    return True


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


def _message_names(tree: nodes.Node) -> tuple[set[str], set[str]]:
    """(names bound to the message list or a slice of it, names bound to one message)."""
    lists, messages = {"messages"}, set()
    changed = True
    while changed:  # aliases of aliases: `set turns = messages[1:]`, then `for m in turns`
        changed = False
        for node in tree.find_all((nodes.Assign, nodes.For)):
            source = node.node if isinstance(node, nodes.Assign) else node.iter
            if not isinstance(node.target, nodes.Name):
                continue
            kind = _kind(source, lists, messages)
            if isinstance(node, nodes.For) and kind == "list":
                kind = "message"
            target = lists if kind == "list" else messages if kind == "message" else None
            if target is not None and node.target.name not in target:
                target.add(node.target.name)
                changed = True
    return lists, messages


def _kind(expr: nodes.Node, lists: set[str], messages: set[str]) -> str | None:
    """'list' for the message list or a slice of it, 'message' for one message, else None."""
    if isinstance(expr, nodes.Name):
        return "list" if expr.name in lists else "message" if expr.name in messages else None
    if isinstance(expr, nodes.Getitem) and _kind(expr.node, lists, messages) == "list":
        return "list" if isinstance(expr.arg, nodes.Slice) else "message"
    if isinstance(expr, nodes.Filter) and expr.name in ("first", "last") and expr.node is not None \
            and _kind(expr.node, lists, messages) == "list":
        return "message"
    return None


def _is_content_read(node: nodes.Node) -> bool:
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    return isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"


def _node_allowed(node: nodes.Node, parent: nodes.Node | None, field: str,
                  parents: Parents, lists: set[str], messages: set[str]) -> bool:
    if isinstance(node, nodes.Const) and node.value == "content":
        # Only as the key of a content read (checked there); anywhere else ('content' in m,
        # map(attribute='content'), m.get('content')) it reaches the content by another path.
        return isinstance(parent, nodes.Getitem) and field == "arg"
    if _is_content_read(node) and not _pasted_into_output(node, parents):
        return False
    if isinstance(node, nodes.Call):
        return isinstance(node.node, nodes.Getattr) or (
            isinstance(node.node, nodes.Name) and node.node.name in _ALLOWED_CALLS)
    if isinstance(node, nodes.Filter | nodes.Test) and node.name in _IMPURE_FILTERS:
        return False
    if isinstance(node, nodes.Getattr) and node.attr in ("previtem", "nextitem"):
        return False  # a loop's neighbouring message, outside the checks below
    if isinstance(node, nodes.Name) and node.ctx == "store":
        # Rebinding a message name to something else would hide it from the checks.
        return node.name not in lists | messages or isinstance(parent, nodes.Assign | nodes.For)
    kind = _kind(node, lists, messages)
    if kind is None or parent is None:
        return True
    return _use_allowed(node, kind, parent, field, parents, lists, messages)


def _use_allowed(node: nodes.Node, kind: str, parent: nodes.Node, field: str,
                 parents: Parents, lists: set[str], messages: set[str]) -> bool:
    """Where the message list or a message may appear: nowhere its contents could leak from."""
    if _in_truth_test(parent, field, parents) or isinstance(parent, nodes.Test) and field == "node":
        return True
    if isinstance(parent, nodes.Getitem) and field == "node":
        if kind == "list":
            return True  # an index or a slice: a message or a list, checked where used
        return isinstance(parent.arg, nodes.Const) and isinstance(parent.arg.value, str)
    if isinstance(parent, nodes.Getattr) and field == "node":
        return kind == "message" and parent.attr not in _DICT_METHODS
    if kind == "list":
        if isinstance(parent, nodes.For) and field == "iter":
            return isinstance(parent.target, nodes.Name)
        if isinstance(parent, nodes.Filter) and field == "node":
            return parent.name in ("length", "count", "first", "last") and not parent.args and not parent.kwargs
        if isinstance(parent, nodes.Assign) and field == "node":
            return isinstance(parent.target, nodes.Name)
        return False
    if isinstance(parent, nodes.Operand) and parent.op in ("in", "notin"):
        return True  # a key test: the keys of a plain message are fixed
    return isinstance(parent, nodes.Assign) and field == "node" and isinstance(parent.target, nodes.Name)


def _in_truth_test(parent: nodes.Node, field: str, parents: Parents) -> bool:
    """Whether only the truth of `node` is used (an if, a ternary's test, through not/and/or)."""
    while isinstance(parent, _TRUTH_PARENTS):
        parent, field = parents[parent]
    return isinstance(parent, nodes.If | nodes.CondExpr) and field == "test" or (
        isinstance(parent, nodes.For) and field == "test")


def _pasted_into_output(node: nodes.Node, parents: Parents) -> bool:
    parent, field = parents[node]
    while isinstance(parent, nodes.Add | nodes.Concat):
        parent, field = parents[parent]
    return isinstance(parent, nodes.Output) and field == "nodes"


class ShapeMemo:
    """One template's texts per conversation shape, as pieces with numbered content slots."""

    def __init__(self) -> None:
        self._shapes: dict[tuple[Any, ...], list[str | int]] = {}
        self.enabled = True

    def render(self, messages: list[dict[str, Any]], generation: bool, variant: str,
               direct: Callable[[list[dict[str, Any]], bool], str]) -> str:
        """The text of a plain conversation. `direct` renders with the template itself;
        `variant` names whatever else it reads (the tokenizer's special tokens), so that two
        tokenizers never share a shape."""
        if not self.enabled or any(_OPEN in m["content"] for m in messages):
            return direct(messages, generation)
        key = (variant, generation, *[m["role"] for m in messages])
        pieces = self._shapes.get(key)
        if pieces is not None:
            return _join(pieces, messages)
        text = direct(messages, generation)  # raises where the template does
        if len(self._shapes) < MAX_SHAPES:
            try:
                pieces = _pieces(messages, generation, direct)
            except Exception:
                pieces = None
            if pieces is None or _join(pieces, messages) != text:
                self.enabled = False
                self._shapes.clear()
            else:
                self._shapes[key] = pieces
        return text


def _join(pieces: list[str | int], messages: list[dict[str, Any]]) -> str:
    return "".join([p if type(p) is str else messages[p]["content"] for p in pieces])


def _pieces(messages: list[dict[str, Any]], generation: bool,
            direct: Callable[[list[dict[str, Any]], bool], str]) -> list[str | int]:
    """The shape's text cut at its contents: fixed strings, and message indices where a content goes."""
    placeholders = [{"role": m["role"], "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
    split = _SLOT.split(direct(placeholders, generation))
    return [int(piece) if i % 2 else piece for i, piece in enumerate(split) if i % 2 or piece]
