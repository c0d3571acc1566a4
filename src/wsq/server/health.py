"""The server's plain HTTP endpoints for operators: ``/health``, ``/ready``, ``/metrics``.

- ``GET /health``: 200 ``ok`` while the process serves HTTP (liveness).
- ``GET /ready``: 200 ``{"ready": true}`` if the last probe of the state store (one read)
  and the blob store (:meth:`BlobStore.check`) both answered in time, else 503 with
  ``{"ready": false, "reason": ...}``. Probes run every :data:`READY_INTERVAL` seconds in
  the background (:meth:`Readiness.run`): the HTTP hook cannot wait on I/O, and a probe
  per request would let anyone make the server read its stores at will.
- ``GET /metrics``: the Prometheus text format (wsq/server/metrics.py). With an auth file,
  only for a token holding ``metrics = true`` (or ``admin`` on ``*``), sent as
  ``Authorization: Bearer <token>`` or ``?token=<token>`` (docs/security.md).

Reasons name the store, never its paths or errors; the cause goes to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import parse_qs

from multidict import CIMultiDict
from picows.websockets import Request, Response, ServerHandshakeConnection

from wsq.blobs.base import BlobStore
from wsq.server.auth import Authenticator
from wsq.server.logs import log
from wsq.server.metrics import CONTENT_TYPE, Metrics
from wsq.storage.base import StateStore

READY_INTERVAL = 1.0
"""Seconds between two readiness probes."""
READY_TIMEOUT = 2.0
"""Seconds each store has to answer a probe."""
_PROBE_TASK = "wsq-ready-probe"  # a task id the probe reads; it need not exist


class Readiness:
    """Whether the stores answer, as of the last probe (:attr:`problem` is ``None`` then)."""

    def __init__(
        self,
        store: StateStore,
        blobs: BlobStore,
        *,
        interval: float = READY_INTERVAL,
        timeout: float = READY_TIMEOUT,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self.interval = interval
        self.timeout = timeout
        self.problem: str | None = "The stores have not been checked yet."
        self._warned = False  # a problem was logged: log its end too

    async def check(self) -> None:
        """Probe both stores now and keep the outcome; a change is logged."""
        problem = await self._probe("state store", self._read_store)
        if problem is None:
            problem = await self._probe("blob store", self._blobs.check)
        if problem is None and self._warned:
            log(logging.INFO, "ready", "the state store and the blob store answer")
        self._warned = problem is not None
        self.problem = problem

    async def run(self) -> None:
        """Probe every :attr:`interval` seconds, forever."""
        while True:
            await asyncio.sleep(self.interval)
            await self.check()

    async def _read_store(self) -> None:
        await self._store.get(_PROBE_TASK)

    async def _probe(self, name: str, probe: Callable[[], Awaitable[None]]) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                await probe()
        except TimeoutError:
            problem = f"The {name} did not answer within {self.timeout} s."
            cause = "timed out"
        except Exception as exc:
            problem = f"The {name} is unreachable."
            cause = repr(exc)
        else:
            return None
        if problem != self.problem:
            log(logging.WARNING, "not ready", f"{problem} ({cause})")
        return problem


def respond(
    connection: ServerHandshakeConnection,
    request: Request,
    path: str,
    *,
    readiness: Readiness,
    metrics: Metrics,
    auth: Authenticator | None,
) -> Response | None:
    """The answer to a plain GET of one of these endpoints, or ``None`` for other paths."""
    if path == "/health":
        return connection.respond(HTTPStatus.OK, "ok\n")
    if path == "/ready":
        if readiness.problem is None:
            return _json(HTTPStatus.OK, {"ready": True})
        return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"ready": False, "reason": readiness.problem})
    if path == "/metrics":
        refusal = _refuse_scrape(connection, request, auth)
        if refusal is not None:
            return refusal
        headers = {"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"}
        return Response(int(HTTPStatus.OK), "OK", CIMultiDict(headers), metrics.render())
    return None


def _refuse_scrape(
    connection: ServerHandshakeConnection, request: Request, auth: Authenticator | None
) -> Response | None:
    if auth is None:
        return None  # no auth file: open, like the dashboard (bind to loopback)
    principal = auth.authenticate(_token(request))
    if principal is None:
        log(logging.DEBUG, "scrape refused", "a /metrics request without a valid token")
        response = connection.respond(HTTPStatus.UNAUTHORIZED, "wsq: a token is needed.\n")
        response.headers["WWW-Authenticate"] = 'Bearer realm="wsq"'
        return response
    if not principal.may_scrape():
        text = "a /metrics request from a token without the metrics role"
        log(logging.DEBUG, "scrape refused", text, principal=principal.name)
        return connection.respond(HTTPStatus.FORBIDDEN, "wsq: the token may not read metrics.\n")
    return None


def _token(request: Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``, else of ``?token=<token>``."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    query = request.path.partition("?")[2]
    try:
        values = parse_qs(query, max_num_fields=20).get("token") if query else None
    except ValueError:  # more fields than any scraper sends
        return None
    return values[0] if values else None


def _json(status: HTTPStatus, value: object) -> Response:
    body = (json.dumps(value) + "\n").encode()
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
    return Response(int(status), status.phrase, CIMultiDict(headers), body)
