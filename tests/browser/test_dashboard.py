"""The dashboard at ``/`` in chromium, live against a real server fed from Python."""

from __future__ import annotations

import asyncio
import hashlib
import os

from playwright.async_api import Browser, Page, expect

import wsq
from tests.browser.conftest import ARTIFACTS, http_url
from tests.conftest import budget, eventually


async def open_dashboard(browser: Browser, server: wsq.Server) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(http_url(server.url) + "/")
    await expect(page.locator("#status")).to_have_text("connected", timeout=budget(10) * 1000)
    return page


def row(page: Page, task_id: str) -> object:
    return page.locator(f'#tasks tr[data-task="{task_id}"]')


async def test_live_tasks_progress_retry_remove_and_a_screenshot(
    browser: Browser, server: wsq.Server, client: wsq.Client
) -> None:
    page = await open_dashboard(browser, server)
    timeout = budget(10) * 1000
    videos = client.queue("videos")
    first = await videos.add({"title": "first"})
    # A task added from Python appears without a reload.
    queue_row = page.locator('#queues tr[data-queue="videos"]')
    await expect(queue_row.locator('td[data-count="waiting"]')).to_have_text("1", timeout=timeout)
    await queue_row.locator("button").click()
    await expect(page.locator(f'#tasks tr[data-task="{first.id}"]')).to_be_visible(timeout=timeout)

    # A worker reports progress: the bar moves.
    step = asyncio.Event()
    finish = asyncio.Event()

    async def handler(task: wsq.Task) -> None:
        if task.data["title"] == "broken":
            raise RuntimeError("codec missing")
        for value in (0.25, 0.6):
            await task.update_progress(value)
            if not finish.is_set():
                await step.wait()
                step.clear()

    worker = videos.process(handler, concurrency=2)
    await page.locator('#states button[data-state="active"]').click()
    bar = page.locator(f'#tasks tr[data-task="{first.id}"] progress')
    await expect(bar).to_have_attribute("value", "0.25", timeout=timeout)
    step.set()
    await expect(bar).to_have_attribute("value", "0.6", timeout=timeout)
    await expect(page.locator("#workers")).to_contain_text("1 worker", timeout=timeout)
    for title in ("second", "third"):
        await videos.add({"title": title})
    await client.queue("thumbnails").add_many([{"n": n} for n in range(3)])
    await expect(page.locator('#queues tr[data-queue="thumbnails"]')).to_be_visible(timeout=timeout)
    # The charts follow the server's history: three added, one of them waiting.
    charts = page.locator("#queue-charts")
    added = charts.locator('figure[data-series="added"] .rate')
    await expect(added).to_have_attribute("data-total", "3", timeout=timeout)
    waiting = charts.locator('figure[data-series="waiting"] .rate')
    await expect(waiting).to_have_attribute("data-last", "1", timeout=timeout)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # A failed task: retry moves it back to waiting, remove deletes it.
    finish.set()
    step.set()
    broken = await videos.add({"title": "broken"})
    await eventually(lambda: videos.failed())
    await worker.stop()
    await page.locator('#states button[data-state="failed"]').click()
    failed_row = page.locator(f'#tasks tr[data-task="{broken.id}"]')
    await expect(failed_row.locator(".error")).to_have_text("codec missing", timeout=timeout)
    await failed_row.locator('button[data-action="retry"]').click()
    await expect(failed_row).to_have_count(0, timeout=timeout)
    await page.locator('#states button[data-state="waiting"]').click()
    waiting_row = page.locator(f'#tasks tr[data-task="{broken.id}"]')
    await expect(waiting_row).to_be_visible(timeout=timeout)
    assert [t.id for t in await videos.waiting()] == [broken.id]
    await waiting_row.locator('button[data-action="remove"]').click()
    await expect(waiting_row).to_have_count(0, timeout=timeout)
    await eventually(lambda: _gone(videos, broken.id))
    assert not page.errors  # type: ignore[attr-defined]
    await page.close()


async def _gone(queue: wsq.Queue, task_id: str) -> bool:
    return task_id not in [t.id for t in await queue.all()]


async def test_add_with_files_and_download_a_stream(
    browser: Browser, server: wsq.Server, client: wsq.Client
) -> None:
    page = await open_dashboard(browser, server)
    timeout = budget(10) * 1000
    content = os.urandom(1_500_000)
    await page.fill("#add-queue", "uploads")
    await page.fill("#add-data", '{"kind": "report"}')
    await page.set_input_files(
        "#add-files", files=[{"name": "report.bin", "mimeType": "application/octet-stream",
                              "buffer": content}]
    )  # fmt: skip
    await page.locator('#add-form button[type="submit"]').click()
    await expect(page.locator("#add-result")).to_contain_text("Added", timeout=timeout)
    (task,) = await client.queue("uploads").waiting()
    data = await task.get_data()
    assert data["kind"] == "report"
    assert (
        hashlib.sha256(await data["files"][0].read()).digest() == hashlib.sha256(content).digest()
    )

    # The dashboard shows the task's data and downloads its stream.
    task_row = page.locator(f'#tasks tr[data-task="{task.id}"]')
    await task_row.locator('button[data-action="data"]').click()
    await expect(page.locator("#data-json")).to_contain_text('"kind": "report"', timeout=timeout)
    async with page.expect_download(timeout=timeout) as info:
        await page.locator("#data-streams button").first.click()
    download = await info.value
    path = await download.path()
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(content).digest()
    assert not page.errors  # type: ignore[attr-defined]
    await page.close()


async def test_the_dashboard_asks_for_a_token_when_the_server_needs_one(
    browser: Browser, tmp_path: object
) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    auth = folder / "auth.toml"
    auth.write_text('[tokens.ops]\ntoken = "dashboard-token-0123456789"\nadmin = ["*"]\n')
    async with wsq.Server(data_dir=folder / "data", port=0, auth=auth) as server:
        page = await browser.new_page()
        await page.goto(http_url(server.url) + "/")
        timeout = budget(10) * 1000
        await expect(page.locator("#token-form")).to_be_visible(timeout=timeout)
        await page.fill("#token", "dashboard-token-0123456789")
        await page.locator('#token-form button[type="submit"]').click()
        await expect(page.locator("#status")).to_have_text("connected", timeout=timeout)
        await page.close()


async def test_a_narrow_screen_gets_one_column(browser: Browser, server: wsq.Server) -> None:
    page = await browser.new_page(viewport={"width": 390, "height": 844})
    await page.goto(http_url(server.url) + "/")
    columns = await page.evaluate(
        "() => getComputedStyle(document.querySelector('main')).gridTemplateColumns"
    )
    assert len(columns.split()) == 1
    await page.close()
