"""The one HTML table writer of the report: every cell escaped (model-, spec- and corpus-derived
strings are never markup) unless it is :class:`Html` the report built itself from escaped parts,
the first ``left`` columns left-aligned, numbers formatted by ``fmt``. Tables sit in a scrolling
box, so a wide one scrolls on its own instead of widening the page."""
from __future__ import annotations

import base64
import html
import math
from typing import Callable


class Html(str):
    """A cell that is already markup (a link built from escaped parts); written as it is."""


def img(png: bytes | None, alt: str) -> str:
    """A plot inlined as a data URI (the page then needs no file beside it); nothing for no plot."""
    if not png:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def link(href: str, text: str) -> Html:
    return Html(f'<a href="{html.escape(href, quote=True)}">{html.escape(text)}</a>')


def fmt(v, digits: int = 3, grouped: bool = False) -> str:
    """A table cell's text: – for missing or NaN, floats to ``digits`` significant digits (with
    ``grouped``, values from 1000 up as whole numbers with thousands separators)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if grouped and abs(v) >= 1000 else f"{v:.{digits}g}"
    return str(v)


def _cell(v, i: int, left: int, fmt: Callable[[object], str]) -> str:
    cls = " class=l" if i < left else ""
    if isinstance(v, Html):
        return f"<td{cls}>{v}</td>"
    return f"<td{cls}>{html.escape(fmt(v))}</td>"


def table(header: list[str], rows: list[list], fmt: Callable[[object], str], left: int = 1,
          sortable: bool = False, cls: str = "") -> str:
    h = "".join(f'<th{" class=l" if i < left else ""}>{html.escape(c)}</th>' for i, c in enumerate(header))
    body = "".join("<tr>" + "".join(_cell(v, i, left, fmt) for i, v in enumerate(r)) + "</tr>" for r in rows)
    classes = " ".join(c for c in (cls, "sortable" if sortable else "") if c)
    attr = f' class="{classes}"' if classes else ""
    return f"<div class=scroll><table{attr}><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table></div>"
