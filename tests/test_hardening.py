"""Files that change under the tool, names that must survive the round trip, and
messages that say what happened: the pure parts, then the real scripts as
subprocesses against moto's server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import PurePosixPath, PureWindowsPath
from types import SimpleNamespace

import pytest
from conftest import ROOT, TEST_SERVER, free_port, make_tree, run_script
from plans import restore_plan_of, steps_of

import backup
from backup import (
    BackupPlan,
    Keep,
    LocalFile,
    ReadStart,
    StaleFolder,
    Upload,
    after_recheck,
    read_unchanged,
    read_whole,
)
from restore import folder_conflict
from s3common import (
    MAX_KEY_BYTES,
    CliError,
    ExitCode,
    FileChanged,
    Filters,
    RemoteObject,
    Store,
    UnsafeKey,
    crc32_header,
    endpoint_url_from,
    format_mtime,
    key_length_problem,
    md5chksum,
    one_line,
    parse_location,
    parse_mtime,
    path_for_key,
    printable,
)

MiB = 1024 * 1024
SECOND = 1_000_000_000


# --- The pure parts -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("plain/name.txt", "plain/name.txt"),
        ("ünï/日本 café.txt", "ünï/日本 café.txt"),
        ("a\nb", "a\\nb"),
        ("a\rb\tc", "a\\rb\\tc"),
        ("esc\x1b[31mred", "esc\\x1b[31mred"),
        ("rtl\u202eexe.txt", "rtl\\u202eexe.txt"),
        ("bad\udcffutf8", "bad\\udcffutf8"),
        ("back\\slash", "back\\slash"),
    ],
)
def test_printable_escapes_control_characters_only(name, shown):
    assert printable(name) == shown
    assert "\n" not in printable(name) and "\r" not in printable(name)


def test_one_line_joins_lines_but_keeps_the_spaces_of_a_name():
    assert one_line("upload failed: a  b.txt:\n  Too many\r\nopen files ") == (
        "upload failed: a  b.txt: Too many open files"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("bucket::photos ", "ends with a space"),
        (" bucket::photos", "starts with a space"),
        ("s3://bucket/photos\t", "ends with a tab"),
        ("bucket::photos\n", "ends with a newline"),
        ("bucket\r", "ends with a carriage return"),
    ],
)
def test_location_with_stray_whitespace_is_a_usage_error(text, problem):
    with pytest.raises(CliError) as caught:
        parse_location(text)
    assert caught.value.code == ExitCode.USAGE
    assert problem in str(caught.value)


def test_endpoint_url_with_stray_whitespace_is_a_usage_error():
    args = SimpleNamespace(endpoint_url="http://127.0.0.1:9000 ")
    with pytest.raises(CliError) as caught:
        endpoint_url_from(args)
    assert caught.value.code == ExitCode.USAGE
    assert "ends with a space" in str(caught.value)


def test_inner_spaces_stay_part_of_the_prefix():
    assert parse_location("bucket::my photos").prefix == "my photos"


@pytest.mark.parametrize("root", [PurePosixPath("/r"), PureWindowsPath("C:/r")])
def test_backslash_is_a_name_character_on_posix_only(root):
    if isinstance(root, PureWindowsPath):
        with pytest.raises(UnsafeKey, match="backslash"):
            path_for_key("a\\b.txt", root)
    else:
        assert path_for_key("d/a\\b.txt", root).name == "a\\b.txt"
        assert path_for_key("..\\..\\x", root).parent == root


@pytest.mark.parametrize(
    ("nanoseconds", "text"),
    [
        (-1_500_000_000, "-1.500000000"),
        (-86_400 * SECOND, "-86400.000000000"),
        (-1, "-0.000000001"),
        (0, "0.000000000"),
        (1_700_000_000_000_000_001, "1700000000.000000001"),
    ],
)
def test_mtimes_before_1970_round_trip(nanoseconds, text):
    assert format_mtime(nanoseconds) == text
    assert parse_mtime(text) == nanoseconds


def test_key_length_limit_counts_utf8_bytes():
    assert key_length_problem("a" * MAX_KEY_BYTES) is None
    assert "1,025 bytes" in key_length_problem("a" * MAX_KEY_BYTES + "b")
    # 342 characters of 3 bytes each: 1,026 bytes.
    assert "1,026 bytes" in key_length_problem("日" * 342)


def stat(size=10, mtime_ns=5 * SECOND, ctime_ns=5 * SECOND, ino=1, dev=1):
    return SimpleNamespace(
        st_size=size, st_mtime_ns=mtime_ns, st_ctime_ns=ctime_ns, st_ino=ino, st_dev=dev
    )


@pytest.mark.parametrize(
    ("after", "started_ns", "unchanged"),
    [
        (stat(), 6 * SECOND, True),
        (stat(size=11), 6 * SECOND, False),
        (stat(mtime_ns=5 * SECOND + 1), 6 * SECOND, False),
        (stat(ino=2), 6 * SECOND, False),  # replaced by a rename
        (stat(dev=2), 6 * SECOND, False),
        (stat(ctime_ns=5 * SECOND + 1), 6 * SECOND, False),  # e.g. chmod
        # Written within the clock's slack before the read began: it may have been
        # written during the read too, in the same tick, leaving size and mtime.
        (stat(), 5 * SECOND + 10_000_000, False),
        (stat(), 5 * SECOND + backup.CLOCK_SLACK_NS + 1, True),
    ],
)
def test_read_unchanged(after, started_ns, unchanged):
    assert read_unchanged(stat(), after, started_ns) is unchanged


def test_read_whole_refuses_a_file_that_grew_while_read(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 1000)
    with open(path, "rb") as source:
        start = ReadStart.of(str(path), source)
        with open(path, "ab") as writer:
            writer.write(b"b")
        with pytest.raises(FileChanged):
            read_whole(source, start)


def test_read_whole_refuses_a_file_replaced_while_read(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 1000)
    with open(path, "rb") as source:
        start = ReadStart.of(str(path), source)
        (tmp_path / "g").write_bytes(b"b" * 1000)
        os.replace(tmp_path / "g", path)
        with pytest.raises(FileChanged):
            read_whole(source, start)


def test_a_failed_check_before_complete_multipart_leaves_no_object(s3, tmp_path):
    s3.create_bucket(Bucket="bkt")
    path = tmp_path / "big"
    path.write_bytes(b"x" * (9 * 1024 * 1024))
    seen = []

    def check():
        seen.append("checked")
        raise FileChanged()

    store = Store(s3, "bkt")
    with pytest.raises(FileChanged):
        store.upload_file(str(path), "k", 9 * 1024 * 1024, {}, lambda n: None, check)
    store.close()
    assert seen == ["checked"]
    assert "Contents" not in s3.list_objects_v2(Bucket="bkt")
    assert "Uploads" not in s3.list_multipart_uploads(Bucket="bkt")


def local(name, size=1, mtime_ns=SECOND):
    return LocalFile(name, size, mtime_ns, 0o100644)


def stale_folders(files, remote, prefix, filters) -> dict[str, int]:
    """The plan's stale folders: objects under each that --delete would remove, by the file's key."""
    steps = steps_of(files, remote, prefix, filters, delete=False)
    return {step.key: step.objects for step in steps if isinstance(step, StaleFolder)}


def future_dated(plan: BackupPlan, now: float) -> list[Upload]:
    return [upload for upload in plan.uploads if backup.future_dated(upload, now)]


def without_recorded(plan: BackupPlan, recorded: dict[str, int | None]) -> BackupPlan:
    """The plan with each upload rechecked against its object's recorded mtime."""
    rechecked = [
        after_recheck(upload, recorded.get(upload.key)) for upload in plan.uploads
    ]
    return BackupPlan.of([*rechecked, *[Keep("") for _ in range(plan.skipped)]])


