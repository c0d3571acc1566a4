"""Access control (auth files, roles), allowed origins and TLS, against real servers."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import wsq
from tests.conftest import budget, count_pattern_matches, eventually
from tests.integration.rawclient import RawClient
from wsq import protocol
from wsq.blobs.memory import MemoryBlobStore, MemoryBlobWriter
from wsq.exceptions import ServerError
from wsq.server.auth import Authenticator, AuthFileError, hash_token
from wsq.storage.memory import MemoryStateStore

PRODUCER = "producer-token-0123456789"
WORKER = "worker-token-0123456789"
OBSERVER = "observer-token-0123456789"
ADMIN = "admin-token-0123456789abc"
HASHED = "hashed-token-0123456789"
OTHER_PRODUCER = "other-producer-token-012345"

AUTH_TOML = f"""
[tokens.uploader]
token = "{PRODUCER}"
produce = ["videos", "thumbs-*"]

[tokens.other]
token = "{OTHER_PRODUCER}"
produce = ["videos"]

[tokens.encoder]
token = "{WORKER}"
work = ["videos"]

[tokens.watcher]
token = "{OBSERVER}"
observe = ["videos"]

[tokens.ops]
token = "{ADMIN}"
admin = ["*"]

[tokens.hashed]
sha256 = "{hash_token(HASHED)}"
observe = ["*"]
"""


def fast(url: str, token: str | None, **kwargs: Any) -> wsq.Client:
    return wsq.Client(url, backoff=lambda tries: 0.05, token=token, **kwargs)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[wsq.Server]:
    auth = tmp_path / "auth.toml"
    auth.write_text(AUTH_TOML)
    async with wsq.Server(data_dir=tmp_path / "data", port=0, auth=auth) as server:
        yield server


# -- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "not-a-known-token-at-all"])
async def test_a_connection_without_a_valid_token_is_refused(
    secured: wsq.Server, token: str | None
) -> None:
    client = fast(secured.url, token)
    with pytest.raises(wsq.WsqError, match=r"token is required|valid token"):
        await asyncio.wait_for(client.connect(), budget(5))
    await client.close()
    async with RawClient(secured.url, hello=False) as raw:
        await raw.send({"op": "hello", "protocol": 1, **({"token": token} if token else {})})
        error = await raw.expect("error")
        assert error["code"] == "unauthorized"
        assert raw.ws is not None
        await asyncio.wait_for(raw.ws.wait_closed(), budget(5))
        assert raw.ws.close_code == 1008


async def test_a_hashed_token_is_accepted(secured: wsq.Server) -> None:
    async with fast(secured.url, HASHED) as client:
        assert [q.name for q in await client.list_queues()] == []


async def test_tokens_are_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text(AUTH_TOML)
    caplog.set_level(logging.DEBUG)
    async with wsq.Server(data_dir=tmp_path / "data", port=0, auth=auth) as server:
        async with fast(server.url, PRODUCER) as client:
            await client.queue("videos").add({"n": 1})
        bad = fast(server.url, "wrong-token-but-long-enough")
        with pytest.raises(wsq.WsqError):
            await asyncio.wait_for(bad.connect(), budget(5))
        await bad.close()
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "uploader" in text  # the principal's name is logged...
    for token in (PRODUCER, "wrong-token-but-long-enough"):
        assert token not in text  # ...its token never


# -- roles ----------------------------------------------------------------------------------


async def test_produce_adds_only_to_its_queues_and_reads_only_its_own_tasks(
    secured: wsq.Server,
) -> None:
    async with (
        fast(secured.url, PRODUCER) as producer,
        fast(secured.url, OTHER_PRODUCER) as other,
    ):
        task = await producer.queue("videos").add({"n": 1, "blob": b"x" * 100_000})
        await producer.queue("thumbs-small").add({"n": 2})
        with pytest.raises(wsq.Forbidden, match="produce"):
            await producer.queue("billing").add({"n": 3})
        data = await task.get_data()
        assert data["n"] == 1 and await data["blob"].read() == b"x" * 100_000
        with pytest.raises(wsq.Forbidden):
            await producer.queue("videos").waiting()  # listing is observing
        stranger = wsq.Task(other, {"id": task.id, "queue": "videos"})
        with pytest.raises(wsq.TaskNotFound):  # as if it did not exist
            await stranger.get_data()
        with pytest.raises(wsq.Forbidden):
            await stranger.remove()


async def test_attempts_of_a_task_it_may_not_read_are_answered_as_not_found(
    secured: wsq.Server,
) -> None:
    async with fast(secured.url, PRODUCER) as producer:
        task = await producer.queue("videos").add({"n": 1})
        assert await producer.attempts(task.id) == []  # it added it: it may read it
    async with RawClient(secured.url, token=OTHER_PRODUCER) as raw:
        hidden = await raw.request({"op": "attempts", "task": task.id})
        missing = await raw.request({"op": "attempts", "task": "no-such-task"})
    del hidden["id"], missing["id"]
    assert hidden == {**missing, "message": missing["message"].replace("no-such-task", task.id)}
    assert hidden["code"] == "not_found"


async def test_work_processes_its_queue_and_nothing_else(secured: wsq.Server) -> None:
    async with (
        fast(secured.url, PRODUCER) as producer,
        fast(secured.url, WORKER) as worker_client,
    ):
        seen: list[Any] = []

        async def handler(task: wsq.Task) -> None:
            await task.update_progress(0.5)
            seen.append(await task.data["blob"].read())

        worker = worker_client.queue("videos").process(handler)
        task = await producer.queue("videos").add({"blob": b"y" * 70_000})
        await eventually(lambda: len(seen) == 1)
        assert seen == [b"y" * 70_000]
        await worker.stop()
        async with RawClient(secured.url, token=WORKER) as raw:
            refused = await raw.request({"op": "work", "queue": "thumbs-small"})
            assert refused["op"] == "error" and refused["code"] == "forbidden"
            refused = await raw.request({"op": "add", "queue": "videos", "data": {}})
            assert refused["code"] == "forbidden"
            got = await raw.request({"op": "get", "task": task.id})
            assert got["op"] == "result"  # a worker reads the tasks of its queue


async def test_only_the_same_principal_takes_a_worker_id_over(tmp_path: Path) -> None:
    auth = tmp_path / "auth.toml"
    auth.write_text(
        AUTH_TOML + f'[tokens.encoder2]\ntoken = "{WORKER}-second"\nwork = ["videos"]\n'
    )
    async with wsq.Server(data_dir=tmp_path / "data", port=0, auth=auth) as server:
        session = "one-client-session-0123"
        first = RawClient(server.url, token=WORKER, session=session)
        stranger = RawClient(server.url, token=f"{WORKER}-second", session=session)
        again = RawClient(server.url, token=WORKER, session=session)
        async with first, stranger, again:
            work = {"op": "work", "queue": "videos", "worker": "enc-1"}
            assert (await first.request(work))["op"] == "result"
            # Another principal's "enc-1" is a worker of its own (issue 10: worker ids
            # are scoped to their principal), not a takeover and not a clash.
            assert (await stranger.request(work))["result"] == {"worker": "enc-1"}
            assert (await again.request(work))["op"] == "result"
            keys = sorted(w for c in server.connections for w in server.core.workers_of(c))
            assert keys == ["encoder/enc-1", "encoder2/enc-1"]


async def test_a_task_id_of_another_principal_is_a_task_of_its_own(secured: wsq.Server) -> None:
    """Issue 10: a chosen task id is scoped to its principal (``<principal>/<id>``), as
    worker ids are. Another producer choosing the same id in the same queue gets a task
    of its own, and what it hears about the first principal's task id is exactly what it
    hears about an id nobody uses: adding is no existence oracle."""
    add = {"op": "add", "queue": "videos", "task": "job-1"}
    async with (
        RawClient(secured.url, token=PRODUCER) as alice,
        RawClient(secured.url, token=OTHER_PRODUCER) as bob,
    ):
        assert (alice.welcome["scope"], bob.welcome["scope"]) == ("uploader/", "other/")
        await alice.send({"op": "upload", "stream": 1})
        await alice.send(protocol.pack_chunk(1, b"a" * 100))
        await alice.send({"op": "upload_end", "stream": 1})
        streams = [{"path": ["blob"], "upload": 1}]
        first = await alice.request(
            {**add, "data": {"by": "alice", "blob": None}, "streams": streams}
        )
        assert first["result"]["id"] == "uploader/job-1", first
        second = await bob.request({**add, "data": {"by": "bob"}})
        assert second["result"]["id"] == "other/job-1", second  # no "already in use"
        got = await bob.request({"op": "get", "task": "other/job-1"})
        assert got["result"]["data"] == {"by": "bob"}
        got = await alice.request({"op": "get", "task": "uploader/job-1"})
        assert got["result"]["data"] == {"by": "alice", "blob": None}
        # Each principal adding its id again gets its own task back (§4.3), not the other's.
        assert (await bob.request({**add, "data": {}}))["result"]["id"] == "other/job-1"
        assert (await alice.request({**add, "data": {}}))["result"]["id"] == "uploader/job-1"
        # Bob about Alice's task, and about ids nobody uses (scoped or bare: a bare id is
        # never resolved to a scoped one), answers alike.
        theirs, unknown = "uploader/job-1", "uploader/no-such-job"
        for other_id in (unknown, "job-1"):
            for request in ({"op": "get"}, {"op": "remove"}, {"op": "retry"}):
                found = await bob.request({**request, "task": theirs})
                missing = await bob.request({**request, "task": other_id})
                assert _answer(found, theirs, other_id) == _answer(missing, theirs, other_id)
            answers = []
            for stream, task_id in ((7, theirs), (8, other_id)):
                await bob.send({"op": "download", "stream": stream, "task": task_id, "index": 0})
                answers.append(await bob.expect("stream_error"))
            assert answers[0]["code"] == "not_found"
            assert _answer(answers[0], theirs, other_id) == _answer(answers[1], theirs, other_id)
        assert (await bob.request({"op": "get", "task": "job-1"}))["code"] == "not_found"
        # Alice's task and its stream are untouched by all this.
        await alice.send({"op": "download", "stream": 9, "task": theirs, "index": 0})
        chunk = await alice.expect("_binary")
        assert protocol.unpack_chunk(chunk["frame"]) == (9, b"a" * 100)


async def test_add_many_scopes_chosen_ids_and_leaves_the_servers_own_bare(
    secured: wsq.Server,
) -> None:
    async with RawClient(secured.url, token=OTHER_PRODUCER) as bob:
        tasks = [{"task": "m-1", "data": 1}, {"data": 2}]
        answer = await bob.request({"op": "add_many", "queue": "videos", "tasks": tasks})
        chosen, made = answer["result"]["tasks"]
        assert chosen == "other/m-1"
        assert "/" not in made and len(made) == 32
        for task_id in (chosen, made):
            assert (await bob.request({"op": "get", "task": task_id}))["op"] == "result"
        # A "/" in a chosen id is refused: a client cannot name a place in another's space.
        refused = await bob.request({"op": "add", "queue": "videos", "task": "uploader/m-1"})
        assert refused["code"] == "bad_message" and "$.task" in refused["message"]


async def test_the_python_client_goes_by_the_scoped_id_the_server_answered(
    secured: wsq.Server,
) -> None:
    """The client sends the id it chose and from then on uses the id of the answer: its
    Task, the task's events, its streams, ``get_data``, ``remove``; add_many's too."""
    async with fast(secured.url, PRODUCER) as producer, fast(secured.url, ADMIN) as admin:
        mine = await producer.queue("videos").add({"blob": b"p" * 100_000}, id="clip-1")
        assert mine.id == "uploader/clip-1"
        assert (await producer.queue("videos").add({}, id="clip-1")).id == mine.id
        assert await (await mine.get_data())["blob"].read() == b"p" * 100_000
        many = await producer.queue("videos").add_many([{"n": 1}, {"n": 2}])
        assert all(t.id.startswith("uploader/") for t in many)
        # The admin may listen: its task's events reach the Task its add returned.
        queue = admin.queue("videos")
        task = await queue.add({"blob": b"v" * 100_000}, id="clip-1")
        assert task.id == "ops/clip-1"
        heard: list[tuple[str, str]] = []
        task.on("started", lambda t: heard.append(("started", t.id)))
        task.on("completed", lambda t: heard.append(("completed", t.id)))
        read: dict[str, bytes] = {}

        async def handler(running: wsq.Task) -> None:
            blob = running.data.get("blob")
            read[running.id] = await blob.read() if blob is not None else b""

        worker = queue.process(handler)
        await eventually(lambda: ("completed", task.id) in heard)
        await worker.stop()
        assert read["ops/clip-1"] == b"v" * 100_000
        assert read["uploader/clip-1"] == b"p" * 100_000
        assert heard[0] == ("started", "ops/clip-1")
        assert task.state == "completed"
        assert await (await task.get_data())["blob"].read() == b"v" * 100_000
        await task.remove()
        with pytest.raises(wsq.TaskNotFound):
            await task.get_data()


async def test_streams_of_scoped_tasks_are_stored_under_the_stores_own_keys(
    secured: wsq.Server,
) -> None:
    """A ``/`` in a task id reaches no path: blob keys are made by the store (32 hex
    digits, ``blobs/<2>/<key>``), never from the task id, so a scoped task's upload makes
    no folder of its principal or id, and reads back whole."""
    blobs = secured.data_dir / "blobs"
    before = {path for path in blobs.rglob("*") if path.is_dir()}
    async with fast(secured.url, PRODUCER) as producer:
        task = await producer.queue("videos").add({"blob": b"s" * 100_000}, id="..")
        assert task.id == "uploader/.."
        assert await (await task.get_data())["blob"].read() == b"s" * 100_000
    files = [path.relative_to(blobs) for path in blobs.rglob("*") if path.is_file()]
    stored = [path for path in files if path.parts[0] != "tmp" and len(path.parts) == 2]
    assert len(stored) == 1, files
    folder, key = stored[0].parts
    assert len(key) == 32 and set(key) <= set("0123456789abcdef") and folder == key[:2]
    made = {path for path in blobs.rglob("*") if path.is_dir()} - before
    assert made <= {blobs / folder}, made
    assert not any("uploader" in str(path) for path in blobs.rglob("*"))


async def test_an_own_task_id_stays_taken_when_its_task_is_out_of_reach(tmp_path: Path) -> None:
    """A principal whose earlier task it may no longer read (its role on that queue was
    taken away) still finds the id taken: the space is its own, so this tells it only of
    its own past add, never of another principal's; the task itself stays unreadable."""
    auth = tmp_path / "auth.toml"
    auth.write_text(AUTH_TOML)
    async with (
        wsq.Server(data_dir=tmp_path / "data", port=0, auth=auth) as server,
        RawClient(server.url, token=PRODUCER) as alice,
    ):
        added = await alice.request({"op": "add", "queue": "thumbs-a", "task": "mine"})
        assert added["result"]["id"] == "uploader/mine"
    auth.write_text(AUTH_TOML.replace('produce = ["videos", "thumbs-*"]', 'produce = ["videos"]'))
    async with (
        wsq.Server(data_dir=tmp_path / "data", port=0, auth=auth) as server,
        RawClient(server.url, token=PRODUCER) as alice,
    ):
        again = await alice.request({"op": "add", "queue": "videos", "task": "mine"})
        assert again["code"] == "invalid_argument" and "already in use" in again["message"]
        got = await alice.request({"op": "get", "task": "uploader/mine"})
        assert got["code"] == "not_found"


