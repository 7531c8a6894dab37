"""Accidents on the local side, end to end against the test server: links that
lead to themselves or nowhere, files and folders that vanish during a run, the
temporary files a killed restore leaves, and trees deeper than the path limit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_tree, run_script


def keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def backup(source: Path, location: str, server: str, env: dict, *options: str):
    return run_script(
        "backup.py", str(source), location, "--endpoint-url", server, *options, env=env
    )


def start_backup(source: Path, location: str, server: str, env: dict, *options: str):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "backup.py"), str(source), location,
         "--endpoint-url", server, *options],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


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
    wait_for(lambda: proxy.faults["SlowDown"], "the listing")
    os.rename(source / "d", tmp_path / "elsewhere")
    proxy.errors.clear()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stderr.splitlines() == [
        f"warning: folder vanished during the backup, not backed up: {source}/d"
    ]
    assert "failed 0, deleted 2," in stdout
    assert keys(server_client, bucket_name) == ["p/a.txt"]
