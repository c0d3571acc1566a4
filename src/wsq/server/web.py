"""Static files the server sends for plain HTTP GETs: the dashboard (``/``), the browser
client (``/wsq.js``, its modules ``/lib/*.js``) and its type declarations. They ship
inside the package (``wsq/web``) and are read once."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Asset:
    body: bytes
    headers: dict[str, str]


_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/charts.js": ("charts.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/wsq.js": ("wsq.js", "text/javascript; charset=utf-8"),
    "/wsq.d.ts": ("wsq.d.ts", "text/plain; charset=utf-8"),
}
# wsq.js imports its modules from lib/ (no bundler): each is served at /lib/<name>.js.
_FILES.update(
    (f"/lib/{entry.name}", (f"lib/{entry.name}", "text/javascript; charset=utf-8"))
    for entry in resources.files("wsq").joinpath("web", "lib").iterdir()
    if entry.name.endswith(".js")
)


SECURITY_HEADERS = {
    # No other site may frame the dashboard (clickjacking its retry and remove buttons).
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}
"""Sent with every HTTP response of the server, files and errors alike."""

PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The dashboard page's Content-Security-Policy: its scripts, styles and WebSocket come
from the server itself only, with nothing inline. Text from tasks is set as text, never
parsed as HTML, so this is the second line of defence (docs/security.md)."""


def asset(path: str) -> Asset | None:
    """The file served at ``path``, or ``None``."""
    entry = _FILES.get(path)
    return _load(*entry) if entry else None


@functools.cache
def _load(name: str, content_type: str) -> Asset:
    body = resources.files("wsq").joinpath("web", *name.split("/")).read_bytes()
    headers = {
        "Content-Type": content_type,
        "Cache-Control": "no-cache",
        # Any page may load the client (a module script is a CORS request); connecting
        # is what the origin check guards.
        "Access-Control-Allow-Origin": "*",
    }
    if content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = PAGE_POLICY
    return Asset(body, headers)
