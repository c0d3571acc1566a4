"""Replay protocol conformance vectors (tests/vectors/*.jsonl) against a live wsq server.

Usage: ``python -m tests.vectors.runner ws://127.0.0.1:4242 tests/vectors/tasks.jsonl ...``
(each file expects a server with no tasks; its first line names the server options it
needs). The format is described in tests/vectors/README.md; this module is the reference
reading of it: :func:`load` parses a file, :func:`match` compares a received message
with an expected one and binds placeholders, :func:`substitute` fills placeholders into
a message to send, and :func:`replay` runs a vector over real WebSockets (the
``websockets`` package, an implementation independent of the server's).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

VECTORS = Path(__file__).parent
_NAME = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KINDS = {
    "$any": lambda v: True,
    "$string": lambda v: isinstance(v, str),
    "$int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "$number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}
STEP_KEYS = {
    "open",
    "close",
    "send",
    "send_raw",
    "send_binary",
    "recv",
    "recv_unordered",
    "recv_binary",
    "recv_close",
    "sleep",
    "comment",
}


class Mismatch(AssertionError):
    """The server's answer differs from the vector."""


@dataclass
class Vector:
    path: Path
    header: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def server(self) -> dict[str, Any]:
        """Keyword arguments for wsq.Server (times in seconds)."""
        options: dict[str, Any] = self.header.get("server", {})
        return options


def load(path: Path) -> Vector:
    """Parse a vector file: a header line, then one step per line (blank lines and lines
    starting with ``//`` are skipped)."""
    lines = [
        json.loads(line)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("//")
    ]
    header, steps = lines[0], lines[1:]
    if "vector" not in header:
        raise ValueError(f"{path}: the first line must be the header ({{'vector': ...}})")
    for number, step in enumerate(steps, 2):
        unknown = set(step) - STEP_KEYS - {"c"}
        if unknown or not set(step) & STEP_KEYS:
            raise ValueError(f"{path}: step {number} has unknown keys {sorted(unknown)}")
    return Vector(path, header, steps)


def all_vectors() -> list[Vector]:
    return [load(path) for path in sorted(VECTORS.glob("*.jsonl"))]


def substitute(value: Any, names: dict[str, Any]) -> Any:
    """``value`` with each ``${name}`` replaced by its bound value (a whole-string
    placeholder by the value itself, one inside a longer string by its text)."""
    if isinstance(value, str):
        whole = _NAME.fullmatch(value)
        if whole:
            return names[whole.group(1)]
        return _NAME.sub(lambda m: str(names[m.group(1)]), value)
    if isinstance(value, list):
        return [substitute(v, names) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, names) for k, v in value.items()}
    return value


def match(expected: Any, actual: Any, names: dict[str, Any], where: str = "$") -> None:
    """Raise Mismatch unless ``actual`` matches ``expected``; bind new ``${name}``s."""
    if isinstance(expected, str):
        if expected in _KINDS:
            if not _KINDS[expected](actual):
                raise Mismatch(f"{where}: {actual!r} is not {expected}")
            return
        whole = _NAME.fullmatch(expected)
        if whole and whole.group(1) not in names:
            names[whole.group(1)] = actual
            return
        expected = substitute(expected, names)
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) != set(actual):
            raise Mismatch(f"{where}: keys {sorted(actual)} != expected {sorted(expected)}")
        for key in expected:
            match(expected[key], actual[key], names, f"{where}.{key}")
        return
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            raise Mismatch(f"{where}: {len(actual)} items != expected {len(expected)}")
        for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
            match(e, a, names, f"{where}[{index}]")
        return
    same_kind = isinstance(expected, bool) == isinstance(actual, bool)
    if expected != actual or not same_kind:
        raise Mismatch(f"{where}: {actual!r} != expected {expected!r}")


def binary_frame(spec: dict[str, Any]) -> bytes:
    """A binary frame from its vector form: ``{"stream": n, "base64": ...}`` (the 4-byte
    big-endian stream id, then the payload) or ``{"hex": ...}`` (the whole frame)."""
    if "hex" in spec:
        return bytes.fromhex(spec["hex"])
    return struct.pack(">I", spec["stream"]) + base64.b64decode(spec["base64"])


