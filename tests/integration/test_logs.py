"""Client-supplied text in the server's logs (client names, queue names, error texts)
cannot forge a line or a field: the text format escapes and cuts it, JSON stays JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.integration.procs import ServerProcess
from tests.integration.rawclient import RawClient

FORGED = "2026-01-01 00:00:00,000 ERROR   FORGED"
QUEUE = "q task=FORGED-TASK worker=\u2028FORGED"
ERROR = f"boom\n{FORGED} line\r\n\x1b[2J{'x' * 60_000}"
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


async def _misbehave(url: str) -> None:
    async with RawClient(url, hello=False) as raw:
        await raw.send({"op": "hello", "protocol": 1, "client": f"evil\n{FORGED} client"})
        await raw.expect("welcome")
        await raw.request({"op": "work", "queue": QUEUE, "worker": "w1"})
        await raw.send({"op": "add", "id": 1, "queue": QUEUE, "data": {}})  # before its answer
        offer = await raw.expect("offer")
        run = offer["tasks"][0]
        ref = {"task": run["task"]["id"], "run": run["run"]}
        await raw.send({"op": "ack", "runs": [[ref["task"], ref["run"]]]})
        await raw.request({"op": "fail", **ref, "error": ERROR})


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_client_text_cannot_forge_log_lines(tmp_path: Path, fmt: str) -> None:
    server = ServerProcess(tmp_path / "data", None, "--log-format", fmt)
    await server.start()
    try:
        await _misbehave(server.url)
        await eventually(lambda: "task failed" in server.log.read_text())
    finally:
        server.stop()
    lines = server.log.read_text().splitlines()
    assert lines
    if fmt == "json":
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        (failed,) = [r for r in records if r.get("action") == "task failed"]
        assert failed["queue"] == QUEUE and failed["error"] == ERROR
        return
    for line in lines:
        assert RECORD.match(line), f"a line that is not a record: {line[:200]!r}"
        assert "\x1b" not in line and len(line) < 5000
    (failed,) = [line for line in lines if " task failed " in line or "task failed" in line]
    assert 'queue="q task=FORGED-TASK worker=\\u2028FORGED"' in failed
    assert " task=FORGED" not in failed.replace('"q task=FORGED', "")
    assert "boom\\n2026-01-01" in failed