async def test_observe_lists_and_watches_only_its_queues(secured: wsq.Server) -> None:
    async with (
        fast(secured.url, PRODUCER) as producer,
        fast(secured.url, OBSERVER) as watcher,
    ):
        events: list[tuple[str, str]] = []
        watcher.on("task added", lambda task: events.append(("added", task.queue)))
        await asyncio.sleep(0.05)  # let the subscription land
        await producer.queue("thumbs-small").add({"n": 0})
        await producer.queue("videos").add({"n": 1})
        await eventually(lambda: ("added", "videos") in events)
        assert ("added", "thumbs-small") not in events
        assert [q.name for q in await watcher.list_queues()] == ["videos"]
        assert len(await watcher.queue("videos").waiting()) == 1
        with pytest.raises(wsq.Forbidden):
            await watcher.queue("thumbs-small").waiting()
        with pytest.raises(wsq.Forbidden):
            await watcher.queue("videos").add({"n": 2})
    async with RawClient(secured.url, token=OBSERVER) as raw:
        refused = await raw.request({"op": "subscribe", "queue": "thumbs-small"})
        assert refused["code"] == "forbidden"
        assert (await raw.request({"op": "subscribe", "queue": "videos"}))["op"] == "result"
        # Every queue: allowed, and filtered to the queues this token observes.
        assert (await raw.request({"op": "subscribe"}))["op"] == "result"