def frame_text(step: dict[str, Any], names: dict[str, Any]) -> str:
    """The text frame a ``send`` or ``send_raw`` step sends."""
    if "send_raw" in step:
        raw: str = step["send_raw"]
        return raw
    return json.dumps(substitute(step["send"], names))


class _Connection:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.backlog: list[Any] = []  # received messages not yet expected

    async def next(self, timeout: float) -> Any:
        """The next message: a dict, or bytes for a binary frame (arrays are split)."""
        while not self.backlog:
            frame = await asyncio.wait_for(self.ws.recv(), timeout)
            if isinstance(frame, bytes):
                self.backlog.append(frame)
            else:
                decoded = json.loads(frame)
                self.backlog.extend(decoded if isinstance(decoded, list) else [decoded])
        return self.backlog.pop(0)


@dataclass
class _Run:
    url: str
    timeout: float
    names: dict[str, Any] = field(default_factory=dict)
    connections: dict[str, _Connection] = field(default_factory=dict)


async def replay(vector: Vector, url: str, timeout: float = 10.0) -> dict[str, Any]:
    """Run every step of ``vector`` against the server at ``url``; raise Mismatch (with
    the file and line) at the first difference. Returns the bound names."""
    run = _Run(url, timeout)
    try:
        for number, step in enumerate(vector.steps, 2):
            try:
                await _step(run, step)
            except (Mismatch, TimeoutError, ConnectionClosed) as exc:
                raise Mismatch(f"{vector.path.name}, step {number} {step}: {exc!r}") from exc
    finally:
        for connection in run.connections.values():
            await connection.ws.close()
    return run.names


async def _step(run: _Run, step: dict[str, Any]) -> None:
    name = step.get("c", "a")
    if "open" in step:
        ws = await connect(run.url, max_size=None, compression=None)
        run.connections[name] = _Connection(ws)
        return
    if "sleep" in step:
        await asyncio.sleep(step["sleep"])
        return
    if "comment" in step:
        return
    connection = run.connections[name]
    if "close" in step:
        await connection.ws.close()
    elif "send" in step or "send_raw" in step:
        await connection.ws.send(frame_text(step, run.names))
    elif "send_binary" in step:
        await connection.ws.send(binary_frame(substitute(step["send_binary"], run.names)))
    elif "recv" in step:
        match(step["recv"], await connection.next(run.timeout), run.names)
    elif "recv_unordered" in step:
        await _unordered(connection, step["recv_unordered"], run)
    elif "recv_binary" in step:
        frame = await connection.next(run.timeout)
        expected = binary_frame(substitute(step["recv_binary"], run.names))
        if frame != expected:
            raise Mismatch(f"binary frame {frame!r} != expected {expected!r}")
    elif "recv_close" in step:
        await _closed(connection, step["recv_close"], run.timeout)


async def _unordered(connection: _Connection, expected: list[Any], run: _Run) -> None:
    """The next ``len(expected)`` messages, each matching one of ``expected``."""
    received = [await connection.next(run.timeout) for _ in expected]
    pending = list(expected)
    for message in received:
        for index, candidate in enumerate(pending):
            trial = dict(run.names)
            try:
                match(candidate, message, trial)
            except Mismatch:
                continue
            run.names.update(trial)
            del pending[index]
            break
        else:
            raise Mismatch(f"{message!r} matches none of {pending!r}")


async def _closed(connection: _Connection, code: int, timeout: float) -> None:
    try:
        while True:
            message = await connection.next(timeout)
            raise Mismatch(f"expected a close, got {message!r}")
    except ConnectionClosed:
        pass
    received = connection.ws.close_code
    if received != code:
        raise Mismatch(f"close code {received} != expected {code}")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m tests.vectors.runner URL [VECTOR.jsonl ...]", file=sys.stderr)
        return 2
    url, paths = argv[0], [Path(p) for p in argv[1:]]
    failed = 0
    for path in paths:
        try:
            asyncio.run(replay(load(path), url))
            print(f"ok    {path}")
        except Mismatch as exc:
            failed += 1
            print(f"FAIL  {path}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
