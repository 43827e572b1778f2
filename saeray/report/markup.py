"""The one HTML table writer of the report: every cell escaped (model-, spec- and corpus-derived
strings are never markup), the first ``left`` columns left-aligned, numbers formatted by ``fmt``."""
from __future__ import annotations

import html
import math
from typing import Callable


def fmt(v, digits: int = 3, grouped: bool = False) -> str:
    """A table cell's text: – for missing or NaN, floats to ``digits`` significant digits (with
    ``grouped``, values from 1000 up as whole numbers with thousands separators)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if grouped and abs(v) >= 1000 else f"{v:.{digits}g}"
    return str(v)


def table(header: list[str], rows: list[list], fmt: Callable[[object], str], left: int = 1) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f'<td{" class=l" if i < left else ""}>{html.escape(fmt(v))}</td>'
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"
