"""History: versioned buckets, the lifecycle rule, restore points and restore.py --at."""

from __future__ import annotations

import calendar
import dataclasses
import io
import json
import os
import random
import re
import subprocess
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import boto3
import pytest
from botocore.stub import Stubber
from conftest import make_tree, run_script
from test_e2e import snapshot

import backup
import restore
from backup import (
    HISTORY_RULE_ID,
    history_rule,
    merge_lifecycle_rules,
)
from restore import (
    add_time,
    by_key_newest_first,
    count_moments,
    objects_at,
    parse_when,
    spill_changes,
    spilled_changes,
)
from s3common import ObjectVersion, RemoteObject, Store, format_when
from s3common import restore_point as restore_point_of

MiB = 1024 * 1024
UTC = timezone.utc  # noqa: UP017 (datetime.UTC is Python 3.11+)
PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 11, 28, 5, 12, 3, 250_000, tzinfo=UTC)


# --- WHEN ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        # A date alone is its midnight, local time (Paris: +01:00 in winter).
        ("2026-11-20", "2026-11-19T23:00:00+00:00"),
        # ... and +02:00 in summer: the offset of that day, not of today.
        ("2026-07-20", "2026-07-19T22:00:00+00:00"),
        ("2026-11-20T14:30", "2026-11-20T13:30:00+00:00"),
        ("2026-11-20 14:30:05", "2026-11-20T13:30:05+00:00"),
        ("2026-11-20T14:30:05Z", "2026-11-20T14:30:05+00:00"),
        ("2026-11-20T14:30Z", "2026-11-20T14:30:00+00:00"),
        ("2026-11-20T14:30:05+01:00", "2026-11-20T13:30:05+00:00"),
        ("2026-11-20 14:30-05:00", "2026-11-20T19:30:00+00:00"),
        ("2026-11-20T14:30:05.250Z", "2026-11-20T14:30:05.250000+00:00"),
        ("2026-11-20T14:30:05.123456+00:00", "2026-11-20T14:30:05.123456+00:00"),
        # Ages count back from now, to the microsecond.
        ("90s", "2026-11-28T05:10:33.250000+00:00"),
        ("15m", "2026-11-28T04:57:03.250000+00:00"),
        ("36h", "2026-11-26T17:12:03.250000+00:00"),
        ("7d", "2026-11-21T05:12:03.250000+00:00"),
        ("2w", "2026-11-14T05:12:03.250000+00:00"),
        ("0s", "2026-11-28T05:12:03.250000+00:00"),
    ],
)
def test_parse_when_reads_dates_date_times_and_ages(text, expected):
    moment = parse_when(text, NOW, PARIS)
    assert moment.astimezone(UTC).isoformat() == expected


