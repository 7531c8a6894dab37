"""The pure parts: locations, keys, bucket names, filters, plans, key-to-path mapping,
the parts of a large download (and the threads that fetch them)."""

from __future__ import annotations

import io
import itertools
import os
import random
import threading
from pathlib import PurePosixPath, PureWindowsPath

import botocore.exceptions
import pytest
from plans import plan_of, restore_plan_of

import backup
from backup import LocalFile, upload_args, upload_reason
from restore import folder_conflict, plan_restore
from s3common import (
    CliError,
    ExitCode,
    Filters,
    Location,
    PartWorkers,
    RemoteObject,
    Summary,
    UnsafeKey,
    body_reader,
    bucket_name_problem,
    describe_error,
    format_mtime,
    is_within,
    key_for,
    key_problem,
    parse_location,
    parse_mode,
    parse_mtime,
    parse_timestamp,
    part_ranges,
    path_for_key,
    range_problem,
    read_range,
    relative_key,
    write_all,
)


@pytest.mark.parametrize(
    ("text", "bucket", "prefix"),
    [
        ("bucket::photos", "bucket", "photos"),
        ("bucket::", "bucket", ""),
        ("bucket", "bucket", ""),
        ("s3://bucket/photos/2024", "bucket", "photos/2024"),
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("S3://bucket/x", "bucket", "x"),
        ("bucket::/photos//2024/", "bucket", "photos/2024"),
        ("bucket::photos\\2024\\", "bucket", "photos/2024"),
        ("s3://bucket//a///b//", "bucket", "a/b"),
        ("Legacy_Bucket::x", "Legacy_Bucket", "x"),
        ("bucket::with space/ünï", "bucket", "with space/ünï"),
    ],
)
def test_parse_location(text, bucket, prefix):
    assert parse_location(text) == Location(bucket, prefix)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "::x",
        "s3://",
        "s3:///x",
        "my bucket::x",
        "b::x",
        "bucket::a/../b",
        "bucket::./a",
        "buck/et",
    ],
)
def test_parse_location_refuses(text):
    with pytest.raises(CliError) as caught:
        parse_location(text)
    assert caught.value.code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("prefix", "relative", "key"),
    [("", "a.txt", "a.txt"), ("p", "a/b.txt", "p/a/b.txt"), ("p/q", "x", "p/q/x")],
)
def test_key_for_and_back(prefix, relative, key):
    assert key_for(prefix, relative) == key
    assert relative_key(prefix, key) == relative


@pytest.mark.parametrize(
    "name",
    ["abc", "my-bucket", "my.bucket.2024", "a" * 63, "0day", "logs-s3"],
)
def test_valid_new_bucket_names(name):
    assert bucket_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("ab", "3 to 63"),
        ("a" * 64, "3 to 63"),
        ("MyBucket", "lowercase"),
        ("my_bucket", "lowercase"),
        ("-abc", "starts and ends"),
        ("abc-", "starts and ends"),
        ("a..b", "'..'"),
        ("192.168.1.1", "IP address"),
        ("xn--abc", "reserved"),
        ("sthree-abc", "reserved"),
        ("abc-s3alias", "reserved"),
        ("abc--ol-s3", "reserved"),
        ("b@d", "lowercase"),
    ],
)
def test_invalid_new_bucket_names(name, why):
    assert why in bucket_name_problem(name)


@pytest.mark.parametrize(
    ("name", "legacy_ok"),
    [
        ("MyBucket", True),
        ("my_bucket", True),
        ("a" * 200, True),
        ("ab", False),
        ("a..b", False),
        ("a b", False),
    ],
)
def test_legacy_bucket_names(name, legacy_ok):
    assert (bucket_name_problem(name, legacy=True) is None) == legacy_ok


