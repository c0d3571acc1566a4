"""The client verbs of the ``wsq`` command: queue, inspect and fix tasks from a shell, watch
a server, run a worker without writing a ``main()``.

Every verb takes ``--url`` (``WSQ_URL``), ``--token`` (``WSQ_TOKEN``), ``--ca-file``
(``WSQ_CA_FILE``) and ``--json`` (machine-readable output: one JSON document, or one per
line for ``watch``). Exit codes: 0 done; 1 refused or failed (no such task, forbidden, a
task that failed under ``add --wait``); 2 bad usage; 3 the server could not be reached
within ``--connect-timeout``; 130 interrupted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

import wsq
import wsq.sync
from wsq.client.streams import Stream

F = TypeVar("F", bound=Callable[..., Any])
STATES = ("all", "waiting", "active", "completed", "failed")
_stderr = Console(stderr=True, soft_wrap=True)


def _tables() -> Console:
    """Where tables go: standard output, as wide as the terminal (or 160 if piped)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


class Unreachable(click.ClickException):
    exit_code = 3


class Refused(click.ClickException):
    """A request the server refused, or a task that failed: exit code 1."""


def client_options(func: F) -> F:
    """The options every verb shares (see the module docstring)."""
    options = [
        click.option(
            "--url",
            envvar="WSQ_URL",
            default="ws://127.0.0.1:4242",
            show_default=True,
            help="The server, or a cluster's nodes separated by commas (tried in turn).",
        ),
        click.option("--token", envvar="WSQ_TOKEN", help="The client's token (docs/security.md)."),
        click.option(
            "--ca-file",
            envvar="WSQ_CA_FILE",
            type=click.Path(exists=True, dir_okay=False),
            help="PEM CA bundle to trust for wss://.",
        ),
        click.option(
            "--connect-timeout",
            type=click.FloatRange(0, min_open=True),
            default=10.0,
            envvar="WSQ_CONNECT_TIMEOUT",
            show_default=True,
            help="Seconds to keep trying to reach the server (exit code 3 after).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def addresses(url: str) -> list[str]:
    """``--url``'s value as the client's addresses: one, or several separated by commas."""
    return [one.strip() for one in url.split(",") if one.strip()] or [url]


class Session:
    """What a verb needs: a connected client, how to print, and the run of its body."""

    def __init__(self, url: str, token: str | None, ca_file: str | None, timeout: float) -> None:
        self.client = wsq.Client(
            addresses(url),
            backoff=lambda tries: min(0.05 * 2**tries, 1.0),
            token=token,
            ca_file=ca_file,
        )
        self.timeout = timeout

    async def __aenter__(self) -> wsq.Client:
        try:
            await asyncio.wait_for(self.client.connect(), self.timeout)
        except TimeoutError:
            await self.client.close()
            where = ", ".join(self.client.addresses)
            raise Unreachable(f"no wsq server answered at {where}") from None
        except wsq.Unauthorized as exc:
            await self.client.close()
            raise Refused(str(exc)) from None
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()


def run(body: Coroutine[Any, Any, None]) -> None:
    """Run a verb's body; a refusal from the server is one line and exit code 1."""
    try:
        asyncio.run(body)
    except wsq.WsqError as exc:
        raise Refused(str(exc)) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def session(kwargs: dict[str, Any]) -> Session:
    return Session(kwargs["url"], kwargs["token"], kwargs["ca_file"], kwargs["connect_timeout"])


def task_json(task: wsq.Task) -> dict[str, Any]:
    fields = ("id", "queue", "state", "progress", "retries", "error", "options", "worker")
    return {name: getattr(task, name) for name in fields} | {
        "created": task.created,
        "updated": task.updated,
    }


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, default=_stream_json))


def _stream_json(value: Any) -> Any:
    if isinstance(value, Stream):
        return {"stream": {"size": value.size}}
    raise TypeError(f"not JSON: {value!r}")


def _when(seconds: float) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else ""


def _task_table(tasks: list[wsq.Task]) -> Table:
    table = Table(
        Column("id", no_wrap=True),
        "queue",
        "state",
        "progress",
        "retries",
        "error",
        Column("updated", no_wrap=True),
    )
    for t in tasks:
        progress = f"{t.progress:.0%}"
        table.add_row(
            t.id, t.queue, t.state, progress, str(t.retries), t.error or "", _when(t.updated)
        )
    return table


# -- add -------------------------------------------------------------------------------------


