"""The browser client (wsq.js) in chromium: its API, streams both ways, events,
reconnection, tokens, and interop with the Python client, bytes compared by SHA-256."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

import wsq
from tests.browser.conftest import http_url, open_page
from tests.conftest import budget, eventually
from tests.integration.procs import ServerProcess

# Helpers defined in the page: SHA-256 of a ReadableStream or bytes, as hex.
HASHING = """
window.hex = (buffer) => Array.from(new Uint8Array(buffer), b => b.toString(16).padStart(2, '0')).join('')
window.sha256 = async (bytes) => hex(await crypto.subtle.digest('SHA-256', bytes))
window.readAll = async (stream) => {
  const parts = []; let size = 0
  const reader = stream.getReader()
  while (true) {
    const { done, value } = await reader.read()
    if (done) break
    if (!(value instanceof Uint8Array)) throw new Error('not a Uint8Array: ' + value)
    parts.push(value); size += value.byteLength
  }
  const all = new Uint8Array(size); let at = 0
  for (const part of parts) { all.set(part, at); at += part.byteLength }
  return all
}
window.pattern = (size, seed) => {
  const bytes = new Uint8Array(size)
  let x = seed >>> 0 || 1
  for (let i = 0; i < size; i++) { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; bytes[i] = x & 255 }
  return bytes
}
"""


def pattern(size: int, seed: int) -> bytes:
    """The same bytes as ``window.pattern`` (xorshift32)."""
    out = bytearray(size)
    x = seed or 1
    for i in range(size):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[i] = x & 255
    return bytes(out)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def python(server: wsq.Server) -> Any:
    async with wsq.Client(server.url, backoff=lambda tries: 0.05) as client:
        yield client


async def setup(page: Page, server: wsq.Server, **options: Any) -> None:
    await page.evaluate(HASHING)
    await page.evaluate(
        "async ([url, options]) => { window.client = new wsq.Client(url, options);"
        " await client.ready() }",
        [server.url, options],
    )


async def test_browser_adds_blob_uint8array_and_readablestream_for_a_python_worker(
    page: Page, server: wsq.Server, python: wsq.Client
) -> None:
    await setup(page, server)
    seen: dict[str, Any] = {}

    async def handler(task: wsq.Task) -> None:
        data = task.data
        seen[task.id] = {
            "name": data["name"],
            "small": await data["small"].read(),
            "blob": sha(await data["blob"].read()),
            "bytes": sha(await data["parts"][0].read()),
            "stream": sha(await data["parts"][1].read()),
        }

    python.queue("from-browser").process(handler)
    added = await page.evaluate(
        """async () => {
          const blob = new Blob([pattern(3_000_000, 1)])
          const bytes = pattern(200_000, 2)
          const streamed = pattern(2_500_000, 3)
          const stream = new ReadableStream({ start (c) {
            for (let at = 0; at < streamed.length; at += 100_000) c.enqueue(streamed.slice(at, at + 100_000))
            c.close()
          } })
          const progress = []
          const task = await client.queue('from-browser').add(
            { name: 'clip', small: new Uint8Array([1, 2, 3]), blob, parts: [bytes, stream] },
            { timeout: 30000, retries: 2, onUploadProgress: (sent, total) => progress.push([sent, total]) })
          return { id: task.id, state: task.state, options: task.options, progress: progress.at(-1) }
        }"""
    )
    assert added["state"] == "waiting"
    assert added["options"] == {"timeout": 30000, "retries": 2, "autoremove": False}
    assert added["progress"][0] == 3_000_000 + 200_000 + 2_500_000  # sent; total unknown
    await eventually(lambda: added["id"] in seen)
    assert seen[added["id"]] == {
        "name": "clip",
        "small": b"\x01\x02\x03",
        "blob": sha(pattern(3_000_000, 1)),
        "bytes": sha(pattern(200_000, 2)),
        "stream": sha(pattern(2_500_000, 3)),
    }


async def test_browser_worker_reads_python_streams_and_reports(
    page: Page, server: wsq.Server, python: wsq.Client
) -> None:
    await setup(page, server)
    await page.evaluate(
        """() => {
          window.done = []
          window.worker = client.queue('to-browser').process(async (task) => {
            await task.updateProgress(0.5)
            const video = await readAll(task.data.video)
            const inline = await readAll(task.data.thumb)
            done.push({ id: task.id, n: task.data.n, video: await sha256(video),
                        size: video.byteLength, inline: Array.from(inline), run: task.run })
          }, { concurrency: 2 })
        }"""
    )
    video = os.urandom(5_000_000)
    progress: list[float] = []
    queue = python.queue("to-browser")
    queue.on("task progress", lambda task, value: progress.append(value))
    task = await queue.add({"n": 7, "video": video, "thumb": b"\x09\x08"})
    done = await eventually(lambda: page.evaluate("() => done.length && done"))
    assert done == [
        {"id": task.id, "n": 7, "video": sha(video), "size": 5_000_000, "inline": [9, 8],
         "run": 1}
    ]  # fmt: skip
    await eventually(lambda: completed_count_is_one(queue))
    assert progress == [0.5]


async def completed_count_is_one(queue: wsq.Queue) -> bool:
    return len(await queue.completed()) == 1


async def test_handler_errors_fail_the_task_and_retry_and_remove_work(
    page: Page, server: wsq.Server, python: wsq.Client
) -> None:
    await setup(page, server)
    task = await python.queue("failing").add({"n": 1})
    await page.evaluate(
        """async () => {
          window.worker = client.queue('failing').process(async () => { throw new Error('no codec') })
        }"""
    )
    await eventually(lambda: python.queue("failing").failed())
    result = await page.evaluate(
        """async () => {
          await worker.stop()
          const [failed] = await client.queue('failing').failed()
          const before = { state: failed.state, error: failed.error, retries: failed.retries }
          await failed.retry()
          const waiting = (await client.queue('failing').waiting()).map(t => t.id)
          await failed.remove()
          const all = await client.queue('failing').all()
          return { before, waiting, left: all.length, id: failed.id }
        }"""
    )
    assert result == {
        "before": {"state": "failed", "error": "no codec", "retries": 1},
        "waiting": [task.id],
        "left": 0,
        "id": task.id,
    }


async def test_events_on_client_queue_task_and_event_stream(
    page: Page, server: wsq.Server, python: wsq.Client
) -> None:
    await setup(page, server)
    await page.evaluate(
        """async () => {
          window.seen = { client: [], queue: [], task: [], stream: [] }
          client.on('task completed', (task) => seen.client.push(['completed', task.queue]))
          client.queue('ev').on('task added', (task) => seen.queue.push(['added', task.id]))
          const reader = client.getEventStream().getReader()
          ;(async () => { while (true) { const { value, done } = await reader.read(); if (done) break;
                                          seen.stream.push(value.event) } })()
          await new Promise(r => setTimeout(r, 100))  // subscriptions land
          const task = await client.queue('ev').add({ n: 1 })
          task.on('progress', (t, value) => seen.task.push(['progress', value]))
          task.on('completed', (t) => seen.task.push(['completed', t.state]))
          window.taskId = task.id
        }"""
    )

    async def handler(task: wsq.Task) -> None:
        await asyncio.sleep(0.2)  # the page's task listeners are in place
        await task.update_progress(0.25)

    python.queue("ev").process(handler)
    seen = await eventually(
        lambda: page.evaluate("() => seen.task.length === 2 && seen.client.length && seen")
    )
    task_id = await page.evaluate("() => taskId")
    assert seen["task"] == [["progress", 0.25], ["completed", "completed"]]
    assert seen["client"] == [["completed", "ev"]]
    assert seen["queue"] == [["added", task_id]]
    assert {"task added", "task started", "task progress", "task completed"} <= set(seen["stream"])


async def test_get_data_and_list_queues_from_the_browser(
    page: Page, server: wsq.Server, python: wsq.Client
) -> None:
    blob = os.urandom(300_000)
    task = await python.queue("stored").add({"meta": {"title": "x"}, "file": blob})
    await setup(page, server)
    got = await page.evaluate(
        """async (id) => {
          const [task] = await client.queue('stored').all()
          const data = await task.getData()
          const queues = (await client.listQueues()).map(q => q.name)
          const first = await client.queue('stored').all({ limit: 1 })
          return { id: task.id, title: data.meta.title, file: await sha256(await readAll(data.file)),
                   queues, paged: [first.length, first.cursor] }
        }""",
        task.id,
    )
    assert got == {"id": task.id, "title": "x", "file": sha(blob), "queues": ["stored"],
                   "paged": [1, None]}  # fmt: skip


async def test_streams_of_a_lost_connection_fail_at_once_in_the_browser(
    page: Page, server: wsq.Server, python: wsq.Client
) -> None:
    """Issue 9 §1 in the browser: a ReadableStream from getData() whose connection drops
    errors with 'Lost connection.', whether its read started before the drop or not."""
    await python.queue("drop").add({"video": os.urandom(20_000_000)})  # > a credit window
    await setup(page, server)
    result = await page.evaluate(
        """async () => {
          const [task] = await client.queue('drop').all()
          const started = (await task.getData()).video.getReader()
          await started.read()
          const unread = (await task.getData()).video
          const dropped = new Promise((resolve) => client.once('disconnect', resolve))
          client._socket.close()  // the connection drops (the client connects again)
          await dropped
          const outcome = (p) => p.then(() => 'read on', (e) => e.message)
          return [await outcome(started.read()), await outcome(unread.getReader().read())]
        }"""
    )
    assert result == ["Lost connection.", "Lost connection."]


async def test_a_token_is_sent_in_the_hello(browser: Browser, tmp_path: Path) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text('[tokens.page]\ntoken = "page-token-0123456789"\nproduce = ["*"]\n')
    async with wsq.Server(data_dir=tmp_path / "data", port=0, auth=auth) as server:
        page = await open_page(browser, server.url)
        result = await page.evaluate(
            """async (url) => {
              const good = new wsq.Client(url, { token: 'page-token-0123456789' })
              const task = await good.queue('q').add({ n: 1 })
              good.close()
              const bad = new wsq.Client(url, { token: 'wrong-token-0123456789' })
              const refused = await bad.ready().then(() => 'connected', (e) => e.code)
              let forbidden = null
              const viewer = new wsq.Client(url, { token: 'page-token-0123456789' })
              try { await viewer.queue('q').all() } catch (e) { forbidden = e.code }
              viewer.close()
              return { state: task.state, refused, forbidden }
            }""",
            server.url,
        )
        assert result == {"state": "waiting", "refused": "unauthorized", "forbidden": "forbidden"}
        await page.close()


async def test_reconnects_after_a_server_restart(browser: Browser, data_dir: Path) -> None:
    proc = await ServerProcess(data_dir, None, "--heartbeat-interval", "0.5").start()
    try:
        page = await open_page(browser, proc.url)
        await page.evaluate(
            """async (url) => {
              window.events = []
              window.client = new wsq.Client(url, { backoff: () => 100 })
              client.on('connect', () => events.push('connect'))
              client.on('disconnect', () => events.push('disconnect'))
              await client.ready()
              await client.queue('r').add({ n: 1 })
            }""",
            proc.url,
        )
        proc.kill()
        await eventually(lambda: page.evaluate("() => events.includes('disconnect')"))
        # A request made while the server is down waits for the reconnect.
        pending = asyncio.ensure_future(
            page.evaluate("async () => (await client.queue('r').add({ n: 2 })).state")
        )
        await asyncio.sleep(0.3)
        await proc.start()
        assert await asyncio.wait_for(pending, budget(15)) == "waiting"
        assert await page.evaluate("() => events") == ["connect", "disconnect", "connect"]
        assert await page.evaluate("async () => (await client.queue('r').all()).length") == 2
        await page.close()
    finally:
        proc.stop()


async def test_the_server_serves_the_client_with_its_types(server: wsq.Server) -> None:
    import urllib.request

    base = http_url(server.url)
    reply = await asyncio.to_thread(urllib.request.urlopen, base + "/wsq.js")
    assert reply.headers["Content-Type"].startswith("text/javascript")
    assert reply.headers["Access-Control-Allow-Origin"] == "*"
    body = reply.read()
    assert b"export { Client }" in body
    # No dependencies and no build: every module it imports, and theirs, is one of its own
    # files, served beside it (the header comment shows an import for pages).
    modules = {"/wsq.js": body}
    pending = ["/wsq.js"]
    while pending:
        for name in re.findall(rb"(?:from|import\() *'\./([\w./-]+)'", modules[pending.pop()]):
            path = "/lib/" + name.decode().removeprefix("lib/")
            if path not in modules:
                reply = await asyncio.to_thread(urllib.request.urlopen, base + path)
                assert reply.headers["Content-Type"].startswith("text/javascript")
                modules[path] = reply.read()
                pending.append(path)
    assert {"/lib/client.js", "/lib/platform.js", "/lib/browser.js"} <= set(modules)
    # Node's modules are reached at run time (process.getBuiltinModule), never imported.
    bare = rb"^(?:import|export)\b[^'\n]*from *'(?!\./)"
    assert not [path for path, text in modules.items() if re.search(bare, text, re.M)]
    types = await asyncio.to_thread(urllib.request.urlopen, base + "/wsq.d.ts")
    assert b"export class Client" in types.read()


async def test_a_large_picked_file_uploads_with_bounded_memory_and_progress(
    browser: Browser, server: wsq.Server, python: wsq.Client, tmp_path: Path
) -> None:
    """1 GiB from an <input type=file>: the page reads it a slice at a time, so its heap
    stays small; progress is reported all along; the bytes arrive intact."""
    size = 1 << 30
    path = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for i in range(size >> 20):
            chunk = block[i % 997 :] + block[: i % 997]  # no two neighbours alike
            file.write(chunk)
            digest.update(chunk)
    page = await open_page(browser, server.url)
    await page.evaluate(HASHING)
    await page.set_content('<input type="file" id="pick">')
    await page.evaluate("async () => { window.wsq = await import('/wsq.js') }")
    await page.set_input_files("#pick", str(path))
    result = await page.evaluate(
        """async ([url]) => {
          const client = new wsq.Client(url)
          const file = document.querySelector('#pick').files[0]
          const reports = []
          let heap = 0
          const started = performance.now()
          const task = await client.queue('big').add({ file }, {
            onUploadProgress: (sent, total) => {
              reports.push(sent / total)
              heap = Math.max(heap, performance.memory ? performance.memory.usedJSHeapSize : 0)
            } })
          const seconds = (performance.now() - started) / 1000
          client.close()
          return { id: task.id, reports: reports.length, last: reports.at(-1), heap, seconds }
        }""",
        [server.url],
    )
    print(f"1 GiB from the page in {result['seconds']:.1f} s, heap peak {result['heap'] >> 20} MiB")
    assert result["last"] == 1.0 and result["reports"] >= 1000  # one per 1 MiB chunk
    # Bounded: garbage the collector has not reclaimed yet counts too (about 80 MiB seen
    # here), but nothing near the 1 GiB file.
    assert 0 < result["heap"] < 160 << 20, f"page heap peaked at {result['heap'] >> 20} MiB"
    (task,) = await python.queue("big").waiting()
    stream = (await task.get_data())["file"]
    assert stream.size == size
    received = hashlib.sha256()
    async for chunk in stream:
        received.update(chunk)
    assert received.hexdigest() == digest.hexdigest()
    await page.close()


async def test_the_browser_connects_over_tls(browser: Browser, tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    async with wsq.Server(data_dir=tmp_path / "data", port=0, ssl=context) as server:
        assert server.url.startswith("wss://")
        # The test's CA is not in chromium's store: this context trusts any certificate.
        tls_context = await browser.new_context(ignore_https_errors=True)
        page = await tls_context.new_page()
        await page.goto(http_url(server.url) + "/health")
        assert page.url.startswith("https://")
        state = await page.evaluate(
            """async (url) => {
              const { Client } = await import('/wsq.js')
              const client = new Client(url)
              const task = await client.queue('tls').add({ n: 1 })
              client.close()
              return task.state
            }""",
            server.url,
        )
        assert state == "waiting"
        await tls_context.close()
