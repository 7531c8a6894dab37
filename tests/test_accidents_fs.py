"""Accidents on the local side, end to end against the test server: links that
lead to themselves or nowhere, files and folders that vanish during a run, the
temporary files a killed restore leaves, and trees deeper than the path limit."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_tree, run_script

MiB = 1024 * 1024


def keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def backup(source: Path, location: str, server: str, env: dict, *options: str):
    return run_script(
        "backup.py", str(source), location, "--endpoint-url", server, *options, env=env
    )


def start_script(script: str, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def start_backup(source: Path, location: str, server: str, env: dict, *options: str):
    return start_script(
        "backup.py", str(source), location, "--endpoint-url", server, *options, env=env
    )


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- Links that lead to themselves or nowhere -------------------------------------


def test_links_to_themselves_or_nowhere_are_warnings_and_never_block_delete(
    s3_server, server_client, cli_env, tmp_path, bucket_name
):
    source = make_tree(tmp_path / "src", {"a.txt": b"a", "sub/b.txt": b"b"})
    os.symlink("self", source / "self")
    os.symlink("loop2", source / "loop1")
    os.symlink("loop1", source / "loop2")
    os.symlink("nowhere", source / "sub" / "dangling")
    server_client.create_bucket(Bucket=bucket_name)
    server_client.put_bucket_versioning(
        Bucket=bucket_name, VersioningConfiguration={"Status": "Enabled"}
    )
    server_client.put_object(Bucket=bucket_name, Key="p/gone.txt", Body=b"gone")

    for attempt in range(2):  # every night alike
        result = backup(source, f"{bucket_name}::p", s3_server, cli_env, "--delete")
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(result.stderr.splitlines()) == [
            f"warning: broken symbolic link skipped: {source}/sub/dangling",
            f"warning: symbolic link loop not followed: {source}/loop1",
            f"warning: symbolic link loop not followed: {source}/loop2",
            f"warning: symbolic link loop not followed: {source}/self",
        ]
        failed = "failed 0, deleted 1" if attempt == 0 else "failed 0,"
        assert failed in result.stdout
    assert keys(server_client, bucket_name) == ["p/a.txt", "p/sub/b.txt"]


def test_links_to_a_fifo_or_a_socket_are_not_regular_files(
    s3_server, server_client, cli_env, tmp_path, bucket_name
):
    source = make_tree(tmp_path / "src", {"a.txt": b"a"})
    os.mkfifo(tmp_path / "fifo")
    # A socket's path is limited to about 100 bytes: bind it from its folder.
    with socket.socket(socket.AF_UNIX) as listener:
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            listener.bind("sock")
        finally:
            os.chdir(cwd)
        os.symlink(tmp_path / "fifo", source / "to-fifo")
        os.symlink(tmp_path / "sock", source / "to-sock")
        result = backup(source, f"{bucket_name}::p", s3_server, cli_env, "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stderr.splitlines()) == [
        f"warning: not a regular file, skipped: {source}/to-fifo",
        f"warning: not a regular file, skipped: {source}/to-sock",
    ]
    assert json.loads(result.stdout)["failed"] == 0
    assert keys(server_client, bucket_name) == ["p/a.txt"]


def test_no_follow_symlinks_skips_loops_and_dangling_links_silently(
    s3_server, server_client, cli_env, tmp_path, bucket_name
):
    source = make_tree(tmp_path / "src", {"a.txt": b"a"})
    os.symlink("self", source / "self")
    os.symlink("nowhere", source / "dangling")
    result = backup(
        source, f"{bucket_name}::p", s3_server, cli_env, "--no-follow-symlinks"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert keys(server_client, bucket_name) == ["p/a.txt"]


# --- Files and folders that vanish during the run ---------------------------------


@pytest.mark.parametrize("report", ["summary", "json"])
def test_a_folder_renamed_during_the_uploads_counts_its_files_as_vanished(
    s3_server, start_proxy, server_client, cli_env, tmp_path, bucket_name, report
):
    files = {"a.txt": b"first"} | {f"d/f{n:03d}.txt": b"x" * n for n in range(150)}
    source = make_tree(tmp_path / "src", files)
    # The first upload is throttled until the folder is renamed: its files are
    # planned under their old names, and gone when their turn comes (one worker).
    proxy = start_proxy(throttled_keys={"p/a.txt"})
    options = ["--workers", "1"] + (["--json"] if report == "json" else [])
    process = start_backup(source, f"{bucket_name}::p", proxy.url, cli_env, *options)
    wait_for(lambda: proxy.throttled_attempts["p/a.txt"], "the first upload")
    os.rename(source / "d", source / "e")
    proxy.stop_faults()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stderr.splitlines() == [
        f"warning: vanished during the backup, not uploaded: {source}/d/f{n:03d}.txt"
        for n in range(150)
    ]
    if report == "json":
        summary = json.loads(stdout)
        assert (summary["transferred"], summary["skipped"]) == (1, 0)
        assert (summary["failed"], summary["vanished"]) == (0, 150)
        assert summary["bytes"] == len(b"first")
    else:
        assert "uploaded 1, skipped 0, failed 0, vanished 150," in stdout
    assert keys(server_client, bucket_name) == ["p/a.txt"]


def test_a_folder_renamed_before_it_is_walked_is_a_warning_and_delete_goes_on(
    s3_server, start_proxy, server_client, cli_env, tmp_path, bucket_name
):
    source = make_tree(tmp_path / "src", {"a.txt": b"a", "d/b.txt": b"b"})
    first = backup(source, f"{bucket_name}::p", s3_server, cli_env)
    assert first.returncode == 0, first.stderr
    server_client.put_object(Bucket=bucket_name, Key="p/gone.txt", Body=b"gone")
    # The plan waits for the listing, throttled until the folder is renamed: the
    # walk has read the top folder, and d's own listing comes after.
    proxy = start_proxy(errors={"ListObjectsV2": ("SlowDown", 503)})
    process = start_backup(source, f"{bucket_name}::p", proxy.url, cli_env, "--delete")
    # Its first answer comes beside HeadBucket's, and the walk begins after
    # HeadBucket's: once the listing is asked again the walk is under way.
    wait_for(lambda: proxy.faults["SlowDown"] >= 2, "the listing asked again")
    time.sleep(0.5)
    os.rename(source / "d", tmp_path / "elsewhere")
    proxy.errors.clear()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stderr.splitlines() == [
        f"warning: folder vanished during the backup, not backed up: {source}/d"
    ]
    assert "failed 0, deleted 2," in stdout
    assert keys(server_client, bucket_name) == ["p/a.txt"]


# --- What a killed restore leaves behind -------------------------------------------


def test_a_restore_after_a_killed_one_removes_its_temporary_files_and_backup_never_uploads_them(
    s3_server, server_client, cli_env, tmp_path, bucket_name
):
    large = random.Random(7).randbytes(24 * MiB)
    source = make_tree(tmp_path / "src", {"sub/large.bin": large, "small.txt": b"s"})
    first = backup(source, f"{bucket_name}::p", s3_server, cli_env)
    assert first.returncode == 0, first.stderr
    target = tmp_path / "restored"
    # Names close to restore's own, which are the user's: never removed.
    lookalikes = {
        "sub/.s3restore-notes.txt": b"1",
        "sub/.s3restore-abcdefgh.part.old": b"2",
        "sub/.s3restore-abcdefghi.part": b"3",
        "sub/s3restore-abcdefgh.part": b"4",
    }
    make_tree(target, lookalikes)
    # At 2 MiB/s the large file takes 12 s: killed once its first bytes landed.
    process = start_script(
        "restore.py", f"{bucket_name}::p", str(target), "--endpoint-url", s3_server,
        "--bwlimit", "2M", env=cli_env,
    )  # fmt: skip

    def bytes_landed() -> bool:
        assert process.poll() is None, "the restore ended before it was killed"
        return any(
            p.stat().st_size for p in target.glob("sub/.s3restore-????????.part")
        )

    try:
        wait_for(bytes_landed, "the first bytes of the large file")
    finally:
        process.kill()
        process.communicate()
    [left] = target.glob("sub/.s3restore-????????.part")
    # A case probe as a kill between its creation and removal leaves it.
    (target / ".s3restore-case-k1ll3d_x").write_bytes(b"")

    again = backup(target, f"{bucket_name}::again", s3_server, cli_env, "-v")
    assert again.returncode == 0, again.stderr
    users = sorted(
        path.relative_to(target).as_posix()
        for path in target.rglob("*")
        if path.is_file() and path != left and not path.name.startswith(".s3restore-c")
    )
    assert keys(server_client, bucket_name) == sorted(
        ["p/small.txt", "p/sub/large.bin"] + [f"again/{name}" for name in users]
    )
    assert f"skipped, restore's temporary file: {left}" in again.stdout

    restored = run_script(
        "restore.py", f"{bucket_name}::p", str(target), "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    assert sorted(target.rglob(".s3restore-*")) == sorted(
        target / name for name in lookalikes if "/.s3restore-" in name
    )
    assert (target / "sub" / "large.bin").read_bytes() == large
    for name, data in lookalikes.items():
        assert (target / name).read_bytes() == data
