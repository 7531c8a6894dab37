"""A throw-away Ceph cluster serving S3 (the RADOS Gateway) on 127.0.0.1.

    with rgw_cluster(folder, access_key="testing", secret_key="...") as cluster:
        boto3.client("s3", endpoint_url=cluster.url, ...)

    python tests/rgwserver.py   # start one by hand; prints its URL and keys, Ctrl-C stops it

One monitor, one OSD that keeps its data in memory (memstore), no manager,
no authentication between the daemons, pools of one copy, and radosgw with one
S3 user, all on free ports of 127.0.0.1, with their configuration, logs and
sockets in `folder`. It needs Debian's `ceph-mon`, `ceph-osd` and `radosgw`
packages and nothing else: only the standard library, so that the tests'
conftest.py and bench/run.py both start it from this one module.

Leaving the block stops exactly the processes it started, with SIGKILL (SIGTERM
makes memstore write itself out first, 5-7 s) and waits for each, also when the
start fails halfway or the block is left by Ctrl-C.
"""

from __future__ import annotations

import ctypes
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("ceph-mon", "ceph-osd", "radosgw")
START_TIMEOUT = 90  # seconds; it starts in about 3 on an idle 2-core machine

# Settings measured to matter (tests and bench both depend on them):
# - "ms mon client mode = crc": by default radosgw insists on a secure connection
#   to the monitor, which auth none cannot give, and retries forever (error -13).
# - "paxos propose interval = 0.1": the monitor commits map changes ten times as
#   often; cold start 12 s -> ~2.2 s, the first bucket 2.1 s -> 0.3 s.
# - pools of one copy and 8 placement groups: one OSD holds every copy, and
#   radosgw's own pools stay under the limit of placement groups per OSD.
# - memstore holds 1 GiB by default and radosgw frees the data of deleted
#   objects only after 2 hours: a benchmark run filled it, and a full OSD makes
#   every write wait forever. Memory is taken only as data is written.
CEPH_CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_port}]
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
paxos propose interval = 0.1
mon allow pool size one = true
osd objectstore = memstore
memstore device bytes = 8589934592
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
run dir = {folder}/run
admin socket = {folder}/run/$name.asok
log file = {folder}/log/$name.log
mon data = {folder}/mon
osd data = {folder}/osd
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}{tls}
rgw data = {folder}/rgw
rgw gc obj min wait = 1
rgw gc processor period = 5
# SSE-C over the tests' plain http on 127.0.0.1 (RGW refuses it without TLS).
rgw crypt require ssl = false
"""


@dataclass(frozen=True)
class Cluster:
    url: str  # http://127.0.0.1:PORT, the S3 endpoint
    access_key: str
    secret_key: str
    conf: Path  # ceph.conf, for `ceph -c` and `radosgw-admin -c` by hand
    server_pids: tuple[int, ...]  # the monitor's, the OSD's and radosgw's
    https_url: str | None = None  # https://127.0.0.1:PORT, when started with tls


def missing_programs() -> list[str]:
    """The Ceph programs this needs that are not on PATH."""
    programs = (
        "monmaptool",
        "ceph-mon",
        "ceph",
        "ceph-osd",
        "radosgw",
        "radosgw-admin",
    )
    return [name for name in programs if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGKILL each process this module started, and reap it."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()


_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies,
    so that not even a killed test run leaves a daemon behind."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _daemon(
    program: str, args: list[str], conf: Path, processes: list[subprocess.Popen]
) -> None:
    """Start a Ceph daemon in the foreground (-f), so that its pid is ours to stop;
    its output goes to log/PROGRAM.out beside `conf`."""
    with open(conf.parent / "log" / f"{program}.out", "ab") as out:
        # Its own session: a Ctrl-C in the terminal reaches only our process,
        # which then kills the daemon, instead of a slow clean shutdown of each.
        processes.append(
            subprocess.Popen(
                [program, "-c", str(conf), "-f", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Safe beside threads here: one prctl call, libc loaded before.
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        )


def _run(argv: list[str], folder: Path, timeout: float) -> str:
    """A Ceph command line tool to its end; its output, or RuntimeError with it."""
    result = subprocess.run(
        argv,
        cwd=folder,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-500:]}"
        )
    return result.stdout


def _wait_for_s3(url: str, processes: list[subprocess.Popen], deadline: float) -> None:
    """Until the S3 server at `url` answers HTTP (any status), or fail if a
    daemon died; shared by seaweedserver.py."""
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{process.args[0]} exited at start (code {process.returncode})"
                )
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # an S3 error answer: it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{processes[-1].args[0]} did not answer at {url} in time")


@contextmanager
def rgw_cluster(
    folder: Path, access_key: str, secret_key: str, tls: tuple[Path, Path] | None = None
) -> Iterator[Cluster]:
    """Start the cluster with its files in `folder` (made if missing), yield it, stop
    it. With `tls` (a certificate and its key, PEM files), RGW also serves HTTPS."""
    missing = missing_programs()
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not found: install the Debian packages "
            f"{' '.join(PACKAGES)} (apt-get install --no-install-recommends ...)"
        )
    folder = Path(folder).resolve()
    for sub in ("mon", "osd", "run", "log", "rgw"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    fsid, osd_uuid = uuid.uuid4(), uuid.uuid4()
    mon_port, rgw_port, https_port = free_port(), free_port(), free_port()
    frontend = ""
    if tls:
        frontend = (
            f" ssl_endpoint=127.0.0.1:{https_port} ssl_certificate={tls[0]}"
            f" ssl_private_key={tls[1]}"
        )
    conf = folder / "ceph.conf"
    conf.write_text(
        CEPH_CONF.format(
            fsid=fsid, mon_port=mon_port, rgw_port=rgw_port, folder=folder, tls=frontend
        )
    )
    with_conf = ["-c", str(conf)]
    deadline = time.monotonic() + START_TIMEOUT
    processes: list[subprocess.Popen] = []
    try:
        monmap = str(folder / "monmap")
        _run(
            ["monmaptool", "--create", "--fsid", str(fsid),
             "--addv", "a", f"[v2:127.0.0.1:{mon_port}]", monmap],
            folder, 30,
        )  # fmt: skip
        _run(
            ["ceph-mon", *with_conf, "--mkfs", "-i", "a", "--monmap", monmap],
            folder,
            30,
        )
        _daemon("ceph-mon", ["-i", "a"], conf, processes)
        osd_id = _run(
            ["ceph", *with_conf, "--connect-timeout", "30", "osd", "new", str(osd_uuid)],
            folder, 60,
        ).strip()  # fmt: skip
        _run(
            ["ceph-osd", *with_conf, "-i", osd_id, "--mkfs", "--osd-uuid", str(osd_uuid)],
            folder, 60,
        )  # fmt: skip
        _daemon("ceph-osd", ["-i", osd_id], conf, processes)
        _daemon("radosgw", ["-n", "client.rgw"], conf, processes)
        url = f"http://127.0.0.1:{rgw_port}"
        _wait_for_s3(url, processes, deadline)
        _run(
            ["radosgw-admin", *with_conf, "user", "create", "--uid", "tester",
             "--display-name", "tester", "--access-key", access_key, "--secret", secret_key],
            folder, 60,
        )  # fmt: skip
        pids = tuple(process.pid for process in processes)
        https_url = f"https://127.0.0.1:{https_port}" if tls else None
        yield Cluster(url, access_key, secret_key, conf, pids, https_url)
    finally:
        _stop(processes)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_by_hand(start, prefix: str, where: Callable[[object], str]) -> int:
    """Start a server by hand with start(folder, access_key, secret_key), print how
    to reach it (and `where` its files are), and stop it on Ctrl-C or SIGTERM."""
    # Also when started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        try:
            with start(Path(folder), "testing", "testing-secret") as server:
                print(
                    f"S3 at {server.url}  access key {server.access_key}"
                    f"  secret {server.secret_key}\n{where(server)}  (Ctrl-C stops it)",
                    flush=True,
                )
                signal.pause()
        except KeyboardInterrupt:
            return 0
    return 0


def main() -> int:
    """Start a cluster by hand; Ctrl-C or SIGTERM stops it."""
    return serve_by_hand(
        rgw_cluster, "rgw-", lambda cluster: f"ceph.conf {cluster.conf}"
    )


if __name__ == "__main__":
    sys.exit(main())