@pytest.mark.parametrize(
    ("rules", "path", "included"),
    [
        ((), "a.txt", True),
        (((False, "*.log"),), "sub/b.log", False),
        (((False, "*.log"),), "b.txt", True),
        (((False, "*.log"), (True, "keep.log")), "keep.log", True),
        (((True, "keep.log"), (False, "*.log")), "keep.log", False),
        (((False, "cache/*"),), "cache/x/y", False),
        (((False, "cache/*"),), "src/cache/x", True),
        (((False, "*"), (True, "*.jpg")), "a/b/c.jpg", True),
        (((False, "*"), (True, "*.jpg")), "a/b/c.png", False),
        (((False, "file?.txt"),), "file1.txt", False),
        (((False, "[ab].txt"),), "c.txt", True),
    ],
)
def test_filters_last_match_wins(rules, path, included):
    assert Filters(rules).includes(path) is included


def local(size=10, mtime=1000.0, path="/src/x"):
    return LocalFile(path, size, int(mtime * 1e9), 0o100644)


def remote(key, size=10, last_modified=2000.0):
    return RemoteObject(key, size, last_modified)


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (None, "new"),
        (remote("k", size=11), "size changed"),
        (remote("k", last_modified=999.0), "newer"),
        (remote("k", last_modified=1000.0), None),
        (remote("k", last_modified=2000.0), None),
    ],
)
def test_upload_reason(obj, reason):
    assert upload_reason(local(), obj) == reason


def test_upload_reason_compares_whole_seconds_as_s3_keeps_them():
    assert upload_reason(local(mtime=1000.7), remote("k", last_modified=1000.0)) is None
    assert (
        upload_reason(local(mtime=1001.0), remote("k", last_modified=1000.0)) == "newer"
    )


def test_plan_backup_uploads_changed_and_skips_unchanged():
    files = {
        "p/new": local(),
        "p/same": local(),
        "p/grown": local(size=20),
        "p/touched": local(mtime=3000.0),
    }
    objects = {key: remote(key) for key in ("p/same", "p/grown", "p/touched", "p/gone")}
    plan = plan_of(files, objects, "p", Filters(), delete=False)
    assert [(u.key, u.reason) for u in plan.uploads] == [
        ("p/grown", "size changed"),
        ("p/new", "new"),
        ("p/touched", "newer"),
    ]
    assert plan.skipped == 1
    assert plan.deletes == ()


def test_plan_backup_delete_respects_filters_and_folder_markers():
    files = {"p/keep": local()}
    objects = {
        key: remote(key) for key in ("p/keep", "p/gone.txt", "p/gone.log", "p/dir/")
    }
    plan = plan_of(files, objects, "p", Filters(((False, "*.log"),)), delete=True)
    assert plan.deletes == ("p/gone.txt",)


def test_plan_backup_filters_local_files():
    files = {"a.log": local(), "b.txt": local(), "sub/c.log": local()}
    plan = plan_of(files, {}, "", Filters(((False, "*.log"),)), delete=False)
    assert [u.key for u in plan.uploads] == ["b.txt"]


def test_upload_args_record_mtime_mode_and_type():
    file = LocalFile("/src/photo.JPG", 1, 1_700_000_000_123_456_789, 0o100640)
    args = upload_args(file)
    assert args == {
        "Metadata": {"mtime": "1700000000.123456789", "mode": "100640"},
        "ContentType": "image/jpeg",
    }


@pytest.mark.parametrize(
    ("text", "nanoseconds"),
    [
        ("1700000000.123456789", 1_700_000_000_123_456_789),
        ("1700000000", 1_700_000_000_000_000_000),
        ("1700000000.5", 1_700_000_000_500_000_000),
        ("", None),
        ("yesterday", None),
        ("-5", -5_000_000_000),
        ("-0.25", -250_000_000),
        ("1e20", None),
        ("nan", None),
        (None, None),
    ],
)
def test_parse_mtime(text, nanoseconds):
    assert parse_mtime(text) == nanoseconds


