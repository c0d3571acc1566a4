"""The S3 for the blob store contract: the session's moto server (an emulator,
tests/conftest.py), and the standard AWS variables pointing at it for each test that asks."""

from __future__ import annotations

import pytest

from tests.s3emulator import MotoServer


@pytest.fixture
def s3(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """The moto server, with AWS_ENDPOINT_URL and dummy credentials set for this test."""
    for name, value in moto_server.environ().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server
