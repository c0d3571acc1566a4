"""The ``wsq`` command: ``wsq server`` runs a server, ``wsq demo`` runs one with a demo."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import resource
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click

from wsq import __version__
from wsq.exceptions import ServerError, Unavailable
from wsq.server.app import Server
from wsq.server.auth import Authenticator, AuthFileError
from wsq.server.logs import configure, log

_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def _stacked(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator applying ``options`` in the order listed (as ``--help`` shows them)."""

    def decorate(func: Any) -> Any:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _seconds(
    *, zero_disables: bool = False
) -> Callable[[click.Context, click.Parameter, float], float]:
    """A callback checking a duration option: finite, and positive (or 0 for off)."""

    def check(ctx: click.Context, param: click.Parameter, value: float) -> float:
        if math.isfinite(value) and (value > 0 or (value == 0 and zero_disables)):
            return value
        low = "0 (off) or more" if zero_disables else "more than 0"
        raise click.BadParameter(f"{value} is not a number of seconds {low}.")

    return check


_server_options = _stacked(
    click.option(
        "--host",
        default="127.0.0.1",
        envvar="WSQ_HOST",
        show_default=True,
        help="Interface to listen on.",
    ),
    click.option(
        "--port",
        type=click.IntRange(0, 65535),
        default=4242,
        envvar=["WSQ_PORT", "PORT"],
        show_default=True,
        help="Port to listen on (0 picks a free one).",
    ),
    click.option(
        "--data-dir",
        default="./wsq-data",
        envvar="WSQ_DATA_DIR",
        show_default=True,
        help="Where the SQLite database and blobs live.",
    ),
    click.option(
        "--database",
        metavar="URL",
        default=None,
        envvar="WSQ_DATABASE",
        callback=lambda ctx, param, value: _database(value),
        help="Where the state lives: postgresql://user:password@host:5432/database"
        " [default: SQLite in DATA_DIR].",
    ),
    click.option(
        "--storage",
        metavar="URL",
        default=None,
        envvar="WSQ_STORAGE",
        callback=lambda ctx, param, value: _storage(value),
        help="Where stream data lives: s3://bucket/prefix (endpoint, region and credentials"
        " from the AWS_* variables) or file:///path [default: DATA_DIR/blobs].",
    ),
    click.option(
        "--heartbeat-interval",
        type=float,
        default=5.0,
        envvar="WSQ_HEARTBEAT_INTERVAL",
        callback=_seconds(zero_disables=True),
        show_default=True,
        help="Seconds between pings; 3 missed pongs drop a connection (0: no heartbeat).",
    ),
    click.option(
        "--worker-timeout",
        type=float,
        default=1.0,
        envvar="WSQ_WORKER_TIMEOUT",
        callback=_seconds(),
        show_default=True,
        help="Seconds a worker has to acknowledge an offered task.",
    ),
    click.option(
        "--node-name",
        default=None,
        envvar="WSQ_NODE_NAME",
        callback=lambda ctx, param, value: _node_name(value),
        help="This node's name in logs, stats and the dashboard [default: HOST:PORT].",
    ),
    click.option(
        "--lease",
        type=float,
        default=10.0,
        envvar="WSQ_LEASE",
        callback=_seconds(),
        show_default=True,
        help="With --database: seconds after which a node that stopped renewing its lease"
        " is dead and another takes its running tasks over.",
    ),
    click.option(
        "--log-level", type=_LEVELS, default="info", envvar="WSQ_LOG_LEVEL", show_default=True
    ),
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        envvar="WSQ_LOG_FORMAT",
        show_default=True,
        help="json: one JSON object per line.",
    ),
)