def test_mtime_round_trips():
    assert (
        parse_mtime(format_mtime(1_234_567_890_000_000_001))
        == 1_234_567_890_000_000_001
    )


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("100644", 0o644),
        ("100755", 0o755),
        ("104755", 0o755),
        ("644", 0o644),
        ("rwx", None),
        (None, None),
    ],
)
def test_parse_mode(text, mode):
    assert parse_mode(text) == mode


ROOT = PurePosixPath("/restore")
WINDOWS_ROOT = PureWindowsPath("C:/restore")


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("a.txt", "/restore/a.txt"),
        ("deep/er/path/a b+c%#?&=.txt", "/restore/deep/er/path/a b+c%#?&=.txt"),
        ("ünï/ço dé.txt", "/restore/ünï/ço dé.txt"),
        ("..a/b..", "/restore/..a/b.."),
        ("10:30 notes.txt", "/restore/10:30 notes.txt"),
    ],
)
def test_path_for_safe_keys(relative, expected):
    assert path_for_key(relative, ROOT) == PurePosixPath(expected)


HOSTILE_KEYS = [
    "..",
    "../evil",
    "a/../../evil",
    "a/..",
    "./a",
    "a/./b",
    "/etc/passwd",
    "//server/share/x",
    "a//b",
    "C:/Windows/evil",
    "c:evil",
    "Z:",
    "evil\x00.txt",
    "a/\x00/b",
    "",
]


@pytest.mark.parametrize("relative", HOSTILE_KEYS)
@pytest.mark.parametrize("root", [ROOT, WINDOWS_ROOT], ids=["posix", "windows"])
def test_path_for_hostile_keys(relative, root):
    with pytest.raises(UnsafeKey):
        path_for_key(relative, root)


@pytest.mark.parametrize(
    "relative",
    [
        "CON",
        "a/nul.txt",
        "a/COM1",
        "lpt9.log",
        "a/b:stream",
        "trailing.",
        "space ",
        "a/<b>",
        "a/b?",
        "pipe|x",
        "..\\evil",
        "a\\..\\..\\evil",
        "\\\\server\\share\\evil",
    ],
)
def test_path_for_keys_windows_refuses(relative):
    with pytest.raises(UnsafeKey):
        path_for_key(relative, WINDOWS_ROOT)
    # The same names are ordinary files on a POSIX system.
    assert ROOT in path_for_key(relative, ROOT).parents


@pytest.mark.parametrize(
    ("path", "root", "inside"),
    [
        (PurePosixPath("/data/a/b"), PurePosixPath("/data"), True),
        (PurePosixPath("/data"), PurePosixPath("/data"), True),
        (PurePosixPath("/data2/a"), PurePosixPath("/data"), False),
        (PurePosixPath("/"), PurePosixPath("/data"), False),
        (PurePosixPath("/data/a"), PurePosixPath("/"), True),
        (PureWindowsPath("C:/restore/a"), PureWindowsPath("C:/restore"), True),
        (PureWindowsPath("C:/restore2"), PureWindowsPath("C:/restore"), False),
        (PureWindowsPath("C:/a"), PureWindowsPath("C:/"), True),
        (PureWindowsPath("D:/restore/a"), PureWindowsPath("C:/restore"), False),
    ],
)
def test_is_within_compares_part_by_part(path, root, inside):
    assert is_within(path, root) is inside


def test_path_for_key_windows_lands_under_root():
    assert path_for_key("a/b.txt", WINDOWS_ROOT) == PureWindowsPath(
        "C:/restore/a/b.txt"
    )


def objects_for(*keys):
    return {key: RemoteObject(key, 1, 1000.0) for key in keys}


def test_plan_restore_maps_keys_and_skips_markers():
    plan = restore_plan_of(
        objects_for("p/a", "p/d/", "p/d/b"),
        "p",
        ROOT,
        Filters(),
        case_insensitive=False,
    )
    assert [(d.key, str(d.path)) for d in plan.downloads] == [
        ("p/a", "/restore/a"),
        ("p/d/b", "/restore/d/b"),
    ]
    assert plan.refused == () and plan.conflicts == ()


