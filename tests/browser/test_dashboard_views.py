"""The dashboard's workers view, task page, search, bulk actions and charts, in chromium,
live against a real server fed from Python. Screenshots of the workers view and of a task
page go to ``WSQ_ARTIFACTS`` (``scripts/screenshots`` writes them into ``docs/``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Dialog, Page, expect

import wsq
from tests.browser.conftest import ARTIFACTS, http_url
from tests.conftest import budget, eventually
from tests.integration.procs import ServerProcess

# Client-controlled text that would run script if it were ever parsed as HTML.
HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script>'


async def open_dashboard(
    browser: Browser, server: wsq.Server | ServerProcess, route: str = ""
) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    # A CSP violation is reported on the console: the page must cause none.
    page.on(
        "console",
        lambda message: (
            problems.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    page.problems = problems  # type: ignore[attr-defined]
    await page.goto(http_url(server.url) + "/" + route)
    await expect(page.locator("#status")).to_have_text("connected", timeout=timeout())
    return page


def timeout() -> float:
    return budget(10) * 1000


async def close(page: Page) -> None:
    assert not page.problems, page.problems  # type: ignore[attr-defined]
    assert await page.evaluate("() => window.pwned") is None
    await page.close()


class Dialogs:
    """Answers the page's confirm() dialogs with ``answer`` and keeps their texts."""

    def __init__(self, page: Page, answer: bool) -> None:
        self.answer = answer
        self.texts: list[str] = []
        page.on("dialog", lambda dialog: asyncio.ensure_future(self._handle(dialog)))

    async def _handle(self, dialog: Dialog) -> None:
        self.texts.append(dialog.message)
        await (dialog.accept() if self.answer else dialog.dismiss())


