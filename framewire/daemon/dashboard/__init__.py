"""The dashboard page served at ``GET /`` of the status port: one self-contained HTML file.

The page's markup, style and script are package data (``page.html``, ``dashboard.css``,
``dashboard.js``), read with importlib.resources and put together once: the style and the
script are inlined, so the page needs no second request (which the token would guard too)
and nothing from the internet. Its Content-Security-Policy allows exactly those two inline
blocks (by their SHA-256) and connections back to the status port, nothing else.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cached_property
from importlib import resources
from typing import Final

__all__ = ["DASHBOARD", "Dashboard"]


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


class Dashboard:
    """The assembled page and the headers to serve it with. Reading the package data fails
    with OSError only if the installation is broken (a missing file)."""

    @cached_property
    def _parts(self) -> tuple[bytes, list[tuple[str, str]]]:
        files = resources.files(__name__)
        html = files.joinpath("page.html").read_text(encoding="utf-8")
        style = files.joinpath("dashboard.css").read_text(encoding="utf-8")
        script = files.joinpath("dashboard.js").read_text(encoding="utf-8")
        page = html.replace("/*STYLE*/", style).replace("/*SCRIPT*/", script)
        policy = (
            "default-src 'none'; "
            f"style-src {_digest(style)}; script-src {_digest(script)}; "
            "connect-src 'self' ws: wss:; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        headers = [("content-security-policy", policy), ("referrer-policy", "no-referrer")]
        return page.encode(), headers

    @property
    def page(self) -> bytes:
        return self._parts[0]

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self._parts[1]


DASHBOARD: Final = Dashboard()