def test_plan_restore_refuses_escaping_keys_and_goes_on():
    plan = restore_plan_of(
        objects_for("p/ok", "p/../evil", "p/a/../../x"), "p", ROOT, Filters(), False
    )
    assert [d.key for d in plan.downloads] == ["p/ok"]
    assert [key for key, _ in plan.refused] == ["p/../evil", "p/a/../../x"]


def test_plan_restore_file_beside_folder_is_a_conflict():
    plan = restore_plan_of(objects_for("a", "a/b", "a/c"), "", ROOT, Filters(), False)
    assert [d.key for d in plan.downloads] == ["a/b", "a/c"]
    assert [key for key, _ in plan.conflicts] == ["a"]


@pytest.mark.parametrize(
    ("case_insensitive", "restored"),
    [(False, ["Photo.jpg", "photo.jpg"]), (True, ["Photo.jpg"])],
)
def test_plan_restore_case_collisions(case_insensitive, restored):
    plan = restore_plan_of(
        objects_for("Photo.jpg", "photo.jpg"), "", ROOT, Filters(), case_insensitive
    )
    assert [d.key for d in plan.downloads] == restored
    assert len(plan.conflicts) == 2 - len(restored)


def test_plan_restore_applies_filters_to_relative_paths():
    plan = restore_plan_of(
        objects_for("p/a.log", "p/b.txt"),
        "p",
        ROOT,
        Filters(((False, "*.log"),)),
        False,
    )
    assert [d.key for d in plan.downloads] == ["p/b.txt"]


def test_plan_restore_single_object_lands_in_root():
    plan = restore_plan_of(
        objects_for("docs/2024/report.pdf"), "docs/2024", ROOT, Filters(), False
    )
    assert [str(d.path) for d in plan.downloads] == ["/restore/report.pdf"]


# The streaming plan: a file beside a folder of its name, whatever sorts between.


def steps_for(keys, times=None, case_insensitive=False, filters=None):
    times = times or {}
    objects = {key: RemoteObject(key, 1, times.get(key, 1000.0)) for key in keys}
    return restore_plan_of(objects, "", ROOT, filters or Filters(), case_insensitive)


@pytest.mark.parametrize(
    ("keys", "conflicts"),
    [
        (["a", "a-b", "a.txt", "a/x", "a0"], ["a"]),
        (["a", "a b", "a!/c", "a-b", "a-b/c", "a.txt", "a/x"], ["a", "a-b"]),
        (
            ["a", "a-b/c/d", "a-b/c", "a.d/e", "a/b", "a/b.txt", "a/b/c"],
            ["a", "a-b/c", "a/b"],
        ),
        (["a/b", "a/b/c", "a/bc"], ["a/b"]),
        (["a", "ab/c", "a0/x", "b"], []),
        (["a", "a/", "b"], []),  # a folder marker alone makes no folder
        (["x", "x" + "-" * 40, "x" + "-" * 40 + "/y", "x/z"], ["x", "x" + "-" * 40]),
    ],
)
def test_plan_restore_finds_a_file_beside_its_folder_in_any_key_order(keys, conflicts):
    plan = steps_for(sorted(keys))
    assert sorted(key for key, _ in plan.conflicts) == conflicts
    restored = [key for key in sorted(keys) if key not in conflicts and key[-1] != "/"]
    assert sorted(d.key for d in plan.downloads) == restored


def test_plan_restore_compares_the_file_with_the_newest_object_under_its_folder():
    keys = ["a", "a-b", "a.txt", "a/x", "a/y/z", "a0"]
    times = {"a": 2000.0, "a/x": 1200.0, "a/y/z": 1500.0, "a-b": 9000.0}
    [(key, why)] = steps_for(keys, times).conflicts
    assert (key, why) == ("a", folder_conflict(2000.0, 1500.0))