def test_stale_folders_counts_what_delete_would_remove():
    files = {"p/sub": local("src/sub"), "p/other.txt": local("src/other.txt")}
    remote = {
        key: RemoteObject(key, 1, 1.0)
        for key in ("p/sub/a", "p/sub/deep/b", "p/sub/x.log", "p/sub/", "p/subway/c")
    }
    filters = Filters(((False, "*.log"),))
    assert stale_folders(files, remote, "p", filters) == {"p/sub": 2}
    assert stale_folders(files, remote, "p", Filters()) == {"p/sub": 3}
    assert stale_folders(
        {"sub": local("sub")}, {"sub/a": RemoteObject("sub/a", 1, 1.0)}, "", Filters()
    ) == {"sub": 1}


def test_future_dated_files_are_rechecked_by_their_recorded_mtime():
    now = 2_000_000_000.0
    future = local("future", mtime_ns=int(now + 3600) * SECOND)
    newer = local("newer", mtime_ns=int(now - 60) * SECOND)
    plan = BackupPlan(
        (
            Upload("p/future", future, "newer"),
            Upload("p/newer", newer, "newer"),
            Upload("p/new", future, "new"),
        ),
        (),
        4,
    )
    assert [u.key for u in future_dated(plan, now)] == ["p/future"]
    unchanged = without_recorded(plan, {"p/future": future.mtime_ns})
    assert [u.key for u in unchanged.uploads] == ["p/newer", "p/new"]
    assert unchanged.skipped == 5
    touched = without_recorded(plan, {"p/future": future.mtime_ns + 1})
    assert touched == plan
    assert without_recorded(plan, {"p/future": None}) == plan


