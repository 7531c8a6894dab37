"""Memory bounds: PUT bodies streamed from their files (FileBody), failures kept
without their bodies, malloc arenas, --delete's keys spilled to a temporary file, and
restore's listing streamed through its plan into the workers."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import random
import sys
import tempfile
import tracemalloc
import weakref
import zlib
from datetime import datetime
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from conftest import make_tree, run_script
from test_reliability import (
    interrupted_when,
    objects_in,
    start_script,
    under_prefix,
)

import backup
import restore
import s3common
from backup import DeleteKeys
from s3common import (
    CHUNK,
    FileBody,
    FileChanged,
    Filters,
    RemoteObject,
    limit_malloc_arenas,
    run_collecting_failures,
)

MiB = 1024 * 1024


def body_of(path, data: bytes):
    """A FileBody of the file at path, made (as backup.py makes it) from data's
    CRC32, after a read of it to the end."""
    file = open(path, "rb")  # noqa: SIM115 (the body reads it while it lives)
    file.read()
    return FileBody(file, len(data), zlib.crc32(data))


def read_all(body, amount: int) -> list[bytes]:
    chunks = []
    while chunk := body.read(amount):
        chunks.append(chunk)
    return chunks


# --- PUT bodies stream from their files ---------------------------------------------


def test_a_file_body_reads_the_file_in_chunks_again_from_its_start(tmp_path):
    data = random.Random(1).randbytes(3 * CHUNK + 5)
    (tmp_path / "f").write_bytes(data)
    body = body_of(tmp_path / "f", data)
    assert len(body) == len(data)
    chunks = read_all(body, MiB)  # as botocore asks, for its payload hash
    assert max(map(len, chunks)) == CHUNK and b"".join(chunks) == data
    assert body.seek(0) == 0 and body.tell() == 0
    assert b"".join(read_all(body, 8192)) == data  # sent again, as http.client reads
    assert body.sha256() == hashlib.sha256(data).hexdigest() and body.tell() == 0
    assert body.seek(0, os.SEEK_END) == len(data) and body.read(CHUNK) == b""
    with pytest.raises(io.UnsupportedOperation):
        body.seek(CHUNK)


@pytest.mark.parametrize(
    "now",
    [
        lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # its last byte changed
        lambda data: bytes([data[0] ^ 1]) + data[1:],  # its first
        lambda data: data[: CHUNK + 1],  # it shrank
    ],
    ids=["last-byte", "first-byte", "shrank"],
)
def test_a_file_changed_since_its_checksum_never_gives_its_last_bytes(tmp_path, now):
    data = random.Random(2).randbytes(2 * CHUNK + 1)
    path = tmp_path / "f"
    path.write_bytes(data)
    body = body_of(path, data)
    path.write_bytes(now(data))
    sent = []
    with pytest.raises(FileChanged):
        while chunk := body.read(CHUNK):
            sent.append(chunk)
    # What the server got is short of the Content-Length: it stores nothing.
    assert sum(map(len, sent)) < len(data)


def test_a_file_that_grew_sends_the_bytes_its_checksum_was_made_of(tmp_path):
    data = random.Random(3).randbytes(CHUNK + 7)
    path = tmp_path / "f"
    path.write_bytes(data)
    body = body_of(path, data)
    with open(path, "ab") as file:
        file.write(b"appended since")
    assert b"".join(read_all(body, CHUNK)) == data


# --- Failures are kept without their bodies -----------------------------------------


class Body:
    """Stands for a file's bytes: one that can be watched for being freed."""


def test_a_failed_item_keeps_no_local_variable_of_its_work():
    bodies = []

    def work(item: int, cancel) -> None:
        body = Body()
        bodies.append(weakref.ref(body))
        try:
            raise ConnectionError("the first attempt failed")
        except ConnectionError:
            raise OSError(f"item {item} failed") from None

    failures, skipped = run_collecting_failures(range(3), work, workers=2)
    assert sorted(str(failure.error) for failure in failures) == [
        "item 0 failed",
        "item 1 failed",
        "item 2 failed",
    ]
    assert skipped == []
    gc.collect()
    assert len(bodies) == 3
    assert all(body() is None for body in bodies)


def test_malloc_arenas_are_limited_where_the_c_library_is_glibc():
    try:
        glibc = bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):
        glibc = False
    assert limit_malloc_arenas() is (sys.platform == "linux" and glibc)


