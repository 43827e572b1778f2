"""The one HTML table writer of the report: every cell escaped (model-, spec- and corpus-derived
strings are never markup), the first ``left`` columns left-aligned, numbers formatted by ``fmt``."""
from __future__ import annotations

import html
from typing import Callable


def table(header: list[str], rows: list[list], fmt: Callable[[object], str], left: int = 1) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f'<td{" class=l" if i < left else ""}>{html.escape(fmt(v))}</td>'
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"
