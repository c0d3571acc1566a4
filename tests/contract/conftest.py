"""The S3 for the blob store contract: one moto server (an emulator) for the session, and
the standard AWS variables pointing at it for each test that asks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3emulator import MotoServer


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """The moto server, with AWS_ENDPOINT_URL and dummy credentials set for this test."""
    for name, value in moto_server.environ().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server