def test_plan_restore_refuses_keys_as_they_come_and_goes_on():
    plan = steps_for(["a", "a/../../x", "a/y", "b/../../z", "c"])
    assert [key for key, _ in plan.refused] == ["a/../../x", "b/../../z"]
    assert [key for key, _ in plan.conflicts] == ["a"]
    assert [d.key for d in plan.downloads] == ["a/y", "c"]


def test_plan_restore_leaves_out_of_a_folder_what_the_filters_leave_out():
    plan = steps_for(["a", "a.txt", "a/x.log"], filters=Filters(((False, "*.log"),)))
    assert plan.conflicts == ()
    assert sorted(d.key for d in plan.downloads) == ["a", "a.txt"]


@pytest.mark.parametrize(
    ("keys", "restored", "conflicts"),
    [
        (["A", "a/x"], ["a/x"], ["A"]),  # the folder wins, whatever the case
        (["B", "a", "b"], ["B", "a"], ["b"]),
        (["Dir/x", "dir/x", "dir/y"], ["Dir/x", "dir/y"], ["dir/x"]),
    ],
)
def test_plan_restore_on_a_case_insensitive_file_system(keys, restored, conflicts):
    plan = steps_for(keys, case_insensitive=True)
    assert sorted(d.key for d in plan.downloads) == restored
    assert [key for key, _ in plan.conflicts] == conflicts
    assert sorted(d.key for d in steps_for(keys).downloads) == sorted(keys)


def listing_that_ends_the_test_after(count: int):
    """A listing of a million keys that fails the test if more than `count` are read."""
    for n in range(1_000_000):
        assert n < count, "the plan read on past the steps it was asked for"
        yield RemoteObject(f"p/d{n // 100:05d}/f{n:07d}", 1, 1000.0)


def test_plan_restore_gives_its_first_steps_before_the_listing_ends():
    steps = plan_restore(
        listing_that_ends_the_test_after(5), "p", ROOT, Filters(), False
    )
    first = list(itertools.islice(steps, 3))
    assert [str(d.path) for d in first] == [
        "/restore/d00000/f0000000",
        "/restore/d00000/f0000001",
        "/restore/d00000/f0000002",
    ]


def plan_by_the_whole_listing(keys, case_insensitive):
    """The plan as restore.py made it from the whole listing held (before issue 28):
    the downloads and the conflicts."""
    fold = str.casefold if case_insensitive else str
    files = [key for key in sorted(keys) if not key.endswith("/")]
    folders = {fold(k[:i]) for k in files for i, c in enumerate(k) if c == "/"}
    downloads, conflicts, taken = [], [], set()
    for key in files:
        if fold(key) in folders or fold(key) in taken:
            conflicts.append(key)
        else:
            taken.add(fold(key))
            downloads.append(key)
    return sorted(downloads), sorted(conflicts)


@pytest.mark.parametrize("case_insensitive", [False, True])
def test_plan_restore_streamed_decides_as_the_whole_listing_did(case_insensitive):
    names = random.Random(28)
    alphabet = ["a", "A", "b", "-", ".", "/", " ", "0"]
    for _ in range(300):
        keys = set()
        for _ in range(names.randint(1, 12)):
            key = "".join(names.choice(alphabet) for _ in range(names.randint(1, 6)))
            if "//" not in key and not key.startswith("/"):
                keys.add(key)
        keys = sorted(k for k in keys if key_problem(k) is None)
        plan = steps_for(keys, case_insensitive=case_insensitive)
        got = (
            sorted(d.key for d in plan.downloads),
            sorted(k for k, _ in plan.conflicts),
        )
        if not case_insensitive:
            assert got == plan_by_the_whole_listing(keys, False), keys
        else:  # the same conflicts, though another of a pair may be the one left out
            expected = plan_by_the_whole_listing(keys, True)
            assert len(got[1]) == len(expected[1]), keys
            assert {k.casefold() for k in got[0]} == {
                k.casefold() for k in expected[0]
            }, keys


