"""Where stream bytes live: the blob store interface (:mod:`wsq.blobs.base`) and its
backends. :func:`blob_store_from_url` makes one from a ``--storage`` URL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from wsq.blobs.base import BlobStore

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", re.IGNORECASE)
_FORMS = "s3://bucket/prefix or file:///absolute/path"


def check_storage_url(url: str) -> str:
    """Return ``url`` if :func:`blob_store_from_url` takes it, else raise ValueError with a
    one-line reason."""
    _parse(url)
    return url


STALE_UPLOAD_AGE = 24 * 3600.0
"""Seconds after which an unfinished upload in a store named by URL (which several servers
may share) is taken for a dead server's and deleted; and the age below which the orphan
sweep spares an unreferenced blob there (another server's add may be about to claim it)."""


def blob_store_from_url(url: str) -> BlobStore:
    """``s3://bucket/prefix``: the S3 blob store (endpoint, region and credentials from the
    standard AWS variables); ``file:///path``: the files store at that path. Raise
    ValueError for anything else. Nothing is opened or contacted yet."""
    scheme, where, prefix = _parse(url)
    if scheme == "file":
        from wsq.blobs.files import FileBlobStore

        # A folder named by URL may be shared by several servers (a network file system):
        # a starting server must not delete the others' uploads in progress.
        return FileBlobStore(where, stale_upload_age=STALE_UPLOAD_AGE)
    from wsq.blobs.s3 import S3BlobStore

    return S3BlobStore(where, prefix)


def _parse(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket or path, prefix)``."""
    if not isinstance(url, str):
        raise ValueError(f"storage must be a URL ({_FORMS}), not {url!r}")
    parts = urlsplit(url.strip())
    if parts.query or parts.fragment:
        raise ValueError(f"storage URL {url!r} takes no ?query or #fragment")
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ValueError(f"storage URL {url!r} must name an absolute path: file:///path")
        return "file", str(Path(path)), ""
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET.match(bucket):
            raise ValueError(f"storage URL {url!r} does not name an S3 bucket: s3://bucket/prefix")
        return "s3", bucket, parts.path.strip("/")
    raise ValueError(f"storage must be {_FORMS}, not {url!r}")
