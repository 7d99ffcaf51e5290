"""A small HTML builder for the run report: escaped text, tables, key/value lists and notes, as strings."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

Cell = Any  # a value shown as text, or Raw HTML


class Raw(str):
    """HTML that is already escaped (a nested element, an SVG chart)."""


def text(value: Cell) -> str:
    """A value as escaped HTML text; None is a dash."""
    if isinstance(value, Raw):
        return value
    if value is None:
        return "–"
    return escape(str(value))


def tag(name: str, *children: Cell, **attrs: Any) -> Raw:
    """`<name attrs>children</name>`; `class_` becomes `class`, an attribute that is None is left out."""
    rendered = "".join(f' {k.rstrip("_").replace("_", "-")}="{escape(str(v))}"' for k, v in attrs.items()
                       if v is not None)
    return Raw(f"<{name}{rendered}>{''.join(text(c) for c in children)}</{name}>")


def join(parts: Iterable[Cell]) -> Raw:
    return Raw("".join(text(p) for p in parts))


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], numeric: Sequence[int] = (), **attrs: Any) -> Raw:
    """A table in a scrolling box (wide tables scroll sideways on a phone instead of widening the page); the
    columns in `numeric` are right-aligned."""
    head = tag("tr", *(tag("th", h, class_="num" if i in numeric else None) for i, h in enumerate(headers)))
    body = [tag("tr", *(tag("td", c, class_="num" if i in numeric else None) for i, c in enumerate(row)))
            for row in rows]
    return tag("div", tag("table", tag("thead", head), tag("tbody", *body), **attrs), class_="scroll")


def facts(pairs: Iterable[tuple[str, Cell]], **attrs: Any) -> Raw:
    """A definition list of label/value pairs (values that are None are left out)."""
    items = [join([tag("dt", k), tag("dd", v)]) for k, v in pairs if v is not None]
    return tag("dl", *items, class_="facts", **attrs)


def note(*children: Cell, kind: str = "note") -> Raw:
    return tag("p", *children, class_=kind)


def section(anchor: str, title: str, *children: Cell) -> Raw:
    return tag("section", tag("h2", title), *children, id=anchor)


def code(value: Cell) -> Raw:
    return tag("code", value)


def percent(value: float | None, digits: int = 1) -> str | None:
    return None if value is None else f"{value:.{digits}%}"


def number(value: Any, digits: int = 4) -> str | None:
    """Floats to `digits` significant digits, other values as they are."""
    if value is None:
        return None
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def size(n: int | None) -> str | None:
    if n is None:
        return None
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def shown(display: str | None, source: str, value: Any) -> Raw:
    """A number as displayed, tagged with the file and place it was read from (`eval/summary.json#models/base/x/n`)
    and its exact value, so a test can check that the page shows what the run's files say."""
    return tag("span", display, data_src=source, data_value=json.dumps(value))
