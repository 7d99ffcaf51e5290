"""A small interpreter for the subset of Go's text/template that Ollama chat templates use.

It lets the export check, before writing a Modelfile, that the Go TEMPLATE renders conversations exactly like the
HF chat template. Supported: text, `{{- ` / ` -}}` trimming, comments, `if` / `else if` / `else`, `range` with
`$i, $x :=`, variables (`$x := ...`, `$x = ...`, `$`), field chains (`.Messages`, `$x.Role`, `(index .M 0).Role`),
string/number/bool literals, parentheses and the functions and, or, not, eq, ne, lt, le, gt, ge, len, index, slice.
Anything else raises MedtuneError, so a template is never silently rendered wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medtune.errors import MedtuneError

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)|(?P<assign>:=|=)'
                    r"|(?P<punct>[(),])|(?P<var>\$\w*)|(?P<field>(?:\.\w+)+|\.)|(?P<ident>\w+))")
_GO_SPACE = " \t\r\n"
_GO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def truth(value: Any) -> bool:
    """Go's notion of true: not the zero value of its type, not empty."""
    if value is None or value is False:
        return False
    if isinstance(value, (int, float, str, list, tuple, dict)):
        return bool(value)
    return True


def _eq(a: Any, *others: Any) -> bool:
    return any(a == b for b in others)


def _and(*args: Any) -> Any:
    for arg in args:
        if not truth(arg):
            return arg
    return args[-1]


def _or(*args: Any) -> Any:
    for arg in args:
        if truth(arg):
            return arg
    return args[-1]


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else value[key]
    return value


def _slice(value: Any, *bounds: int) -> Any:
    return value[bounds[0] : bounds[1] if len(bounds) > 1 else None] if bounds else value


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "and": _and, "or": _or, "not": lambda a: not truth(a), "eq": _eq, "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "len": len, "index": _index, "slice": _slice,
}


@dataclass
class Node:
    kind: str  # text | print | assign | if | range
    text: str = ""
    expr: list[Any] = field(default_factory=list)  # parsed expression tokens
    names: list[str] = field(default_factory=list)  # variables an assign/range declares
    declare: bool = True  # := (declare) or = (assign)
    branches: list[tuple[list[Any], list[Node]]] = field(default_factory=list)  # if: (condition, body)...
    body: list[Node] = field(default_factory=list)
    orelse: list[Node] = field(default_factory=list)


def _tokens(source: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while source[pos:].strip():
        match = _TOKEN.match(source, pos)
        if match is None or match.end() == pos:
            raise MedtuneError(f"Go template: cannot parse {source[pos:].strip()!r} (outside the supported subset)")
        out.append((match.lastgroup, match.group(match.lastgroup)))
        pos = match.end()
    return out


def _split(template: str) -> list[tuple[str, str]]:
    """[('text', ...), ('action', ...)] with Go's trim markers applied to the neighbouring text."""
    parts: list[tuple[str, str]] = []
    trim_next = False
    pos = 0
    for match in _ACTION.finditer(template):
        text = template[pos : match.start()]
        if trim_next:
            text = text.lstrip(_GO_SPACE)
        if match.group(1):
            text = text.rstrip(_GO_SPACE)
        parts.append(("text", text))
        parts.append(("action", match.group(2).strip()))
        trim_next = bool(match.group(3))
        pos = match.end()
    tail = template[pos:]
    parts.append(("text", tail.lstrip(_GO_SPACE) if trim_next else tail))
    return parts


def parse(template: str) -> list[Node]:
    parts = [p for p in _split(template) if not (p[0] == "action" and p[1].startswith("/*"))]
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list[Node], str]:
        nonlocal pos
        nodes: list[Node] = []
        while pos < len(parts):
            kind, content = parts[pos]
            pos += 1
            if kind == "text":
                if content:
                    nodes.append(Node("text", text=content))
                continue
            word = content.split(None, 1)[0] if content else ""
            if word in ("end", "else") and word in stop:
                return nodes, content
            if word in ("end", "else"):
                raise MedtuneError(f"Go template: unexpected {{{{ {content} }}}}")
            if word == "if":
                node = Node("if")
                condition = content[2:]
                while True:
                    body, closer = block(("end", "else"))
                    node.branches.append((_tokens(condition), body))
                    if closer == "end":
                        break
                    rest = closer[4:].strip()
                    if rest.startswith("if "):
                        condition = rest[3:]
                        continue
                    node.orelse, _ = block(("end",))
                    break
                nodes.append(node)
            elif word == "range":
                tokens = _tokens(content[5:])
                names = []
                if any(kind == "assign" for kind, _ in tokens):
                    split = next(i for i, (kind, _) in enumerate(tokens) if kind == "assign")
                    names = [text for kind, text in tokens[:split] if kind == "var"]
                    tokens = tokens[split + 1 :]
                body, closer = block(("end", "else"))
                orelse = block(("end",))[0] if closer.startswith("else") else []
                nodes.append(Node("range", expr=tokens, names=names, body=body, orelse=orelse))
            else:
                tokens = _tokens(content)
                if len(tokens) > 2 and tokens[0][0] == "var" and tokens[1][0] == "assign":
                    nodes.append(Node("assign", expr=tokens[2:], names=[tokens[0][1]],
                                      declare=tokens[1][1] == ":="))
                else:
                    nodes.append(Node("print", expr=tokens))
        if stop:
            raise MedtuneError(f"Go template: missing {{{{ end }}}} (expected one of {stop})")
        return nodes, ""

    nodes, _ = block(())
    return nodes