def _parse_files(files: tuple[str, ...]) -> list[tuple[list[str], Path]]:
    parsed = []
    for spec in files:
        key, sep, path = spec.partition("=")
        if not sep or not key or not path:
            raise click.BadParameter(f"{spec!r} is not KEY=PATH", param_hint="--file")
        if not Path(path).is_file():
            raise click.BadParameter(f"{path!r} is not a file", param_hint="--file")
        parsed.append((key.split("."), Path(path)))
    return parsed


def _parse_data(text: str | None, files: list[tuple[list[str], Path]]) -> Any:
    try:
        data = json.loads(text) if text is not None else ({} if files else None)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="JSON") from None
    if files and not isinstance(data, dict):
        raise click.BadParameter("--file needs the data to be a JSON object", param_hint="JSON")
    return data


def _with_files(data: Any, files: list[tuple[list[str], Path]], bars: Progress) -> Any:
    """``data`` with each file as a stream at its key, read as the upload takes it."""
    for keys, path in files:
        place = data
        for key in keys[:-1]:
            place = place.setdefault(key, {})
        bar = bars.add_task(path.name, total=path.stat().st_size)
        place[keys[-1]] = _reading(path, bars, bar)
    return data


async def _reading(path: Path, bars: Progress, bar: TaskID) -> AsyncIterator[bytes]:
    """The file's bytes, 1 MiB at a time (read in a thread), advancing its progress bar as
    the upload's flow control takes them."""
    with path.open("rb") as file:
        while chunk := await asyncio.to_thread(file.read, 1 << 20):
            yield chunk
            bars.advance(bar, len(chunk))


def _transfer_bars(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_stderr,
        disable=quiet,
        transient=True,
    )