def test_parse_when_without_a_zone_takes_the_systems_local_time(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        moment = parse_when("2026-11-20T09:00", NOW)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert moment.astimezone(UTC).isoformat() == "2026-11-20T14:00:00+00:00"


@pytest.mark.parametrize(
    "text",
    [
        "", " ", "yesterday", "now", "7", "7y", "-7d", "7 d", "7D", "1.5d", "d",
        "2026-13-01", "2026-02-30", "2026-11-20T25:00", "2026-11-20T14:60",
        "20261120", "2026-11-20T14", "2026-11-20Z", "2026-W47", "2026-11",
        "2026-11-20T14:30:05.1Z", "2026-11-20T14:30+1", "2026-11-20T14:30 UTC",
        " 2026-11-20", "36h ago", "99999999999999w",
        "0001-01-01T00:00+01:00",  # a moment before year 1 in UTC
    ],
)  # fmt: skip
def test_parse_when_refuses_anything_else(text):
    with pytest.raises(ValueError, match="neither a date"):
        parse_when(text, NOW, PARIS)


def test_a_restore_point_is_read_back_by_parse_when_as_the_same_moment():
    point = format_when(1_795_843_923.9)
    assert point == "2026-11-28T05:32:03Z"
    assert parse_when(point, NOW, PARIS).timestamp() == 1_795_843_923


@pytest.mark.parametrize(
    "server_time, now, expected",
    [
        # A Date header is cut to the second: the answer came before the next one.
        (1_795_843_923.0, 1_795_843_900.0, "2026-11-28T05:32:04Z"),
        # No Date header seen: the local clock, rounded up.
        (None, 1_795_843_923.2, "2026-11-28T05:32:04Z"),
        (None, 1_795_843_923.0, "2026-11-28T05:32:03Z"),
    ],
)
def test_restore_point_is_after_every_answer_of_the_run(server_time, now, expected):
    assert restore_point_of(server_time, now) == expected


# --- The version at WHEN ----------------------------------------------------------


def version(key, version_id, last_modified, size=1, latest=False, klass="STANDARD"):
    return ObjectVersion(key, version_id, last_modified, latest, size, klass)


def marker(key, version_id, last_modified, latest=False):
    return ObjectVersion(key, version_id, last_modified, latest, None)


# As two pages of ListObjectVersions give them: each page's versions, then its
# delete markers; within each, a key's newest first.
HISTORY = [
    # page 1, versions
    version("a", "a3", 300, size=3, latest=True),
    version("a", "a2", 200, size=2),
    version("b", "b2", 250, size=22),
    # page 1, delete markers
    marker("b", "bx2", 400, latest=True),
    marker("b", "bx1", 150),
    # page 2, versions: more of b, then c and d
    version("b", "b1", 100, size=11),
    version("c", "c1", 350, size=5, latest=True, klass="GLACIER"),
    version("d", "d2", 200, size=42, latest=True),
    version("d", "d1", 200, size=41),
    # page 2, delete markers
    marker("e", "ex", 100, latest=True),
]


@pytest.mark.parametrize(
    "when, expected",
    [
        (50, {}),
        (100, {"b": "b1"}),  # e: only a delete marker
        (149.5, {"b": "b1"}),
        (150, {}),  # b deleted at 150
        (200, {"a": "a2", "d": "d2"}),  # d: two in one second, the listing's first
        (250, {"a": "a2", "b": "b2", "d": "d2"}),  # b back after its delete marker
        (300, {"a": "a3", "b": "b2", "d": "d2"}),
        (399, {"a": "a3", "b": "b2", "c": "c1", "d": "d2"}),
        (400, {"a": "a3", "c": "c1", "d": "d2"}),  # b deleted again
        (10**10, {"a": "a3", "c": "c1", "d": "d2"}),
    ],
)
def test_objects_at_picks_each_keys_newest_version_at_or_before_when(when, expected):
    objects = objects_at(HISTORY, when)
    assert {key: obj.version_id for key, obj in objects.items()} == expected


class HistoryPages:
    """A store whose version listing under "p/" is HISTORY's two pages, counting those read."""

    bucket = "b"

    def __init__(self):
        self.read = 0

    def version_pages(self, prefix, through=None):
        for page in (HISTORY[:5], HISTORY[5:]):
            self.read += 1
            yield [dataclasses.replace(v, key=f"p/{v.key}") for v in page]


@pytest.mark.parametrize("when", [50, 100, 150, 200, 250, 300, 399, 400, 10**10])
def test_restore_at_when_streams_the_versions_a_key_at_a_time(when):
    store = HistoryPages()
    objects, base_prefix = restore.find_objects_at(store, "p", when)
    first = next(objects, None)
    if first is not None and first.key == "p/a":
        assert store.read == 1  # out before the second page is asked for
    listed = {
        obj.key: obj.version_id for obj in ([first] if first else []) + [*objects]
    }
    expected = {
        f"p/{k}": obj.version_id for k, obj in objects_at(HISTORY, when).items()
    }
    assert listed == expected and list(listed) == sorted(listed)
    # With nothing under p/ at `when`, the object named p, as at `when` (none here).
    assert base_prefix == ("p" if expected else "")


def test_objects_at_keeps_the_versions_size_time_and_storage_class():
    assert objects_at(HISTORY, 400)["c"] == RemoteObject(
        "c", 5, 350, "GLACIER", version_id="c1"
    )


def test_objects_at_does_not_depend_on_how_the_pages_split_a_key():
    shuffled_pages = HISTORY[5:] + HISTORY[:5]  # versions of b before its newer ones
    for when in (100, 250, 400):
        # Only the order within the versions, and within the markers, carries meaning.
        same_kind_order = [v for v in HISTORY if v.size] + [
            v for v in HISTORY if not v.size
        ]
        assert objects_at(same_kind_order, when) == objects_at(HISTORY, when)
    assert objects_at(shuffled_pages, 250)["b"].version_id == "b2"


@pytest.mark.parametrize(
    "entries, expected",
    [
        # In the same second, the one S3 marks latest wins, whatever its kind.
        ([version("k", "v", 10), marker("k", "m", 10, latest=True)], None),
        ([version("k", "v", 10, latest=True), marker("k", "m", 10)], "v"),
        # Neither latest: the listing cannot tell their order; restore rather than lose.
        ([marker("k", "m", 10), version("k", "v", 10)], "v"),
        # An unversioned bucket: every object is its own only version, "null".
        ([version("k", "null", 10, latest=True)], "null"),
    ],
)
def test_objects_at_in_one_second(entries, expected):
    picked = objects_at(entries, 10).get("k")
    assert (picked and picked.version_id) == expected


@pytest.mark.parametrize(
    "when, expected",
    [
        # The whole second that WHEN names holds the versions written in it.
        (1000, "v1000.999"),
        (1000.5, "v1000.999"),  # an age lands mid-second: still that second
        (999, "v999.016"),
        (1001, "v1001.000"),
        (998, None),
    ],
)
def test_at_takes_the_whole_second_it_names(when, expected):
    entries = [
        version("k", "v1001.000", 1001.0, latest=True),
        version("k", "v1000.999", 1000.999),
        version("k", "v999.016", 999.016),
    ]
    picked = objects_at(entries, when).get("k")
    assert (picked and picked.version_id) == expected


def test_a_delete_marker_late_in_the_second_named_counts():
    entries = [version("k", "v", 500.1), marker("k", "m", 501.9, latest=True)]
    assert objects_at(entries, 499.99) == {}  # 499 names its second: v not yet
    assert objects_at(entries, 500)["k"].version_id == "v"
    assert objects_at(entries, 501) == {}


# --- Moments of --history ------------------------------------------------------------


def moments_of(*pages):
    """--history's moments of ListObjectVersions pages, as (end, added, changed, deleted)."""
    spill = io.BytesIO()
    starts, ends = spill_changes(by_key_newest_first(pages), spill)
    moments = count_moments(spilled_changes(spill), starts, ends)
    return [(m.last, m.added, m.changed, m.deleted) for m in moments]


@pytest.mark.parametrize(
    "gap, expected",
    [
        (59.9, [(1059.9, 2, 0, 0)]),
        (60, [(1060, 2, 0, 0)]),
        (60.1, [(1060.1, 1, 0, 0), (1000, 1, 0, 0)]),
    ],
)
def test_a_moment_ends_where_the_gap_is_over_60_seconds(gap, expected):
    page = [version("a", "a1", 1000, latest=True), version("b", "b1", 1000 + gap)]
    assert moments_of(page) == expected


def test_the_times_make_the_same_moments_in_any_order():
    times = [
        0,
        100,
        50,
        300,
        200,
        250,
        1000,
    ]  # 50 joins 0 and 100; 250 joins 200 and 300
    for order in (times, sorted(times), sorted(times, reverse=True)):
        starts, ends = [], []
        for seconds in order:
            add_time(starts, ends, seconds)
        assert (starts, ends) == ([0, 200, 1000], [100, 300, 1000])


def test_each_moment_counts_a_file_once_by_how_it_began_and_ended():
    page = [
        # a: added, then changed twice in the second moment: changed once.
        version("a", "a3", 1010, latest=True),
        version("a", "a2", 1000),
        version("a", "a1", 0),
        # b: added and changed within the second moment: added.
        version("b", "b2", 1020, latest=True),
        version("b", "b1", 1005),
        # c: added and deleted within the second moment: nothing.
        version("c", "c1", 1001),
        # d: only deleted in the second moment.
        version("d", "d1", 10),
        # Each page lists its versions, then its delete markers.
        marker("c", "cx", 1002, latest=True),
        marker("d", "dx", 1030, latest=True),
    ]
    assert moments_of(page) == [(1030, 1, 1, 1), (10, 2, 0, 0)]


def test_pages_that_hold_only_delete_markers_split_no_key():
    # A page is a slice of the listing (each key's entries newest first): this
    # one's slice holds only the delete markers of a, the next a's older versions.
    pages = (
        [marker("a", "ax2", 3000, latest=True), marker("a", "ax1", 2500)],
        [version("a", "a2", 2000), version("a", "a1", 0)],
        [marker("b", "bx", 3010, latest=True)],  # no version of b was ever listed
        [version("c", "c1", 3020, latest=True)],
    )
    assert moments_of(*pages) == [
        (3020, 1, 0, 0),  # c added; a deleted again and b: nothing to delete
        (2500, 0, 0, 1),
        (2000, 0, 1, 0),
        (0, 1, 0, 0),
    ]


def test_a_version_and_a_marker_in_one_second_end_the_moment_as_at_does():
    # The one marked latest is the newer, whatever its kind, as objects_at says.
    page = [version("k", "v", 100), marker("k", "m", 100, latest=True)]
    assert moments_of(page) == [(100, 0, 0, 0)]
    page = [version("k", "v", 100, latest=True), marker("k", "m", 100)]
    assert moments_of(page) == [(100, 1, 0, 0)]
    assert moments_of([]) == []


# --- Listing versions ---------------------------------------------------------------


def listed(key, version_id, seconds, size=None, latest=False):
    item = {
        "Key": key,
        "VersionId": version_id,
        "IsLatest": latest,
        "LastModified": datetime.fromtimestamp(seconds, UTC),
    }
    if size is not None:
        item.update(Size=size, StorageClass="STANDARD", ETag='"x"')
    return item


def test_version_pages_follows_both_markers_through_pages_of_markers_only(aws_env):
    client = boto3.client("s3", region_name="us-east-1")
    base = {"Bucket": "bkt", "Prefix": "p/", "MaxKeys": 1000}
    pages = [
        # A page with nothing but delete markers, which must not end the listing.
        (
            {
                "IsTruncated": True,
                "NextKeyMarker": "p/a",
                "NextVersionIdMarker": "m2",
                "DeleteMarkers": [
                    listed("p/a", "m1", 300, latest=True),
                    listed("p/a", "m2", 200),
                ],
            },
            base,
        ),
        # The same key goes on: only the version id marker tells where.
        (
            {
                "IsTruncated": True,
                "NextKeyMarker": "p/a",
                "NextVersionIdMarker": "v1",
                "Versions": [listed("p/a", "v1", 100, size=1)],
            },
            {**base, "KeyMarker": "p/a", "VersionIdMarker": "m2"},
        ),
        (
            {
                "IsTruncated": False,
                "Versions": [listed("p/b", "w1", 100, size=2, latest=True)],
            },
            {**base, "KeyMarker": "p/a", "VersionIdMarker": "v1"},
        ),
    ]
    with Stubber(client) as stubber:
        for response, params in pages:
            stubber.add_response("list_object_versions", response, params)
        versions = [
            v for page in Store(client, "bkt").version_pages("p/") for v in page
        ]
        stubber.assert_no_pending_responses()
    assert [(v.key, v.version_id, v.size) for v in versions] == [
        ("p/a", "m1", None),
        ("p/a", "m2", None),
        ("p/a", "v1", 1),
        ("p/b", "w1", 2),
    ]
    assert {key: o.version_id for key, o in objects_at(versions, 150).items()} == {
        "p/a": "v1",
        "p/b": "w1",
    }


def test_version_pages_of_one_key_stops_once_past_it(aws_env):
    client = boto3.client("s3", region_name="us-east-1")
    with Stubber(client) as stubber:
        stubber.add_response(
            "list_object_versions",
            {
                "IsTruncated": True,
                "NextKeyMarker": "p0",
                "NextVersionIdMarker": "z",
                "Versions": [
                    listed("p", "v1", 100, size=1, latest=True),
                    listed("p.txt", "x", 100, size=1, latest=True),
                ],
            },
            {"Bucket": "bkt", "Prefix": "p", "MaxKeys": 1000},
        )
        versions = [
            v
            for page in Store(client, "bkt").version_pages("p", through="p")
            for v in page
        ]
        stubber.assert_no_pending_responses()
    assert [v.key for v in versions] == ["p", "p.txt"]


# --- Lifecycle rules --------------------------------------------------------------

THEIRS = {
    "ID": "logs-to-glacier",
    "Filter": {"Prefix": "logs/"},
    "Status": "Enabled",
    "Transitions": [{"Days": 90, "StorageClass": "GLACIER"}],
}
UNNAMED = {
    "Filter": {"Prefix": "tmp/"},
    "Status": "Disabled",
    "Expiration": {"Days": 1},
}
OURS_OLD = {**history_rule(7), "Status": "Disabled"}


@pytest.mark.parametrize(
    "existing, expected",
    [
        ([], [history_rule(30)]),
        ([THEIRS], [THEIRS, history_rule(30)]),
        ([THEIRS, UNNAMED], [THEIRS, UNNAMED, history_rule(30)]),
        # Ours is replaced where it stands; the others stay as they were.
        ([OURS_OLD, THEIRS], [history_rule(30), THEIRS]),
        ([THEIRS, OURS_OLD, UNNAMED], [THEIRS, history_rule(30), UNNAMED]),
        ([history_rule(30)], [history_rule(30)]),
    ],
)
def test_merge_lifecycle_rules_adds_or_replaces_ours_only(existing, expected):
    assert merge_lifecycle_rules(existing, history_rule(30)) == expected


def test_history_rule_expires_old_versions_cleans_markers_and_aborts_uploads():
    assert history_rule(30) == {
        "ID": HISTORY_RULE_ID,
        "Filter": {"Prefix": ""},
        "Status": "Enabled",
        "NoncurrentVersionExpiration": {"NoncurrentDays": 30},
        "Expiration": {"ExpiredObjectDeleteMarker": True},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
    }
    assert history_rule(None) == {
        "ID": HISTORY_RULE_ID,
        "Filter": {"Prefix": ""},
        "Status": "Enabled",
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
    }


# --- Buckets: in-process moto ---------------------------------------------------------


def lifecycle_rules(client, bucket):
    return client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]


