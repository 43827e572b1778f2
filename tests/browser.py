"""Headless Chromium for the report tests, driven by Playwright with Debian's ``chromium`` (no
browser download): open a page from ``file://``, collect console errors, page errors and failed
requests, check the width at a 1280-pixel window, and save a screenshot as a test artefact
(``$SAERAY_ARTIFACTS`` or ``<repo>/test-artifacts/``)."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import env_flag

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 1280


def chromium() -> str:
    exe = os.environ.get("SAERAY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        if env_flag("CI"):   # the same reading of CI as the slow-test switch
            pytest.fail("chromium is not installed; infra/bootstrap.sh installs it with apt-get when run as root")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def artifacts() -> Path:
    d = Path(os.environ.get("SAERAY_ARTIFACTS") or ROOT / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


class Visit:
    """One page load: the Playwright page and what went wrong while it loaded."""

    def __init__(self, b, path: Path):
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.page = b.new_page(viewport={"width": WIDTH, "height": 900})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.failed.append(r.url))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.url = path.resolve().as_uri()

    def open(self, fragment: str = "") -> "Visit":
        self.page.goto(self.url + fragment, wait_until="load")
        self.page.wait_for_timeout(150)      # the dashboard renders on DOMContentLoaded
        return self

    def check_clean(self) -> None:
        """No console or page errors, no failed request, nothing fetched off this machine, no
        dialog (a script that ran), and no horizontal overflow of the page at 1280 pixels."""
        assert not self.errors, f"{self.url}: console errors {self.errors}"
        assert not self.failed, f"{self.url}: failed requests {self.failed}"
        assert all(u.startswith(("file://", "data:")) for u in self.requests), self.requests
        assert not self.dialogs, f"{self.url}: a script ran: {self.dialogs}"
        width = self.page.evaluate("document.documentElement.scrollWidth")
        assert width <= WIDTH, f"{self.url}: the page is {width} px wide at a {WIDTH}-px window"

    def screenshot(self, name: str) -> Path:
        out = artifacts() / f"{name}.png"
        self.page.screenshot(path=str(out), full_page=True)
        return out


def check_all_pages(report: Path, name: str, max_dashboards: int = 2) -> dict[str, Visit]:
    """Load every page of a report (the first ``max_dashboards`` dashboards), check each clean,
    screenshot each page type; returns the visits by path relative to the report folder."""
    pages = sorted(p for p in report.glob("*.html"))
    pages += sorted(report.glob("dashboards/**/*.html"))[:max_dashboards]
    out, shot = {}, set()
    with browser() as b:
        for p in pages:
            v = Visit(b, p).open()
            v.check_clean()
            rel = str(p.relative_to(report))
            kind = "dashboard" if rel.startswith("dashboards/") else p.stem
            if kind not in shot:
                v.screenshot(f"{name}-{kind}")
                shot.add(kind)
            out[rel] = v.page.content()
            v.page.close()
    return out