@click.command()
@click.argument("queue")
@click.argument("data", metavar="[JSON]", required=False)
@click.option(
    "--file",
    "files",
    multiple=True,
    metavar="KEY=PATH",
    help="Upload PATH as the stream at KEY (a.b for nested keys); repeatable.",
)
@click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds without news from the worker before the run fails (-1: none).",
)
@click.option(
    "--retries",
    type=click.IntRange(-1),
    default=0,
    show_default=True,
    help="Failures re-queued (-1: forever).",
)
@click.option("--autoremove", is_flag=True, help="Delete the task once completed.")
@click.option("--id", "task_id", help="The task's id (adding it again is a no-op).")
@click.option("--wait", is_flag=True, help="Wait for the task to end; exit 1 if it failed.")
@client_options
def add(
    queue: str,
    data: str | None,
    files: tuple[str, ...],
    timeout: float,
    retries: int,
    autoremove: bool,
    task_id: str | None,
    wait: bool,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Add a task to QUEUE with JSON data and files; print its id."""
    parsed = _parse_files(files)
    value = _parse_data(data, parsed)

    async def body() -> None:
        async with session(kwargs) as client:
            with _transfer_bars(as_json or not sys.stderr.isatty()) as bars:
                ended = _await_end(client.queue(queue)) if wait else None
                task = await client.queue(queue).add(
                    _with_files(value, parsed, bars), timeout, retries, autoremove, id=task_id
                )
            if ended is None:
                _print_added(task, as_json)
                return
            final = await ended(task.id)
            if as_json:
                print_json(task_json(final))
            else:
                _print_final(final)
            if final.state == "failed":
                raise Refused(f"task {final.id} failed: {final.error}")

    run(body())


def _print_added(task: wsq.Task, as_json: bool) -> None:
    if as_json:
        print_json(task_json(task))
    else:
        click.echo(task.id)


def _print_final(task: wsq.Task) -> None:
    click.echo(f"{task.id} {task.state}" + (f": {task.error}" if task.error else ""))


def _await_end(queue: wsq.Queue) -> Callable[[str], Awaitable[wsq.Task]]:
    """Listen (before the add is sent) for the end of a task of ``queue``: completion, a
    failure that will not be retried, or deletion."""
    ended: dict[str, asyncio.Future[wsq.Task]] = {}

    def future(task_id: str) -> asyncio.Future[wsq.Task]:
        return ended.setdefault(task_id, asyncio.get_running_loop().create_future())

    def end(task: wsq.Task, will_retry: bool = False) -> None:
        if not will_retry and not future(task.id).done():
            future(task.id).set_result(task)

    for event in ("task completed", "task failed", "task deleted"):
        queue.on(event, end)
    return lambda task_id: future(task_id)


# -- listing and inspecting -------------------------------------------------------------------


@click.command()
@client_options
def queues(as_json: bool, **kwargs: Any) -> None:
    """List the queues the server holds tasks or workers for."""

    async def body() -> None:
        async with session(kwargs) as client:
            names = [q.name for q in await client.list_queues()]
        if as_json:
            print_json(names)
        else:
            click.echo("\n".join(names))

    run(body())


@click.command()
@client_options
def stats(as_json: bool, **kwargs: Any) -> None:
    """Counts of tasks by state and workers, per queue."""

    async def body() -> None:
        async with session(kwargs) as client:
            rows = await client.stats()
        if as_json:
            print_json(rows)
            return
        table = Table("queue", "waiting", "active", "completed", "failed", "workers")
        for row in rows:
            counts = [str(row[state]) for state in STATES[1:]]
            table.add_row(row["name"], *counts, str(len(row["workers"])))
        _tables().print(table)

    run(body())


@click.command()
@click.argument("queue", required=False)
@client_options
def workers(queue: str | None, as_json: bool, **kwargs: Any) -> None:
    """List the workers connected now (of QUEUE, or of every queue), with the runs each
    holds and since when."""

    async def body() -> None:
        async with session(kwargs) as client:
            rows = await client.workers(queue)
        if as_json:
            print_json(rows)
            return
        _tables().print(_worker_table(rows))

    run(body())


def _worker_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        Column("worker", no_wrap=True),
        "queue",
        "node",
        "client",
        Column("since", no_wrap=True),
        "slots",
        Column("runs", no_wrap=True),
    )
    for w in rows:
        client = f"{w['client'] or '-'} ({w['peer']})"
        slots = f"{len(w['runs'])}/{w['concurrency']}"
        runs = "\n".join(_run_text(r) for r in w["runs"]) or "idle"
        table.add_row(
            w["id"], w["queue"], w.get("node") or "", client, _when(w["since"]), slots, runs
        )
    return table


def _attempt_table(attempts: list[dict[str, Any]]) -> Table:
    """A task's runs: who held each, when (local times, then how long), how it ended."""
    table = Table(
        "run",
        "worker",
        "node",
        Column("offered", no_wrap=True),
        Column("started", no_wrap=True),
        Column("ended", no_wrap=True),
        "outcome",
        "progress",
    )
    for a in attempts:
        worker = a["worker"] or "-"
        if a["client"]:
            worker += f" ({a['client']})"
        outcome = a["outcome"] or "running"
        if a["error"]:
            outcome += f": {a['error']}"
        progress = "-" if a["progress"] is None else f"{a['progress']:.0%}"
        began = a["started"] or a["offered"]
        table.add_row(
            str(a["run"]),
            worker,
            a["node"] or "-",
            _when(a["offered"]) or "-",
            _when(a["started"]) or "-",
            _ended(a["ended"], began),
            outcome,
            progress,
        )
    return table


def _ended(ended: float | None, began: float | None) -> str:
    if ended is None:
        return "-"
    took = f" ({_duration(ended - began)})" if began is not None else ""
    return _when(ended) + took


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _run_text(run: dict[str, Any]) -> str:
    """One run a worker holds: its task, attempt, progress and since when."""
    if run["started"] is not None:
        when = f"started {_when(run['started'])}"
    elif run["offered"] is not None:
        when = f"offered {_when(run['offered'])}"
    else:
        when = "since the server restarted"
    return f"{run['task']} run {run['run']} {run['progress']:.0%} {when}"


@click.command()
@click.argument("queue")
@click.option("--state", type=click.Choice(STATES), default="all", show_default=True)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", help="Continue a listing (the cursor a previous page printed).")
@client_options
def tasks(
    queue: str, state: str, limit: int, cursor: str | None, as_json: bool, **kwargs: Any
) -> None:
    """List tasks of QUEUE, oldest first."""

    async def body() -> None:
        async with session(kwargs) as client:
            page = await getattr(client.queue(queue), state)(limit=limit, cursor=cursor)
        if as_json:
            print_json({"tasks": [task_json(t) for t in page], "cursor": page.cursor})
            return
        _tables().print(_task_table(page))
        if page.cursor:
            click.echo(f"more: --cursor {page.cursor}")

    run(body())


@click.command()
@click.argument("task_id", metavar="ID")
@client_options
def show(task_id: str, as_json: bool, **kwargs: Any) -> None:
    """Show a task: its fields, its data (streams by size) and its attempts."""

    async def body() -> None:
        async with session(kwargs) as client:
            task = wsq.Task(client, {"id": task_id, "queue": ""})
            data = await task.get_data()
            attempts = await task.attempts()
        if as_json:
            print_json(task_json(task) | {"data": data, "attempts": attempts})
            return
        for name, value in task_json(task).items():
            shown = json.dumps(value) if isinstance(value, dict) else value
            click.echo(f"{name + ':':9} {shown if value is not None else ''}")
        click.echo("data:     " + json.dumps(data, default=_stream_json, indent=2))
        if not attempts:
            click.echo("attempts: none")
            return
        click.echo("attempts:")
        _tables().print(_attempt_table(attempts))

    run(body())


def _each(verb: str, method: str) -> click.Command:
    """A command applying ``Task.<method>`` to each ID; exit 1 if any was refused."""

    @click.command(verb)
    @click.argument("task_ids", metavar="ID...", nargs=-1, required=True)
    @client_options
    def command(task_ids: tuple[str, ...], as_json: bool, **kwargs: Any) -> None:
        async def body() -> None:
            refused = 0
            async with session(kwargs) as client:
                for task_id in task_ids:
                    try:
                        await getattr(wsq.Task(client, {"id": task_id, "queue": ""}), method)()
                    except wsq.WsqError as exc:
                        refused += 1
                        _stderr.print(f"{task_id}: {exc}", markup=False)
                    else:
                        click.echo(json.dumps({"id": task_id}) if as_json else task_id)
            if refused:
                raise Refused(f"{refused} of {len(task_ids)} refused")

        run(body())

    return command


retry = _each("retry", "retry")
retry.help = "Move failed tasks back to waiting (failure count reset)."
rm = _each("rm", "remove")
rm.help = "Delete tasks and their streams, in any state (an active run is aborted)."


@click.command()
@click.argument("task_id", metavar="ID")
@click.argument("key", metavar="KEY")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to this file (default: standard output).",
)
@client_options
def get(task_id: str, key: str, output: str | None, as_json: bool, **kwargs: Any) -> None:
    """Download the stream at KEY (a.b for nested keys) of a task's data."""

    async def body() -> None:
        async with session(kwargs) as client:
            data = await wsq.Task(client, {"id": task_id, "queue": ""}).get_data()
            stream = _at(data, key)
            if output is None:
                await _copy(stream, sys.stdout.buffer, quiet=True)
                return
            with open(output, "wb") as file:  # noqa: ASYNC230 (a local file, written in a thread)
                await _copy(stream, file, quiet=as_json or not sys.stderr.isatty())
        if as_json:
            print_json({"id": task_id, "key": key, "size": stream.size, "output": output})

    run(body())