def versioning(client, bucket):
    return client.get_bucket_versioning(Bucket=bucket).get("Status")


@pytest.fixture
def source(tmp_path):
    return make_tree(tmp_path / "src", {"a.txt": b"a", "sub/b.txt": b"bb"})


@pytest.mark.parametrize(
    "options, status, rule",
    [
        ([], "Enabled", history_rule(30)),
        (["--keep-days", "7"], "Enabled", history_rule(7)),
        (["--no-versioning"], None, history_rule(None)),
    ],
)
def test_a_created_bucket_gets_versioning_and_our_rule(
    s3, source, capsys, options, status, rule
):
    assert backup.main([str(source), "new-bucket::p", *options]) == 0
    assert versioning(s3, "new-bucket") == status
    assert lifecycle_rules(s3, "new-bucket") == [rule]
    assert "s3backup-retention" in capsys.readouterr().out


def test_an_existing_bucket_is_left_as_it_is_without_keep_days(s3, source):
    s3.create_bucket(Bucket="theirs")
    assert backup.main([str(source), "theirs::p", "-q"]) == 0
    assert versioning(s3, "theirs") is None
    with pytest.raises(s3.exceptions.ClientError, match="NoSuchLifecycle"):
        s3.get_bucket_lifecycle_configuration(Bucket="theirs")