# --- Small files, many workers: every byte arrives ---------------------------------


def test_small_files_of_many_sizes_on_many_workers_arrive_byte_identical(
    s3_server, cli_env, tmp_path, bucket_name, server_client
):
    """Files of 1-8 MiB (one PUT each, streamed from the file) on 64 workers at
    once, and small ones (held whole) beside them."""
    rng = random.Random(17)
    sizes = [MiB - 1, MiB, MiB + 1, 3 * MiB + 7, 5 * MiB, 7 * MiB, 8 * MiB - 1]
    files = {f"big/{n}.bin": rng.randbytes(size) for n, size in enumerate(sizes)}
    files.update({f"small/{n}.txt": rng.randbytes(n * 100) for n in range(20)})
    source = make_tree(tmp_path / "src", files)
    result = run_script(
        "backup.py",
        str(source),
        f"{bucket_name}::many",
        "--endpoint-url",
        s3_server,
        "--workers",
        "64",
        env=cli_env,
    )
    assert result.returncode == 0, result.stderr
    assert f"uploaded {len(files)}, skipped 0, failed 0" in result.stdout
    assert objects_in(server_client, bucket_name) == under_prefix(files, "many")


def test_ctrl_c_stops_workers_waiting_for_the_rate(
    s3_server, cli_env, tmp_path, bucket_name, server_client
):
    """Files of 7 MiB, each let through --bwlimit whole before its PUT, at 8 MiB/s:
    once the first is up, the others are waiting for the rate when Ctrl-C comes,
    and every one of them stops (none holds its place in line for ever)."""
    rng = random.Random(130)
    files = {f"f{n:02d}.bin": rng.randbytes(7 * MiB) for n in range(12)}
    source = make_tree(tmp_path / "src", files)
    process = start_script(
        "backup.py",
        str(source),
        f"{bucket_name}::wait",
        "--endpoint-url",
        s3_server,
        "--bwlimit",
        "8M",
        env=cli_env,
    )

    def one_uploaded() -> bool:
        assert process.poll() is None, "the backup ended before it was interrupted"
        try:
            return "Contents" in server_client.list_objects_v2(Bucket=bucket_name)
        except server_client.exceptions.NoSuchBucket:
            return False

    stderr = interrupted_when(process, one_uploaded, "the first file to be uploaded")
    assert "interrupted" in stderr
    stored = objects_in(server_client, bucket_name)
    assert 1 <= len(stored) < len(files)
    assert stored.items() <= under_prefix(files, "wait").items()


# --- --delete's keys, spilled past DELETES_HELD -------------------------------------


AWKWARD_KEYS = [
    "p/a line\nbreak",
    "p/ünïcödé/日本語.txt",
    "p/" + "long" * 250,
    'p/"quoted" \\ back\tslash',
    "p/{}[],:",
    "p/ ",
]


