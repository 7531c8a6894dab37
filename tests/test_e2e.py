"""The real scripts as subprocesses against the test server on 127.0.0.1 (moto's
server mode, or Ceph RGW with S3_TEST_SERVER=rgw)."""

from __future__ import annotations

import os
import pty
import random
import stat
import subprocess
import sys

import pytest
from conftest import ROOT, TEST_SERVER, make_tree, run_script

MiB = 1024 * 1024

AWKWARD_TREE = {
    "plain.txt": b"plain",
    "ünïcödé/naïve café.txt": "ünïcödé".encode(),
    "日本語/ファイル.txt": "日本".encode(),
    "with spaces/a b c.txt": b"spaces",
    "chars/+plus%percent#hash?question&amp=equals.txt": b"specials",
    "chars/100% done (final) [v2] {x} 'q' ~tilde!.md": b"more",
    "empty.txt": b"",
    "a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/deep.txt": b"deep",
}


def snapshot(root) -> dict[str, tuple[bytes, int, int]]:
    """Every file under root: bytes, mtime in ns and permission bits."""
    result = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            info = os.stat(path)
            with open(path, "rb") as file:
                result[os.path.relpath(path, root)] = (
                    file.read(),
                    info.st_mtime_ns,
                    stat.S_IMODE(info.st_mode),
                )
    return result


@pytest.fixture
def awkward_tree(tmp_path):
    files = dict(AWKWARD_TREE)
    files["big/over-threshold.bin"] = random.Random(7).randbytes(9 * MiB + 123)
    root = make_tree(tmp_path / "src", files)
    os.chmod(root / "plain.txt", 0o600)
    os.chmod(root / "chars" / "+plus%percent#hash?question&amp=equals.txt", 0o755)
    os.utime(
        root / "plain.txt", ns=(1_234_567_890_123_456_789, 1_234_567_890_123_456_789)
    )
    return root


def test_round_trip_is_byte_for_byte_with_mtimes_and_modes(
    s3_server, cli_env, awkward_tree, tmp_path, bucket_name
):
    endpoint = ["--endpoint-url", s3_server]
    uploaded = run_script(
        "backup.py",
        str(awkward_tree),
        f"{bucket_name}::round/trip",
        *endpoint,
        env=cli_env,
    )
    assert uploaded.returncode == 0, uploaded.stderr
    assert "uploaded 9, skipped 0, failed 0" in uploaded.stdout
    assert uploaded.stderr == ""

    target = tmp_path / "restored"
    restored = run_script(
        "restore.py",
        f"s3://{bucket_name}/round/trip",
        str(target),
        *endpoint,
        env=cli_env,
    )
    assert restored.returncode == 0, restored.stderr
    assert "restored 9, skipped 0, failed 0" in restored.stdout
    assert snapshot(target) == snapshot(awkward_tree)


