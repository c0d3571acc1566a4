"""Which browser pages may open a WebSocket to this server (docs/security.md, origins).

A browser sends ``Origin`` with every WebSocket request, and the page's JavaScript cannot
change it. Without ``allowed_origins`` only the server's own pages may connect, and "own"
is decided on two headers that a DNS-rebinding page chooses itself (its name now resolves
to this server): so ``Host`` must be a name the server knows to be itself, and ``Origin``
must then be that same scheme, host and port. A rebinding page's name is a domain the
attacker controls, never one of those.

Known names: the bound address; for a loopback bind also ``localhost``, ``127.0.0.1`` and
``::1``; for a wildcard bind (``0.0.0.0``, ``::``) any IP literal, since a page whose
address is an IP literal was reached by that address, not through a name that can be
rebound; and the operator's ``server_names``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize(origin: str) -> str:
    """An origin as listed and compared: lower case, without a trailing slash."""
    return origin.strip().rstrip("/").lower()


class OriginPolicy:
    """Decides whether a WebSocket request carrying ``Origin`` may proceed."""

    def __init__(
        self,
        allowed_origins: Iterable[str],
        server_names: Iterable[str],
        bound: Iterable[str],
        tls: bool,
    ) -> None:
        self.allowed = {normalize(origin) for origin in allowed_origins}
        self.scheme = "https" if tls else "http"
        self.names = {_host_of(name) for name in server_names if name.strip()}
        self.any_ip = False
        for address in bound:
            self._learn(address)

    def _learn(self, address: str) -> None:
        ip = _ip(address)
        if ip is None:  # a name the operator bound to (``--host myhost``)
            self.names.add(_bare(address))
        elif ip.is_unspecified:
            self.any_ip = True
            self.names.add("localhost")
        else:
            self.names.add(str(ip))
            if ip.is_loopback:
                self.names.update(_LOOPBACK_NAMES)

    def allows(self, origin: str, host: str | None) -> bool:
        """Whether a request with this ``Origin`` and ``Host`` may connect."""
        if "*" in self.allowed or normalize(origin) in self.allowed:
            return True
        if host is None:
            return False
        return self.is_own(host) and _same_origin(origin, self.scheme, host)

    def is_own(self, host: str) -> bool:
        """Whether the ``Host`` header names this server."""
        try:
            name = urlsplit(f"//{host}").hostname
        except ValueError:
            return False
        if not name:
            return False
        return name in self.names or (self.any_ip and _ip(name) is not None)


def _same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether ``origin`` is ``scheme://host`` (ports compared with defaults filled in)."""
    try:
        page = urlsplit(origin.strip().lower())
        request = urlsplit(f"{scheme}://{host.lower()}")
        page_port = page.port or _DEFAULT_PORTS.get(page.scheme)
        request_port = request.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        return False
    if page.path not in ("", "/") or page.query or page.username is not None:
        return False
    return (page.scheme, page.hostname, page_port) == (scheme, request.hostname, request_port)


def _host_of(name: str) -> str:
    """A server name as given (``queue.example.com``, ``queue.example.com:8443``,
    ``[::1]``): its host part, as ``urlsplit`` reports a ``Host`` header's."""
    try:
        return urlsplit(f"//{name.strip()}").hostname or _bare(name)
    except ValueError:
        return _bare(name)


def _bare(name: str) -> str:
    """A host name or address as ``urlsplit`` reports it: lower case, no brackets."""
    return name.strip().lower().removeprefix("[").removesuffix("]")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(_bare(text))
    except ValueError:
        return None
