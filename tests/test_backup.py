"""backup.main against moto's in-process S3: buckets, incremental runs, metadata, options, errors."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from datetime import datetime

import boto3
import botocore.client
import botocore.exceptions
import pytest
from botocore.stub import Stubber
from conftest import TEST_SERVER, make_tree

import backup
import s3common

MiB = 1024 * 1024


def keys(s3, bucket, prefix=""):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture
def tree(tmp_path):
    return make_tree(
        tmp_path / "src",
        {
            "a.txt": b"alpha",
            "sub/b.json": b"{}",
            "sub/deeper/c.log": b"log line",
            "empty": b"",
        },
    )


def test_backup_creates_bucket_in_us_east_1_and_mirrors_tree(s3, tree, capsys):
    assert backup.main([str(tree), "fresh-bucket::backups/laptop"]) == 0
    assert s3.get_bucket_location(Bucket="fresh-bucket")["LocationConstraint"] is None
    assert keys(s3, "fresh-bucket") == [
        "backups/laptop/a.txt",
        "backups/laptop/empty",
        "backups/laptop/sub/b.json",
        "backups/laptop/sub/deeper/c.log",
    ]
    assert (
        s3.get_object(Bucket="fresh-bucket", Key="backups/laptop/empty")[
            "ContentLength"
        ]
        == 0
    )
    out = capsys.readouterr().out
    assert "created bucket s3://fresh-bucket in us-east-1" in out
    assert "uploaded 4, skipped 0, failed 0" in out


def test_backup_creates_bucket_in_region_option(s3, tree):
    assert backup.main([str(tree), "s3://eu-bucket/x", "--region", "eu-west-1"]) == 0
    assert (
        s3.get_bucket_location(Bucket="eu-bucket")["LocationConstraint"] == "eu-west-1"
    )


def test_backup_creates_bucket_in_profile_region(s3, tree, home):
    (home / ".aws" / "config").write_text("[profile work]\nregion = ap-southeast-2\n")
    (home / ".aws" / "credentials").write_text(
        "[work]\naws_access_key_id = a\naws_secret_access_key = b\n"
    )
    assert backup.main([str(tree), "profile-bucket", "--profile", "work"]) == 0
    assert (
        s3.get_bucket_location(Bucket="profile-bucket")["LocationConstraint"]
        == "ap-southeast-2"
    )


def test_backup_into_existing_legacy_named_bucket(s3, tree):
    s3.create_bucket(Bucket="Legacy_Bucket")
    assert backup.main([str(tree), "Legacy_Bucket::p"]) == 0
    assert len(keys(s3, "Legacy_Bucket")) == 4


def test_backup_refuses_invalid_name_for_missing_bucket(s3, tree, capsys):
    assert backup.main([str(tree), "Missing_Bucket::p"]) == 2
    assert "cannot create bucket 'Missing_Bucket'" in capsys.readouterr().err
    assert s3.list_buckets()["Buckets"] == []


def test_second_run_uploads_nothing_and_says_so(s3, tree, capsys):
    assert backup.main([str(tree), "bk1::p"]) == 0
    before = {
        o["Key"]: o["LastModified"]
        for o in s3.list_objects_v2(Bucket="bk1")["Contents"]
    }
    capsys.readouterr()
    assert backup.main([str(tree), "bk1::p"]) == 0
    out = capsys.readouterr().out
    assert "nothing to upload: s3://bk1/p is up to date" in out
    assert "uploaded 0, skipped 4, failed 0" in out
    after = {
        o["Key"]: o["LastModified"]
        for o in s3.list_objects_v2(Bucket="bk1")["Contents"]
    }
    assert after == before


def test_changed_files_are_uploaded_again(s3, tree, capsys):
    assert backup.main([str(tree), "bk2::p"]) == 0
    (tree / "a.txt").write_bytes(b"alpha, longer now")
    newer = time.time() + 120
    os.utime(tree / "sub" / "b.json", (newer, newer))
    capsys.readouterr()
    assert backup.main([str(tree), "bk2::p", "-v"]) == 0
    out = capsys.readouterr().out
    assert "uploaded 2, skipped 2, failed 0" in out
    assert f"upload: {tree / 'a.txt'} -> s3://bk2/p/a.txt" in out
    assert (
        s3.get_object(Bucket="bk2", Key="p/a.txt")["Body"].read()
        == b"alpha, longer now"
    )


def test_objects_record_mtime_mode_and_content_type(s3, tree):
    os.chmod(tree / "a.txt", 0o640)
    os.utime(tree / "a.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    assert backup.main([str(tree), "bk3"]) == 0
    head = s3.head_object(Bucket="bk3", Key="a.txt")
    assert head["Metadata"] == {"mtime": "1600000000.123456789", "mode": "100640"}
    assert head["ContentType"] == "text/plain"
    assert (
        s3.head_object(Bucket="bk3", Key="sub/b.json")["ContentType"]
        == "application/json"
    )


def test_single_file_goes_under_the_prefix(s3, tree):
    assert backup.main([str(tree / "sub" / "b.json"), "bk4::docs/"]) == 0
    assert keys(s3, "bk4") == ["docs/b.json"]


def test_large_file_goes_up_in_multipart_with_metadata(s3, tmp_path):
    data = os.urandom(9 * MiB)
    make_tree(tmp_path / "big", {"big.bin": data})
    assert backup.main([str(tmp_path / "big"), "bk5::p"]) == 0
    got = s3.get_object(Bucket="bk5", Key="p/big.bin")
    assert got["Body"].read() == data
    assert "-" in got["ETag"]  # a multipart ETag
    # Its ETag is not its MD5: md5chksum holds it, base64 as rclone writes it.
    assert set(got["Metadata"]) == {"mtime", "mode", "md5chksum"}
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    assert got["Metadata"]["md5chksum"] == md5
    assert s3.list_multipart_uploads(Bucket="bk5").get("Uploads", []) == []


def test_exclude_include_in_order(s3, tree):
    (tree / "keep.log").write_bytes(b"keep")
    assert (
        backup.main([str(tree), "bk6", "--exclude", "*.log", "--include", "keep.log"])
        == 0
    )
    assert keys(s3, "bk6") == ["a.txt", "empty", "keep.log", "sub/b.json"]


def test_delete_removes_only_what_is_gone_and_not_excluded(s3, tree, capsys):
    assert backup.main([str(tree), "bk7::p"]) == 0
    (tree / "a.txt").unlink()
    (tree / "sub" / "deeper" / "c.log").unlink()
    assert backup.main([str(tree), "bk7::p", "--delete", "--exclude", "*.log"]) == 0
    assert keys(s3, "bk7") == ["p/empty", "p/sub/b.json", "p/sub/deeper/c.log"]
    assert "deleted 1" in capsys.readouterr().out


def test_delete_never_touches_a_sibling_prefix(s3, tree):
    assert backup.main([str(tree), "bk8::photos2"]) == 0
    assert backup.main([str(tree / "sub"), "bk8::photos", "--delete"]) == 0
    assert len(keys(s3, "bk8", "photos2/")) == 4


def test_delete_refuses_empty_source(s3, tree, tmp_path, capsys):
    assert backup.main([str(tree), "bk9::p"]) == 0
    (tmp_path / "nothing").mkdir()
    assert backup.main([str(tmp_path / "nothing"), "bk9::p", "--delete"]) == 2
    assert "refusing --delete" in capsys.readouterr().err
    assert len(keys(s3, "bk9")) == 4


def test_dry_run_creates_nothing(s3, tree, capsys):
    assert backup.main([str(tree), "dry-bucket::p", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(dry run) create bucket s3://dry-bucket" in out
    assert f"(dry run) upload: {tree / 'a.txt'} -> s3://dry-bucket/p/a.txt" in out
    assert s3.list_buckets()["Buckets"] == []


def test_dry_run_delete_lists_and_keeps(s3, tree, capsys):
    assert backup.main([str(tree), "bk10"]) == 0
    (tree / "a.txt").unlink()
    capsys.readouterr()
    assert backup.main([str(tree), "bk10", "--delete", "--dry-run"]) == 0
    assert "(dry run) delete: s3://bk10/a.txt" in capsys.readouterr().out
    assert "a.txt" in keys(s3, "bk10")


def test_storage_class_and_sse_pass_through(s3, tree):
    assert (
        backup.main(
            [str(tree), "bk11", "--storage-class", "STANDARD_IA", "--sse", "AES256"]
        )
        == 0
    )
    head = s3.head_object(Bucket="bk11", Key="a.txt")
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["ServerSideEncryption"] == "AES256"


def test_symlink_loop_is_a_warning_and_files_go_up_once(s3, tree, capsys):
    os.symlink("..", tree / "sub" / "loop")
    os.symlink(tree / "sub" / "deeper", tree / "linked")
    assert backup.main([str(tree), "bk12"]) == 0
    assert keys(s3, "bk12") == [
        "a.txt",
        "empty",
        "linked/c.log",
        "sub/b.json",
        "sub/deeper/c.log",
    ]
    assert "symbolic link loop not followed" in capsys.readouterr().err


def test_no_follow_symlinks_skips_links(s3, tree):
    os.symlink(tree / "sub" / "deeper", tree / "linked")
    os.symlink(tree / "a.txt", tree / "a-link.txt")
    assert backup.main([str(tree), "bk13", "--no-follow-symlinks"]) == 0
    assert keys(s3, "bk13") == ["a.txt", "empty", "sub/b.json", "sub/deeper/c.log"]


def test_empty_folders_are_not_backed_up(s3, tree):
    (tree / "nothing" / "inside").mkdir(parents=True)
    assert backup.main([str(tree), "bk14"]) == 0
    assert not any(key.startswith("nothing") for key in keys(s3, "bk14"))


def test_missing_credentials_is_one_clear_line(s3, tree, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # no token on SeaweedFS
    assert backup.main([str(tree), "bk15"]) == 1
    err = capsys.readouterr().err
    assert "aws configure" in err
    assert len(err.strip().splitlines()) == 1


def test_forbidden_bucket_stops_before_any_upload(
    tree, server_client, failing_proxy, capsys
):
    proxy = failing_proxy(
        {"HeadBucket": ("403", 403)}, buckets=("theirs",), create=True
    )
    assert backup.main([str(tree), "theirs", "--endpoint-url", proxy.url]) == 1
    assert "bucket theirs: access denied" in capsys.readouterr().err
    assert keys(server_client, "theirs") == []


def test_name_taken_by_another_account(tree, failing_proxy, capsys):
    # S3's answers when another account owns the name: HeadBucket 404 (it is not
    # ours to see), then BucketAlreadyExists.
    proxy = failing_proxy(
        {"HeadBucket": ("404", 404), "CreateBucket": ("BucketAlreadyExists", 409)},
        buckets=("taken",),
    )
    assert backup.main([str(tree), "taken", "--endpoint-url", proxy.url]) == 1
    assert "taken by another account" in capsys.readouterr().err


@pytest.mark.skipif(
    TEST_SERVER == "seaweedfs",
    reason="SeaweedFS lists out of S3's key order, so backup.py lists it whole "
    "instead of in ranges of a page (test_a_server_listing_out_of_order_...)",
)
def test_a_no_change_run_sends_head_bucket_and_its_listing_and_nothing_else(
    tmp_path, failing_proxy, capsys, monkeypatch
):
    monkeypatch.setattr(s3common, "LIST_PAGE", 3)
    monkeypatch.setattr(backup, "LIST_PAGE", 3)
    tree = make_tree(tmp_path / "src", {f"d{n}/f{n}.txt": b"x" * n for n in range(7)})
    proxy = failing_proxy({}, buckets=("bk20",))
    argv = [str(tree), "bk20::p", "--endpoint-url", proxy.url]
    assert backup.main(argv) == 0
    proxy.operations.clear()
    assert backup.main(argv) == 0
    assert "uploaded 0, skipped 7, failed 0" in capsys.readouterr().out
    # The bucket check with its versioning beside it (a bucket without history
    # is said on every run), and three ranges of a page, each answered in one.
    assert sorted(proxy.operations) == [
        "GetBucketVersioning",
        "HeadBucket",
        *["ListObjectsV2"] * 3,
    ]


def test_access_denied_on_upload_is_a_failed_file(tree, failing_proxy, capsys):
    proxy = failing_proxy({"PutObject": ("AccessDenied", 403)}, buckets=("bk16",))
    assert backup.main([str(tree), "bk16", "--endpoint-url", proxy.url]) == 1
    captured = capsys.readouterr()
    assert "upload failed:" in captured.err and "access denied" in captured.err
    assert "failed 4" in captured.out


def test_delete_is_skipped_when_an_upload_failed(
    tree, server_client, failing_proxy, capsys
):
    proxy = failing_proxy({}, buckets=("bk17",))
    assert backup.main([str(tree), "bk17::p", "--endpoint-url", proxy.url]) == 0
    (tree / "a.txt").unlink()
    (tree / "sub" / "b.json").write_bytes(b'{"changed": true}')
    proxy.errors["PutObject"] = ("InternalError", 500)
    assert (
        backup.main([str(tree), "bk17::p", "--delete", "--endpoint-url", proxy.url])
        == 1
    )
    assert "not deleting anything" in capsys.readouterr().err
    assert "p/a.txt" in keys(server_client, "bk17")


# --- The listing in ranges ----------------------------------------------------


def count_listings(client) -> list[dict]:
    """Record the parameters of every ListObjectsV2 request the client sends."""
    sent = []
    client.meta.events.register(
        "before-call.s3.ListObjectsV2",
        lambda params, **_: sent.append(params["query_string"]),
    )
    return sent


@pytest.mark.parametrize(
    "remote",
    [
        pytest.param([f"p/k{n:02d}" for n in range(10)], id="as expected"),
        pytest.param(
            ["o", "p/", "p/k00", "p/k01", "p/k015", "p/k03", "p/k05x", "p/k99", "p2/x"],
            id="missing, extra and neighbouring keys",
        ),
        pytest.param([f"p/k{n:02d}" for n in range(3, 5)], id="one range only"),
        pytest.param([], id="nothing yet"),
    ],
)
def test_listing_in_ranges_finds_every_key_once(s3, monkeypatch, remote):
    monkeypatch.setattr(s3common, "LIST_PAGE", 3)
    monkeypatch.setattr(backup, "LIST_PAGE", 3)
    s3.create_bucket(Bucket="ranges")
    for key in remote:
        s3.put_object(Bucket="ranges", Key=key, Body=key.encode())
    expected = [f"p/k{n:02d}" for n in range(10)]
    boundaries = backup.listing_boundaries(expected)
    assert boundaries == ["p/k02", "p/k05", "p/k08"]

    listing = s3common.Store(s3, "ranges").list("p/", boundaries, workers=2)
    listed = {obj.key: obj for obj in listing}
    assert sorted(listed) == sorted(key for key in remote if key.startswith("p/"))
    assert all(listed[key].size == len(key) for key in listed)


def test_listing_in_ranges_sends_no_more_requests_than_paging(s3, monkeypatch):
    monkeypatch.setattr(s3common, "LIST_PAGE", 3)
    monkeypatch.setattr(backup, "LIST_PAGE", 3)
    s3.create_bucket(Bucket="ranges")
    expected = [f"p/k{n:02d}" for n in range(12)]
    for key in expected:
        s3.put_object(Bucket="ranges", Key=key, Body=b"")
    sent = count_listings(s3)
    boundaries = backup.listing_boundaries(expected)
    list(s3common.Store(s3, "ranges").list("p/", boundaries, workers=4))
    # Four pages of three: each range is one page that ends on its boundary.
    assert len(sent) == 4
    assert sorted(query.get("start-after", "") for query in sent) == [
        "",
        "p/k02",
        "p/k05",
        "p/k08",
    ]


def test_listing_in_ranges_stops_where_the_prefix_ends(s3, monkeypatch):
    # A first backup into an empty prefix: one range finds the end, and the
    # ranges after it are not asked for.
    monkeypatch.setattr(s3common, "LIST_PAGE", 3)
    monkeypatch.setattr(backup, "LIST_PAGE", 3)
    s3.create_bucket(Bucket="ranges")
    for key in ("p/k00", "p/k01", "q/other"):
        s3.put_object(Bucket="ranges", Key=key, Body=b"")
    sent = count_listings(s3)
    boundaries = backup.listing_boundaries(f"p/k{n:02d}" for n in range(30))
    assert len(boundaries) == 9
    listing = s3common.Store(s3, "ranges").list("p/", boundaries, workers=2)
    assert [obj.key for obj in listing] == ["p/k00", "p/k01"]
    assert 1 <= len(sent) <= 2


def test_no_change_run_and_delete_with_the_listing_in_ranges(
    s3, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(s3common, "LIST_PAGE", 2)
    monkeypatch.setattr(backup, "LIST_PAGE", 2)
    tree = make_tree(tmp_path / "src", {f"d{n}/f{n}.txt": b"x" * n for n in range(7)})
    assert backup.main([str(tree), "bk18::p"]) == 0
    s3.put_object(Bucket="bk18", Key="p/d3/gone.txt", Body=b"")
    s3.put_object(Bucket="bk18", Key="p/z/gone.txt", Body=b"")
    capsys.readouterr()
    assert backup.main([str(tree), "bk18::p", "--delete"]) == 0
    assert "uploaded 0, skipped 7, failed 0, deleted 2" in capsys.readouterr().out
    assert keys(s3, "bk18") == [f"p/d{n}/f{n}.txt" for n in range(7)]


def test_listing_denied_stops_before_any_upload(
    tree, server_client, failing_proxy, capsys
):
    proxy = failing_proxy(
        {"ListObjectsV2": ("AccessDenied", 403)}, buckets=("bk19",), create=True
    )
    assert backup.main([str(tree), "bk19::p", "--endpoint-url", proxy.url]) == 1
    err = capsys.readouterr().err
    assert "cannot list s3://bk19/p" in err and "access denied" in err
    assert len(err.strip().splitlines()) == 1
    assert keys(server_client, "bk19") == []


def test_directory_buckets_are_listed_in_one_range(monkeypatch):
    # S3 Express directory buckets list in no particular order and refuse StartAfter.
    monkeypatch.setattr(s3common, "LIST_PAGE", 3)
    client = boto3.client("s3", region_name="us-east-1")
    bucket = "backups--use1-az4--x-s3"
    keys_there = [f"p/k{n:02d}" for n in (5, 0, 3, 6, 1, 4, 2)]
    with Stubber(client) as stubber:
        for start in range(0, len(keys_there), 3):
            page = keys_there[start : start + 3]
            more = start + 3 < len(keys_there)
            response = {
                "Contents": [
                    {"Key": key, "Size": 0, "LastModified": datetime(2026, 1, 1)}
                    for key in page
                ],
                "IsTruncated": more,
                **({"NextContinuationToken": f"after-{start}"} if more else {}),
            }
            expected = {"Bucket": bucket, "Prefix": "p/", "MaxKeys": 3}
            if start:
                expected["ContinuationToken"] = f"after-{start - 3}"
            stubber.add_response("list_objects_v2", response, expected)
        boundaries = ["p/k02", "p/k05"]
        listing = s3common.Store(client, bucket).list("p/", boundaries, workers=4)
        listed = {obj.key: obj for obj in listing}
        stubber.assert_no_pending_responses()
    assert sorted(listed) == sorted(keys_there)


def test_a_server_listing_out_of_order_is_listed_whole_and_sorted(monkeypatch):
    # SeaweedFS lists "p/a/x" before "p/a-b", and after StartAfter="p/a-b" it
    # leaves out "p/a/x": no ranges, one listing from the start, sorted.
    monkeypatch.setattr(s3common, "LIST_PAGE", 2)
    client = boto3.client("s3", region_name="us-east-1")
    keys_there = ["p/a/x", "p/a-b", "p/a.txt", "p/é", "p/B"]
    headers = {"server": "SeaweedFS 8000GB 4.48"}

    def page(start: int, token: str | None) -> None:
        more = start + 2 < len(keys_there)
        response = {
            "Contents": [
                {"Key": key, "Size": 0, "LastModified": datetime(2026, 1, 1)}
                for key in keys_there[start : start + 2]
            ],
            "IsTruncated": more,
            **({"NextContinuationToken": f"after-{start}"} if more else {}),
            "ResponseMetadata": {"HTTPStatusCode": 200, "HTTPHeaders": headers},
        }
        expected = {"Bucket": "sw", "Prefix": "p/", "MaxKeys": 2}
        if token:
            expected["ContinuationToken"] = token
        stubber.add_response("list_objects_v2", response, expected)

    with Stubber(client) as stubber:
        page(0, None)  # the first range's first page: the server is known
        for start in range(0, len(keys_there), 2):
            page(start, f"after-{start - 2}" if start else None)
        listing = s3common.Store(client, "sw").list("p/", ["p/a.txt"], workers=1)
        listed = [obj.key for obj in listing]
        stubber.assert_no_pending_responses()
    assert listed == sorted(keys_there)


def test_a_failed_range_stops_the_listing(monkeypatch):
    # A bucket that backup is about to create: one refusal is enough, not one per range.
    monkeypatch.setattr(s3common, "LIST_PAGE", 1)
    monkeypatch.setattr(backup, "LIST_PAGE", 1)
    sent = []
    client = boto3.client("s3", region_name="us-east-1")
    client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2",
        lambda params, **_: sent.append(params.get("StartAfter")),
    )
    boundaries = backup.listing_boundaries(f"p/k{n:02d}" for n in range(20))
    with Stubber(client) as stubber:
        # Two workers: at most two requests before the first refusal stops them.
        for _ in range(2):
            stubber.add_client_error("list_objects_v2", "NoSuchBucket", "stubbed", 404)
        with pytest.raises(botocore.exceptions.ClientError):
            list(s3common.Store(client, "not-yet").list("p/", boundaries, workers=2))
    assert 1 <= len(sent) <= 2