async def test_listings_cost_only_the_queues_a_token_may_see(
    secured: wsq.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``queues`` and ``stats`` for a token limited to a few patterns match only names under
    those patterns' literal heads: thousands of other queues cost no pattern matches."""
    async with RawClient(secured.url, token=ADMIN) as admin:
        for start in range(0, 3000, 500):
            batch = [
                {"op": "add", "id": n, "queue": f"other-{n}", "data": n}
                for n in range(start, start + 500)
            ]
            await admin.send(json.dumps(batch))
            for _ in range(500):
                assert (await admin.expect("result"))["op"] == "result"
    async with fast(secured.url, PRODUCER) as producer, fast(secured.url, OBSERVER) as watcher:
        await producer.queue("thumbs-small").add({"n": 0})
        await producer.queue("videos").add({"n": 1})
        matches = count_pattern_matches(monkeypatch)
        assert [q.name for q in await producer.list_queues()] == ["thumbs-small", "videos"]
        assert [q["name"] for q in await watcher.stats()] == ["videos"]
        assert matches() < 10


async def test_admin_removes_and_retries(secured: wsq.Server) -> None:
    async with (
        fast(secured.url, PRODUCER) as producer,
        fast(secured.url, ADMIN) as admin,
        fast(secured.url, OBSERVER) as watcher,
    ):
        task = await producer.queue("videos").add({"n": 1})
        as_watcher = wsq.Task(watcher, {"id": task.id, "queue": "videos"})
        with pytest.raises(wsq.Forbidden, match="admin"):
            await as_watcher.remove()
        as_admin = wsq.Task(admin, {"id": task.id, "queue": "videos"})
        await as_admin.remove()
        assert await admin.queue("videos").all() == []


# -- the auth file --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({}, "one table"),
        ({"tokens": {}}, "at least one"),
        ({"tokens": {"a b": {"token": "x" * 20, "work": ["q"]}}}, "principal name"),
        # A name heads its task ids (<principal>/<id>): none may start like a path.
        ({"tokens": {"..": {"token": "x" * 20, "work": ["q"]}}}, "starting with a letter"),
        ({"tokens": {"a": {"token": "short", "work": ["q"]}}}, "at least 16"),
        ({"tokens": {"a": {"work": ["q"]}}}, "exactly one"),
        ({"tokens": {"a": {"token": "x" * 20, "sha256": "0" * 64, "work": []}}}, "exactly one"),
        ({"tokens": {"a": {"sha256": "zz", "work": ["q"]}}}, "64 hex"),
        ({"tokens": {"a": {"token": "x" * 20}}}, "grants no role"),
        ({"tokens": {"a": {"token": "x" * 20, "work": [1]}}}, "patterns"),
        ({"tokens": {"a": {"token": "x" * 20, "write": ["q"]}}}, "unknown keys"),
        (
            {"tokens": {"a": {"token": "x" * 20, "work": ["q"]}, "b": {"token": "x" * 20}}},
            r"same token|grants no role",
        ),
    ],
)
def test_a_malformed_auth_file_is_refused_with_its_problem(document: Any, problem: str) -> None:
    with pytest.raises(AuthFileError, match=problem):
        Authenticator.from_mapping(document)