def test_second_backup_makes_no_upload(
    s3_server, cli_env, awkward_tree, bucket_name, server_client
):
    location = f"{bucket_name}::p"
    first = run_script(
        "backup.py",
        str(awkward_tree),
        location,
        "--endpoint-url",
        s3_server,
        env=cli_env,
    )
    assert first.returncode == 0, first.stderr
    before = server_client.list_objects_v2(Bucket=bucket_name)["Contents"]
    second = run_script(
        "backup.py",
        str(awkward_tree),
        location,
        "--endpoint-url",
        s3_server,
        env={**cli_env, "PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert second.returncode == 0, second.stderr
    assert "nothing to upload" in second.stdout
    assert "uploaded 0, skipped 9, failed 0" in second.stdout
    assert server_client.list_objects_v2(Bucket=bucket_name)["Contents"] == before
    # With nothing to upload there is no transfer manager to import.
    imported = {line.rsplit("|", 1)[-1].strip() for line in second.stderr.splitlines()}
    assert "botocore.client" in imported
    assert not {"boto3", "s3transfer"} & imported


def test_endpoint_from_environment(
    s3_server, cli_env, tmp_path, bucket_name, server_client
):
    source = make_tree(tmp_path / "src", {"a.txt": b"a"})
    env = {**cli_env, "AWS_ENDPOINT_URL": s3_server}
    result = run_script("backup.py", str(source), bucket_name, env=env)
    assert result.returncode == 0, result.stderr
    assert (
        server_client.get_object(Bucket=bucket_name, Key="a.txt")["Body"].read() == b"a"
    )


@pytest.mark.skipif(
    TEST_SERVER == "seaweedfs",
    reason="SeaweedFS answers GetBucketLocation with no location for every bucket",
)
def test_bucket_created_in_requested_region(
    s3_server, cli_env, tmp_path, bucket_name, server_client
):
    """A bucket location on RGW is its zonegroup's name, not an AWS region."""
    region = "default" if TEST_SERVER == "rgw" else "eu-central-1"
    source = make_tree(tmp_path / "src", {"a.txt": b"a"})
    result = run_script(
        "backup.py",
        str(source),
        bucket_name,
        "--region",
        region,
        "--endpoint-url",
        s3_server,
        env=cli_env,
    )
    assert result.returncode == 0, result.stderr
    assert (
        server_client.get_bucket_location(Bucket=bucket_name)["LocationConstraint"]
        == region
    )


def test_no_progress_line_without_a_terminal(s3_server, cli_env, tmp_path, bucket_name):
    source = make_tree(tmp_path / "src", {f"f{n}.txt": b"x" for n in range(20)})
    result = run_script(
        "backup.py",
        str(source),
        bucket_name,
        "--endpoint-url",
        s3_server,
        env=cli_env,
    )
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.splitlines()[-1].startswith("uploaded 20, skipped 0, failed 0")


def test_progress_line_on_a_terminal(s3_server, cli_env, tmp_path, bucket_name):
    source = make_tree(tmp_path / "src", {f"f{n}.txt": b"x" * 1000 for n in range(50)})
    terminal, stderr_side = pty.openpty()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "backup.py"),
            str(source),
            bucket_name,
            "--endpoint-url",
            s3_server,
        ],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=stderr_side,
        stdin=subprocess.DEVNULL,
    )
    os.close(stderr_side)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    assert process.wait(timeout=60) == 0
    text = shown.decode()
    assert "/50 files, " in text and "/s, ETA" in text
    assert text.endswith("\r\x1b[K")  # the line is cleared before the summary
    assert "uploaded 50" in process.stdout.read().decode()


def test_a_tree_of_several_listing_pages_is_listed_in_ranges_on_the_server(
    s3_server, cli_env, tmp_path, bucket_name, server_client
):
    """The server's own key order and StartAfter, across page boundaries that fall
    between non-ASCII names: nothing is uploaded again, nothing else deleted."""
    names = ["a", "é", "z", "日本", "a-b", "a.b", "a/b"]
    files = {
        f"{names[n % len(names)]}/{n:04d}-{names[n % 3]}.txt": b"%d" % n
        for n in range(2_100)
    }
    source = make_tree(tmp_path / "src", files)
    endpoint = ["--endpoint-url", s3_server]
    location = f"{bucket_name}::p"
    first = run_script("backup.py", str(source), location, *endpoint, env=cli_env)
    assert first.returncode == 0, first.stderr
    (source / "a" / "0000-a.txt").unlink()
    again = run_script(
        "backup.py", str(source), location, "--delete", *endpoint, env=cli_env
    )
    assert again.returncode == 0, again.stderr
    assert "uploaded 0, skipped 2099, failed 0, deleted 1" in again.stdout
    listed = server_client.get_paginator("list_objects_v2").paginate(Bucket=bucket_name)
    keys = {item["Key"] for page in listed for item in page.get("Contents", [])}
    assert keys == {f"p/{name}" for name in files} - {"p/a/0000-a.txt"}
