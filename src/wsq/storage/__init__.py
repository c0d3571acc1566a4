"""Where tasks live: the state store interface (:mod:`wsq.storage.base`) and its backends.
:func:`state_store_from_url` makes one from a ``--database`` URL."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from wsq.storage.base import StateStore

_FORM = "postgresql://user:password@host:5432/database"


def check_database_url(url: str) -> str:
    """Return ``url`` if :func:`state_store_from_url` takes it, else raise ValueError with a
    one-line reason (the password left out)."""
    if not isinstance(url, str):
        raise ValueError(f"database must be a URL ({_FORM}), not {url!r}")
    parts = urlsplit(url.strip())
    shown = redact(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"database must be a URL like {_FORM}, not {shown!r}")
    if parts.fragment:
        raise ValueError(f"database URL {shown!r} takes no #fragment")
    try:
        parts.port  # noqa: B018 (parsing it is the check)
    except ValueError:
        raise ValueError(f"database URL {shown!r} has a port that is not 0 to 65535") from None
    return url


def redact(url: str) -> str:
    """``url`` with its password, if any, as ``***``."""
    parts = urlsplit(url.strip())
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def state_store_from_url(url: str) -> StateStore:
    """``postgresql://...``: the PostgreSQL state store (nothing is contacted yet). Raise
    ValueError for anything else."""
    check_database_url(url)
    from wsq.storage.postgres import PostgresStateStore

    return PostgresStateStore(url.strip())
