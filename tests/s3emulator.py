"""The S3 the tests use: moto's standalone server (an emulator, not S3) in a child process,
on 127.0.0.1 and a free port, so its memory and its GIL are not the test's.

``MotoServer`` starts one; :meth:`MotoServer.bucket` makes a fresh bucket; the standard
variables that point boto3 at it are in :meth:`MotoServer.environ`.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from typing import Any

CHILD = textwrap.dedent(
    """
    import logging, sys
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()  # until the test process closes our stdin (or dies)
    server.stop()
    """
)

_buckets = itertools.count(1)


class MotoServer:
    """A moto server in a child process. :meth:`stop` ends it (also to make S3 vanish)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"moto server did not start (said {line!r})")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        """The variables that send boto3 here, with dummy credentials (moto takes any), and
        no probing of instance metadata or the user's AWS files."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        """A plain boto3 client on this server, for tests to look behind the store."""
        import boto3

        env = self.environ()
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def bucket(self) -> str:
        """A new, empty bucket."""
        name = f"wsq-test-{os.getpid()}-{next(_buckets)}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