def _at(data: Any, key: str) -> Stream:
    value = data
    for part in key.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise Refused(f"the task's data has no {key!r}")
    if not isinstance(value, Stream):
        raise Refused(f"{key!r} is not a stream (it is {type(value).__name__})")
    return value


async def _copy(stream: Stream, file: BinaryIO, quiet: bool) -> None:
    with _transfer_bars(quiet) as bars:
        bar = bars.add_task(f"{stream.task_id} {stream.index}", total=stream.size)
        async for chunk in stream:
            await asyncio.to_thread(file.write, chunk)
            bars.advance(bar, len(chunk))
        await asyncio.to_thread(file.flush)


# -- watch -------------------------------------------------------------------------------------


@click.command()
@click.argument("queue_names", metavar="[QUEUE]...", nargs=-1)
@client_options
def watch(queue_names: tuple[str, ...], as_json: bool, **kwargs: Any) -> None:
    """Print events as they happen (all queues, or these), with progress bars of active
    tasks, until Ctrl-C."""

    async def body() -> None:
        async with session(kwargs) as client:
            events = client.events()  # subscribes
            await client.stats()  # answered after the subscription took effect
            # On standard error even with --json: scripts may wait for it.
            _stderr.print(
                f"watching {', '.join(queue_names) or 'every queue'} at "
                f"{client.address} (Ctrl-C stops)",
                markup=False,
            )
            with _progress_bars(as_json) as bars:
                watching = asyncio.create_task(_watch(events, set(queue_names), as_json, bars))
                await _until_signal(watching)

    run(body())


