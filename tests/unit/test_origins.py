"""The origin rule (wsq/server/origins.py) case by case: no sockets."""

from __future__ import annotations

import pytest

from wsq.server.origins import OriginPolicy

LOOPBACK = OriginPolicy([], [], ["127.0.0.1"], tls=False)
NAMED_TLS = OriginPolicy([], ["queue.example.com"], ["10.0.0.5"], tls=True)
WILDCARD = OriginPolicy([], [], ["0.0.0.0"], tls=False)
LISTED = OriginPolicy(["https://app.example.com/"], [], ["127.0.0.1"], tls=False)


@pytest.mark.parametrize(
    ("policy", "origin", "host", "allowed"),
    [
        (LOOPBACK, "http://127.0.0.1:4242", "127.0.0.1:4242", True),
        (LOOPBACK, "http://localhost:4242", "localhost:4242", True),
        (LOOPBACK, "http://[::1]:4242", "[::1]:4242", True),
        (LOOPBACK, "http://LOCALHOST:4242", "localhost:4242", True),
        (LOOPBACK, "http://evil.example:4242", "evil.example:4242", False),  # rebinding
        (LOOPBACK, "http://localhost.evil.example:4242", "localhost.evil.example:4242", False),
        (LOOPBACK, "https://127.0.0.1:4242", "127.0.0.1:4242", False),  # scheme
        (LOOPBACK, "http://127.0.0.1:4243", "127.0.0.1:4242", False),  # port
        (LOOPBACK, "http://127.0.0.1", "127.0.0.1:80", True),  # default port
        (LOOPBACK, "http://127.0.0.1:4242", None, False),
        (LOOPBACK, "null", "127.0.0.1:4242", False),
        (LOOPBACK, "http://127.0.0.1:4242/path", "127.0.0.1:4242", False),
        (LOOPBACK, "http://127.0.0.1:99999", "127.0.0.1:99999", False),  # not a port
        (LOOPBACK, "http://10.0.0.5:4242", "10.0.0.5:4242", False),  # not bound there
        (NAMED_TLS, "https://queue.example.com", "queue.example.com", True),
        (NAMED_TLS, "https://queue.example.com:443", "queue.example.com", True),
        (NAMED_TLS, "http://queue.example.com", "queue.example.com", False),
        (NAMED_TLS, "https://10.0.0.5:4242", "10.0.0.5:4242", True),
        (NAMED_TLS, "https://localhost:4242", "localhost:4242", False),  # not loopback
        (WILDCARD, "http://192.168.1.9:4242", "192.168.1.9:4242", True),
        (WILDCARD, "http://localhost:4242", "localhost:4242", True),
        (WILDCARD, "http://evil.example:4242", "evil.example:4242", False),
        (LISTED, "https://app.example.com", "anything:1", True),
        (LISTED, "https://app.example.org", "anything:1", False),
        (LISTED, "http://127.0.0.1:4242", "127.0.0.1:4242", True),  # its own still
    ],
)
def test_origins(policy: OriginPolicy, origin: str, host: str | None, allowed: bool) -> None:
    assert policy.allows(origin, host) is allowed


def test_server_names_may_carry_a_port_or_brackets() -> None:
    policy = OriginPolicy([], ["Queue.Example.com:8443", "[fd00::5]"], ["10.0.0.5"], tls=True)
    assert policy.allows("https://queue.example.com:8443", "queue.example.com:8443")
    assert policy.allows("https://[fd00::5]", "[fd00::5]")


def test_a_star_allows_every_origin() -> None:
    policy = OriginPolicy(["*"], [], ["127.0.0.1"], tls=False)
    assert policy.allows("http://evil.example", "evil.example")