def test_keep_days_on_an_existing_bucket_keeps_its_own_rules_exactly(
    s3, source, capsys
):
    s3.create_bucket(Bucket="theirs")
    s3.put_bucket_lifecycle_configuration(
        Bucket="theirs", LifecycleConfiguration={"Rules": [THEIRS]}
    )
    before = lifecycle_rules(s3, "theirs")

    assert backup.main([str(source), "theirs::p", "--keep-days", "10", "-q"]) == 0
    assert versioning(s3, "theirs") == "Enabled"
    assert lifecycle_rules(s3, "theirs") == [*before, history_rule(10)]

    # Given again, ours is updated in place.
    assert backup.main([str(source), "theirs::p", "--keep-days", "20"]) == 0
    assert lifecycle_rules(s3, "theirs") == [*before, history_rule(20)]
    assert "set up s3://theirs with versioning" in capsys.readouterr().out
    # Given as it is, nothing changes and nothing is said.
    assert backup.main([str(source), "theirs::p", "--keep-days", "20"]) == 0
    assert "set up" not in capsys.readouterr().out


def test_keep_days_turns_suspended_versioning_back_on(s3, source):
    s3.create_bucket(Bucket="paused")
    s3.put_bucket_versioning(
        Bucket="paused", VersioningConfiguration={"Status": "Suspended"}
    )
    assert backup.main([str(source), "paused::p", "--keep-days", "3", "-q"]) == 0
    assert versioning(s3, "paused") == "Enabled"
    assert lifecycle_rules(s3, "paused") == [history_rule(3)]


