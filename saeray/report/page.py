"""The frame every report page shares: the navigation bar, the local stylesheet and scripts.

Pages link to each other and to ``assets/`` by relative paths only, so a report works opened
from a local folder, from files copied off object storage, or served by any static server, with
no network access (no CDN scripts or fonts)."""
from __future__ import annotations

import html
from dataclasses import dataclass
from importlib import resources

ASSETS = ("report.css", "report.js", "dashboard.js")


@dataclass(frozen=True)
class NavLink:
    href: str       # relative to the report folder
    label: str


def asset_files() -> dict[str, bytes]:
    """The assets shipped in the package, written to ``report/assets/``."""
    root = resources.files("saeray.report") / "assets"
    return {name: (root / name).read_bytes() for name in ASSETS}


def page(title: str, body: str, run: str, nav: list[NavLink], here: str, depth: int = 0,
         scripts: tuple[str, ...] = ()) -> str:
    """A whole page. ``here``: this page's href (relative to the report folder), marked in the bar;
    ``depth``: folders below the report folder (dashboards live three deep); ``scripts``: extra
    script files, relative to the page."""
    up = "../" * depth
    links = "".join(f'<a href="{html.escape(up + n.href, quote=True)}"{" class=here" if n.href == here else ""}>'
                    f"{html.escape(n.label)}</a>" for n in nav)
    extra = "".join(f'<script src="{html.escape(s, quote=True)}"></script>' for s in scripts)
    return (f'<!doctype html><html lang=en><head><meta charset=utf-8>'
            f'<meta name=viewport content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title>"
            f'<link rel=stylesheet href="{up}assets/report.css"><script src="{up}assets/report.js"></script>{extra}'
            f'</head><body><header class=nav><span class=run>saeray · {html.escape(run)}</span>{links}</header>'
            f"<main>{body}</main></body></html>")
