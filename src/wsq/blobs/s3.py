"""The S3 blob store: one object per blob, for S3 and the stores that speak its API (MinIO,
R2, Ceph RGW...). Needs boto3 (``pip install 'wsqueue[s3]'``).

Layout::

    s3://bucket/prefix/<key>     a committed blob (no fan-out: S3 has no folders to fill)

Writes: a writer buffers up to :data:`PART_SIZE` bytes. A blob that never fills a part is
stored by one PutObject at commit; a larger one is a multipart upload (created with its
first full part, one UploadPart per part, CompleteMultipartUpload at commit). The object
exists, durable and visible, only once :meth:`S3BlobWriter.commit` returns; abort is
AbortMultipartUpload. A writer holds one part plus the caller's chunk at most.

Reads: a reader learns the size (HeadObject), then streams one ranged GET from its offset,
:data:`READ_AHEAD` bytes per thread hop. If that response breaks (the store drops a
connection a slow client left idle) or a read was cancelled, the next read resumes with a
new ranged GET from the first byte not yet returned.

Leftovers: a server killed mid-upload leaves a multipart upload, invisible but billed.
:meth:`S3BlobStore.open` aborts those under the prefix older than ``stale_upload_age``
(default 24 h), never younger ones: servers may share a bucket, and a younger upload may be
another server's live one. The age is read on the store's own clock (its ``Date`` header
against the upload's ``Initiated``), so a server's clock skew does not matter. A bucket
lifecycle rule (AbortIncompleteMultipartUpload) is a good second net.

Threads: boto3 blocks, so every call runs in a ThreadPoolExecutor owned by the store
(``max_workers`` threads and as many pooled HTTP connections), never on the event loop.
Calls on one writer or reader run in order (a cancelled call still ends before the next).

Errors: a store that cannot be reached, or that refuses (bad credentials, no such bucket,
still throttling after boto3's retries), raises :class:`~wsq.exceptions.Unavailable` naming
the operation and the reason. Configuration comes from the standard variables:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), and boto3's other
usual sources (profiles, instance roles).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import email.utils
import functools
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from wsq.blobs.base import OWNER_MARK, BlobNotFound, BlobStore, BlobWriter, check_key, new_key
from wsq.blobs.memory import check_offset
from wsq.blobs.threads import Lane, ReadAheadReader
from wsq.exceptions import Unavailable

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

T = TypeVar("T")

PART_SIZE = 8 << 20
"""Bytes of one multipart part (S3's minimum is 5 MiB, except for the last part). Past each
1,000 parts it grows by as much, so the 10,000-part limit is reached only at 440 GB."""

STALE_UPLOAD_AGE = 24 * 3600.0
CLOSE_GRACE = 2.0  # seconds close waits for S3 calls in flight
"""Seconds after which open() takes an unfinished multipart upload for a dead server's."""

DELETE_BATCH = 1000
"""Keys per DeleteObjects call (S3's limit)."""

_KEY = re.compile(r"^[0-9a-f]{32}$")
_OPEN, _BROKEN, _COMMITTED, _ABORTED = "open", "broken", "committed", "aborted"
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}

logger = logging.getLogger("wsq.blobs.s3")