class _Scope:
    def __init__(self, root: Any) -> None:
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def get(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise MedtuneError(f"Go template: undefined variable {name}")

    def set(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise MedtuneError(f"Go template: assignment to undeclared variable {name}")


def _field(value: Any, names: list[str]) -> Any:
    for name in names:
        if isinstance(value, dict):
            value = value.get(name)  # Ollama parses with missingkey=zero
        else:
            value = getattr(value, name)
    return value


def _evaluate(tokens: list[tuple[str, str]], dot: Any, scope: _Scope) -> Any:
    pos = 0

    def operand() -> Any:
        nonlocal pos
        kind, text = tokens[pos]
        pos += 1
        if kind == "punct" and text == "(":
            value = command()
            if pos >= len(tokens) or tokens[pos] != ("punct", ")"):
                raise MedtuneError("Go template: missing ')'")
            pos += 1
        elif kind == "str":
            value = re.sub(r"\\(.)", lambda m: _GO_ESCAPES.get(m.group(1), m.group(0)), text[1:-1])
        elif kind == "raw":
            value = text[1:-1]
        elif kind == "num":
            value = int(text)
        elif kind == "var":
            value = scope.get(text)
        elif kind == "field":
            return dot if text == "." else _field(dot, text[1:].split("."))
        elif kind == "ident" and text in ("true", "false"):
            return text == "true"
        else:
            raise MedtuneError(f"Go template: unexpected {text!r}")
        if pos < len(tokens) and tokens[pos][0] == "field" and tokens[pos][1] != ".":
            value = _field(value, tokens[pos][1][1:].split("."))
            pos += 1
        return value

    def command() -> Any:
        nonlocal pos
        kind, text = tokens[pos]
        if kind == "ident" and text in FUNCTIONS:
            pos += 1
            args = []
            while pos < len(tokens) and tokens[pos] != ("punct", ")"):
                args.append(operand())
            return FUNCTIONS[text](*args)
        if kind == "ident" and text not in ("true", "false"):
            raise MedtuneError(f"Go template: function {text!r} is outside the supported subset")
        return operand()

    value = command()
    if pos != len(tokens):
        raise MedtuneError(f"Go template: unexpected {tokens[pos][1]!r}")
    return value


def _run(nodes: list[Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "print":
            value = _evaluate(node.expr, dot, scope)
            if value is None:
                raise MedtuneError("Go template: printing a missing value (Go would print '<no value>')")
            out.append(str(value).lower() if isinstance(value, bool) else str(value))
        elif node.kind == "assign":
            value = _evaluate(node.expr, dot, scope)
            if node.declare:
                scope.frames[-1][node.names[0]] = value
            else:
                scope.set(node.names[0], value)
        elif node.kind == "if":
            for condition, body in node.branches:
                if truth(_evaluate(condition, dot, scope)):
                    scope.frames.append({})
                    _run(body, dot, scope, out)
                    scope.frames.pop()
                    break
            else:
                scope.frames.append({})
                _run(node.orelse, dot, scope, out)
                scope.frames.pop()
        elif node.kind == "range":
            items = _evaluate(node.expr, dot, scope)
            pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items or []))
            for key, item in pairs:
                frame = {}
                if len(node.names) == 1:
                    frame[node.names[0]] = item
                elif len(node.names) == 2:
                    frame[node.names[0]], frame[node.names[1]] = key, item
                scope.frames.append(frame)
                _run(node.body, item, scope, out)
                scope.frames.pop()
            if not pairs:
                _run(node.orelse, dot, scope, out)


def render(template: str, data: dict[str, Any]) -> str:
    """Execute `template` on `data` the way Go's text/template would (for the supported subset)."""
    out: list[str] = []
    _run(parse(template), data, _Scope(data), out)
    return "".join(out)