async def _until_signal(task: asyncio.Task[None]) -> None:
    """Run ``task`` until it ends or SIGINT/SIGTERM arrives (then cancel it): a normal way
    to stop, so exit code 0."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _progress_bars(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        console=_stderr,
        disable=quiet,
    )


async def _watch(
    events: AsyncIterator[wsq.Event], wanted: set[str], as_json: bool, bars: Progress
) -> None:
    running: dict[str, TaskID] = {}
    async for event in events:
        first = event.args[0] if event.args else {}
        queue = first.get("queue") if isinstance(first, dict) else None
        if wanted and queue not in wanted:
            continue
        if as_json:
            print_json({"event": event.event, "args": event.args, "time": time.time()})
            continue
        _show_event(event, first, bars)
        _track(event, first, bars, running)


def _show_event(event: wsq.Event, first: dict[str, Any], bars: Progress) -> None:
    if event.event == "task progress":
        return  # the bar shows it
    detail = ""
    if event.event == "task failed":
        detail = f" {first.get('error')!r}" + (" (will retry)" if event.args[1] else "")
    elif event.event == "worker started":
        detail = f" {event.args[1]['id']}"
    stamp = time.strftime("%H:%M:%S")
    name = first.get("id", "")
    bars.console.print(
        f"{stamp} {first.get('queue', '')} {event.event} {name}{detail}",
        markup=False,
        highlight=False,
    )


def _track(
    event: wsq.Event, first: dict[str, Any], bars: Progress, running: dict[str, TaskID]
) -> None:
    task_id = first.get("id", "")
    if event.event == "task started":
        running[task_id] = bars.add_task(f"{first['queue']} {task_id}", total=1.0)
    elif event.event == "task progress" and task_id in running:
        bars.update(running[task_id], completed=event.args[1])
    elif event.event in ("task completed", "task failed", "task deleted") and task_id in running:
        bars.remove_task(running.pop(task_id))


# -- worker ------------------------------------------------------------------------------------


def load_handler(spec: str) -> Callable[..., Any]:
    """``package.module:function`` (or ``:object.method``), imported with the current
    folder on the path, as ``rq worker`` and ``celery -A`` do."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise click.BadParameter(f"{spec!r} is not MODULE:FUNCTION", param_hint="HANDLER")
    sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="HANDLER"
        ) from None
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise click.BadParameter(f"{module_name!r} has no {attribute!r}", param_hint="HANDLER")
    if not callable(target):
        raise click.BadParameter(f"{spec!r} is not callable", param_hint="HANDLER")
    return target  # type: ignore[no-any-return]


@click.command()
@click.argument("handler_spec", metavar="MODULE:FUNCTION")
@click.option("--queue", "-q", "queue_name", required=True, help="The queue to work on.")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 10_000),
    default=1,
    show_default=True,
    help="Tasks run at once.",
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="On SIGTERM/SIGINT, seconds to let running tasks finish before aborting.",
)
@client_options
def worker(
    handler_spec: str, queue_name: str, concurrency: int, grace: float, as_json: bool, **kwargs: Any
) -> None:
    """Run a worker: call MODULE:FUNCTION(task) for each task of --queue (sync or async;
    returning is success, raising fails the task), reconnecting forever, until SIGTERM or
    Ctrl-C."""
    handler = load_handler(handler_spec)
    if not inspect.iscoroutinefunction(handler):
        handler = _in_thread(handler, concurrency)
    client = wsq.Client(addresses(kwargs["url"]), token=kwargs["token"], ca_file=kwargs["ca_file"])
    run(_work(client, queue_name, handler, concurrency, grace))


def _in_thread(handler: Callable[..., Any], concurrency: int) -> Callable[..., Awaitable[Any]]:
    """A sync handler runs in a thread of its own pool, so it may block without stalling
    the connection; it gets a :mod:`wsq.sync` view of the task (blocking
    ``update_progress()``, streams as files)."""
    threads = concurrent.futures.ThreadPoolExecutor(concurrency, "wsq-worker")

    @functools.wraps(handler)
    async def threaded(task: wsq.Task) -> Any:
        loop = asyncio.get_running_loop()
        view = wsq.sync.task_in_thread(task, loop)
        return await loop.run_in_executor(threads, handler, view)

    return threaded


async def _work(
    client: wsq.Client, queue: str, handler: Callable[..., Any], concurrency: int, grace: float
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client.on("connect", lambda: _stderr.print(f"worker: connected to {client.address}"))
    client.on("disconnect", lambda: _stderr.print("worker: disconnected; reconnecting"))
    worker = client.queue(queue).process(handler, concurrency=concurrency)
    _stderr.print(
        f"worker {worker.id}: queue {queue!r}, concurrency {concurrency} (SIGTERM or Ctrl-C stops)",
        markup=False,
    )
    await stop.wait()
    _stderr.print(f"worker: stopping; running tasks have {grace:g} s to finish", markup=False)
    stopping = asyncio.create_task(worker.stop(), name="wsq-worker-stop")
    stop.clear()
    second = asyncio.create_task(stop.wait(), name="wsq-second-signal")
    done, _ = await asyncio.wait(
        {stopping, second}, timeout=grace, return_when=asyncio.FIRST_COMPLETED
    )
    second.cancel()
    if stopping not in done:
        _stderr.print("worker: aborting the tasks still running")
    await client.close()
    _stderr.print("worker: stopped")


COMMANDS = [add, queues, stats, workers, tasks, show, retry, rm, get, watch, worker]
