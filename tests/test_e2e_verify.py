"""--checksum, --check and md5chksum end to end: the real scripts as subprocesses
against moto's server on 127.0.0.1, and rclone checking our backup."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, UNPRIVILEGED, make_tree, run_script

MiB = 1024 * 1024
OLD = 1_600_000_000  # an mtime long before any upload


@pytest.fixture
def tree(tmp_path):
    root = make_tree(
        tmp_path / "src",
        {
            "a.txt": b"hello",
            "sub/b.txt": b"world",
            # Over the multipart threshold: its ETag is not its MD5.
            "big.bin": random.Random(12).randbytes(9 * MiB + 17),
        },
    )
    for path in root.rglob("*"):
        os.utime(path, (OLD, OLD))
    return root


@pytest.fixture
def backed_up(tree, moto_server, cli_env, bucket_name):
    """The tree backed up to BUCKET::p; the arguments that name the backup."""
    location = [f"{bucket_name}::p", "--endpoint-url", moto_server]
    result = run_script("backup.py", str(tree), *location, env=cli_env)
    assert result.returncode == 0, result.stderr
    return location


def body(client, bucket, key) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_same_size_edit_with_an_older_mtime_goes_up_only_with_checksum(
    tree, backed_up, cli_env, server_client, bucket_name
):
    # cp -p, an unzip, a clock set back: same size, other bytes, an older mtime.
    (tree / "a.txt").write_bytes(b"HELLO")
    os.utime(tree / "a.txt", (OLD - 3600, OLD - 3600))
    by_time = run_script("backup.py", str(tree), *backed_up, env=cli_env)
    assert by_time.returncode == 0, by_time.stderr
    assert "uploaded 0, skipped 3" in by_time.stdout
    assert body(server_client, bucket_name, "p/a.txt") == b"hello"

    by_content = run_script(
        "backup.py", str(tree), *backed_up, "--checksum", "-v", env=cli_env
    )
    assert by_content.returncode == 0, by_content.stderr
    assert "uploaded 1, skipped 2" in by_content.stdout
    assert body(server_client, bucket_name, "p/a.txt") == b"HELLO"

    again = run_script("backup.py", str(tree), *backed_up, "--checksum", env=cli_env)
    assert "uploaded 0, skipped 3" in again.stdout


def test_check_of_an_identical_tree(tree, backed_up, cli_env):
    result = run_script("backup.py", str(tree), *backed_up, "--check", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines()[-1].startswith(
        "checked 3 identical, 0 missing, 0 changed, 0 extra, failed 0"
    )


def change_a_file(tree, client, bucket):
    (tree / "big.bin").write_bytes(b"X" + (tree / "big.bin").read_bytes()[1:])
    os.utime(tree / "big.bin", (OLD, OLD))


def remove_a_file(tree, client, bucket):
    (tree / "sub" / "b.txt").unlink()


def add_a_file(tree, client, bucket):
    (tree / "sub" / "new\x1bfile.txt").write_bytes(b"new")


def add_an_object(tree, client, bucket):
    client.put_object(Bucket=bucket, Key="p/sub/extra.txt", Body=b"x")


@pytest.mark.parametrize(
    ("difference", "line", "counts"),
    [
        (change_a_file, "changed: p/big.bin (content changed)", "2 identical, 0 missing, 1 changed, 0 extra"),
        (add_a_file, "missing: p/sub/new\\x1bfile.txt", "3 identical, 1 missing, 0 changed, 0 extra"),
        (remove_a_file, "extra: p/sub/b.txt", "2 identical, 0 missing, 0 changed, 1 extra"),
        (add_an_object, "extra: p/sub/extra.txt", "3 identical, 0 missing, 0 changed, 1 extra"),
    ],
)  # fmt: skip
def test_check_reports_a_difference_and_changes_nothing(
    tree, backed_up, cli_env, server_client, bucket_name, difference, line, counts
):
    difference(tree, server_client, bucket_name)
    before = server_client.list_objects_v2(Bucket=bucket_name)["Contents"]
    result = run_script("backup.py", str(tree), *backed_up, "--check", env=cli_env)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == line
    assert lines[1].startswith(f"checked {counts}")
    assert len(lines) == 2
    assert server_client.list_objects_v2(Bucket=bucket_name)["Contents"] == before


def test_check_of_a_missing_bucket_creates_none(
    tree, moto_server, cli_env, server_client, bucket_name
):
    result = run_script(
        "backup.py",
        str(tree),
        f"{bucket_name}::p",
        "--endpoint-url",
        moto_server,
        "--check",
        env=cli_env,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"backup.py: error: the bucket {bucket_name} does not exist: "
        f"nothing is backed up at s3://{bucket_name}/p"
    )
    names = [b["Name"] for b in server_client.list_buckets()["Buckets"]]
    assert bucket_name not in names


def test_check_reports_an_unreadable_file_as_an_error(tree, backed_up, cli_env):
    (tree / "a.txt").chmod(0)
    result = subprocess.run(
        [*UNPRIVILEGED, sys.executable, str(ROOT / "backup.py"), str(tree)]
        + [*backed_up, "--check"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: read failed: ")
    assert "a.txt: Permission denied" in result.stderr
    assert "changed:" not in result.stdout
    assert "checked 2 identical, 0 missing, 0 changed, 0 extra, failed 1" in (
        result.stdout
    )


def test_restore_checksum_rerun_rewrites_nothing_that_matches(
    tree, backed_up, cli_env, tmp_path
):
    location, *endpoint = backed_up
    target = tmp_path / "dst"
    first = run_script("restore.py", location, str(target), *endpoint, env=cli_env)
    assert first.returncode == 0, first.stderr
    files = [target / "a.txt", target / "sub" / "b.txt", target / "big.bin"]
    inodes = [path.stat().st_ino for path in files]
    # Touched and chmodded since: the content still matches.
    for path in files:
        os.utime(path, (OLD + 99, OLD + 99))
        path.chmod(0o600)

    again = run_script(
        "restore.py", location, str(target), *endpoint, "--checksum", env=cli_env
    )
    assert again.returncode == 0, again.stderr
    assert "restored 0, skipped 3, failed 0" in again.stdout
    assert [path.stat().st_ino for path in files] == inodes
    for path in files:
        assert path.stat().st_mtime == OLD
        assert path.stat().st_mode & 0o777 == 0o644


RCLONE = shutil.which("rclone")


@pytest.mark.skipif(
    RCLONE is None,
    reason="rclone is not on PATH (Debian: apt-get install rclone); "
    "the interoperability test runs rclone check",
)
def test_rclone_check_finds_our_backup_identical(
    tree, backed_up, moto_server, bucket_name
):
    # rclone refuses to start while AWS_CA_BUNDLE is set.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        RCLONE_CONFIG_MOTO_TYPE="s3",
        RCLONE_CONFIG_MOTO_PROVIDER="Other",
        RCLONE_CONFIG_MOTO_ENDPOINT=moto_server,
        RCLONE_CONFIG_MOTO_ACCESS_KEY_ID="testing",
        RCLONE_CONFIG_MOTO_SECRET_ACCESS_KEY="testing",
        RCLONE_CONFIG_MOTO_REGION="us-east-1",
    )

    def rclone_check() -> subprocess.CompletedProcess:
        return subprocess.run(
            [RCLONE, "check", str(tree), f"moto:{bucket_name}/p"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    same = rclone_check()
    assert same.returncode == 0, same.stderr
    assert "0 differences found" in same.stderr
    assert "3 matching files" in same.stderr
    # Every file was compared by hash, the multipart one through md5chksum.
    assert "hashes could not be checked" not in same.stderr

    # The same size, other bytes: rclone sees it by our MD5 alone.
    (tree / "big.bin").write_bytes(b"X" + (tree / "big.bin").read_bytes()[1:])
    changed = rclone_check()
    assert changed.returncode == 1
    assert "1 differences found" in changed.stderr
    assert "big.bin" in changed.stderr


def test_check_with_json_lists_the_keys(
    tree, backed_up, cli_env, server_client, bucket_name
):
    change_a_file(tree, server_client, bucket_name)
    add_an_object(tree, server_client, bucket_name)
    result = run_script(
        "backup.py", str(tree), *backed_up, "--check", "--json", env=cli_env
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == 1
    assert report["missing"] == []
    assert report["changed"] == ["p/big.bin"]
    assert report["extra"] == ["p/sub/extra.txt"]
    assert report["skipped"] == 2
    assert report["transferred"] == 0