def _node_name(value: str | None) -> str | None:
    from wsq.server.app import check_node_name

    try:
        return None if value is None else check_node_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _storage(value: str | None) -> str | None:
    from wsq.blobs import check_storage_url

    try:
        return None if value is None else check_storage_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _database(value: str | None) -> str | None:
    from wsq.storage import check_database_url

    try:
        return None if value is None else check_database_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(value: str) -> int:
    """A number of bytes: ``1048576``, ``512K``, ``64MiB``, ``10G`` (units are powers of
    1024; ``B`` and ``iB`` are optional). Raise ValueError."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    number = text.rstrip("KMGT")
    unit = text[len(number) :]
    if unit not in _UNITS or not number:
        raise ValueError(value)
    size = int(float(number) * 1024 ** _UNITS[unit])
    if size < 1:
        raise ValueError(value)
    return size


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a size of at least 1 byte like 1048576, 512K, 64MiB or 10G."
        ) from None


_limit_options = _stacked(
    click.option(
        "--max-message",
        "max_message_size",
        metavar="BYTES",
        callback=_size,
        default="1MiB",
        envvar="WSQ_MAX_MESSAGE",
        show_default=True,
        help="Largest control message (text frame).",
    ),
    click.option(
        "--max-data",
        "max_data_size",
        metavar="BYTES",
        callback=_size,
        default="1MiB",
        envvar="WSQ_MAX_DATA",
        show_default=True,
        help="Largest JSON data of one task (streams not counted).",
    ),
    click.option(
        "--max-stream",
        "max_stream_size",
        metavar="BYTES",
        callback=_size,
        default=None,
        envvar="WSQ_MAX_STREAM",
        help="Largest stream of one task [default: none].",
    ),
    click.option(
        "--max-blob-bytes",
        metavar="BYTES",
        callback=_size,
        default=None,
        envvar="WSQ_MAX_BLOB_BYTES",
        help="Most bytes of streams stored in all [default: until the disk is full].",
    ),
    click.option(
        "--max-connections",
        type=click.IntRange(1),
        default=10_000,
        envvar="WSQ_MAX_CONNECTIONS",
        show_default=True,
        help="Connections beyond this are refused (HTTP 503).",
    ),
    click.option(
        "--max-pending",
        type=click.IntRange(1),
        default=1024,
        envvar="WSQ_MAX_PENDING",
        show_default=True,
        help="Sockets that have not said hello yet (TCP, TLS, HTTP or WebSocket"
        " handshake in progress); past it the oldest is closed.",
    ),
    click.option(
        "--max-requests",
        type=click.IntRange(1),
        default=10_000,
        envvar="WSQ_MAX_REQUESTS",
        show_default=True,
        help="Requests in flight per connection.",
    ),
    click.option(
        "--max-uploads",
        type=click.IntRange(1),
        default=100,
        envvar="WSQ_MAX_UPLOADS",
        show_default=True,
        help="Uploads open at once per connection.",
    ),
    click.option(
        "--max-workers",
        type=click.IntRange(1),
        default=1000,
        envvar="WSQ_MAX_WORKERS",
        show_default=True,
        help="Workers registered at once per connection.",
    ),
    click.option(
        "--min-task-timeout",
        type=click.FloatRange(min=0, max=86_400),
        default=0.1,
        envvar="WSQ_MIN_TASK_TIMEOUT",
        show_default=True,
        help="Smallest task timeout (seconds) an add may ask for; -1 (none) is always allowed.",
    ),
    click.option(
        "--max-outgoing",
        metavar="BYTES",
        callback=_size,
        default="64MiB",
        envvar="WSQ_MAX_OUTGOING",
        show_default=True,
        help="Unread outgoing bytes after which a client is dropped.",
    ),
    click.option(
        "--max-buffered",
        metavar="BYTES",
        callback=_size,
        default="1GiB",
        envvar="WSQ_MAX_BUFFERED",
        show_default=True,
        help="Unsent bytes of all clients, plus one frame per client that has not said"
        " hello; past it the largest backlog is dropped, the oldest silent client closed.",
    ),
    click.option(
        "--metrics-max-queues",
        type=click.IntRange(0),
        default=100,
        envvar="WSQ_METRICS_MAX_QUEUES",
        show_default=True,
        help="Queues with a queue label of their own in /metrics; the others count"
        ' under queue="_other".',
    ),
    click.option(
        "--history-max-queues",
        type=click.IntRange(0),
        default=100,
        envvar="WSQ_HISTORY_MAX_QUEUES",
        show_default=True,
        help="Busy queues whose last hour the server keeps for the dashboard's charts"
        " (115 KB each).",
    ),
)


_security_options = _stacked(
    click.option(
        "--auth-file",
        type=click.Path(exists=True, dir_okay=False),
        envvar="WSQ_AUTH_FILE",
        help="TOML or YAML file mapping tokens to roles per queue pattern; with it,"
        " connections without a valid token are refused (docs/security.md).",
    ),
    click.option(
        "--allowed-origins",
        default="",
        envvar="WSQ_ALLOWED_ORIGINS",
        help="Comma-separated origins whose pages may connect (* for any). Pages from"
        " the server's own origin always may; requests without Origin are not browsers.",
    ),
    click.option(
        "--server-names",
        default="",
        envvar="WSQ_SERVER_NAMES",
        help="Comma-separated host names this server is reached by, beside its address"
        " (and localhost on loopback): browser pages under these names may connect.",
    ),
    click.option(
        "--tls-cert",
        type=click.Path(exists=True, dir_okay=False),
        envvar="WSQ_TLS_CERT",
        help="PEM certificate chain: serve wss:// and https:// (needs --tls-key).",
    ),
    click.option(
        "--tls-key",
        type=click.Path(exists=True, dir_okay=False),
        envvar="WSQ_TLS_KEY",
        help="PEM private key for --tls-cert.",
    ),
)


def _security_settings(
    auth_file: str | None,
    allowed_origins: str,
    server_names: str,
    tls_cert: str | None,
    tls_key: str | None,
) -> dict[str, Any]:
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together.")
    context = None
    if tls_cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(tls_cert, tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise click.UsageError(f"Cannot load the TLS certificate and key: {exc}") from None
    auth = None
    if auth_file is not None:
        try:
            auth = Authenticator.load(auth_file)
        except AuthFileError as exc:
            raise click.UsageError(str(exc)) from None
    origins = [o.strip() for o in allowed_origins.split(",") if o.strip()]
    names = [n.strip() for n in server_names.split(",") if n.strip()]
    return {"auth": auth, "allowed_origins": origins, "server_names": names, "ssl": context}


class _UsageLine(click.ClickException):
    """A usage error shown as one line (the option and what is wrong), exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"wsq: error: {self.format_message()}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _UsageLine(exc.format_message()) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsq")