def test_restore_conflict_says_which_is_newer():
    objects = {
        "p/sub": RemoteObject("p/sub", 1, 2000.0),
        "p/sub/a": RemoteObject("p/sub/a", 1, 1000.0),
        "p/sub/b/c": RemoteObject("p/sub/b/c", 1, 1500.0),
    }
    plan = restore_plan_of(objects, "p", PurePosixPath("/r"), Filters(), False)
    [(key, why)] = plan.conflicts
    assert key == "p/sub"
    assert why == folder_conflict(2000.0, 1500.0)
    assert "the file is newer" in why and "--delete" in why
    assert "the folder is newer" in folder_conflict(1000.0, 1500.0)
    assert "both were backed up at 1970-01-01 00:25:00 UTC" in folder_conflict(
        1500.0, 1500.0
    )


# --- End to end on moto's server --------------------------------------------------


def keys(client, bucket, prefix=""):
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


WHOLE_LINES = (
    "error:", "warning:", "backup.py:", "restore.py:", "upload:", "restore:",
    "uploaded ", "restored ", "(dry run)", "created ", "nothing ",
)  # fmt: skip


def no_line_breaks_inside(stream: str) -> None:
    """Every line is a whole message: an error, a warning or a line of the run's own."""
    for line in stream.splitlines():
        assert line.startswith(WHOLE_LINES), line


