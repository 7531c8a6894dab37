"""Reliability: a server that fails a fifth of all requests, a fault that outlasts the
retries, Ctrl-C in the middle of a transfer, and nothing lost across backups."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_tree, run_script

MiB = 1024 * 1024
# A fifth of all requests fail: throttled, server errors and connections reset.
FIFTH_OF_REQUESTS_FAIL = {
    "slowdown_rate": 0.08,
    "internal_error_rate": 0.06,
    "reset_rate": 0.06,
}
SIGINT_GRACE_SECONDS = 15


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under root by its "/"-separated relative path, with its bytes."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def objects_in(client, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, with its bytes."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {
        item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for page in pages
        for item in page.get("Contents", [])
    }


def incomplete_uploads(client, bucket: str) -> list[dict]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def under_prefix(files: dict[str, bytes], prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{relative}": data for relative, data in files.items()}


# --- A server that fails a fifth of all requests --------------------------------


@pytest.fixture
def many_files_and_a_large_one(tmp_path) -> Path:
    rng = random.Random(4)
    files = {
        f"folder{n % 7}/sub{n % 3}/file{n:03d}.bin": rng.randbytes(rng.randrange(3000))
        for n in range(300)
    }
    files["large/over-threshold.bin"] = rng.randbytes(10 * MiB + 17)
    return make_tree(tmp_path / "src", files)


def test_backup_and_restore_ride_out_a_fifth_of_requests_failing(
    start_proxy,
    cli_env,
    many_files_and_a_large_one,
    tmp_path,
    bucket_name,
    server_client,
):
    source = many_files_and_a_large_one
    proxy = start_proxy(seed=20, **FIFTH_OF_REQUESTS_FAIL)
    endpoint = ["--endpoint-url", proxy.url]

    backed_up = run_script(
        "backup.py", str(source), f"{bucket_name}::flaky", *endpoint, env=cli_env
    )
    assert backed_up.returncode == 0, backed_up.stderr
    assert "uploaded 301, skipped 0, failed 0" in backed_up.stdout
    assert "Traceback" not in backed_up.stderr
    faults_in_backup = sum(proxy.faults.values())
    assert faults_in_backup > 30, proxy.faults
    assert objects_in(server_client, bucket_name) == under_prefix(
        files_under(source), "flaky"
    )
    assert incomplete_uploads(server_client, bucket_name) == []

    target = tmp_path / "restored"
    restored = run_script(
        "restore.py", f"{bucket_name}::flaky", str(target), *endpoint, env=cli_env
    )
    assert restored.returncode == 0, restored.stderr
    assert "restored 301, skipped 0, failed 0" in restored.stdout
    assert "Traceback" not in restored.stderr
    assert sum(proxy.faults.values()) - faults_in_backup > 30, proxy.faults
    assert (
        min(proxy.faults[kind] for kind in ("SlowDown", "InternalError", "reset")) > 5
    )
    assert files_under(target) == files_under(source)


# --- A fault that outlasts the retries ------------------------------------------


def test_fault_outlasting_the_retries_fails_those_files_only_and_a_rerun_finishes(
    start_proxy, cli_env, tmp_path, bucket_name, server_client
):
    rng = random.Random(5)
    files = {f"file{n:02d}.txt": rng.randbytes(100 + n) for n in range(20)}
    files["large.bin"] = rng.randbytes(9 * MiB)
    source = make_tree(tmp_path / "src", files)
    stuck_files = ("file03.txt", "file11.txt")
    proxy = start_proxy(
        throttled_keys={f"stuck/{name}" for name in stuck_files},
        # The multipart upload starts, then every part is refused.
        throttled_part_keys={"stuck/large.bin"},
    )
    # Three attempts instead of the scripts' ten keep this test short: the
    # standard retry mode backs off exponentially, up to 20 s between attempts.
    env = {**cli_env, "AWS_MAX_ATTEMPTS": "3"}
    location = f"{bucket_name}::stuck"

    first = run_script(
        "backup.py", str(source), location, "--endpoint-url", proxy.url, env=env
    )
    assert first.returncode == 1
    assert "Traceback" not in first.stderr
    assert "uploaded 18, skipped 0, failed 3" in first.stdout
    failed_lines = [
        line for line in first.stderr.splitlines() if "upload failed" in line
    ]
    assert len(failed_lines) == 3, first.stderr
    for name in (*stuck_files, "large.bin"):
        assert any(str(source / name) + ":" in line for line in failed_lines), name
    stuck_keys = {f"stuck/{name}" for name in (*stuck_files, "large.bin")}
    expected = under_prefix(files, "stuck")
    assert objects_in(server_client, bucket_name) == {
        key: data for key, data in expected.items() if key not in stuck_keys
    }
    assert incomplete_uploads(server_client, bucket_name) == []

    proxy.stop_faults()
    rerun = run_script(
        "backup.py", str(source), location, "--endpoint-url", proxy.url, env=env
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "uploaded 3, skipped 18, failed 0" in rerun.stdout
    assert objects_in(server_client, bucket_name) == expected
    assert incomplete_uploads(server_client, bucket_name) == []

    # The user's AWS_MAX_ATTEMPTS, which every AWS tool reads, bounds the attempts.
    attempts = {name: proxy.throttled_attempts[f"stuck/{name}"] for name in stuck_files}
    assert attempts == dict.fromkeys(stuck_files, 3), "AWS_MAX_ATTEMPTS not honoured"


# --- Ctrl-C in the middle of a transfer ------------------------------------------


@pytest.fixture(scope="session")
def large_files(tmp_path_factory) -> Path:
    """Four files of 40 MiB of random data, written once per test session."""
    rng = random.Random(6)
    return make_tree(
        tmp_path_factory.mktemp("large"),
        {f"large{n}.bin": rng.randbytes(40 * MiB) for n in range(4)},
    )


def start_script(script: str, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def interrupt(process: subprocess.Popen) -> tuple[int, str]:
    """Send SIGINT as Ctrl-C does; the exit code and stderr, or fail if it does not end in time."""
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=SIGINT_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(
            f"still running {SIGINT_GRACE_SECONDS} s after SIGINT"
        ) from None
    return process.returncode, stderr


def interrupted_when(process: subprocess.Popen, ready, what: str) -> str:
    """Ctrl-C once ready() holds; the stderr of a run that then stopped with exit
    130 and no traceback."""
    try:
        wait_for(ready, what)
    finally:
        returncode, stderr = interrupt(process)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    return stderr


def test_ctrl_c_during_backup_stops_cleanly_and_leaves_no_incomplete_upload(
    s3_server, cli_env, large_files, bucket_name, server_client
):
    process = start_script(
        "backup.py",
        str(large_files),
        f"{bucket_name}::big",
        "--endpoint-url",
        s3_server,
        env=cli_env,
    )

    def upload_in_flight() -> bool:
        assert process.poll() is None, "the backup ended before it was interrupted"
        try:
            return bool(incomplete_uploads(server_client, bucket_name))
        except server_client.exceptions.NoSuchBucket:
            return False

    stderr = interrupted_when(process, upload_in_flight, "a multipart upload to start")
    assert "interrupted" in stderr
    assert incomplete_uploads(server_client, bucket_name) == []


def test_ctrl_c_during_restore_leaves_no_temporary_file_and_no_half_written_file(
    s3_server, cli_env, large_files, tmp_path, bucket_name, server_client
):
    server_client.create_bucket(Bucket=bucket_name)
    for path in large_files.iterdir():
        server_client.upload_file(str(path), bucket_name, f"big/{path.name}")
    target = tmp_path / "restored"
    old_content = b"the old content of large0.bin\n"
    make_tree(target, {"large0.bin": old_content})
    process = start_script(
        "restore.py",
        f"{bucket_name}::big",
        str(target),
        "--endpoint-url",
        s3_server,
        env=cli_env,
    )

    def download_in_flight() -> bool:
        assert process.poll() is None, "the restore ended before it was interrupted"
        return any(target.glob(".s3restore-*.part"))

    stderr = interrupted_when(process, download_in_flight, "a download to start")
    assert list(target.rglob(".s3restore-*")) == [], stderr
    restored = files_under(target)
    assert restored["large0.bin"] in (
        old_content,
        (large_files / "large0.bin").read_bytes(),
    )
    for name, data in restored.items():
        if data != old_content:
            assert data == (large_files / name).read_bytes(), f"{name} is cut short"


def test_ctrl_c_in_the_middle_of_a_large_files_parts_ends_within_seconds(
    s3_server, cli_env, large_files, tmp_path, bucket_name, server_client
):
    """At 2 MiB/s the 40 MiB file takes 20 s: Ctrl-C lands while its parts are
    read and while they wait for --bwlimit."""
    server_client.create_bucket(Bucket=bucket_name)
    server_client.upload_file(
        str(large_files / "large0.bin"), bucket_name, "big/large0.bin"
    )
    target = tmp_path / "restored"
    process = start_script(
        "restore.py",
        f"{bucket_name}::big",
        str(target),
        "--endpoint-url",
        s3_server,
        "--bwlimit",
        "2M",
        env=cli_env,
    )

    def bytes_landed() -> bool:
        assert process.poll() is None, "the restore ended before it was interrupted"
        return any(path.stat().st_size for path in target.glob(".s3restore-*.part"))

    stderr = interrupted_when(process, bytes_landed, "the first bytes of a part")
    assert "interrupted" in stderr
    assert list(target.iterdir()) == []


# --- Nothing is lost --------------------------------------------------------------


def test_backup_deletes_nothing_unless_asked_and_then_exactly_what_is_gone(
    s3_server, cli_env, tmp_path, bucket_name, server_client
):
    source = make_tree(
        tmp_path / "src",
        {
            "kept.txt": b"kept",
            "grows.txt": b"short",
            "rewritten.txt": b"before",
            "gone.txt": b"gone",
            "sub/gone-too.txt": b"gone too",
            "sub/kept-too.txt": b"kept too",
        },
    )
    endpoint = ["--endpoint-url", s3_server]
    location = f"{bucket_name}::host/home"
    first = run_script("backup.py", str(source), location, *endpoint, env=cli_env)
    assert first.returncode == 0, first.stderr
    # Objects beside the prefix, which no run over it may touch.
    outside = {"host/home2/beside.txt": b"beside", "elsewhere/other.txt": b"other"}
    for key, data in outside.items():
        server_client.put_object(Bucket=bucket_name, Key=key, Body=data)
    first_objects = objects_in(server_client, bucket_name)

    (source / "grows.txt").write_bytes(b"longer than before")
    # Same size: only a newer mtime tells the backup it changed, and the backup
    # compares mtimes to whole seconds, so rewrite it in a later second.
    time.sleep(1.1)
    (source / "rewritten.txt").write_bytes(b"after!")
    (source / "gone.txt").unlink()
    (source / "sub" / "gone-too.txt").unlink()

    second = run_script("backup.py", str(source), location, *endpoint, env=cli_env)
    assert second.returncode == 0, second.stderr
    assert "uploaded 2, skipped 2, failed 0" in second.stdout
    assert objects_in(server_client, bucket_name) == {
        **first_objects,
        "host/home/grows.txt": b"longer than before",
        "host/home/rewritten.txt": b"after!",
    }

    third = run_script(
        "backup.py", str(source), location, "--delete", *endpoint, env=cli_env
    )
    assert third.returncode == 0, third.stderr
    assert "uploaded 0, skipped 4, failed 0, deleted 2" in third.stdout
    assert objects_in(server_client, bucket_name) == {
        **under_prefix(files_under(source), "host/home"),
        **outside,
    }

    empty = tmp_path / "empty"
    empty.mkdir()
    before = objects_in(server_client, bucket_name)
    refused = run_script(
        "backup.py", str(empty), location, "--delete", *endpoint, env=cli_env
    )
    assert refused.returncode == 2
    assert "refusing --delete" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert objects_in(server_client, bucket_name) == before