class S3BlobWriter(BlobWriter):
    """One blob on its way into S3. Call :meth:`write` sequentially (await each call), then
    :meth:`commit` or :meth:`abort`. If a call fails or is cancelled the writer is broken:
    :meth:`write` and :meth:`commit` raise RuntimeError and only :meth:`abort` is left."""

    def __init__(self, store: S3BlobStore, key: str) -> None:
        self.key = key
        self._store = store
        self._lane = Lane(store._executor)
        self._buffer = bytearray()
        self._size = 0
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._state = _OPEN
        self._commit_tried = False

    async def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; a full part is uploaded before this returns.
        Raise Unavailable, or RuntimeError if the writer is not open."""
        self._check_open()
        self._size += len(data)
        self._buffer += data
        if len(self._buffer) >= PART_SIZE * (1 + len(self._parts) // 1000):
            part, self._buffer = self._buffer, bytearray()
            await self._run(self._send_part, part)

    async def commit(self) -> int:
        """Upload the rest and complete the upload (or put a small blob whole); return the
        size. The blob is durable and visible once this returns. On an error, call
        :meth:`abort`."""
        self._check_open()
        self._commit_tried = True
        rest, self._buffer = self._buffer, bytearray()
        await self._run(self._commit_sync, rest)
        self._state = _COMMITTED
        self._store._count(self.key, self._size)
        return self._size

    async def abort(self) -> None:
        """Abort the multipart upload. Idempotent; does nothing after a successful commit;
        deletes the object if :meth:`commit` failed or was cancelled after S3 stored it.
        Never raises for S3 errors: what it cannot remove is logged and left for the next
        :meth:`S3BlobStore.open` (old uploads) or the server's orphan sweep (objects)."""
        if self._state in (_COMMITTED, _ABORTED):
            return
        self._state = _ABORTED
        self._buffer = bytearray()
        try:
            await self._lane.run(self._abort_sync)
        except (Unavailable, RuntimeError) as exc:  # RuntimeError: the store was closed
            self.left = True
            logger.warning("Could not discard blob %s: %s", self.key, exc)

    def _send_part(self, part: bytearray) -> None:
        """In a thread: upload ``part``, creating the multipart upload first if needed."""
        store = self._store
        if self._upload_id is None:
            self._upload_id = store._create_upload(self.key)
        number = len(self._parts) + 1
        etag = store._upload_part(self.key, self._upload_id, number, part)
        self._parts.append({"PartNumber": number, "ETag": etag})

    def _commit_sync(self, rest: bytearray) -> None:
        if self._upload_id is None:
            self._store._put(self.key, rest)
            return
        if rest:
            self._send_part(rest)
        self._store._complete(self.key, self._upload_id, self._parts)

    def _abort_sync(self) -> None:
        if self._upload_id is not None:
            self._store._abort_upload(self.key, self._upload_id)
        if self._commit_tried:
            self._store._delete_batch([self.key])

    async def _run(self, fn: Callable[..., None], *args: object) -> None:
        try:
            await self._lane.run(fn, *args)
        except BaseException:
            self._state = _BROKEN
            raise

    def _check_open(self) -> None:
        if self._state != _OPEN:
            raise RuntimeError(f"Blob writer {self.key} is {self._state}")


class S3BlobReader(ReadAheadReader):
    """Reads one object from an offset through a ranged GET kept open between reads;
    Unavailable if S3 fails (twice in a row) or the blob was deleted before this reader
    had it whole."""

    def __init__(self, store: S3BlobStore, key: str, size: int, offset: int) -> None:
        super().__init__(store._executor, size, offset)
        self._store = store
        self._key = key
        # Touched only in the lane's thread calls:
        self._body: StreamingBody | None = None
        self._body_at = 0  # object offset of the body's next byte

    def _read_sync(self, at: int, want: int) -> bytes:
        """In a thread: ``want`` bytes from offset ``at``, over the open GET if it stands
        there, else over a new one; one retry on a new GET if the response breaks."""
        for attempt in (1, 2):
            if self._body is None or self._body_at != at:
                self._drop_body()
                self._body = self._store._get(self._key, at)
                self._body_at = at
            try:
                data = _read_exactly(self._body, want)
            except Exception as exc:  # a broken response: botocore, urllib3 or socket errors
                self._drop_body()
                if attempt == 2:
                    raise Unavailable(f"S3 read of blob {self._key} broke: {exc}") from exc
                continue
            self._body_at += len(data)
            return data
        raise AssertionError("unreachable")

    def _release_sync(self) -> None:
        self._drop_body()

    def _drop_body(self) -> None:
        if self._body is not None:
            body, self._body = self._body, None
            with contextlib.suppress(Exception):
                body.close()


