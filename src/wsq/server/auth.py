"""Access control: tokens, the roles they grant per queue-name pattern, and the checks.

An auth file (TOML, or YAML if its name ends in ``.yaml`` or ``.yml``) names each principal::

    [tokens.encoder]                  # the name logs and task owners show, never the token
    token = "s3cret-encoder-token"    # or: sha256 = "<hex digest of the token>"
    produce = ["videos", "thumbs-*"]  # queue-name patterns (shell-style: * ? [...])
    work = ["videos"]
    observe = ["*"]
    admin = []
    metrics = true                    # may read GET /metrics (server-wide, not per queue)

Roles (docs/security.md): ``produce`` adds tasks and reads the tasks it added; ``work``
processes tasks and reads their data; ``observe`` lists tasks and queues, reads any task's
data and subscribes to events; ``admin`` removes and retries tasks and may do everything.
``metrics`` (``true`` or ``false``, not patterns) reads ``GET /metrics``, as ``admin`` on
``*`` may.
A request about every queue at once (a listing or an event subscription without a queue)
needs the role on the pattern ``*``.

Tokens are compared as SHA-256 digests with :func:`hmac.compare_digest`, against every
entry, so neither the time taken nor the entry matched depends on how much of a token was
right. Tokens are never logged; principals are logged by name.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("produce", "work", "observe", "admin")
# A name starts with a letter or digit: it heads the ids of the tasks its principal names
# (``<principal>/<id>``, docs/protocol.md §3), which then never start like a path (``../``).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,99}\Z")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
MIN_TOKEN_LENGTH = 16


class AuthFileError(ValueError):
    """The auth file is missing, unreadable or malformed; the message says where."""


@dataclass(eq=False)
class Principal:
    """Who a connection is, and what it may do."""

    name: str
    grants: Mapping[str, tuple[str, ...]]
    metrics: bool = False
    _cache: dict[tuple[str, str | None], bool] = field(default_factory=dict, repr=False)

    def may(self, role: str, queue: str | None) -> bool:
        """Whether this principal holds ``role`` (or ``admin``) on ``queue``; ``None``
        means every queue, which needs the pattern ``*``."""
        key = (role, queue)
        allowed = self._cache.get(key)
        if allowed is None:
            allowed = self._match(role, queue) or (role != "admin" and self._match("admin", queue))
            if len(self._cache) < 10_000:
                self._cache[key] = allowed
        return allowed

    def may_any(self, queue: str) -> bool:
        """Whether this principal holds any role on ``queue``."""
        return any(self.may(role, queue) for role in ROLES)

    def patterns(self, *roles: str) -> tuple[str, ...] | None:
        """The queue-name patterns on which this principal holds any of ``roles`` (or
        ``admin``); ``None`` when one of them is ``*`` (every queue)."""
        found: dict[str, None] = {}
        for role in (*roles, "admin"):
            found.update(dict.fromkeys(self.grants.get(role, ())))
        return None if "*" in found else tuple(found)

    def holds(self, role: str) -> bool:
        """Whether this principal holds ``role`` (or ``admin``) on at least one pattern."""
        return bool(self.grants.get(role) or self.grants.get("admin"))

    def may_scrape(self) -> bool:
        """Whether this principal may read ``GET /metrics``: ``metrics = true``, or
        ``admin`` on ``*``."""
        return self.metrics or self.may("admin", None)

    def _match(self, role: str, queue: str | None) -> bool:
        patterns = self.grants.get(role, ())
        if queue is None:
            return "*" in patterns
        return any(fnmatch.fnmatchcase(queue, pattern) for pattern in patterns)


EVERYONE = Principal("anonymous", {"admin": ("*",)})
"""The principal of every connection when the server has no auth file."""


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


class Authenticator:
    """The tokens of an auth file; :meth:`authenticate` maps a token to its principal."""

    def __init__(self, entries: list[_Entry]) -> None:
        self._entries = entries

    @property
    def names(self) -> list[str]:
        return [entry.principal.name for entry in self._entries]

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal for ``token``, or ``None``. Every entry is compared."""
        if token is None:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry.principal
        return found

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Authenticator:
        """Read and check an auth file; raise :class:`AuthFileError` naming the problem."""
        path = Path(path)
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise AuthFileError(f"Cannot read auth file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise AuthFileError(f"Auth file {path} is not UTF-8 text.") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            document = _parse_yaml(path, text)
        else:
            try:
                document = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise AuthFileError(f"Auth file {path} is not valid TOML: {exc}") from None
        return cls.from_mapping(document, str(path))

    @classmethod
    def from_mapping(cls, document: Any, where: str = "auth file") -> Authenticator:
        if not isinstance(document, dict) or set(document) != {"tokens"}:
            raise AuthFileError(f"{where}: expected one table, 'tokens'.")
        tokens = document["tokens"]
        if not isinstance(tokens, dict) or not tokens:
            raise AuthFileError(f"{where}: 'tokens' must name at least one principal.")
        entries = [_entry(name, spec, where) for name, spec in tokens.items()]
        digests = [entry.digest for entry in entries]
        if len(set(digests)) != len(digests):
            raise AuthFileError(f"{where}: two principals have the same token.")
        return cls(entries)


def _entry(name: Any, spec: Any, where: str) -> _Entry:
    if not isinstance(name, str) or not _NAME.match(name):
        raise AuthFileError(
            f"{where}: principal name {name!r} must be 1-100 letters, digits or _.@:-,"
            " starting with a letter or digit"
        )
    at = f"{where}: tokens.{name}"
    if not isinstance(spec, dict):
        raise AuthFileError(f"{at} must be a table.")
    unknown = set(spec) - {"token", "sha256", "metrics", *ROLES}
    if unknown:
        raise AuthFileError(
            f"{at}: unknown keys {sorted(unknown)}; expected token or sha256,"
            f" roles {', '.join(ROLES)}, and metrics."
        )
    metrics = spec.get("metrics", False)
    if not isinstance(metrics, bool):
        raise AuthFileError(f"{at}.metrics must be true or false.")
    digest = _digest(spec, at)
    grants: dict[str, tuple[str, ...]] = {}
    for role in ROLES:
        patterns = spec.get(role, [])
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list) or not all(
            isinstance(p, str) and 0 < len(p) < 200 for p in patterns
        ):
            raise AuthFileError(f"{at}.{role} must be a list of queue-name patterns.")
        if patterns:
            grants[role] = tuple(patterns)
    if not grants and not metrics:
        raise AuthFileError(f"{at} grants no role.")
    return _Entry(digest, Principal(name, grants, metrics))


def _digest(spec: dict[str, Any], at: str) -> bytes:
    if ("token" in spec) == ("sha256" in spec):
        raise AuthFileError(f"{at} needs exactly one of 'token' and 'sha256'.")
    if "token" in spec:
        token = spec["token"]
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise AuthFileError(
                f"{at}.token must be a string of at least {MIN_TOKEN_LENGTH} characters."
            )
        digest = hashlib.sha256(token.encode("utf-8")).digest()
    else:
        hexdigest = spec["sha256"]
        if not isinstance(hexdigest, str) or not _HEX64.match(hexdigest.lower()):
            raise AuthFileError(f"{at}.sha256 must be 64 hex digits.")
        digest = bytes.fromhex(hexdigest)
    return digest


def _parse_yaml(path: Path, text: str) -> Any:
    import yaml  # type: ignore[import-untyped]

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AuthFileError(f"Auth file {path} is not valid YAML: {exc}") from None


def hash_token(token: str) -> str:
    """The ``sha256`` value to put in an auth file instead of ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
