"""GET /metrics, /health and /ready, and the history op, against real servers."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import wsq
from tests.conftest import budget, eventually
from tests.integration.rawclient import RawClient
from wsq.blobs.files import FileBlobStore
from wsq.blobs.memory import MemoryBlobStore
from wsq.core.task import Task
from wsq.server import metrics as metrics_module
from wsq.storage.memory import MemoryStateStore

BLOB = b"x" * 200_000  # over the inline limit: uploaded and downloaded as a stream


def http_url(server: wsq.Server, path: str) -> str:
    return server.url.replace("ws://", "http://") + path


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET, errors included."""

    def get() -> tuple[int, bytes]:
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=budget(10)) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return await asyncio.to_thread(get)


async def scrape(server: wsq.Server, **headers: str) -> dict[tuple[str, tuple[Any, ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value. With a shared store the
    task counts are read from it once a second: read them now, as the next second would."""
    if server.store.shared:
        await server._refresh_counts()
    status, body = await http_get(http_url(server, "/metrics"), headers)
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[Any, ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_what_was_done(server: wsq.Server, client: wsq.Client) -> None:
    queue = client.queue("m")
    for n in range(5):
        await queue.add({"n": n}, retries=1 if n == 4 else 0)
    await queue.add({"n": 5, "blob": BLOB})
    await client.queue("m-idle").add(None)  # never worked on: waiting
    attempts: dict[int, int] = {}

    async def handler(task: wsq.Task) -> None:
        n = task.data["n"]
        attempts[n] = attempts.get(n, 0) + 1
        if n == 5:
            assert await task.data["blob"].read() == BLOB
        if n >= 3 and n != 5:
            raise ValueError("no")

    worker = queue.process(handler, concurrency=2)
    await eventually(lambda: len(attempts) == 6 and attempts[4] == 2)
    await eventually(lambda: queue.failed())
    await eventually(lambda: _failed_count(queue, 2))
    samples = await scrape(server)

    assert value(samples, "wsq_tasks_added_total", queue="m") == 6
    assert value(samples, "wsq_tasks_added_total", queue="m-idle") == 1
    assert value(samples, "wsq_tasks_started_total", queue="m") == 7  # 6 + one retry
    assert value(samples, "wsq_tasks_completed_total", queue="m") == 4
    assert value(samples, "wsq_tasks_failed_total", queue="m") == 2
    assert value(samples, "wsq_tasks_retried_total", queue="m") == 1
    assert value(samples, "wsq_tasks_timed_out_total", queue="m") == 0
    assert value(samples, "wsq_tasks", queue="m", state="completed") == 4
    assert value(samples, "wsq_tasks", queue="m", state="failed") == 2
    assert value(samples, "wsq_tasks", queue="m", state="waiting") == 0
    assert value(samples, "wsq_tasks", queue="m-idle", state="waiting") == 1
    assert value(samples, "wsq_task_wait_seconds_count", queue="m") == 7
    assert value(samples, "wsq_task_wait_seconds_bucket", queue="m", le="+Inf") == 7
    assert value(samples, "wsq_task_run_seconds_count", queue="m") == 7
    assert value(samples, "wsq_task_run_seconds_sum", queue="m") > 0
    assert value(samples, "wsq_workers", queue="m") == 1
    assert value(samples, "wsq_connections") == 1
    assert value(samples, "wsq_stream_received_bytes_total") == len(BLOB)
    assert value(samples, "wsq_stream_sent_bytes_total") == len(BLOB)
    assert value(samples, "wsq_store_commit_seconds_count") > 0
    assert "process_cpu_seconds_total" in {name for name, _ in samples}
    await worker.stop()

    async def no_workers() -> bool:  # a scrape may be up to a second old (RENDER_REUSE)
        return value(await scrape(server), "wsq_workers", queue="m") == 0

    await eventually(no_workers)
    await eventually(lambda: _loop_lag_measured(server), timeout=5)


async def test_a_scrape_is_rendered_at_most_once_a_second(
    server: wsq.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendering costs the event loop time per labelled queue: scrapes asked for in a burst
    share one rendering."""
    renders = 0
    real = metrics_module.generate_latest

    def counting(registry: Any) -> bytes:
        nonlocal renders
        renders += 1
        return real(registry)

    monkeypatch.setattr(metrics_module, "generate_latest", counting)
    bodies = [server.metrics.render(now=100.0 + n / 10) for n in range(10)]
    assert renders == 1 and len(set(bodies)) == 1
    server.metrics.render(now=101.5)
    assert renders == 2
    for _ in range(20):
        await scrape(server)
    assert renders <= 4  # the burst took at most a second or two here


async def _completed_count(queue: wsq.Queue, n: int) -> bool:
    return len(await queue.completed()) == n


async def _failed_count(queue: wsq.Queue, n: int) -> bool:
    return len(await queue.failed()) == n


async def _loop_lag_measured(server: wsq.Server) -> bool:
    return value(await scrape(server), "wsq_event_loop_lag_seconds_count") > 0


async def test_timeouts_are_counted(server: wsq.Server, client: wsq.Client) -> None:
    queue = client.queue("slow")
    await queue.add(None, timeout=0.2)

    async def handler(task: wsq.Task) -> None:
        await asyncio.sleep(budget(5))

    worker = queue.process(handler)
    await eventually(lambda: _failed_count(queue, 1))
    samples = await scrape(server)
    assert value(samples, "wsq_tasks_timed_out_total", queue="slow") == 1
    assert value(samples, "wsq_tasks_failed_total", queue="slow") == 1
    await worker.stop()


async def test_queue_labels_are_bounded(data_dir: Path) -> None:
    async with (
        wsq.Server(data_dir=data_dir, port=0, metrics_max_queues=2) as server,
        wsq.Client(server.url) as client,
    ):
        for name in ("a", "b", "c", "d", "_other"):
            await client.queue(name).add(None)
        samples = await scrape(server)
    labelled = {dict(labels).get("queue") for name, labels in samples if name.startswith("wsq_")}
    assert labelled - {None} == {"a", "b", "_other"}
    assert value(samples, "wsq_tasks_added_total", queue="_other") == 3
    assert value(samples, "wsq_tasks", queue="_other", state="waiting") == 3


async def test_two_servers_in_one_process_keep_their_own_metrics(tmp_path: Path) -> None:
    async with (
        wsq.Server(data_dir=tmp_path / "one", port=0) as one,
        wsq.Server(data_dir=tmp_path / "two", port=0) as two,
        wsq.Client(one.url) as client,
    ):
        await client.queue("q").add(None)
        assert value(await scrape(one), "wsq_tasks_added_total", queue="q") == 1
        assert value(await scrape(two), "wsq_tasks_added_total", queue="q") == 0


# -- auth ------------------------------------------------------------------------------

SCRAPER = "scraper-token-0123456789"
OBSERVER = "observer-token-0123456789"
ADMIN = "admin-token-0123456789abc"
SOME_ADMIN = "some-admin-token-0123456789"
AUTH = f"""
[tokens.prometheus]
token = "{SCRAPER}"
metrics = true

[tokens.watcher]
token = "{OBSERVER}"
observe = ["*"]

[tokens.ops]
token = "{ADMIN}"
admin = ["*"]

[tokens.team]
token = "{SOME_ADMIN}"
admin = ["team-*"]
"""


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[wsq.Server]:
    auth = tmp_path / "auth.toml"
    auth.write_text(AUTH)
    async with wsq.Server(data_dir=tmp_path / "data", port=0, auth=auth) as server:
        yield server


async def test_metrics_need_the_metrics_role(secured: wsq.Server) -> None:
    url = http_url(secured, "/metrics")
    status, _ = await http_get(url)
    assert status == 401
    for token in ("wrong-token-0123456789", OBSERVER, SOME_ADMIN):
        status, body = await http_get(url, {"Authorization": f"Bearer {token}"})
        assert status == (401 if token.startswith("wrong") else 403), (token, body)
    status, _ = await http_get(f"{url}?token={OBSERVER}")
    assert status == 403
    for token in (SCRAPER, ADMIN):
        status, body = await http_get(url, {"Authorization": f"Bearer {token}"})
        assert status == 200 and b"wsq_connections" in body
    status, body = await http_get(f"{url}?token={SCRAPER}")
    assert status == 200 and b"wsq_connections" in body
    # /health and /ready stay open: probes carry no token.
    assert (await http_get(http_url(secured, "/health")))[0] == 200
    assert (await http_get(http_url(secured, "/ready")))[0] == 200


async def test_the_metrics_role_grants_nothing_on_queues(secured: wsq.Server) -> None:
    async with RawClient(secured.url, token=SCRAPER) as raw:
        answer = await raw.request({"op": "history", "queue": "q"})
        assert answer["code"] == "forbidden"
        answer = await raw.request({"op": "stats"})
        assert answer["result"] == {"queues": [], "cursor": None}


async def test_history_needs_observe_on_the_queue(secured: wsq.Server) -> None:
    async with RawClient(secured.url, token=SOME_ADMIN) as raw:
        assert (await raw.request({"op": "history", "queue": "team-a"}))["op"] == "result"
        answer = await raw.request({"op": "history", "queue": "other"})
        assert answer["code"] == "forbidden"


# -- health and readiness --------------------------------------------------------------


async def test_health_and_ready(server: wsq.Server) -> None:
    assert await http_get(http_url(server, "/health")) == (200, b"ok\n")
    status, body = await http_get(http_url(server, "/ready"))
    assert (status, json.loads(body)) == (200, {"ready": True})


async def test_ready_follows_the_blob_store_folder(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    server = wsq.Server(data_dir=tmp_path / "data", port=0, blob_store=FileBlobStore(blobs))
    server.readiness.interval = 0.05
    async with server:
        assert (await http_get(http_url(server, "/ready")))[0] == 200
        shutil.move(blobs, tmp_path / "moved")
        blobs.write_text("not a folder")
        body = await eventually(lambda: _not_ready(server))
        assert body == {"ready": False, "reason": "The blob store is unreachable."}
        assert (await http_get(http_url(server, "/health")))[0] == 200
        blobs.unlink()
        shutil.move(tmp_path / "moved", blobs)
        await eventually(lambda: _ready(server))


class BrokenStore(MemoryStateStore):
    """The memory store, with reads that fail or hang while told to."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.hanging = False

    async def get(self, task_id: str) -> Task | None:
        if self.failing:
            raise OSError("connection refused")
        if self.hanging:
            await asyncio.sleep(3600)
        return await super().get(task_id)


async def test_ready_follows_the_state_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsq.server")
    store = BrokenStore()
    # Memory stores answer at once, so the short timeout holds on a loaded machine too.
    blobs = MemoryBlobStore()
    server = wsq.Server(data_dir=tmp_path, port=0, state_store=store, blob_store=blobs)
    server.readiness.interval = 0.05
    server.readiness.timeout = 0.2
    async with server:
        assert (await http_get(http_url(server, "/ready")))[0] == 200
        store.failing = True
        body = await eventually(lambda: _not_ready(server))
        assert body == {"ready": False, "reason": "The state store is unreachable."}
        store.failing = False
        await eventually(lambda: _ready(server))
        actions = [getattr(r, "action", None) for r in caplog.records]
        assert actions.count("not ready") == 1 and actions.count("ready") == 1
        warning = next(r for r in caplog.records if getattr(r, "action", None) == "not ready")
        assert "connection refused" in warning.getMessage()  # the cause, in the log only
        store.hanging = True
        body = await eventually(lambda: _not_ready(server))
        assert body["reason"] == "The state store did not answer within 0.2 s."
        store.hanging = False
        await eventually(lambda: _ready(server))


async def _not_ready(server: wsq.Server) -> Any:
    status, body = await http_get(http_url(server, "/ready"))
    return json.loads(body) if status == 503 else None


async def _ready(server: wsq.Server) -> bool:
    return (await http_get(http_url(server, "/ready")))[0] == 200


# -- history ---------------------------------------------------------------------------


async def test_history_through_the_client(server: wsq.Server, client: wsq.Client) -> None:
    queue = client.queue("h")
    before = time.time()
    await queue.add_many([{"n": n} for n in range(7)])
    await queue.add({"n": 7})
    done = 0

    async def handler(task: wsq.Task) -> None:
        nonlocal done
        done += 1
        if task.data["n"] == 0:
            raise ValueError("no")

    worker = queue.process(handler, concurrency=4)
    await eventually(lambda: done == 8)
    await eventually(lambda: _failed_count(queue, 1))
    history = await client.history("h")
    assert history["queue"] == "h"
    assert history["end"] - history["start"] == 3599
    assert history["end"] >= int(before)
    assert sum(history["added"]) == 8
    assert sum(history["completed"]) == 7
    assert sum(history["failed"]) == 1
    started = [x for x in history["latency"] if x is not None]
    assert started and all(x >= 0 for x in started)
    await worker.stop()
    await queue.add({"n": 8})
    # The waiting depth is sampled about once a second.
    await eventually(lambda: _waiting_sampled(client, 1))
    recent = await client.history("h", since=time.time() - 1)
    assert recent["end"] - recent["start"] <= 2
    assert len(recent["added"]) == recent["end"] - recent["start"] + 1


async def _waiting_sampled(client: wsq.Client, depth: int) -> bool:
    history = await client.history("h", since=time.time() - 2)
    return depth in history["waiting"]


async def test_history_refuses_bad_input(server: wsq.Server) -> None:
    async with RawClient(server.url) as raw:
        for bad in (
            {"op": "history"},
            {"op": "history", "queue": 5},
            {"op": "history", "queue": ""},
            {"op": "history", "queue": "q", "since": "yesterday"},
            {"op": "history", "queue": "q", "since": -5},
            {"op": "history", "queue": "q", "since": 1e300},
            {"op": "history", "queue": "q", "since": None, "until": 1},
            {"op": "history", "queue": ["q"]},
        ):
            answer = await raw.request(bad)
            assert answer["op"] == "error" and answer["code"] == "bad_message", bad
        unknown = (await raw.request({"op": "history", "queue": "never-used"}))["result"]
        assert len(unknown["added"]) == 3600 and not any(unknown["added"])
        assert set(unknown["waiting"]) == {None}
        future = (await raw.request({"op": "history", "queue": "q", "since": 2**53}))["result"]
        assert future["added"] == [] and future["start"] == future["end"] + 1
        past = (await raw.request({"op": "history", "queue": "q", "since": 0}))["result"]
        assert len(past["added"]) == 3600
        # The connection goes on.
        assert (await raw.request({"op": "ping"}))["op"] == "result"


async def test_the_grafana_dashboard_uses_only_metrics_the_server_has(
    server: wsq.Server, client: wsq.Client
) -> None:
    await client.queue("g").add(None)
    worker = client.queue("g").process(lambda task: None)
    await eventually(lambda: _completed_count(client.queue("g"), 1))
    exposed = {name for name, _ in await scrape(server)}
    await worker.stop()
    dashboard = json.loads((Path(__file__).parents[2] / "docs/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\b(?:wsq|process)_[a-z_]+", expr)}
    assert used and used <= exposed, used - exposed
    variables = [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert all(re.search(r"\bwsq_[a-z_]+", v).group() in exposed for v in variables)  # type: ignore[union-attr]