def test_dry_run_changes_no_bucket(s3, source, capsys):
    s3.create_bucket(Bucket="theirs")
    assert backup.main([str(source), "theirs::p", "--keep-days", "5", "--dry-run"]) == 0
    assert backup.main([str(source), "not-yet::p", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(dry run) set up s3://theirs with versioning" in out
    assert "(dry run) create bucket s3://not-yet in us-east-1 with versioning" in out
    assert versioning(s3, "theirs") is None
    assert "not-yet" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert "Contents" not in s3.list_objects_v2(Bucket="theirs")


@pytest.mark.parametrize(
    "operation", ["PutBucketLifecycleConfiguration", "PutBucketVersioning"]
)
def test_refused_history_set_up_is_one_line_exit_1_nothing_uploaded(
    source, server_client, failing_proxy, capsys, operation
):
    proxy = failing_proxy(
        {operation: ("AccessDenied", 403)}, buckets=("locked",), create=True
    )
    assert (
        backup.main(
            [str(source), "locked::p", "--keep-days", "5", "--endpoint-url", proxy.url]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        (
            "backup.py: error: cannot turn on history (versioning and lifecycle rule) "
            "for bucket locked: access denied: check that these credentials may use "
            "the bucket"
        )
    ]
    assert "Contents" not in server_client.list_objects_v2(Bucket="locked")


@pytest.mark.parametrize(
    "operation", ["PutBucketVersioning", "PutBucketLifecycleConfiguration"]
)
def test_a_new_bucket_on_a_server_without_history_is_backed_up_with_a_warning(
    source, server_client, failing_proxy, capsys, operation
):
    proxy = failing_proxy(
        {operation: ("NotImplemented", 501)}, buckets=("plain-server",)
    )
    assert (
        backup.main([str(source), "plain-server::p", "--endpoint-url", proxy.url]) == 0
    )
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        (
            "warning: this server has no versioning or lifecycle rules (NotImplemented): "
            "bucket s3://plain-server keeps no history, so an overwritten or deleted "
            "file cannot be brought back"
        )
    ]
    assert "created bucket s3://plain-server in us-east-1 without history" in out
    assert server_client.list_objects_v2(Bucket="plain-server")["KeyCount"] > 0


def test_an_existing_bucket_on_a_server_without_lifecycle_rules_is_backed_up(
    source, server_client, failing_proxy, capsys
):
    # s3rver: versioning never on, and no lifecycle rules to read (NotImplemented).
    proxy = failing_proxy(
        {"GetBucketLifecycleConfiguration": ("NotImplemented", 501)},
        buckets=("plain-server",),
        create=True,
    )
    assert (
        backup.main([str(source), "plain-server::p", "--endpoint-url", proxy.url]) == 0
    )
    [warning] = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: versioning of s3://plain-server is off")
    assert server_client.list_objects_v2(Bucket="plain-server")["KeyCount"] > 0


@pytest.mark.parametrize(
    "operation", ["PutBucketVersioning", "PutBucketLifecycleConfiguration"]
)
def test_keep_days_on_a_server_without_history_is_a_failure(
    source, server_client, failing_proxy, capsys, operation
):
    proxy = failing_proxy(
        {operation: ("NotImplemented", 501)}, buckets=("plain-server",), create=True
    )
    options = ["--keep-days", "5", "--endpoint-url", proxy.url]
    assert backup.main([str(source), "plain-server::p", *options]) == 1
    assert "cannot turn on history" in capsys.readouterr().err
    assert "Contents" not in server_client.list_objects_v2(Bucket="plain-server")


def test_keep_days_and_no_versioning_together_is_a_usage_error(s3, source, capsys):
    assert (
        backup.main([str(source), "b-x::p", "--keep-days", "5", "--no-versioning"]) == 2
    )
    assert "--no-versioning" in capsys.readouterr().err
    assert s3.list_buckets()["Buckets"] == []


@pytest.mark.parametrize("days", ["0", "-1", "x", "1.5"])
def test_keep_days_must_be_a_whole_number_of_days(s3, source, capsys, days):
    assert backup.main([str(source), "b-x::p", "--keep-days", days]) == 2
    assert "--keep-days" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, warning",
    [
        (
            [],
            (
                "warning: versioning of s3://plain is off: overwritten and deleted files "
                "cannot be recovered (backup.py --keep-days N turns it on; --no-versioning "
                "says that a mirror without history is meant)"
            ),
        ),
        (
            ["--no-versioning"],
            (
                "warning: versioning of s3://plain is off: the objects --delete removes "
                "cannot be recovered (backup.py --keep-days N turns it on)"
            ),
        ),
    ],
)
def test_delete_on_an_unversioned_bucket_warns_once_before_deleting(
    s3, tmp_path, capsys, options, warning
):
    s3.create_bucket(Bucket="plain")
    for name in ("gone1.txt", "gone2.txt", "kept.txt"):
        s3.put_object(Bucket="plain", Key=f"p/{name}", Body=b"x")
    source = make_tree(tmp_path / "src", {"kept.txt": b"x"})
    assert backup.main([str(source), "plain::p", "--delete", "-q", *options]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [warning]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="plain")["Contents"]]
    assert keys == ["p/kept.txt"]