def test_yaml_auth_files_work_like_toml(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(f"tokens:\n  enc:\n    token: {WORKER}\n    work: [videos, 'img-*']\n")
    principal = Authenticator.load(path).authenticate(WORKER)
    assert principal is not None and principal.name == "enc"
    assert principal.may("work", "img-1") and not principal.may("observe", "img-1")
    assert Authenticator.load(path).authenticate(WORKER[:-1]) is None


def test_the_cli_refuses_a_broken_auth_file(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text('[tokens.a]\ntoken = "short"\nwork = ["q"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "wsq", "server", "--port", "0", "--auth-file", str(path)],
        capture_output=True,
        text=True,
        timeout=budget(30),
    )
    assert done.returncode == 2
    assert "at least 16" in done.stderr


# -- origins --------------------------------------------------------------------------------


async def test_pages_from_other_origins_are_refused_by_default(server: wsq.Server) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.url, origin="http://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    same = f"http://127.0.0.1:{server.port}"
    async with RawClient(server.url, origin=same) as raw:  # the server's own page
        assert raw.welcome["op"] == "welcome"
    async with RawClient(server.url) as raw:  # no Origin: not a browser
        assert raw.welcome["op"] == "welcome"


async def test_allowed_origins_admit_listed_pages(tmp_path: Path) -> None:
    async with wsq.Server(
        data_dir=tmp_path, port=0, allowed_origins=["https://app.example.com/"]
    ) as server:
        async with RawClient(server.url, origin="https://APP.example.com") as raw:
            assert raw.welcome["op"] == "welcome"
        with pytest.raises(InvalidStatus):
            await connect(server.url, origin="https://app.example.org")  # type: ignore[arg-type]


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_serves_wss_and_https(tmp_path: Path, ca: trustme.CA) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with wsq.Server(data_dir=tmp_path / "data", port=0, ssl=context) as server:
        assert server.url.startswith("wss://")
        async with fast(server.url, None, ca_file=ca_file) as client:
            queue = client.queue("tls")
            done = asyncio.Event()
            queue.process(lambda task: done.set())
            task = await queue.add({"blob": b"z" * 200_000})
            await asyncio.wait_for(done.wait(), budget(5))
            assert await (await task.get_data())["blob"].read() == b"z" * 200_000
        https = server.url.replace("wss://", "https://") + "/health"
        reply = await asyncio.to_thread(
            urllib.request.urlopen, https, context=ssl.create_default_context(cafile=ca_file)
        )
        assert reply.read() == b"ok\n"
        # Without the CA the certificate is not trusted: no connection.
        errors: list[BaseException] = []
        untrusting = fast(server.url, None)
        untrusting.on("error", errors.append)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(untrusting.connect(), 0.5)
        await untrusting.close()
        assert any(isinstance(e, ssl.SSLCertVerificationError) for e in errors)
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(urllib.request.urlopen, https)


async def _upgrade_status(port: int, host: str, origin: str | None) -> int:
    """The HTTP status a WebSocket upgrade with these headers gets (raw: any Host)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = [
        "GET / HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *([f"Origin: {origin}"] if origin is not None else []),
    ]
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode())
    status = await asyncio.wait_for(reader.readline(), budget(5))
    writer.close()
    return int(status.split()[1])


async def test_a_rebinding_page_cannot_connect_by_default(server: wsq.Server) -> None:
    port = server.port
    # A page on evil.example whose name now resolves to 127.0.0.1 sends its own name as
    # both Host and Origin: the server does not know that name as its own.
    for name in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example"):
        assert await _upgrade_status(port, f"{name}:{port}", f"http://{name}:{port}") == 403
    # Scheme and port are compared too.
    assert await _upgrade_status(port, f"127.0.0.1:{port}", f"https://127.0.0.1:{port}") == 403
    assert await _upgrade_status(port, f"127.0.0.1:{port}", "http://127.0.0.1:1") == 403
    assert await _upgrade_status(port, f"127.0.0.1:{port}", "null") == 403
    # The server's own pages: its address and loopback names; and non-browsers.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert await _upgrade_status(port, host, f"http://{host}") == 101
    assert await _upgrade_status(port, "anything.example", None) == 101


async def test_server_names_admit_pages_under_those_names(tmp_path: Path) -> None:
    async with wsq.Server(data_dir=tmp_path, port=0, server_names=["queue.internal"]) as server:
        host = f"queue.internal:{server.port}"
        assert await _upgrade_status(server.port, host, f"http://{host}") == 101
        other = f"queue.other:{server.port}"
        assert await _upgrade_status(server.port, other, f"http://{other}") == 403


async def test_a_wildcard_bind_knows_ip_literals_but_not_names(tmp_path: Path) -> None:
    async with wsq.Server(data_dir=tmp_path, host="0.0.0.0", port=0) as server:
        host = f"127.0.0.1:{server.port}"
        assert await _upgrade_status(server.port, host, f"http://{host}") == 101
        host = f"evil.example:{server.port}"
        assert await _upgrade_status(server.port, host, f"http://{host}") == 403


async def test_dashboard_pages_cannot_be_framed(server: wsq.Server) -> None:
    base = server.url.replace("ws://", "http://")
    for path in ("/", "/wsq.js", "/health", "/nothing-here"):
        try:
            reply = await asyncio.to_thread(urllib.request.urlopen, base + path)
            headers = reply.headers
        except urllib.error.HTTPError as error:
            headers = error.headers
        assert headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert headers["X-Content-Type-Options"] == "nosniff", path


# -- existence oracles ----------------------------------------------------------------------


def _answer(message: dict[str, Any], task_id: str, unknown: str) -> tuple[Any, ...]:
    """An answer with the task id replaced, so answers about two ids compare."""
    text = str(message.get("message", "")).replace(task_id, "ID").replace(unknown, "ID")
    return (message["op"], message.get("code"), text)


def _naming(request: dict[str, Any], task_id: str) -> dict[str, Any]:
    if "runs" in request:
        return {**request, "runs": [[task_id, 1]]}
    return {**request, "task": task_id}


async def test_tasks_a_token_may_not_read_look_like_missing_ones(secured: wsq.Server) -> None:
    async with fast(secured.url, PRODUCER) as producer, fast(secured.url, ADMIN) as admin:
        secret = await producer.queue("thumbs-small").add({"blob": b"s" * 70_000})
        admin.queue("thumbs-small").process(lambda task: asyncio.sleep(30))
        await eventually(lambda: admin.queue("thumbs-small").active())
    unknown = "no-such-task-0123456789abcdef"
    async with (
        RawClient(secured.url, token=OBSERVER) as watcher,
        RawClient(secured.url, token=WORKER) as worker,
        RawClient(secured.url, token=OTHER_PRODUCER) as other,
    ):
        for raw in (watcher, worker, other):
            for request in (
                {"op": "get"},
                {"op": "remove"},
                {"op": "retry"},
                {"op": "progress", "run": 1, "progress": 0.5},
                {"op": "touch", "run": 1},
                {"op": "complete", "run": 1},
                {"op": "fail", "run": 1, "error": "x"},
                {"op": "complete_many", "runs": [["TASK", 1]]},
            ):
                found = await raw.request(_naming(request, secret.id))
                missing = await raw.request(_naming(request, unknown))
                assert _answer(found, secret.id, unknown) == _answer(missing, secret.id, unknown)
            answers = []
            for stream, task_id in ((1, secret.id), (2, unknown)):
                await raw.send({"op": "download", "stream": stream, "task": task_id, "index": 0})
                answers.append(await raw.expect("stream_error"))
            assert answers[0]["code"] == "not_found"
            assert _answer(answers[0], secret.id, unknown) == _answer(
                answers[1], secret.id, unknown
            )


# -- error texts carry no internal names ----------------------------------------------------

SECRET_PATH = "/srv/secret-place/wsq.db"


class _BrokenStates(MemoryStateStore):
    """A state store that fails, with paths and SQL in its error texts, once ``broken``."""

    broken = False

    def _failure(self) -> ServerError:
        return ServerError(f"State store error: disk I/O error in {SECRET_PATH} (INSERT INTO)")

    def submit(self, ops: Any) -> asyncio.Future[list[Any]]:
        if not self.broken:
            return super().submit(ops)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        future.set_exception(self._failure())
        return future

    async def get(self, task_id: str) -> Any:
        if self.broken:
            raise self._failure()
        return await super().get(task_id)


class _BrokenBlobs(MemoryBlobStore):
    """A blob store whose writes fail with an OSError naming a file."""

    async def create(self) -> MemoryBlobWriter:
        writer = await super().create()

        async def fail(data: Any) -> None:
            raise OSError(5, "Input/output error", f"/srv/secret-place/blobs/{writer.key}")

        writer.write = fail  # type: ignore[method-assign]
        return writer


def _assert_discreet(message: dict[str, Any], *secrets: str) -> None:
    text = json.dumps(message)
    for secret in (SECRET_PATH, "secret-place", "INSERT", *secrets):
        assert secret not in text, message


async def test_errors_never_carry_paths_keys_or_sql(data_dir: Path) -> None:
    states, blobs = _BrokenStates(), _BrokenBlobs()
    async with (
        wsq.Server(data_dir=data_dir, port=0, state_store=states, blob_store=blobs) as srv,
        RawClient(srv.url) as raw,
    ):
        await raw.send({"op": "upload", "stream": 1})
        await raw.send(protocol.pack_chunk(1, b"x" * 1000))
        _assert_discreet(await raw.expect("stream_error"))
        states.broken = True
        for request in (
            {"op": "add", "queue": "q", "data": {}},
            {"op": "add_many", "queue": "q", "tasks": [{"data": {}}]},
            {"op": "get", "task": "some-task"},
            {"op": "remove", "task": "some-task"},
        ):
            answer = await raw.request(request)
            assert answer["code"] == "internal"
            _assert_discreet(answer)
        await raw.send({"op": "download", "stream": 2, "task": "some-task", "index": 0})
        _assert_discreet(await raw.expect("stream_error"))


async def test_a_missing_blob_is_reported_without_its_key(server: wsq.Server) -> None:
    async with fast(server.url, None) as client:
        task = await client.queue("q").add({"blob": b"k" * 100_000})
    files = [path for path in server.data_dir.joinpath("blobs").rglob("*") if path.is_file()]
    keys = [path.name for path in files if path.parent.name != "tmp"]
    assert keys
    for path in files:
        path.unlink()
    async with RawClient(server.url) as raw:
        await raw.send({"op": "download", "stream": 1, "task": task.id, "index": 0})
        error = await raw.expect("stream_error")
        _assert_discreet(error, *keys)
