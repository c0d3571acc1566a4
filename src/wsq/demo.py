"""The quick-start demo: a producer streams files to a worker that reports progress,
and an observer prints what happens."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import click

import wsq

FILES = 5
FILE_SIZE = 32 << 20
QUEUE = "demo-checksums"
WORK_PER_MIB = 0.04


async def generated_file(size: int, seed: int) -> AsyncIterator[bytes]:
    """A pseudo-random 'file' produced on the fly, 1 MiB at a time."""
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)
    for _ in range(size // len(block)):
        yield block


async def checksum(task: wsq.Task) -> None:
    """The worker: read the streamed file, hash it, report progress as it goes."""
    digest = hashlib.sha256()
    seen = 0
    stream = task.data["file"]
    async for chunk in stream:
        digest.update(chunk)
        seen += len(chunk)
        await task.update_progress(seen / stream.size)
        await asyncio.sleep(WORK_PER_MIB)  # pretend each MiB takes some work
    click.echo(f"  worker  {task.data['name']}: sha256 {digest.hexdigest()[:16]}...")


async def run_demo(url: str, *, once: bool = False) -> None:
    async with wsq.Client(url) as client:
        queue = client.queue(QUEUE)
        progress: dict[str, int] = {}

        def on_progress(task: wsq.Task, fraction: float) -> None:
            step = int(fraction * 4)
            if progress.get(task.id) != step:
                progress[task.id] = step
                click.echo(f"  event   task {task.id} progress {fraction:.0%}")

        queue.on("task progress", on_progress)
        finished = asyncio.Event()
        completed: list[str] = []

        def on_completed(task: wsq.Task) -> None:
            click.echo(f"  event   task {task.id} completed")
            completed.append(task.id)
            if len(completed) == FILES:
                finished.set()

        queue.on("task completed", on_completed)
        worker = queue.process(checksum, concurrency=2)
        click.echo(f"demo: the dashboard is at {dashboard_url(url)} (open it in a browser)")
        click.echo(f"demo: streaming {FILES} files of {FILE_SIZE >> 20} MiB to {url}")
        for n in range(FILES):
            name = f"file-{n}.bin"
            task = await queue.add(
                {"name": name, "file": generated_file(FILE_SIZE, n)}, autoremove=True
            )
            click.echo(f"  added   {name} as task {task.id}")
        await finished.wait()
        await worker.stop()
        if once:
            click.echo("demo: done. The server stops (--once).")
        else:
            click.echo(
                f"demo: done. The server keeps running at {url} (pid {os.getpid()});"
                f" its dashboard: {dashboard_url(url)}"
            )


def dashboard_url(url: str) -> str:
    """The http(s) address of the dashboard a server at ``url`` (ws:// or wss://) serves."""
    return "http" + url.removeprefix("ws") + "/"