@pytest.fixture
def temporary_files(tmp_path, monkeypatch) -> list:
    """The temporary files made (into a folder of the test's own), as they are made."""
    made = []
    make = tempfile.TemporaryFile
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))

    def recording(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    yield made
    assert list(folder.iterdir()) == []


def test_delete_keys_past_the_bound_go_to_a_file_and_come_back_in_order(
    monkeypatch, temporary_files
):
    monkeypatch.setattr(backup, "DELETES_HELD", 4)
    keys = [*AWKWARD_KEYS, "p/last"] * 2
    deletes = DeleteKeys()
    for key in keys[:5]:
        deletes.append(key)
    assert list(deletes) == keys[:5]
    for key in keys[5:]:  # appended after a read, to the end
        deletes.append(key)
    assert len(deletes) == len(keys)
    assert list(deletes) == keys
    assert list(deletes) == keys  # as often as asked
    assert len(temporary_files) == 1
    deletes.close()
    assert temporary_files[0].closed


def test_delete_keys_under_the_bound_need_no_file(temporary_files):
    deletes = DeleteKeys()
    for key in AWKWARD_KEYS:
        deletes.append(key)
    assert list(deletes) == AWKWARD_KEYS
    deletes.close()
    assert temporary_files == []


def test_delete_past_the_bound_removes_exactly_the_objects_without_files(
    s3, tmp_path, monkeypatch, capsys, temporary_files
):
    """In process, with room for 2 keys and batches of 3: the keys go through the
    file, in more than one DeleteObjects; --dry-run lists the same keys."""
    monkeypatch.setattr(backup, "DELETES_HELD", 2)
    monkeypatch.setattr(s3common, "DELETE_BATCH", 3)
    source = make_tree(tmp_path / "src", {"kept.txt": b"kept"})
    assert backup.main([str(source), "bk-spill::p", "-q"]) == 0
    gone = [*AWKWARD_KEYS, "p/x1", "p/x2"]
    for key in gone:
        s3.put_object(Bucket="bk-spill", Key=key, Body=b"gone")
    s3.put_object(Bucket="bk-spill", Key="p2/beside", Body=b"beside")
    capsys.readouterr()

    assert backup.main([str(source), "bk-spill::p", "--delete", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith("(dry run) delete")]
    shown = [backup.printable(f"s3://bk-spill/{key}") for key in sorted(gone)]
    assert listed == [f"(dry run) delete: {url}" for url in shown]
    assert f"delete {len(gone)}" in out

    assert backup.main([str(source), "bk-spill::p", "--delete", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["deleted"] == len(gone) and report["exit_code"] == 0
    listing = s3.list_objects_v2(Bucket="bk-spill")["Contents"]
    assert sorted(item["Key"] for item in listing) == ["p/kept.txt", "p2/beside"]
    assert len(temporary_files) == 2  # one for each run that had keys to delete
    assert all(file.closed for file in temporary_files)


# --- restore.py: the listing flows through the plan into the workers ----------------


def test_a_listing_without_ranges_is_read_one_page_ahead(monkeypatch):
    monkeypatch.setattr(s3common, "LIST_PAGE", 2)
    client = boto3.client("s3", region_name="us-east-1")
    asked = []
    client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2", lambda params, **_: asked.append(1)
    )
    keys = [f"p/k{n:02d}" for n in range(10)]
    with Stubber(client) as stubber:
        for start in range(0, len(keys), 2):
            more = start + 2 < len(keys)
            response = {
                "Contents": [
                    {"Key": key, "Size": 0, "LastModified": datetime(2026, 1, 1)}
                    for key in keys[start : start + 2]
                ],
                "IsTruncated": more,
                **({"NextContinuationToken": f"after-{start}"} if more else {}),
            }
            stubber.add_response("list_objects_v2", response)
        for n, obj in enumerate(s3common.Store(client, "b").list("p/")):
            assert obj.key == keys[n]
            assert len(asked) <= n // 2 + 2  # the page read, and the next one
        stubber.assert_no_pending_responses()


def test_restore_plans_a_long_listing_in_memory_that_does_not_grow():
    def listing(count: int):
        for n in range(count):
            yield RemoteObject(f"p/d{n // 1000:04d}/f{n:07d}.bin", 16, 1000.0)

    tracemalloc.start()
    try:
        steps = restore.plan_restore(listing(30_000), "p", Path("/r"), Filters(), False)
        assert sum(1 for _ in steps) == 30_000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Held whole, as before issue 28, the listing and its plan took 1.4 KB an object.
    assert peak < 4 * MiB


def test_restore_draws_the_plan_a_bounded_way_ahead_of_the_downloads(
    s3, tmp_path, monkeypatch
):
    s3.create_bucket(Bucket="ahead")
    for n in range(40):
        s3.put_object(Bucket="ahead", Key=f"p/f{n:02d}", Body=b"x")
    monkeypatch.setattr(restore, "PLAN_AHEAD", 3)
    drawn, ahead = [0], []
    planned, restored = restore.plan_restore, restore.Restorer.__call__

    def counted(*args, **kwargs):
        for step in planned(*args, **kwargs):
            drawn[0] += 1
            yield step

    def restoring(self, item, cancel):
        ahead.append(drawn[0] - len(ahead))
        return restored(self, item, cancel)

    monkeypatch.setattr(restore, "plan_restore", counted)
    monkeypatch.setattr(restore.Restorer, "__call__", restoring)
    assert restore.main(["ahead::p", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert len(list((tmp_path / "out").iterdir())) == 40
    # The queue's 3, the one a worker holds and the one waiting to go in the queue.
    assert max(ahead) <= 3 + 1 + 1