def _read_exactly(body: StreamingBody, want: int) -> bytes:
    parts: list[bytes] = []
    while want > 0:
        part = body.read(want)
        if not part:
            break
        parts.append(part)
        want -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class S3BlobStore(BlobStore):
    """Blobs as objects under ``s3://bucket/prefix/``. Call :meth:`open` once, before any
    other method; call :meth:`close` after every writer and reader is done.

    ``endpoint_url`` and ``region`` override ``AWS_ENDPOINT_URL`` and ``AWS_REGION``.
    ``max_workers`` bounds the threads (and HTTP connections) doing S3 calls for this store.
    ``stale_upload_age`` is the age in seconds past which :meth:`open` aborts an unfinished
    multipart upload under the prefix; make it longer than any upload may take.

    :attr:`used_bytes` counts the blobs listed at :meth:`open` and those committed since
    by this store, less those it deleted: a blob another server commits into the same
    prefix counts here only from this store's next open. The store keeps each counted
    blob's size (about 150 bytes of memory per blob) to lower the count on delete.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_workers: int = 16,
        stale_upload_age: float = STALE_UPLOAD_AGE,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.stale_upload_age = stale_upload_age
        self._endpoint_url = endpoint_url
        self._region = region
        self._max_workers = max_workers
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="wsq-s3"
        )
        self._client: S3Client | None = None
        self._sizes: dict[str, int] = {}
        self.used_bytes = 0

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    async def open(self) -> None:
        """Connect, count the committed blobs (one LIST per 1,000), and abort the multipart
        uploads under the prefix older than ``stale_upload_age``. Raise Unavailable."""
        if self._client is None:
            self._client = await self._run(self._make_client)
        sizes: dict[str, int] = {}
        pages = await self._run(self._object_pages)
        while (page := await self._run(_next_page, pages)) is not None:
            sizes.update(page)
        self._sizes = sizes
        self.used_bytes = sum(sizes.values())
        aborted = await self._run(self._abort_stale_uploads)
        if aborted:
            logger.info(
                "Aborted %d unfinished uploads older than %g s", aborted, self.stale_upload_age
            )

    async def create(self) -> S3BlobWriter:
        """A writer for a fresh key. Nothing reaches S3 until the first part is full."""
        return S3BlobWriter(self, new_key())

    async def reader(self, key: str, offset: int = 0) -> S3BlobReader:
        """Read ``key`` from ``offset``. The caller must close the reader.

        Raise InvalidArgument for a malformed key or an offset outside ``0..size``,
        BlobNotFound if no committed blob has that key, Unavailable if S3 fails.
        """
        size = await self._run(self._head, check_key(key))
        check_offset(offset, size)
        return S3BlobReader(self, key, size, offset)

    async def delete(self, keys: Iterable[str]) -> None:
        """Delete these blobs, 1,000 per DeleteObjects call; missing ones are ignored. A
        malformed key raises InvalidArgument before anything is deleted; Unavailable if S3
        fails (the batches before it are deleted)."""
        checked = list(dict.fromkeys(check_key(key) for key in keys))
        for start in range(0, len(checked), DELETE_BATCH):
            batch = checked[start : start + DELETE_BATCH]
            await self._run(self._delete_batch, batch)
            self.used_bytes -= sum(self._sizes.pop(key, 0) for key in batch)

    async def discard(self, keys: Iterable[str]) -> None:
        """See :meth:`BlobStore.discard`: abort the unfinished multipart uploads of these
        keys (one ListMultipartUploads each), then delete their objects."""
        checked = list(dict.fromkeys(check_key(key) for key in keys))
        for key in checked:
            await self._run(self._abort_uploads_of, key)
        await self.delete(checked)

    async def keys(self, min_age: float = 0.0) -> AsyncIterator[str]:
        """Every committed key (with ``min_age``: whose object is at least that many
        seconds old on S3's clock), one LIST page (1,000 keys, one thread hop) at a time.
        Objects under the prefix whose names are not keys are skipped."""
        pages = await self._run(self._object_pages, min_age)
        while (page := await self._run(_next_page, pages)) is not None:
            for key in page:
                yield key

    async def claim(self, owner: str) -> str | None:
        """See :meth:`BlobStore.claim`: the owner is the object ``prefix/wsq-store``."""
        return await self._run(self._claim, owner)

    async def close(self) -> None:
        """Wait for calls in flight (at most :data:`CLOSE_GRACE` seconds: S3 may not
        answer, and boto3 would wait out its timeouts and retries), stop the threads,
        close the connections. Idempotent. Calls still running then end in their threads
        by themselves; their results are dropped."""
        stopping = _in_daemon_thread(functools.partial(self._executor.shutdown, wait=True))
        await asyncio.wait({stopping}, timeout=CLOSE_GRACE)
        if not stopping.done():
            logger.warning("S3 calls still running at close; leaving them to end by themselves")
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.wait({_in_daemon_thread(client.close)}, timeout=CLOSE_GRACE)

    def _count(self, key: str, size: int) -> None:
        """A blob was committed: count it in :attr:`used_bytes`."""
        self._sizes[key] = size
        self.used_bytes += size

    # -- in the store's threads ------------------------------------------------------------

    def _make_client(self) -> S3Client:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # pragma: no cover - depends on the installation
            raise Unavailable("The S3 blob store needs boto3: pip install 'wsqueue[s3]'") from None
        endpoint = self._endpoint_url or _endpoint_from_env()
        config = Config(
            max_pool_connections=self._max_workers,
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=60,
            # Custom endpoints (MinIO, Ceph, moto) often have no per-bucket host names.
            s3={"addressing_style": "path" if endpoint else "auto"},
            # boto3's default CRC checksums (since 1.36) are refused by some S3-compatible
            # stores; send and check them only where the API requires them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        with self._errors("connect to", ""):
            return boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint,
                region_name=self._region or os.environ.get("AWS_REGION") or None,
                config=config,
            )

    @property
    def _s3(self) -> S3Client:
        if self._client is None:
            raise RuntimeError("S3BlobStore.open() was not called")
        return self._client

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        """Turn boto3's errors into Unavailable, naming the action and the object."""
        where = f"s3://{self.bucket}/{self._base}{key or ''}"
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            reason = f"{error.get('Code', '?')} {error.get('Message', '')}".strip()
            raise Unavailable(f"S3 refused to {action} {where}: {reason}") from exc
        except BotoCoreError as exc:
            raise Unavailable(f"S3 unreachable, could not {action} {where}: {exc}") from exc

    def _create_upload(self, key: str) -> str:
        with self._errors("start an upload of", key):
            return self._s3.create_multipart_upload(Bucket=self.bucket, Key=self._base + key)[
                "UploadId"
            ]

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytearray) -> str:
        with self._errors(f"upload part {number} of", key):
            return self._s3.upload_part(
                Bucket=self.bucket,
                Key=self._base + key,
                UploadId=upload_id,
                PartNumber=number,
                Body=bytes(data),
            )["ETag"]

    def _complete(self, key: str, upload_id: str, parts: list[CompletedPartTypeDef]) -> None:
        with self._errors("complete the upload of", key):
            self._s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self._base + key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )

    def _put(self, key: str, data: bytearray) -> None:
        with self._errors("put", key):
            self._s3.put_object(Bucket=self.bucket, Key=self._base + key, Body=bytes(data))

    def _abort_upload(self, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        with self._errors("abort the upload of", key):
            try:
                self._s3.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._base + key, UploadId=upload_id
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise

    def _claim(self, owner: str) -> str | None:
        found = self._read_owner()
        if not found:
            # Written only if absent (a conditional write): of two servers starting at
            # once, one wins and the other reads the winner. Stores that do not know
            # If-None-Match write it unconditionally.
            if self._write_owner(owner, conditional=True):
                return None
            found = self._read_owner()
        return None if found == owner else found or None

    def _read_owner(self) -> str:
        from botocore.exceptions import ClientError

        with self._errors("read the owner of", OWNER_MARK):
            try:
                body = self._s3.get_object(Bucket=self.bucket, Key=self._base + OWNER_MARK)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                    return ""
                raise
            return body["Body"].read().decode("utf-8", "replace").strip()

    def _write_owner(self, owner: str, *, conditional: bool) -> bool:
        """Write the owner mark; ``False`` if a conditional write found one already."""
        from botocore.exceptions import ClientError

        key, body = self._base + OWNER_MARK, owner.encode() + b"\n"
        with self._errors("record the owner in", OWNER_MARK):
            try:
                if conditional:
                    self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
                else:
                    self._s3.put_object(Bucket=self.bucket, Key=key, Body=body)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                if conditional and code in ("NotImplemented", "InvalidArgument"):
                    return self._write_owner(owner, conditional=False)
                raise
        return True

    def _head(self, key: str) -> int:
        from botocore.exceptions import ClientError

        with self._errors("read", key):
            try:
                return self._s3.head_object(Bucket=self.bucket, Key=self._base + key)[
                    "ContentLength"
                ]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in _NOT_FOUND:
                    raise BlobNotFound(key) from None
                raise

    def _get(self, key: str, offset: int) -> StreamingBody:
        with self._errors("read", key):
            return self._s3.get_object(
                Bucket=self.bucket, Key=self._base + key, Range=f"bytes={offset}-"
            )["Body"]

    def _delete_batch(self, keys: list[str]) -> None:
        with self._errors("delete", f"({len(keys)} blobs)"):
            answer = self._s3.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._base + key} for key in keys], "Quiet": True},
            )
        errors = answer.get("Errors", [])
        if errors:
            first = errors[0]
            raise Unavailable(
                f"S3 refused to delete {len(errors)} of {len(keys)} blobs in"
                f" s3://{self.bucket}/{self._base}: {first.get('Code')} {first.get('Message')}"
            )

    def _object_pages(self, min_age: float = 0.0) -> Iterator[dict[str, int]]:
        """An iterator of LIST pages, each ``{key: size}`` of the objects at least
        ``min_age`` seconds old on S3's clock (its Date header against LastModified);
        consume it in a thread."""
        paginator = self._s3.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._base)
        with self._errors("list", None):
            for page in pages:
                cutoff = None
                if min_age > 0:
                    cutoff = _server_time(page) - datetime.timedelta(seconds=min_age)
                yield self._page_keys(page.get("Contents", []), cutoff)

    def _page_keys(
        self, contents: Iterable[Any], cutoff: datetime.datetime | None = None
    ) -> dict[str, int]:
        found: dict[str, int] = {}
        for item in contents:
            name = item["Key"][len(self._base) :]
            if not _KEY.match(name):
                continue
            modified = item.get("LastModified")
            if cutoff is not None and (modified is None or modified > cutoff):
                continue
            found[name] = item.get("Size", 0)
        return found

    def _abort_uploads_of(self, key: str) -> None:
        """Abort every unfinished upload of ``key``."""
        paginator = self._s3.get_paginator("list_multipart_uploads")
        with self._errors("list the uploads of", key):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._base + key):
                for upload in page.get("Uploads", []):
                    if upload.get("Key") == self._base + key:
                        self._abort_upload(key, upload["UploadId"])

    def _abort_stale_uploads(self) -> int:
        """Abort the unfinished uploads of keys under the prefix older than the age; return
        how many. Ages are read on S3's clock: its Date header against ``Initiated``."""
        paginator = self._s3.get_paginator("list_multipart_uploads")
        aborted = 0
        with self._errors("list the uploads in", None):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._base):
                now = _server_time(page)
                for upload in page.get("Uploads", []):
                    name = upload.get("Key", "")[len(self._base) :]
                    started = upload.get("Initiated")
                    if not _KEY.match(name) or started is None:
                        continue
                    if (now - started).total_seconds() > self.stale_upload_age:
                        self._abort_upload(name, upload["UploadId"])
                        aborted += 1
        return aborted

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _next_page(pages: Iterator[dict[str, int]]) -> dict[str, int] | None:
    return next(pages, None)


def _server_time(page: Any) -> datetime.datetime:
    """The store's clock: the Date header of its answer (this machine's clock without one)."""
    date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        with contextlib.suppress(TypeError, ValueError):
            return email.utils.parsedate_to_datetime(date)
    return datetime.datetime.now(datetime.UTC)


def _endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _in_daemon_thread(call: Callable[[], object]) -> asyncio.Future[None]:
    """Run ``call`` in a daemon thread of its own: a future of its end. A wait given up
    on leaves neither the event loop's default executor (which the loop's shutdown
    joins) nor the process's exit waiting for it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            call()
        except Exception:
            logger.exception("S3 close step failed")
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle)

    threading.Thread(target=run, name="wsq-s3-close", daemon=True).start()
    return done