async def test_workers_view_shows_each_worker_its_runs_and_progress_live(
    browser: Browser, server: wsq.Server, client: wsq.Client
) -> None:
    page = await open_dashboard(browser, server, "#/workers")
    await expect(page.locator("#no-workers")).to_be_visible(timeout=timeout())
    videos = client.queue("videos")
    step = asyncio.Event()

    async def handler(task: wsq.Task) -> None:
        await task.update_progress(0.3)
        await step.wait()

    worker = videos.process(handler, concurrency=2)
    first = await videos.add({"title": "first"})
    second = await videos.add({"title": "second"})
    third = await videos.add({"title": "third"})  # waits: two slots
    row = page.locator(f'#worker-list tr[data-worker="{worker.id}"]')
    await expect(row).to_be_visible(timeout=timeout())
    await expect(row.locator("td").nth(1)).to_have_text("videos")
    await expect(row.locator(".node")).to_have_text(server.node_name)
    await expect(row.locator(".client")).to_contain_text("wsq-python")
    await expect(row.locator(".slots")).to_have_text("2/2", timeout=timeout())
    for task in (first, second):
        run = row.locator(f'.runs li[data-task="{task.id}"]')
        await expect(run).to_contain_text("run 1 ", timeout=timeout())
        await expect(run).to_contain_text("s ago")
        await expect(run.locator("progress")).to_have_attribute("value", "0.3", timeout=timeout())
    await expect(row.locator(f'.runs li[data-task="{third.id}"]')).to_have_count(0)
    # A second worker, on another queue, appears without a reload.
    other = client.queue("thumbnails").process(lambda task: None)
    await expect(page.locator(f'#worker-list tr[data-worker="{other.id}"]')).to_be_visible(
        timeout=timeout()
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-workers.png"), full_page=True)

    # A run links to its task's page.
    await row.locator(f'.runs li[data-task="{first.id}"] a').click()
    await expect(page.locator("#task-view")).to_be_visible()
    await expect(page.locator("#task-id")).to_have_text(first.id)
    await page.go_back()
    step.set()
    await eventually(lambda: _completed(videos, 3))
    await expect(row.locator(".runs")).to_have_text("idle", timeout=timeout())
    await worker.stop()
    await expect(row).to_have_count(0, timeout=timeout())
    await other.stop()
    await expect(page.locator("#no-workers")).to_be_visible(timeout=timeout())
    await close(page)


async def _completed(queue: wsq.Queue, count: int) -> bool:
    return len(await queue.completed()) == count


async def test_task_page_shows_data_streams_error_and_follows_the_task_live(
    browser: Browser, server: wsq.Server, client: wsq.Client
) -> None:
    queue = client.queue("videos")
    blob = os.urandom(200_000)  # over the inline limit: a stored blob
    task = await queue.add(
        {"title": "holiday", "frames": [1, 2, 3], "files": [blob, b"tiny"]}, retries=1
    )
    page = await open_dashboard(browser, server)
    await page.fill("#search-id", task.id)
    await page.locator('#search button[type="submit"]').click()
    await expect(page.locator("#task-view")).to_be_visible()
    await expect(page.locator("#task-state")).to_have_text("waiting", timeout=timeout())
    await expect(page.locator('#task-fields dd[data-field="queue"]')).to_have_text("videos")
    await expect(page.locator('#task-fields dd[data-field="failed attempts"]')).to_contain_text(
        "0 (retries allowed: 1)"
    )
    data = page.locator("#task-data-json")
    await expect(data).to_contain_text('"title": "holiday"')
    await expect(data).to_contain_text('"<stream 1: 195 KiB (200,000 bytes)>"')
    streams = page.locator("#task-streams tbody tr")
    await expect(streams).to_have_count(2)
    await expect(streams.nth(0).locator(".path")).to_have_text("files[0]")
    await expect(streams.nth(1)).to_contain_text("4 bytes")
    async with page.expect_download(timeout=timeout()) as info:
        await streams.nth(0).locator('button[data-action="download"]').click()
    path = await (await info.value).path()
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(blob).digest()

    # Live: a run's progress, its worker and start, then failures with their error.
    go = asyncio.Event()

    async def handler(run: wsq.Task) -> None:
        await run.update_progress(0.4)
        await go.wait()
        raise RuntimeError("codec missing: h265")

    worker = queue.process(handler)
    await expect(page.locator("#task-state")).to_have_text("active", timeout=timeout())
    await expect(page.locator("#task-percent")).to_have_text("40%", timeout=timeout())
    await expect(page.locator('#task-fields dd[data-field="worker"]')).to_contain_text(
        "run 1 started", timeout=timeout()
    )
    running = page.locator('#task-attempts tr[data-outcome="running"]')
    await expect(running).to_contain_text("40%", timeout=timeout())
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-task.png"), full_page=True)
    go.set()
    await expect(page.locator("#task-state")).to_have_text("failed", timeout=timeout())
    await worker.stop()
    failures = page.locator('#task-attempts tr[data-outcome="failed"]')
    await expect(failures).to_have_count(2, timeout=timeout())
    await expect(page.locator("#task-error")).to_have_text("codec missing: h265")
    await expect(page.locator('#task-fields dd[data-field="failed attempts"]')).to_contain_text(
        "2 (retries allowed: 1)"
    )

    # Retry from the page: waiting again, error gone; then remove it.
    await page.locator("#task-retry").click()
    await expect(page.locator("#task-state")).to_have_text("waiting", timeout=timeout())
    await expect(page.locator("#task-error-box")).to_be_hidden()
    await page.locator("#task-remove").click()
    await expect(page.locator("#task-missing")).to_have_text(
        f"Task {task.id} was removed.", timeout=timeout()
    )
    assert await queue.all() == []
    await close(page)


async def test_task_page_lists_each_attempt_live_with_times_and_outcomes(
    browser: Browser, server: wsq.Server, client: wsq.Client
) -> None:
    queue = client.queue("flaky")
    task = await queue.add({"n": 1}, retries=1)
    page = await open_dashboard(browser, server, f"#/task/{task.id}")
    await expect(page.locator("#task-no-attempts")).to_be_visible(timeout=timeout())
    first_failed = asyncio.Event()
    finish = asyncio.Event()

    async def handler(run: wsq.Task) -> None:
        if run.run == 1:
            await run.update_progress(0.6)
            raise RuntimeError(HOSTILE)  # the error text is shown as text
        first_failed.set()
        await finish.wait()

    worker = queue.process(handler)
    await first_failed.wait()
    rows = page.locator("#task-attempts tbody tr")
    # The failed run, and the run in progress: rows come as the task's events arrive.
    await expect(rows).to_have_count(2, timeout=timeout())
    failed, current = rows.nth(0), rows.nth(1)
    await expect(failed.locator(".outcome")).to_contain_text("failed")
    await expect(failed.locator(".error")).to_have_text(HOSTILE)
    await expect(failed.locator("td.progress")).to_have_text("60%")
    await expect(failed).to_contain_text(worker.id)
    await expect(failed).to_contain_text("wsq-python")
    await expect(failed).to_contain_text(server.node_name)
    await expect(failed).to_contain_text("after the offer")
    await expect(failed).to_contain_text("took")
    await expect(current.locator(".outcome")).to_have_text("running", timeout=timeout())
    finish.set()
    await expect(current.locator(".outcome")).to_have_text("completed", timeout=timeout())
    await expect(current).to_contain_text("took")
    assert [await row.get_attribute("data-outcome") for row in await rows.all()] == [
        "failed",
        "completed",
    ]
    await worker.stop()
    await close(page)


async def test_text_from_clients_is_shown_as_text_and_never_run(
    browser: Browser, server: wsq.Server, client: wsq.Client
) -> None:
    queue = client.queue(f"q {HOSTILE}")
    task = await queue.add({"title": HOSTILE})

    def fail(run: wsq.Task) -> None:
        raise RuntimeError(f"broken {HOSTILE}")

    worker = queue.process(fail)
    await eventually(lambda: queue.failed())
    page = await open_dashboard(browser, server, "#/workers")
    await expect(page.locator("#worker-list td a").first).to_have_text(queue.name)
    await worker.stop()
    await page.goto(http_url(server.url) + "/#/queue/" + urllib.parse.quote(queue.name))
    await expect(page.locator("#queue-name")).to_have_text(queue.name, timeout=timeout())
    await page.locator('#states button[data-state="failed"]').click()
    row = page.locator(f'#tasks tr[data-task="{task.id}"]')
    await expect(row.locator(".error")).to_have_text(f"broken {HOSTILE}", timeout=timeout())
    await row.locator("a.task-link").click()
    await expect(page.locator("#task-error")).to_have_text(f"broken {HOSTILE}", timeout=timeout())
    await expect(page.locator('#task-fields dd[data-field="queue"]')).to_have_text(queue.name)
    data = await page.locator("#task-data-json").inner_text()
    assert HOSTILE.replace('"', '\\"') in data
    assert await page.locator("#task-view img, #task-view script").count() == 0
    await close(page)


async def test_search_says_clearly_when_there_is_no_such_task(
    browser: Browser, server: wsq.Server, client: wsq.Client
) -> None:
    page = await open_dashboard(browser, server)
    await page.fill("#search-id", "no-such-task")
    await page.locator('#search button[type="submit"]').click()
    missing = page.locator("#task-missing")
    await expect(missing).to_have_text("No task with id no-such-task.", timeout=timeout())
    await expect(page.locator("#task-body")).to_be_hidden()
    await page.fill("#search-id", "not an id!")
    await page.locator('#search button[type="submit"]').click()
    await expect(missing).to_contain_text('"not an id!" is not a task id', timeout=timeout())
    # A scoped id (an auth file's <principal>/<id>, docs/protocol.md §3) is an id to look up.
    await page.fill("#search-id", "alice/no-such-task")
    await page.locator('#search button[type="submit"]').click()
    await expect(missing).to_have_text("No task with id alice/no-such-task.", timeout=timeout())
    await page.fill("#search-id", "../no-such-task")
    await page.locator('#search button[type="submit"]').click()
    await expect(missing).to_contain_text('"../no-such-task" is not a task id', timeout=timeout())
    # A task added meanwhile is found by the same search.
    task = await client.queue("found").add({"n": 1})
    await page.fill("#search-id", task.id)
    await page.locator('#search button[type="submit"]').click()
    await expect(page.locator("#task-state")).to_have_text("waiting", timeout=timeout())
    await expect(missing).to_be_hidden()
    await close(page)


async def test_bulk_retry_and_remove_of_a_queues_failed_tasks(
    browser: Browser, server: wsq.Server, client: wsq.Client
) -> None:
    count = 250  # more than one batch of requests in flight
    queue = client.queue("bulk")
    await queue.add_many([{"n": n} for n in range(count)])
    await client.queue("bulk-other").add({"n": "keep"})

    async def fail_all() -> None:
        worker = queue.process(_fail, concurrency=50)
        await eventually(lambda: _failed(queue, count), timeout=30)
        await worker.stop()

    await fail_all()
    page = await open_dashboard(browser, server, "#/queue/bulk")
    retry = page.locator("#bulk-retry")
    await expect(retry).to_have_text(f"retry all failed ({count})", timeout=timeout())
    # Dismissed: nothing happens.
    dialogs = Dialogs(page, answer=False)
    await retry.click()
    await eventually(lambda: dialogs.texts)
    assert dialogs.texts == [f'Retry all {count} failed tasks of queue "bulk"?']
    assert len(await queue.failed(limit=1000)) == count
    dialogs.answer = True
    await retry.click()
    result = page.locator("#bulk-result")
    await expect(result).to_have_text(f"Retried {count} of {count}.", timeout=budget(30) * 1000)
    assert len(await queue.waiting(limit=1000)) == count
    await expect(page.locator("#bulk")).to_be_hidden(timeout=timeout())

    await fail_all()
    remove = page.locator("#bulk-remove")
    await expect(remove).to_have_text(f"remove all failed ({count})", timeout=timeout())
    await remove.click()
    await expect(result).to_have_text(f"Removed {count} of {count}.", timeout=budget(30) * 1000)
    assert await queue.all() == []
    assert len(await client.queue("bulk-other").all()) == 1
    await close(page)


def _fail(task: wsq.Task) -> None:
    raise RuntimeError("nope")


async def _failed(queue: wsq.Queue, count: int) -> bool:
    return len(await queue.failed(limit=1000)) == count


async def test_charts_show_the_hour_before_the_page_opened_then_follow_it_live(
    browser: Browser, server: wsq.Server, client: wsq.Client
) -> None:
    queue = client.queue("charted")

    async def handler(task: wsq.Task) -> None:
        if task.data == "bad":
            raise RuntimeError("bad data")

    worker = queue.process(handler)
    await queue.add("bad", retries=1)  # two failed attempts, one final failure
    await eventually(lambda: _failed(queue, 1))
    await worker.stop()
    # The next tasks start in seconds of their own (latency is a mean per second), and
    # each waits at least 300 ms for its start.
    await asyncio.sleep(1.05 - time.time() % 1)
    await queue.add_many([{"n": n} for n in range(5)])
    await asyncio.sleep(0.3)
    worker = queue.process(handler)
    await eventually(lambda: _completed(queue, 5))
    await worker.stop()
    await queue.add_many([{"n": n} for n in range(5, 8)])
    await eventually(lambda: _sampled_waiting(client, "charted", 3))

    # All of that happened before the page opened: the charts show it from the history.
    page = await open_dashboard(browser, server, "#/queue/charted")
    charts = page.locator("#queue-charts")
    summary = lambda series: charts.locator(f'figure[data-series="{series}"] .rate')  # noqa: E731
    await expect(summary("added")).to_have_attribute("data-total", "9", timeout=timeout())
    await expect(summary("completed")).to_have_attribute("data-total", "5")
    await expect(summary("failed")).to_have_attribute("data-total", "1")
    await expect(summary("waiting")).to_have_attribute("data-last", "3")
    assert int(await summary("waiting").get_attribute("data-peak") or 0) >= 3
    latency = float(await summary("latency").get_attribute("data-peak") or 0)
    assert 300 <= latency < budget(10) * 1000, latency
    assert "final" in await charts.locator('figure[data-series="failed"]').inner_text()
    assert "retried" in (
        await charts.locator('figure[data-series="failed"]').get_attribute("title") or ""
    )
    assert await charts.locator("figure").count() == 5
    assert await charts.locator("svg polyline").count() >= 5

    # Then live, each second counted once: the seed and the updates do not overlap.
    await queue.add_many([{"n": n} for n in range(8, 10)])
    await expect(summary("added")).to_have_attribute("data-total", "11", timeout=timeout())
    await expect(summary("waiting")).to_have_attribute("data-last", "5", timeout=timeout())
    worker = queue.process(handler)
    await expect(summary("completed")).to_have_attribute("data-total", "10", timeout=timeout())
    await expect(summary("waiting")).to_have_attribute("data-last", "0", timeout=timeout())
    await worker.stop()
    await expect(summary("added")).to_have_attribute("data-total", "11")
    await expect(summary("failed")).to_have_attribute("data-total", "1")
    await close(page)


async def test_charts_read_the_whole_hour_again_after_a_reconnection(
    browser: Browser, data_dir: Path
) -> None:
    proc = await ServerProcess(data_dir, None, "--heartbeat-interval", "0.5").start()
    try:
        async with wsq.Client(proc.url, backoff=lambda tries: 0.05) as client:
            queue = client.queue("again")
            await queue.add_many([{"n": n} for n in range(3)])
            page = await open_dashboard(browser, proc, "#/queue/again")
            added = page.locator('#queue-charts figure[data-series="added"] .rate')
            await expect(added).to_have_attribute("data-total", "3", timeout=timeout())
            proc.kill()
            await expect(page.locator("#status")).to_have_text("disconnected", timeout=timeout())
            await proc.start()
            await expect(page.locator("#status")).to_have_text("connected", timeout=timeout())
            # The restarted server's history starts empty, its three tasks still waiting:
            # the page shows that, not what it held from before.
            await expect(added).to_have_attribute("data-total", "0", timeout=timeout())
            waiting = page.locator('#queue-charts figure[data-series="waiting"] .rate')
            await expect(waiting).to_have_attribute("data-last", "3", timeout=timeout())
            await queue.add({"n": 3})
            await expect(added).to_have_attribute("data-total", "1", timeout=timeout())
            await close(page)
    finally:
        proc.stop()


async def _sampled_waiting(client: wsq.Client, queue: str, depth: int) -> bool:
    waiting = (await client.history(queue))["waiting"]
    return any(value == depth for value in waiting[-3:])


def _headers(url: str) -> Any:
    with urllib.request.urlopen(url) as reply:
        return reply.headers


async def test_the_dashboard_page_allows_only_its_own_scripts(server: wsq.Server) -> None:
    headers = await asyncio.to_thread(_headers, http_url(server.url) + "/")
    policy = headers.get_all("Content-Security-Policy")[0]
    assert "script-src 'self'" in policy
    assert "'unsafe-inline'" not in policy
    assert "frame-ancestors 'none'" in policy
    charts = await asyncio.to_thread(_headers, http_url(server.url) + "/charts.js")
    assert charts["Content-Type"].startswith("text/javascript")
