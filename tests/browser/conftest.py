"""Browser tests: Debian's chromium, driven by Playwright for Python, against real servers.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (override
with ``WSQ_CHROMIUM``). Pages are opened on the server's own origin (``/health``), so the
WebSocket passes the server's default same-origin check, and import the client from
``/wsq.js`` as any page would. Screenshots go to ``WSQ_ARTIFACTS`` (default
``test-artifacts/``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

import wsq

CHROMIUM = os.environ.get("WSQ_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(os.environ.get("WSQ_ARTIFACTS", "test-artifacts"))


@pytest.fixture
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/test does)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        try:
            yield browser
        finally:
            await browser.close()


def http_url(server_url: str) -> str:
    return server_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)


async def open_page(browser: Browser, server_url: str) -> Page:
    """A page on the server's origin, with ``window.wsq`` the imported module and
    browser console errors collected in ``page.errors``."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(http_url(server_url) + "/health")
    await page.evaluate("async () => { window.wsq = await import('/wsq.js') }")
    return page


@pytest.fixture
async def page(browser: Browser, server: wsq.Server) -> AsyncIterator[Page]:
    page = await open_page(browser, server.url)
    yield page
    assert not page.errors, page.errors  # type: ignore[attr-defined]
    await page.close()