def main() -> None:
    """wsq: a WebSocket task queue with streaming task data."""


@main.command()
@_server_options
@_security_options
@_limit_options
def server(
    log_level: str,
    log_format: str,
    auth_file: str | None,
    allowed_origins: str,
    server_names: str,
    tls_cert: str | None,
    tls_key: str | None,
    **settings: Any,
) -> None:
    """Run a wsq server (SQLite + files under --data-dir; no other service needed)."""
    security = _security_settings(auth_file, allowed_origins, server_names, tls_cert, tls_key)
    configure(log_level, log_format)
    _tune_gc()
    _run(_serve(Server(**settings, **security)))


GC_THRESHOLDS = (20_000, 50, 100)
"""The server's garbage collector thresholds (Python's: 700, 10, 10)."""


def _tune_gc() -> None:
    """Collect garbage less often in the server process: each task allocates many small
    containers, and with Python's default thresholds the collector ran so often that
    these thresholds cut the server's CPU by 15-20% per add and 8-12% per task
    (docs/decisions.md). What is loaded at start-up is frozen: never scanned again."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main``; a server that cannot start (its folder in use, its port taken) ends
    with the reason and exit code 1, not a traceback. Once it has stopped, the process
    exits at once even if calls it gave up on are still running in threads (S3 not
    answering: boto3 ends them only after its timeouts and retries, minutes later)."""
    try:
        _run_loop(main)
    except (ServerError, Unavailable, OSError) as exc:
        raise click.ClickException(f"wsq server could not run: {exc}") from None
    left = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon]
    left.remove(threading.main_thread().name)
    if left:
        names = ", ".join(sorted(set(left)))
        log(
            logging.WARNING,
            "calls abandoned",
            f"Exiting without waiting for {len(left)} threads still in calls ({names}).",
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@main.command()
@_server_options
@click.option("--once", is_flag=True, help="Exit after the demo instead of serving on.")
def demo(log_level: str, log_format: str, once: bool, **settings: Any) -> None:
    """Run a server with a demo beside it: a producer streams files to a worker that
    reports progress. The server keeps running afterwards (Ctrl-C stops it)."""
    from wsq.demo import run_demo

    configure(log_level, log_format)
    _run(_serve(Server(**settings), demo=run_demo, once=once))


@main.command()
@click.option(
    "--database",
    metavar="URL",
    default=None,
    envvar="WSQ_DATABASE",
    callback=lambda ctx, param, value: _database(value),
    help="The PostgreSQL database to migrate [default: the SQLite file in DATA_DIR].",
)
@click.option(
    "--data-dir",
    default="./wsq-data",
    envvar="WSQ_DATA_DIR",
    show_default=True,
    help="Where the SQLite database lives (without --database).",
)
def migrate(database: str | None, data_dir: str) -> None:
    """Create or upgrade the state store's schema, then exit (servers also do this when
    they start). Prints the schema version reached."""
    try:
        found, reached = asyncio.run(_migrate(database, data_dir))
    except (ServerError, Unavailable, OSError) as exc:
        raise click.ClickException(f"wsq migrate failed: {exc}") from None
    where = "PostgreSQL" if database else "SQLite"
    change = f"migrated from version {found}" if found != reached else "already up to date"
    click.echo(f"wsq: {where} schema at version {reached} ({change}).")


async def _migrate(database: str | None, data_dir: str) -> tuple[int, int]:
    if database is not None:
        from wsq.storage.postgres import migrate as migrate_postgres

        return await migrate_postgres(database)
    from wsq.storage.sqlite import migrate_file

    return await asyncio.to_thread(migrate_file, Path(data_dir) / "wsq.db")


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (it halves the cost of each network round
    trip here; docs/decisions.md), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _raise_open_file_limit() -> None:
    """A server holds one descriptor per connection: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(server: Server, demo: Any = None, once: bool = False) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly."""
    _raise_open_file_limit()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        if demo is not None:
            demo_task = asyncio.create_task(demo(server.url, once=once), name="wsq-demo")
            if once:
                demo_task.add_done_callback(lambda _: stop.set())
        await stop.wait()
        if demo is not None:
            demo_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await demo_task


def _add_client_verbs() -> None:
    from wsq.commands import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_add_client_verbs()