def test_delete_on_a_versioned_bucket_does_not_warn(s3, tmp_path, capsys):
    source = make_tree(tmp_path / "src", {"a.txt": b"a", "b.txt": b"b"})
    assert backup.main([str(source), "kept-history::p", "-q"]) == 0
    os.remove(source / "b.txt")
    assert backup.main([str(source), "kept-history::p", "--delete", "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_the_summary_names_a_restore_point_that_at_reads(s3, source, capsys):
    assert backup.main([str(source), "points::p"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    point = re.search(r"restore point (\S+)$", summary)[1]
    moment = parse_when(point, datetime.now(UTC)).timestamp()
    for item in s3.list_object_versions(Bucket="points")["Versions"]:
        assert item["LastModified"].timestamp() <= moment
    assert moment <= time.time() + 1


@pytest.mark.parametrize("when", ["yesterday", "7y", "2026-02-30", ""])
def test_a_bad_when_is_exit_2_before_any_request_or_write(
    tmp_path, failing_proxy, capsys, when
):
    proxy = failing_proxy({"ListObjectVersions": ("ShouldNotBeCalled", 500)})
    target = tmp_path / "never"
    options = ["--at", when, "--endpoint-url", proxy.url]
    assert restore.main(["any-bucket::p", str(target), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--at" in err[0] and "neither a date" in err[0]
    assert not target.exists()
    assert proxy.requests == []


@pytest.fixture
def versioned(s3):
    s3.create_bucket(Bucket="kept")
    s3.put_bucket_versioning(
        Bucket="kept", VersioningConfiguration={"Status": "Enabled"}
    )
    return s3


def test_at_reports_archived_versions_as_such(versioned, tmp_path, capsys):
    versioned.put_object(
        Bucket="kept", Key="p/cold.bin", Body=b"c", StorageClass="GLACIER"
    )
    versioned.put_object(Bucket="kept", Key="p/warm.bin", Body=b"warm")
    point = moment_now()
    wait_after(point)
    versioned.put_object(Bucket="kept", Key="p/cold.bin", Body=b"now warm")
    target = tmp_path / "out"
    assert restore.main(["kept::p", str(target), "--at", point]) == 1
    err = capsys.readouterr().err
    assert "s3://kept/p/cold.bin (GLACIER)" in err
    assert "restore it from the archive first" in err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == {"warm.bin": b"warm"}


def test_at_reports_collisions_of_that_moment(versioned, tmp_path, capsys):
    versioned.put_object(Bucket="kept", Key="p/a", Body=b"file a")
    versioned.put_object(Bucket="kept", Key="p/a/b", Body=b"file b")
    point = moment_now()
    wait_after(point)
    versioned.delete_object(Bucket="kept", Key="p/a")
    target = tmp_path / "out"
    assert restore.main(["kept::p", str(target), "--at", point]) == 1
    assert "s3://kept/p/a: conflict" in capsys.readouterr().err
    assert (target / "a" / "b").read_bytes() == b"file b"
    # Now that `a` is deleted, the same restore has no conflict.
    assert restore.main(["kept::p", str(tmp_path / "now"), "--at", "0s", "-q"]) == 0


def test_at_with_checksum_compares_with_the_version_at_that_moment(
    versioned, tmp_path, capsys
):
    def put(key, body, mtime):
        versioned.put_object(
            Bucket="kept", Key=key, Body=body, Metadata={"mtime": str(mtime)}
        )

    big_old = random.Random(5).randbytes(2 * MiB)
    put("p/same.txt", b"old bytes", 1_600_000_000)
    put("p/big.bin", big_old, 1_600_000_100)
    put("p/differs.txt", b"old text", 1_600_000_200)
    point = moment_now()
    wait_after(point)
    put("p/same.txt", b"new bytes", 1_700_000_000)
    put("p/big.bin", random.Random(6).randbytes(2 * MiB), 1_700_000_100)
    put("p/differs.txt", b"new text", 1_700_000_200)
    # Local files as the backup was at `point`, but for one that is as it is now.
    target = make_tree(
        tmp_path / "out",
        {"same.txt": b"old bytes", "big.bin": big_old, "differs.txt": b"new text"},
    )
    inodes = {name: os.stat(target / name).st_ino for name in ("same.txt", "big.bin")}

    argv = ["kept::p", str(target), "--at", point, "--checksum", "-v"]
    assert restore.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("same content:") == 2
    assert (target / "differs.txt").read_bytes() == b"old text"
    for name, mtime in (("same.txt", 1_600_000_000), ("big.bin", 1_600_000_100)):
        assert os.stat(target / name).st_ino == inodes[name]  # kept, not written
        assert os.stat(target / name).st_mtime == mtime


# --- End to end, on moto's server -------------------------------------------------------


def restore_point_in(output: str) -> str:
    return re.search(r"restore point (\S+)\n", output)[1]


def seconds_of(point: str) -> int:
    return calendar.timegm(time.strptime(point, "%Y-%m-%dT%H:%M:%SZ"))


def wait_after(point: str) -> None:
    """Sleep until what is written now has a LastModified (whole seconds) after point."""
    time.sleep(max(0.0, seconds_of(point) + 1 - time.time()))


def moment_now() -> str:
    """A moment after everything written so far; wait_after it before writing more."""
    return format_when(int(time.time()) + 1)


@pytest.fixture
def history_env(s3_server, cli_env):
    def run(script, *args):
        return run_script(script, *args, "--endpoint-url", s3_server, env=cli_env)

    return run


def write(root, relative, data: bytes, mtime: int, mode: int = 0o644):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime * 10**9 + 123_456_789,) * 2)


def test_three_runs_come_back_each_as_it_was_byte_for_byte_with_mtimes(
    history_env, tmp_path, bucket_name
):
    src = tmp_path / "src"
    location = f"{bucket_name}::home"
    write(src, "notes.txt", b"first notes", 1_700_000_000)
    write(src, "docs/report.txt", b"report v1", 1_700_000_100, 0o600)
    write(src, "docs/old.txt", b"to be deleted", 1_700_000_200)
    write(src, "big.bin", random.Random(1).randbytes(9 * MiB + 1), 1_700_000_300)
    write(src, "mid.bin", random.Random(3).randbytes(2 * MiB), 1_700_000_350)
    before_any = moment_now()
    wait_after(before_any)

    states, points = [], []
    for step in range(3):
        if step == 1:  # edit, delete, add
            write(src, "notes.txt", b"second notes, longer", 1_700_000_400)
            os.remove(src / "docs" / "old.txt")
            write(src, "docs/new.txt", b"new in run two", 1_700_000_500, 0o640)
            write(
                src, "big.bin", random.Random(2).randbytes(9 * MiB + 2), 1_700_000_600
            )
        if step == 2:  # edit again
            write(src, "docs/report.txt", b"report v3!", 1_700_000_700, 0o600)
            write(
                src, "mid.bin", random.Random(4).randbytes(2 * MiB + 7), 1_700_000_800
            )
        result = history_env("backup.py", str(src), location, "--delete")
        assert result.returncode == 0, result.stderr
        states.append(snapshot(src))
        points.append(restore_point_in(result.stdout))
        wait_after(points[-1])

    assert len(set(points)) == 3
    for step, point in enumerate(points):
        target = tmp_path / f"at-{step}"
        result = history_env("restore.py", location, str(target), "--at", point)
        assert result.returncode == 0, result.stderr
        assert f"as at {point}" in result.stdout
        assert snapshot(target) == states[step], step

    # One deleted file, alone, as it was before it was deleted.
    target = tmp_path / "one"
    result = history_env(
        "restore.py", f"{location}/docs/old.txt", str(target), "--at", points[0]
    )
    assert result.returncode == 0, result.stderr
    assert snapshot(target) == {"old.txt": states[0]["docs/old.txt"]}

    # Restoring an older moment over a newer tree brings back the old bytes.
    target = tmp_path / "at-2"
    result = history_env("restore.py", location, str(target), "--at", points[0])
    assert result.returncode == 0, result.stderr
    restored = snapshot(target)
    assert {k: restored[k] for k in states[0]} == states[0]
    assert restored["docs/new.txt"] == states[2]["docs/new.txt"]  # left alone

    result = history_env(
        "restore.py", location, str(tmp_path / "x"), "--at", before_any
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"restore.py: error: nothing to restore: no objects under "
        f"s3://{bucket_name}/home at {before_any}"
    )
    assert not (tmp_path / "x").exists()


def test_a_key_with_more_versions_than_a_page(
    history_env, server_client, tmp_path, bucket_name
):
    src = make_tree(tmp_path / "src", {"many.txt": b"the first", "other.txt": b"o"})
    os.utime(src / "many.txt", ns=(1_600_000_000_000_000_000,) * 2)
    result = history_env("backup.py", str(src), f"{bucket_name}::p")
    assert result.returncode == 0, result.stderr
    first = restore_point_in(result.stdout)
    wait_after(first)
    for n in range(1001):
        server_client.put_object(Bucket=bucket_name, Key="p/many.txt", Body=b"v%d" % n)
    after_puts = moment_now()
    wait_after(after_puts)
    # Then more delete markers than a page: the first page holds nothing else.
    for _ in range(1001):
        server_client.delete_object(Bucket=bucket_name, Key="p/many.txt")

    def restored_at(when):
        target = tmp_path / f"at-{when}"
        result = history_env(
            "restore.py", f"{bucket_name}::p", str(target), "--at", when
        )
        assert result.returncode == 0, result.stderr
        return {p.name: p.read_bytes() for p in target.iterdir()}, target

    files, target = restored_at(first)
    assert files == {"many.txt": b"the first", "other.txt": b"o"}
    assert os.stat(target / "many.txt").st_mtime_ns == 1_600_000_000_000_000_000
    assert restored_at(after_puts)[0] == {"many.txt": b"v1000", "other.txt": b"o"}
    assert restored_at("0s")[0] == {"other.txt": b"o"}


def test_a_prefix_whose_objects_were_all_deleted(
    history_env, server_client, tmp_path, bucket_name
):
    files = {f"d{n % 3}/f{n}.txt": b"file %d" % n for n in range(12)}
    src = make_tree(tmp_path / "src", files)
    location = f"{bucket_name}::gone"
    result = history_env("backup.py", str(src), location)
    assert result.returncode == 0, result.stderr
    point = restore_point_in(result.stdout)
    wait_after(point)
    # As `aws s3 rm --recursive` would.
    server_client.delete_objects(
        Bucket=bucket_name,
        Delete={"Objects": [{"Key": f"gone/{relative}"} for relative in files]},
    )

    result = history_env("restore.py", location, str(tmp_path / "now"))
    assert result.returncode == 1
    assert "nothing to restore" in result.stderr

    target = tmp_path / "back"
    result = history_env("restore.py", location, str(target), "--at", point)
    assert result.returncode == 0, result.stderr
    assert snapshot(target) == snapshot(src)

    result = history_env("restore.py", location, str(tmp_path / "later"), "--at", "0s")
    assert result.returncode == 1
    assert "nothing to restore: no objects under" in result.stderr
    assert not (tmp_path / "later").exists()


def test_at_works_on_a_bucket_without_versioning_with_filters_and_dry_run(
    history_env, tmp_path, bucket_name
):
    src = make_tree(tmp_path / "src", {"a.txt": b"a", "b.log": b"b", "c/d.txt": b"d"})
    location = f"{bucket_name}::p"
    result = history_env("backup.py", str(src), location, "--no-versioning")
    assert result.returncode == 0, result.stderr
    point = restore_point_in(result.stdout)

    target = tmp_path / "dry"
    result = history_env(
        "restore.py",
        location,
        str(target),
        "--at",
        point,
        "--dry-run",
        "--exclude",
        "*.log",
    )
    assert result.returncode == 0, result.stderr
    assert "would restore 2" in result.stdout
    assert not target.exists()

    target = tmp_path / "real"
    result = history_env(
        "restore.py", location, str(target), "--at", point, "--exclude", "*.log"
    )
    assert result.returncode == 0, result.stderr
    assert snapshot(target) == {
        k: v for k, v in snapshot(src).items() if not k.endswith(".log")
    }


def test_at_refuses_unsafe_keys_of_an_old_version(s3, tmp_path, capsys):
    s3.create_bucket(Bucket="hostile")
    s3.put_bucket_versioning(
        Bucket="hostile", VersioningConfiguration={"Status": "Enabled"}
    )
    s3.put_object(Bucket="hostile", Key="p/ok.txt", Body=b"ok")
    s3.put_object(Bucket="hostile", Key="p/../evil.txt", Body=b"x")
    point = moment_now()
    wait_after(point)
    s3.delete_object(Bucket="hostile", Key="p/../evil.txt")
    target = tmp_path / "t"
    assert restore.main(["hostile::p", str(target), "--at", point]) == 1
    assert "s3://hostile/p/../evil.txt: refused" in capsys.readouterr().err
    assert {p.name for p in target.iterdir()} == {"ok.txt"}
    assert not (tmp_path / "evil.txt").exists()


def test_restore_point_with_an_age(history_env, tmp_path, bucket_name):
    src = make_tree(tmp_path / "src", {"a.txt": b"a"})
    result = history_env("backup.py", str(src), f"{bucket_name}::p")
    assert result.returncode == 0, result.stderr
    target = tmp_path / "t"
    result = history_env("restore.py", f"{bucket_name}::p", str(target), "--at", "1h")
    assert result.returncode == 1
    at = re.search(r"at (\S+)$", result.stderr.strip())[1]
    expected = datetime.now(UTC) - timedelta(hours=1)
    assert abs(seconds_of(at) - expected.timestamp()) < 60


# --- --history, end to end ------------------------------------------------------------

HISTORY_LINE = re.compile(r"(\S+)  added (\d+), changed (\d+), deleted (\d+)")


def an_hour_earlier_before(point: str):
    """The proxy's version_times: what was written before `point` as if an hour earlier."""
    return lambda t: t - timedelta(hours=1) if t.timestamp() < seconds_of(point) else t


@pytest.fixture
def via_proxy(start_proxy, cli_env):
    """via_proxy(options of FaultProxy) -> run(script, *args) through a new proxy."""

    def start(**options):
        proxy = start_proxy(**options)
        return lambda script, *args: run_script(
            script, *args, "--endpoint-url", proxy.url, env=cli_env
        )

    return start


def test_history_lists_two_moments_and_their_at_values_restore_each(
    history_env, via_proxy, tmp_path, bucket_name
):
    src = tmp_path / "src"
    location = f"{bucket_name}::home"
    write(src, "a.txt", b"a one", 1_700_000_000)
    write(src, "b.txt", b"b one", 1_700_000_100)
    write(src, "docs/c.txt", b"c one", 1_700_000_200, 0o600)
    assert history_env("backup.py", str(src), location).returncode == 0
    first = snapshot(src)
    between = moment_now()
    wait_after(between)
    # Three runs within seconds: one moment. a changed twice, d added and changed.
    write(src, "a.txt", b"a two!", 1_700_000_300)
    os.remove(src / "b.txt")
    write(src, "docs/d.txt", b"d one", 1_700_000_400)
    assert history_env("backup.py", str(src), location, "--delete").returncode == 0
    wait_after(moment_now())  # whole-second servers: a's next version is newer
    write(src, "a.txt", b"a three", 1_700_000_500)
    write(src, "docs/d.txt", b"d two!", 1_700_000_600)
    write(src, "e.txt", b"e one", 1_700_000_700)
    for _ in range(2):  # the second run finds nothing to do
        assert history_env("backup.py", str(src), location).returncode == 0
    second = snapshot(src)

    # The first run an hour earlier, as the listing shows it: a real gap of over 60 s.
    run = via_proxy(version_times=an_hour_earlier_before(between))
    result = run("restore.py", location, "--history")
    assert result.returncode == 0, result.stderr
    *lines, total = result.stdout.splitlines()
    moments = [HISTORY_LINE.fullmatch(line).groups() for line in lines]
    assert [counts for _, *counts in moments] == [["2", "1", "1"], ["3", "0", "0"]]
    assert total == f"2 moments of s3://{bucket_name}/home"
    newest, oldest = (at for at, *_ in moments)
    assert seconds_of(newest) - seconds_of(oldest) > 3600
    assert seconds_of(newest) >= seconds_of(between)

    result = run(
        "restore.py", location, str(tmp_path / "dry"), "--at", oldest, "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert "would restore 3" in result.stdout
    for at, state in ((oldest, first), (newest, second)):
        target = tmp_path / f"at-{at}"
        result = run("restore.py", location, str(target), "--at", at)
        assert result.returncode == 0, result.stderr
        assert snapshot(target) == state, at
    diff = subprocess.run(["diff", "-r", str(src), str(target)], check=False)
    assert diff.returncode == 0

    result = run("restore.py", location, "--history", "--exclude", "b.txt", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["moments"] == [
        {"at": newest, "added": 2, "changed": 1, "deleted": 0},
        {"at": oldest, "added": 2, "changed": 0, "deleted": 0},
    ]
    assert (report["command"], report["source"], report["destination"]) == (
        "restore",
        location,
        None,
    )
    assert report["exit_code"] == 0 and report["errors"] == []


def test_history_of_one_object_lists_its_versions_and_markers(
    history_env, via_proxy, tmp_path, bucket_name
):
    src = tmp_path / "src"
    location = f"{bucket_name}::p"
    write(src, "f.txt", b"one", 1_700_000_000)
    write(src, "g.txt", b"gone soon", 1_700_000_000)
    assert history_env("backup.py", str(src), location).returncode == 0
    wait_after(moment_now())
    write(src, "f.txt", b"two!", 1_700_000_100)
    os.remove(src / "g.txt")
    assert history_env("backup.py", str(src), location, "--delete").returncode == 0

    run = via_proxy()
    result = run("restore.py", f"{location}/f.txt", "--history")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("  ", 1)[1] for line in lines[:2]] == [
        "4 bytes, current",
        "3 bytes",
    ]
    assert lines[2] == f"2 versions of s3://{bucket_name}/p/f.txt"
    result = run("restore.py", f"{location}/g.txt", "--history", "--json")
    assert result.returncode == 0, result.stderr
    versions = json.loads(result.stdout)["versions"]
    assert [(v["size"], v["delete_marker"], v["current"]) for v in versions] == [
        (None, True, True),
        (9, False, False),
    ]
    assert set(versions[0]) == {"at", "size", "delete_marker", "current", "version_id"}
    # Its older version's --at restores it.
    target = tmp_path / "back"
    result = run(
        "restore.py", f"{location}/g.txt", str(target), "--at", versions[1]["at"]
    )
    assert result.returncode == 0, result.stderr
    assert (target / "g.txt").read_bytes() == b"gone soon"


def test_at_names_a_whole_second_on_a_server_with_milliseconds(
    history_env, server_client, via_proxy, tmp_path, bucket_name
):
    files = {f"f{n}.txt": b"file %d" % n for n in range(20)}
    src = make_tree(tmp_path / "src", files)
    location = f"{bucket_name}::ms"
    assert history_env("backup.py", str(src), location).returncode == 0
    listed = server_client.list_objects_v2(Bucket=bucket_name, Prefix="ms/")
    # What `date` printed right after the last file went in: its whole second.
    when = format_when(max(o["LastModified"].timestamp() for o in listed["Contents"]))
    # Late in each second, as a server that keeps milliseconds may write them.
    run = via_proxy(version_times=lambda t: t.replace(microsecond=999_000))

    result = run("restore.py", location, "--history", "--json")
    assert [m["at"] for m in json.loads(result.stdout)["moments"]] == [when]
    target = tmp_path / "t"
    result = run("restore.py", location, str(target), "--at", when)
    assert result.returncode == 0, result.stderr
    assert snapshot(target) == snapshot(src)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("{location}", "{target}", "--history"),
            (
                "restore.py: error: --history lists and writes nothing: give no LOCAL "
                "({target}), e.g. restore.py BUCKET::PREFIX --history"
            ),
        ),
        (
            ("{location}",),
            "restore.py: error: the following arguments are required: LOCAL (see --help)",
        ),
        (
            ("{location}", "--history", "--at", "1d"),
            (
                "restore.py: error: --history lists every moment and takes no --at: "
                "restore one with restore.py BUCKET::PREFIX LOCAL --at WHEN"
            ),
        ),
    ],
)
def test_history_usage_errors_are_one_line_exit_2(
    via_proxy, tmp_path, bucket_name, args, message
):
    target = tmp_path / "t"
    fill = {"location": f"{bucket_name}::p", "target": str(target)}
    run = via_proxy()
    result = run("restore.py", *(a.format(**fill) for a in args))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == message.format(**fill) + "\n"
    assert not target.exists()
    result = run("restore.py", *(a.format(**fill) for a in args), "--json")
    assert json.loads(result.stdout)["exit_code"] == 2