def client_error(code, status=400, message="m"):
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "Op",
    )


@pytest.mark.parametrize(
    ("error", "words", "code"),
    [
        (botocore.exceptions.NoCredentialsError(), "aws configure", ExitCode.FAILURE),
        (
            botocore.exceptions.ProfileNotFound(profile="work"),
            "'work'",
            ExitCode.FAILURE,
        ),
        (
            botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"),
            "http://x",
            ExitCode.FAILURE,
        ),
        (client_error("AccessDenied", 403), "access denied", ExitCode.FAILURE),
        (client_error("403", 403), "another account", ExitCode.FAILURE),
        (client_error("NoSuchBucket", 404), "does not exist", ExitCode.FAILURE),
        (
            client_error("InvalidObjectState", 403),
            "restore it from the archive",
            ExitCode.FAILURE,
        ),
        (client_error("Weird"), "Weird: m", ExitCode.FAILURE),
        (
            client_error("PreconditionFailed", 412),
            "the object was overwritten while it was downloaded",
            ExitCode.FAILURE,
        ),
        # Ceph RGW sends most errors without a message.
        (
            client_error("InvalidArgument", 400, None),
            "InvalidArgument: the server answered HTTP 400 and gave no reason",
            ExitCode.FAILURE,
        ),
        (
            client_error("InvalidLocationConstraint"),
            "check --region (on Ceph RGW it is the zonegroup's name",
            ExitCode.FAILURE,
        ),
        (
            PermissionError(13, "Permission denied", "/x/y"),
            "Permission denied: /x/y",
            ExitCode.FAILURE,
        ),
        (CliError("bad thing", ExitCode.USAGE), "bad thing", ExitCode.USAGE),
    ],
)
def test_describe_error(error, words, code):
    message, exit_code = describe_error(error)
    assert words in message
    assert "\n" not in message
    assert exit_code == code


def test_summary_line():
    summary = Summary(
        "uploaded",
        transferred=3,
        skipped=2,
        failed=1,
        deleted=4,
        nbytes=3 * 1024 * 1024,
        seconds=1.25,
    )
    assert (
        summary.line() == "uploaded 3, skipped 2, failed 1, deleted 4, 3.0 MiB in 1.2 s"
    )


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01T12:30:00.000Z",
        "2024-05-01T12:30:00Z",
        "Wed, 01 May 2024 12:30:00 GMT",
        "1714566600",
        "2024-05-01T12:30:00+00:00",
    ],
)
def test_parse_timestamp_reads_what_s3_sends(text):
    assert parse_timestamp(text).timestamp() == 1714566600.0


@pytest.mark.parametrize(
    ("count", "boundaries"),
    [
        (0, []),
        (3, []),  # one page: one range, one request, as when paging
        (4, ["k2"]),
        (6, ["k2"]),  # never the last key: nothing expected lies after it
        (7, ["k2", "k5"]),
    ],
)
def test_listing_boundaries_cut_every_page(monkeypatch, count, boundaries):
    monkeypatch.setattr(backup, "LIST_PAGE", 3)
    keys = [f"k{n}" for n in range(count)]
    assert backup.listing_boundaries(keys) == boundaries


# --- The parts of a large download ----------------------------------------------


@pytest.mark.parametrize(
    ("size", "part_size", "ranges"),
    [
        (10, 4, [(0, 4), (4, 8), (8, 10)]),
        (8, 4, [(0, 4), (4, 8)]),  # no empty last part
        (3, 4, [(0, 3)]),
        (1, 1, [(0, 1)]),
        (0, 4, []),
        (
            300 * 1024 * 1024,
            128 * 1024 * 1024,
            [(0, 128 << 20), (128 << 20, 256 << 20), (256 << 20, 300 << 20)],
        ),
    ],
)
def test_part_ranges_cut_the_object_without_gap_or_overlap(size, part_size, ranges):
    assert part_ranges(size, part_size) == ranges