class Rewriter(threading.Thread):
    """Rewrites a file front to back, over and over, each pass with one byte value
    (1 to 251, then 1 again): in place over the zeros it starts with, or
    truncating it first (as an editor that saves in place does)."""

    def __init__(self, path, size, truncate):
        super().__init__(daemon=True)
        self.path, self.size, self.truncate = path, size, truncate
        self.stop = threading.Event()
        self.passes = 0

    def run(self):
        chunk = 256 * 1024
        with open(self.path, "r+b") as file:
            while not self.stop.is_set():
                self.passes += 1
                value = bytes([(self.passes - 1) % 251 + 1])
                file.seek(0)
                if self.truncate:
                    file.truncate()
                for _ in range(self.size // chunk):
                    file.write(value * chunk)
                    file.flush()


def is_a_state_of_the_rewritten_file(body: bytes) -> bool:
    """Whether body is what the Rewriter's file held at some instant: a pass's
    value up to where the pass had come, the previous pass's value (or the
    first zeros) after it."""
    value = body[0]
    rest = body.lstrip(bytes([value]))
    return set(rest) <= {0, (value - 2) % 251 + 1} and len(set(rest)) <= 1


@pytest.mark.parametrize(
    "body",
    [b"\5" * 8, b"\5" * 3 + b"\4" * 5, b"\1" * 4 + b"\xfb" * 4, b"\1" * 4 + b"\0" * 4],
)
def test_states_of_the_rewritten_file(body):
    assert is_a_state_of_the_rewritten_file(body)


@pytest.mark.parametrize(
    "body",
    [b"\5" * 3 + b"\4" * 3 + b"\5", b"\5" * 3 + b"\3" * 5, b"\4" * 3 + b"\5" * 5],
)
def test_mixed_reads_of_the_rewritten_file(body):
    assert not is_a_state_of_the_rewritten_file(body)


@pytest.mark.parametrize("truncate", [False, True], ids=["in-place", "truncated"])
@pytest.mark.parametrize(
    "size", [512 * 1024, 2 * MiB, 20 * MiB], ids=["small-put", "put", "multipart"]
)
def test_a_file_rewritten_during_the_upload_is_never_stored_mixed(
    s3_server, server_client, cli_env, tmp_path, bucket_name, size, truncate
):
    source = make_tree(tmp_path / "src", {"busy.bin": b"\0" * size})
    rewriter = Rewriter(source / "busy.bin", size, truncate)
    rewriter.start()
    try:
        # A body shorter than its Content-Length once held a run ~60 s (a timeout).
        result = run_script(
            "backup.py", str(source), f"{bucket_name}::p", "--endpoint-url", s3_server,
            env=cli_env, timeout=45,
        )  # fmt: skip
    finally:
        rewriter.stop.set()
        rewriter.join()
    assert "Traceback" not in result.stderr
    stored = keys(server_client, bucket_name)
    if result.returncode == 0:
        assert stored == ["p/busy.bin"]
    else:
        assert result.returncode == 1
        # Either we saw the change, or the server did: a part whose bytes changed
        # between botocore's hash of them and their sending (RGW checks the
        # signed SHA-256; moto does not).
        assert (
            "busy.bin: it changed during the backup, 3 times in a row" in result.stderr
            or "busy.bin: the server received bytes that do not match their checksum"
            in result.stderr
        )
    if stored:
        # One consistent read: bytes the file held at one instant, at its size,
        # and a checksum of those very bytes.
        response = server_client.get_object(
            Bucket=bucket_name, Key="p/busy.bin", ChecksumMode="ENABLED"
        )
        body = response["Body"].read()
        if truncate:  # a pass's value up to where the pass had come
            assert len(body) <= size and len(set(body)) <= 1
        else:
            assert len(body) == size and is_a_state_of_the_rewritten_file(body)
        # A truncated file may be seen under the multipart threshold, and go up
        # in one PUT: the way it went is the size it had when it was read.
        multipart = "md5chksum" in response["Metadata"]
        if not truncate:
            assert multipart == (size >= backup.MULTIPART_THRESHOLD)
        if not multipart:
            assert response["ChecksumCRC32"] == crc32_header(zlib.crc32(body))
        else:  # its md5chksum, from a pass of its own, is of the same state
            digest = hashlib.md5(body, usedforsecurity=False).hexdigest()
            assert response["Metadata"]["md5chksum"] == md5chksum(digest)
    assert rewriter.passes > 3  # it did write during the run
    uploads = server_client.list_multipart_uploads(Bucket=bucket_name)
    assert not uploads.get("Uploads")

    # Once nobody writes to it, the next run uploads it if nothing was stored.
    # (After a state that was stored, a change in the same second as the upload
    # is not seen: LastModified has whole seconds.)
    again = run_script(
        "backup.py", str(source), f"{bucket_name}::p", "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    if not stored:
        body = server_client.get_object(Bucket=bucket_name, Key="p/busy.bin")["Body"]
        assert body.read() == (source / "busy.bin").read_bytes()


@pytest.mark.skipif(
    TEST_SERVER == "seaweedfs",
    reason="SeaweedFS stores \\ in a key as /: a\\b.txt comes back as a/b.txt",
)
def test_backslash_names_round_trip_on_posix(s3_server, cli_env, tmp_path, bucket_name):
    files = {"a\\b.txt": b"one", "dir\\x/y\\z": b"two", "c:notes.txt": b"three"}
    source = make_tree(tmp_path / "src", files)
    result = run_script(
        "backup.py", str(source), f"{bucket_name}::p", "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Backslashes come back here; a name that starts like a drive letter never does.
    [warning] = result.stderr.splitlines()
    assert warning.startswith("warning: ") and "c:notes.txt" in warning
    assert "refuses it: the key starts with a drive letter" in warning
    dest = tmp_path / "dest"
    restored = run_script(
        "restore.py", f"{bucket_name}::p", str(dest), "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert restored.returncode == 1
    assert (
        "p/c:notes.txt: refused: the key starts with a drive letter" in restored.stderr
    )
    assert (dest / "a\\b.txt").read_bytes() == b"one"
    assert (dest / "dir\\x" / "y\\z").read_bytes() == b"two"


def test_a_folder_replaced_by_a_file_is_warned_of_and_restore_says_which_is_newer(
    s3_server, server_client, cli_env, tmp_path, bucket_name
):
    source = make_tree(tmp_path / "src", {"sub/a": b"a", "sub/deep/b": b"b", "c": b"c"})
    location = f"{bucket_name}::p"
    first = run_script(
        "backup.py", str(source), location, "--endpoint-url", s3_server, env=cli_env
    )
    assert first.returncode == 0, first.stderr
    time.sleep(1.1)  # S3 keeps LastModified to the second
    for name in ("sub/deep/b", "sub/a"):
        os.unlink(source / name)
    os.rmdir(source / "sub" / "deep")
    os.rmdir(source / "sub")
    (source / "sub").write_bytes(b"now a file")

    second = run_script(
        "backup.py", str(source), location, "--endpoint-url", s3_server, env=cli_env
    )
    assert second.returncode == 0, second.stderr
    [warning] = second.stderr.splitlines()
    assert f"{source / 'sub'} is a file now" in warning
    assert f"2 objects under s3://{bucket_name}/p/sub/" in warning
    assert "backup.py --delete removes them" in warning

    restored = run_script(
        "restore.py", location, str(tmp_path / "dest"), "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert restored.returncode == 1
    [conflict] = restored.stderr.splitlines()
    assert conflict.startswith(f"error: s3://{bucket_name}/p/sub: conflict:")
    assert "the file is newer" in conflict

    deleting = run_script(
        "backup.py", str(source), location, "--endpoint-url", s3_server, "--delete",
        env=cli_env,
    )  # fmt: skip
    assert deleting.returncode == 0 and deleting.stderr == ""
    assert keys(server_client, bucket_name) == ["p/c", "p/sub"]


def test_times_before_1970_and_in_the_future(
    s3_server, server_client, cli_env, tmp_path, bucket_name
):
    source = make_tree(tmp_path / "src", {"old.txt": b"old", "future.txt": b"future"})
    old_ns = -(86_400 * 365 * SECOND) - 250_000_000  # 1969, with a fraction
    future_ns = (int(time.time()) + 10 * 365 * 86_400) * SECOND
    os.utime(source / "old.txt", ns=(old_ns, old_ns))
    os.utime(source / "future.txt", ns=(future_ns, future_ns))
    location = f"{bucket_name}::p"
    first = run_script(
        "backup.py", str(source), location, "--endpoint-url", s3_server, env=cli_env
    )
    assert first.returncode == 0, first.stderr

    # A file dated in the future is not uploaded again while its object records its mtime.
    second = run_script(
        "backup.py", str(source), location, "--endpoint-url", s3_server, env=cli_env
    )
    assert second.returncode == 0, second.stderr
    assert "uploaded 0, skipped 2" in second.stdout

    dest = tmp_path / "dest"
    restored = run_script(
        "restore.py", location, str(dest), "--endpoint-url", s3_server, env=cli_env
    )
    assert restored.returncode == 0, restored.stderr
    assert os.stat(dest / "old.txt").st_mtime_ns == old_ns
    assert os.stat(dest / "future.txt").st_mtime_ns == future_ns

    # Given another time, still in the future, with the same size: uploaded again.
    os.utime(source / "future.txt", ns=(future_ns + SECOND, future_ns + SECOND))
    third = run_script(
        "backup.py", str(source), location, "--endpoint-url", s3_server, env=cli_env
    )
    assert third.returncode == 0, third.stderr
    assert "uploaded 1, skipped 1" in third.stdout
    head = server_client.head_object(Bucket=bucket_name, Key="p/future.txt")
    assert parse_mtime(head["Metadata"]["mtime"]) == future_ns + SECOND


@pytest.mark.parametrize("script", ["backup.py", "restore.py"])
@pytest.mark.parametrize(
    ("location", "endpoint_suffix", "problem"),
    [
        ("{bucket}::p ", "", "location '{bucket}::p ' ends with a space"),
        ("\t{bucket}::p", "", "location '\\t{bucket}::p' starts with a tab"),
        ("s3://{bucket}/p\n", "", "ends with a newline"),
        ("{bucket}::p", " ", "endpoint URL '{endpoint} ' ends with a space"),
    ],
)
def test_stray_whitespace_in_a_location_or_url_is_exit_2(
    s3_server, server_client, cli_env, tmp_path, bucket_name, script, location,
    endpoint_suffix, problem,
):  # fmt: skip
    source = make_tree(tmp_path / "src", {"a.txt": b"a"})
    location = location.format(bucket=bucket_name)
    args = (
        (str(source), location)
        if script == "backup.py"
        else (location, str(tmp_path / "dest"))
    )
    result = run_script(
        script, *args, "--endpoint-url", s3_server + endpoint_suffix, env=cli_env
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert problem.format(bucket=bucket_name, endpoint=s3_server) in line
    assert not (tmp_path / "dest").exists()
    assert bucket_name not in [
        b["Name"] for b in server_client.list_buckets()["Buckets"]
    ]


def test_names_with_control_characters_are_printed_escaped(
    moto_server, server_client, cli_env, tmp_path, bucket_name
):
    """On moto: it refuses a key with a newline, as the last part needs (RGW takes it)."""
    files = {
        "tab\there.txt": b"t",
        "esc\x1b[31m.txt": b"e",
        "cr\rx.txt": b"c",
        "new\nline.txt": b"n",
    }
    source = make_tree(tmp_path / "src", files)
    location = f"{bucket_name}::p"
    dry = run_script(
        "backup.py", str(source), location, "--endpoint-url", moto_server, "--dry-run",
        env=cli_env,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    no_line_breaks_inside(dry.stdout)
    assert (
        f"(dry run) upload: {source}/new\\nline.txt -> s3://{bucket_name}/p/new\\nline.txt"
        in dry.stdout
    )

    result = run_script(
        "backup.py",
        str(source),
        location,
        "--endpoint-url",
        moto_server,
        "-v",
        env=cli_env,
    )
    # moto refuses a key with a newline (real S3 takes it): a line about the key,
    # not "check the bucket name".
    assert result.returncode == 1
    no_line_breaks_inside(result.stdout)
    no_line_breaks_inside(result.stderr)
    [error] = result.stderr.splitlines()
    assert error.startswith(f"error: upload failed: {source}/new\\nline.txt: ")
    assert "404 Not Found for the key p/new\\nline.txt: it refuses this name" in error
    assert "bucket" not in error
    assert (
        f"upload: {source}/tab\\there.txt -> s3://{bucket_name}/p/tab\\there.txt"
        in result.stdout
    )
    assert f"upload: {source}/esc\\x1b[31m.txt" in result.stdout
    assert f"upload: {source}/cr\\rx.txt" in result.stdout

    restored = run_script(
        "restore.py", location, str(tmp_path / "dest"), "--endpoint-url", moto_server, "-v",
        env=cli_env,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    no_line_breaks_inside(restored.stdout)
    assert (
        f"restore: s3://{bucket_name}/p/cr\\rx.txt -> {tmp_path}/dest/cr\\rx.txt"
        in restored.stdout
    )
    assert (tmp_path / "dest" / "cr\rx.txt").read_bytes() == b"c"


def test_a_file_that_vanishes_during_the_run_is_a_warning(
    s3_server, start_proxy, server_client, cli_env, tmp_path, bucket_name
):
    source = make_tree(tmp_path / "src", {"a.txt": b"first", "z.txt": b"goes away"})
    # The first upload is throttled (503 SlowDown) until the file is gone, so that
    # it vanishes after the scan and before its own upload (one worker, in order).
    proxy = start_proxy(throttled_keys={"p/a.txt"})
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "backup.py"), str(source), f"{bucket_name}::p",
         "--endpoint-url", proxy.url, "--workers", "1"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not proxy.throttled_attempts["p/a.txt"] and time.monotonic() < deadline:
        time.sleep(0.01)
    os.unlink(source / "z.txt")
    proxy.stop_faults()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert (
        stderr == f"warning: vanished during the backup, not uploaded: {source}/z.txt\n"
    )
    assert "uploaded 1, skipped 0, failed 0, vanished 1," in stdout
    assert keys(server_client, bucket_name) == ["p/a.txt"]


def test_a_key_over_1024_bytes_is_refused_before_any_request(
    s3_server, server_client, cli_env, tmp_path, bucket_name
):
    # 1,025 bytes with "pp/", one more than S3 takes.
    deep = "/".join(["d" * 200] * 5) + "/" + "x" * (1025 - len("pp/") - 1005)
    source = make_tree(tmp_path / "src", {deep: b"x", "short.txt": b"s"})
    result = run_script(
        "backup.py", str(source), f"{bucket_name}::pp", "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert result.returncode == 1
    [error] = result.stderr.splitlines()
    assert error.startswith(
        f"error: upload failed: {source / deep}: its key is 1,025 bytes long"
    )
    assert "over S3's limit of 1,024" in error
    assert "uploaded 1, skipped 0, failed 1" in result.stdout
    assert keys(server_client, bucket_name) == ["pp/short.txt"]


def test_restore_names_the_target_and_what_stands_in_its_way(
    s3_server, cli_env, tmp_path, bucket_name
):
    source = make_tree(
        tmp_path / "src", {"file.txt": b"f", "sub/inner.txt": b"i", "ok.txt": b"o"}
    )
    location = f"{bucket_name}::p"
    first = run_script(
        "backup.py", str(source), location, "--endpoint-url", s3_server, env=cli_env
    )
    assert first.returncode == 0, first.stderr
    dest = tmp_path / "dest"
    (dest / "file.txt").mkdir(parents=True)  # a folder where the backup has a file
    (dest / "sub").write_bytes(b"a file where the backup has a folder")
    result = run_script(
        "restore.py", location, str(dest), "--endpoint-url", s3_server, env=cli_env
    )
    assert result.returncode == 1
    assert ".s3restore" not in result.stderr
    lines = sorted(result.stderr.splitlines())
    assert lines == [
        (
            f"error: restore failed: s3://{bucket_name}/p/file.txt: a folder stands "
            f"where the backup has a file: {dest}/file.txt: move it away and run again"
        ),
        (
            f"error: restore failed: s3://{bucket_name}/p/sub/inner.txt: a file stands "
            f"where the backup has a folder: {dest}/sub: move it away and run again"
        ),
    ]
    assert (dest / "ok.txt").read_bytes() == b"o"
    assert sorted(os.listdir(dest)) == ["file.txt", "ok.txt", "sub"]


@pytest.mark.parametrize("script", ["backup.py", "restore.py"])
def test_ctrl_c_while_importing_exits_130_quietly(tmp_path, cli_env, script):
    # -X importtime reports each import as it ends: once botocore's modules are
    # being imported, the script's own first lines have run. Should the signal
    # come late, the run fails at the dead endpoint, never reaching the network.
    args = (
        (str(tmp_path), "bucket::p")
        if script == "backup.py"
        else ("bucket::p", str(tmp_path / "d"))
    )
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", str(ROOT / script), *args,
         "--endpoint-url", f"http://127.0.0.1:{free_port()}"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "botocore" in line:
            process.send_signal(signal.SIGINT)
            break
    stdout, rest = process.communicate(timeout=60)
    stderr = "".join(seen) + rest
    assert process.returncode == 130
    assert stdout == ""
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert any("botocore" in line for line in seen)


@pytest.mark.parametrize("script", ["backup", "restore"])
def test_botocore_keeps_its_python_signer_when_awscrt_is_installed(script):
    """With awscrt installed (aws-cli v2, boto3[crt]) botocore would sign with it;
    the scripts turn that off with botocore's own switch before botocore loads."""
    env = {k: v for k, v in os.environ.items() if k != "BOTO_DISABLE_CRT"}
    check = (
        f"import {script}, os, inspect, botocore.compat; "
        "print(os.environ['BOTO_DISABLE_CRT'], "
        "'BOTO_DISABLE_CRT' in inspect.getsource(botocore.compat))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["true", "True"]
