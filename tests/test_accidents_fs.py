"""Accidents on the local side, end to end against the test server: links that
lead to themselves or nowhere, files and folders that vanish during a run, the
temporary files a killed restore leaves, and trees deeper than the path limit."""

from __future__ import annotations

import contextlib
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


# --- Trees deeper than the system's path limit -------------------------------------

PATH_MAX = 4096  # Linux's: a longer path fails whole, with ENAMETOOLONG


def open_folder_by_parts(path: str, create: bool = False) -> int:
    """The fd of the folder at `path`, of any length, opened (or made) one name
    at a time: what the test sees, independent of the scripts' own way."""
    fd = os.open("/" if path.startswith("/") else ".", os.O_RDONLY)
    for name in filter(None, path.split("/")):
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
        inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    return fd


def write_deep_tree(root: str, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        folder, name = os.path.split(f"{root}/{relative}")
        fd = open_folder_by_parts(folder, create=True)
        try:
            out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
            with os.fdopen(out, "wb") as stream:
                stream.write(data)
        finally:
            os.close(fd)


def read_deep_tree(root: str) -> dict[str, tuple[bytes, int, int]]:
    """Every file under root: (bytes, mode bits, mtime in ns) by relative path."""
    found = {}

    def read(fd: int, relative: str) -> None:
        for entry in sorted(os.scandir(fd), key=lambda entry: entry.name):
            if entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False):
                inner = os.open(entry.name, os.O_RDONLY, dir_fd=fd)
                try:
                    read(inner, f"{relative}{entry.name}/")
                finally:
                    os.close(inner)
                continue
            info = entry.stat(follow_symlinks=False)
            source = os.open(entry.name, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(source, "rb") as stream:
                data = stream.read()
            found[relative + entry.name] = (
                data,
                info.st_mode & 0o777,
                info.st_mtime_ns,
            )

    fd = open_folder_by_parts(root)
    try:
        read(fd, "")
    finally:
        os.close(fd)
    return found


def deep_path(base: Path, depth: int) -> str:
    """A path `depth` folders of 27 characters under base (not made)."""
    return "/".join([str(base)] + [f"{n:03d}{'d' * 24}" for n in range(depth)])


def deep_files() -> dict[str, bytes]:
    """Files whose keys are some 700 bytes long: below a LOCAL of 3,400 bytes
    they go past the 4,096 of the system."""
    inner = "/".join(f"inner{n:02d}{'i' * 20}" for n in range(25))
    return {
        "top.txt": b"top",
        f"{inner}/small.txt": b"deep down",
        f"{inner}/large.bin": random.Random(8).randbytes(9 * MiB),  # multipart
        f"{inner}/x/empty": b"",
    }


def test_a_tree_deeper_than_the_path_limit_backs_up_like_any_other(
    s3_server, server_client, cli_env, tmp_path, bucket_name
):
    files = deep_files()
    source = deep_path(tmp_path / "s", 120)
    write_deep_tree(source, files)
    assert max(len(f"{source}/{name}".encode()) for name in files) > PATH_MAX
    assert all(len(f"p/{name}".encode()) < 1024 for name in files)

    result = backup(Path(source), f"{bucket_name}::p", s3_server, cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert keys(server_client, bucket_name) == sorted(f"p/{name}" for name in files)
    for name, data in files.items():
        body = server_client.get_object(Bucket=bucket_name, Key=f"p/{name}")["Body"]
        assert body.read() == data, name
    unchanged = backup(Path(source), f"{bucket_name}::p", s3_server, cli_env)
    assert "uploaded 0, skipped 4, failed 0" in unchanged.stdout
    # LOCAL itself past the limit.
    deeper = deep_path(Path(source), 25)
    write_deep_tree(deeper, {"a.txt": b"a"})
    result = backup(Path(deeper), f"{bucket_name}::q", s3_server, cli_env)
    assert result.returncode == 0, result.stderr
    assert keys(server_client, bucket_name)[-1] == "q/a.txt"


def test_a_restore_deeper_than_the_path_limit_is_like_any_other(
    s3_server, server_client, cli_env, tmp_path, bucket_name
):
    files = deep_files()
    source = make_tree(tmp_path / "s", files)
    result = backup(source, f"{bucket_name}::p", s3_server, cli_env)
    assert result.returncode == 0, result.stderr
    stored = read_deep_tree(str(source))

    # Into a folder that does not exist yet, itself past the limit.
    target = deep_path(tmp_path / "t", 150)
    assert len(target.encode()) > PATH_MAX
    restored = run_script(
        "restore.py", f"{bucket_name}::p", target, "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    assert restored.stderr == ""
    found = read_deep_tree(target)
    assert found.keys() == stored.keys()
    for name, (data, mode, mtime_ns) in stored.items():
        assert found[name][:2] == (data, mode), name
        assert abs(found[name][2] - mtime_ns) < 1000, name
    again = run_script(
        "restore.py", f"{bucket_name}::p", target, "--endpoint-url", s3_server,
        "--checksum", env=cli_env,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "restored 0, skipped 4, failed 0" in again.stdout


def test_a_link_out_of_a_deep_restore_is_refused_as_any_other(
    s3_server, server_client, cli_env, tmp_path, bucket_name
):
    files = deep_files()
    source = make_tree(tmp_path / "s", files)
    result = backup(source, f"{bucket_name}::p", s3_server, cli_env)
    assert result.returncode == 0, result.stderr
    target = deep_path(tmp_path / "t", 150)
    write_deep_tree(target, {"keep.txt": b"mine"})
    outside = tmp_path / "outside"
    outside.mkdir()
    fd = open_folder_by_parts(target)
    try:
        os.symlink(outside, "inner00" + "i" * 20, dir_fd=fd)
    finally:
        os.close(fd)
    restored = run_script(
        "restore.py", f"{bucket_name}::p", target, "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert restored.returncode == 1
    assert "leads outside the destination (through a symbolic link)" in restored.stderr
    assert list(outside.iterdir()) == []
    assert read_deep_tree(target)["top.txt"][0] == b"top"
