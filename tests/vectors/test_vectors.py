"""Every conformance vector, replayed against a real server started with its options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.conftest import budget
from tests.vectors import runner
from wsq.server.auth import Authenticator

VECTORS = runner.all_vectors()


def server_options(vector: runner.Vector) -> dict[str, Any]:
    options = dict(vector.server)
    if "auth" in options:
        options["auth"] = Authenticator.from_mapping(options["auth"], f"{vector.name} header")
    return options


@pytest.mark.parametrize("vector", VECTORS, ids=[v.name for v in VECTORS])
async def test_the_server_answers_as_the_vector_says(vector: runner.Vector, tmp_path: Path) -> None:
    async with wsq.Server(data_dir=tmp_path, port=0, **server_options(vector)) as server:
        await runner.replay(vector, server.url, timeout=budget(10))


def test_the_vectors_share_one_server_unless_they_say_otherwise() -> None:
    """Vectors without server options or "fresh" can run one after another against one
    live server (the runner's command line does that): the queues they use and the task
    ids they create are their own."""
    owners: dict[str, str] = {}
    for vector in VECTORS:
        if vector.server or vector.header.get("fresh"):
            continue
        for name in created_names(vector):
            assert owners.setdefault(name, vector.name) == vector.name, name


def created_names(vector: runner.Vector) -> set[str]:
    names: set[str] = set()
    for step in vector.steps:
        sent = step.get("send")
        for message in sent if isinstance(sent, list) else [sent]:
            if not isinstance(message, dict):
                continue
            if isinstance(message.get("queue"), str):
                names.add(f"queue {message['queue']}")
            specs = [message] if message.get("op") == "add" else message.get("tasks", [])
            names.update(f"task {s['task']}" for s in specs if isinstance(s.get("task"), str))
    return names