@pytest.mark.parametrize(
    ("content_range", "content_length", "part", "problem"),
    [
        ("bytes 0-9/100", "10", (0, 10), None),
        ("bytes 90-99/100", 10, (90, 100), None),  # botocore gives an int
        (None, "100", (0, 10), "asked for bytes 0-9, got the whole object"),
        ("bytes 10-19/100", "10", (0, 10), "asked for bytes 0-9, got bytes 10-19/100"),
        ("bytes 0-99/100", "100", (0, 10), "asked for bytes 0-9, got bytes 0-99/100"),
        ("bytes 0-9/100", "9", (0, 10), "asked for 10 bytes, the answer holds 9"),
    ],
)
def test_range_problem_takes_exactly_the_bytes_asked_for(
    content_range, content_length, part, problem
):
    assert range_problem(content_range, content_length, part) == problem


def test_read_range_hands_each_read_on_at_its_offset():
    body = io.BytesIO(b"abcdefghijk")
    landed = []
    reached = read_range(
        body.readinto,
        memoryview(bytearray(4)),
        (100, 111),
        lambda data, offset: landed.append((bytes(data), offset)),
    )
    assert reached == 111
    assert landed == [(b"abcd", 100), (b"efgh", 104), (b"ijk", 108)]


def test_read_range_stops_where_a_short_body_ends():
    landed = []
    reached = read_range(
        io.BytesIO(b"abcdef").readinto,
        memoryview(bytearray(4)),
        (0, 10),
        lambda data, offset: landed.append(bytes(data)),
    )
    assert (reached, landed) == (6, [b"abcd", b"ef"])


@pytest.mark.parametrize("pwrite", [True, False], ids=["pwrite", "windows"])
def test_write_all_writes_parts_at_their_offsets_in_any_order(
    tmp_path, monkeypatch, pwrite
):
    if not pwrite:
        monkeypatch.delattr(os, "pwrite", raising=False)
    path = tmp_path / "parts"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        write_all(fd, memoryview(b"world"), 6)
        write_all(fd, memoryview(b"hello "), 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"hello world"


def test_body_reader_reads_and_copies_where_botocore_has_no_readinto():
    class BodyBefore13820:  # botocore's StreamingBody before 1.38.20: read only
        def __init__(self, data: bytes):
            self._data = io.BytesIO(data)

        def read(self, amount: int) -> bytes:
            return self._data.read(amount)

    read = body_reader(BodyBefore13820(b"abcdef"))
    view = memoryview(bytearray(4))
    assert (read(view), bytes(view)) == (4, b"abcd")
    assert (read(view), bytes(view[:2])) == (2, b"ef")
    assert read(view) == 0


def test_part_workers_stop_a_files_parts_at_its_first_failure():
    workers = PartWorkers(1)
    ran = []

    def fail():
        raise OSError("disk full")

    stop = threading.Event()
    try:
        with pytest.raises(OSError, match="disk full"):
            workers.run_all([fail, lambda: ran.append(1), lambda: ran.append(2)], stop)
        assert stop.is_set()
        assert ran == []  # one thread: the others had not started
        # Another file's parts still run.
        workers.run_all([lambda: ran.append(3)], threading.Event())
        assert ran == [3]
    finally:
        workers.close()


def test_part_workers_bound_the_parts_in_flight_however_many_files_wait():
    workers = PartWorkers(2)
    lock = threading.Lock()
    running = most = done = 0

    def part():
        nonlocal running, most, done
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.001)
        with lock:
            running -= 1
            done += 1

    files = [
        threading.Thread(
            target=workers.run_all, args=([part] * 3, threading.Event()), daemon=True
        )
        for _ in range(64)
    ]
    try:
        for thread in files:
            thread.start()
        for thread in files:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in files), "parts stuck"
        assert done == 64 * 3
        assert most <= 2
    finally:
        workers.close()
