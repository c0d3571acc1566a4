"""A bare protocol client for tests that need to misbehave or look at raw frames."""

from __future__ import annotations

import asyncio
import itertools
import json
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import budget

# Clients that share a session must not reuse a request id within it (protocol §4.2):
# theirs come from one counter.
_SESSION_IDS = itertools.count(1_000_000)


class RawClient:
    def __init__(
        self,
        url: str,
        *,
        hello: bool = True,
        token: str | None = None,
        session: str | None = None,
        **connect: Any,
    ) -> None:
        self.url = url
        self.hello = hello
        self.token = token
        self.session = session
        self.connect = connect
        self.ws: ClientConnection | None = None
        self.welcome: dict[str, Any] = {}
        self._ids = _SESSION_IDS if session is not None else itertools.count(1000)
        self.backlog: list[dict[str, Any]] = []

    async def __aenter__(self) -> RawClient:
        self.ws = await connect(self.url, max_size=None, **self.connect)
        if self.hello:
            hello = {"op": "hello", "protocol": 1, "client": "raw"}
            if self.token is not None:
                hello["token"] = self.token
            if self.session is not None:
                hello["session"] = self.session
            await self.send(hello)
            self.welcome = await self.expect("welcome")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.ws is not None
        await self.ws.close()

    async def send(self, message: Any) -> None:
        assert self.ws is not None
        await self.ws.send(message if isinstance(message, str | bytes) else json.dumps(message))

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next message (frames holding arrays are split)."""
        assert self.ws is not None
        while not self.backlog:
            frame = await asyncio.wait_for(self.ws.recv(), budget(timeout))
            if isinstance(frame, bytes):
                self.backlog.append({"op": "_binary", "frame": frame})
                continue
            decoded = json.loads(frame)
            self.backlog.extend(decoded if isinstance(decoded, list) else [decoded])
        return self.backlog.pop(0)

    async def expect(self, op: str, timeout: float = 5.0) -> dict[str, Any]:
        """Skip messages until one with this op arrives."""
        while True:
            message = await self.receive(timeout)
            if message.get("op") == op:
                return message

    async def expect_answer(self, request_id: int, timeout: float = 5.0) -> dict[str, Any]:
        """Skip messages until the result or error answering ``request_id`` arrives."""
        while True:
            answer = await self.receive(timeout)
            if answer.get("id") == request_id and answer.get("op") in ("result", "error"):
                return answer

    async def request(self, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send with a fresh id; return the result or error answering it."""
        request_id = next(self._ids)
        await self.send({**message, "id": request_id})
        while True:
            answer = await self.receive(timeout)
            if answer.get("id") == request_id and answer.get("op") in ("result", "error"):
                return answer
