"""--checksum, md5chksum and --check: ETag forms, plans by content, the check's
report (pure), then each behaviour against moto in-process."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import boto3
import pytest
from conftest import client_for, make_tree
from plans import Contents, plan_of, steps_of

import backup
import restore
from backup import BackupPlan, LocalFile, Upload
from restore import Download
from s3common import (
    MULTIPART_THRESHOLD,
    CliError,
    CustomerKey,
    Filters,
    RemoteObject,
    Store,
    Summary,
    both_md5s,
    md5_of_etag,
    md5_of_md5chksum,
    md5chksum,
    object_md5,
    printable,
)

MiB = 1024 * 1024
HELLO_MD5 = hashlib.md5(b"hello").hexdigest()  # 5d41402abc4b2a76b9719d911017c592
OTHER_MD5 = hashlib.md5(b"other").hexdigest()


def b64(md5: str) -> str:
    return base64.b64encode(bytes.fromhex(md5)).decode()


# --- ETag forms and md5chksum (pure) ----------------------------------------------


@pytest.mark.parametrize(
    ("etag", "md5"),
    [
        (HELLO_MD5, HELLO_MD5),
        (f'"{HELLO_MD5}"', HELLO_MD5),  # as S3 sends it, quoted
        (HELLO_MD5.upper(), HELLO_MD5),
        (f"{HELLO_MD5}-2", None),  # multipart: an MD5 of the parts' MD5s
        (f'"{HELLO_MD5}-12"', None),
        ("", None),
        (HELLO_MD5[:-1], None),
        (HELLO_MD5[:-1] + "g", None),
    ],
)
def test_md5_of_etag_reads_only_the_plain_form(etag, md5):
    assert md5_of_etag(etag) == md5


def test_md5chksum_is_base64_of_the_digest_as_rclone_writes_it():
    assert md5chksum(HELLO_MD5) == "XUFAKrxLKna5cZ2REBfFkg=="
    assert md5_of_md5chksum("XUFAKrxLKna5cZ2REBfFkg==") == HELLO_MD5


@pytest.mark.parametrize("value", [None, "", "not base64!", b64(HELLO_MD5)[:-4]])
def test_md5chksum_that_holds_no_md5_is_none(value):
    assert md5_of_md5chksum(value) is None


@pytest.mark.parametrize(
    ("head", "md5"),
    [
        # Single-part, unencrypted or SSE-S3: the ETag is the MD5.
        ({"ETag": f'"{HELLO_MD5}"'}, HELLO_MD5),
        ({"ETag": f'"{HELLO_MD5}"', "ServerSideEncryption": "AES256"}, HELLO_MD5),
        # ... and it wins over metadata that says otherwise.
        (
            {"ETag": f'"{HELLO_MD5}"', "Metadata": {"md5chksum": b64(OTHER_MD5)}},
            HELLO_MD5,
        ),
        # SSE-KMS: a plain-looking ETag that is not the MD5; only md5chksum counts.
        (
            {
                "ETag": f'"{OTHER_MD5}"',
                "ServerSideEncryption": "aws:kms",
                "Metadata": {"md5chksum": b64(HELLO_MD5)},
            },
            HELLO_MD5,
        ),
        ({"ETag": f'"{HELLO_MD5}"', "ServerSideEncryption": "aws:kms"}, None),
        ({"ETag": f'"{HELLO_MD5}"', "ServerSideEncryption": "aws:kms:dsse"}, None),
        # SSE-C likewise.
        ({"ETag": f'"{OTHER_MD5}"', "SSECustomerAlgorithm": "AES256"}, None),
        # Multipart: md5chksum, else nothing.
        (
            {"ETag": f'"{OTHER_MD5}-3"', "Metadata": {"md5chksum": b64(HELLO_MD5)}},
            HELLO_MD5,
        ),
        ({"ETag": f'"{OTHER_MD5}-3"', "Metadata": {}}, None),
        ({"ETag": f'"{OTHER_MD5}-3"', "Metadata": {"md5chksum": "garbage"}}, None),
    ],
)
def test_object_md5_from_head(head, md5):
    assert object_md5(head) == md5


@pytest.mark.parametrize(
    ("size", "extra", "key", "needed"),
    [
        (10, {}, None, False),
        (MULTIPART_THRESHOLD - 1, {"ServerSideEncryption": "AES256"}, None, False),
        (MULTIPART_THRESHOLD, {}, None, True),
        (10, {"ServerSideEncryption": "aws:kms"}, None, True),
        (10, {}, CustomerKey(b"k" * 32), True),
    ],
)
def test_md5chksum_goes_where_the_etag_is_not_the_md5(s3, size, extra, key, needed):
    store = Store(s3, "b", put_options=extra, key=key)
    assert store.etag_is_md5(size) is not needed


def test_printable_keeps_a_name_on_one_line():
    assert printable("a\nb\tc\x1b[0m é 日本") == "a\\nb\\tc\\x1b[0m é 日本"


# --- Plans by content (pure) --------------------------------------------------------


def local(size=5, mtime=1000.0, path="/src/x"):
    return LocalFile(path, size, int(mtime * 1e9), 0o100644)


def remote(key, size=5, last_modified=2000.0, etag=""):
    return RemoteObject(key, size, last_modified, etag=etag)


@pytest.mark.parametrize(
    ("file", "obj", "local_md5", "remote_md5", "reason"),
    [
        (local(), None, None, None, "new"),
        (local(size=6), remote("k"), None, None, "size changed"),
        # Same size, an older mtime, other bytes: only content tells.
        (local(), remote("k"), HELLO_MD5, OTHER_MD5, "content changed"),
        # Same bytes, a newer mtime: nothing to upload.
        (local(mtime=3000.0), remote("k"), HELLO_MD5, HELLO_MD5, None),
        (local(), remote("k"), HELLO_MD5, HELLO_MD5, None),
        # An object with no MD5 known counts as different.
        (local(), remote("k"), HELLO_MD5, None, "no MD5 to compare"),
        (local(), remote("k"), None, HELLO_MD5, "no MD5 to compare"),
    ],
)
def test_upload_reason_by_content(file, obj, local_md5, remote_md5, reason):
    assert (
        backup.upload_reason(file, obj, local_md5, remote_md5, by_content=True)
        == reason
    )


def test_plan_backup_by_content():
    files = {
        "p/same": local(),
        "p/edited": local(),
        "p/grown": local(size=9),
        "p/new": local(),
        "p/skipped.log": local(),
    }
    objects = {key: remote(key) for key in ("p/same", "p/edited", "p/grown", "p/gone")}
    contents = Contents(
        local={"p/same": HELLO_MD5, "p/edited": OTHER_MD5},
        remote={"p/same": HELLO_MD5, "p/edited": HELLO_MD5},
    )
    filters = Filters(((False, "*.log"),))
    plan = plan_of(files, objects, "p", filters, True, contents)
    assert [(u.key, u.reason, u.md5) for u in plan.uploads] == [
        ("p/edited", "content changed", OTHER_MD5),
        ("p/grown", "size changed", None),
        ("p/new", "new", None),
    ]
    assert plan.deletes == ("p/gone",)
    assert plan.skipped == 1
    # Without contents the same listing is compared by mtime: nothing but size and new.
    by_time = plan_of(files, objects, "p", filters, False)
    assert [u.key for u in by_time.uploads] == ["p/grown", "p/new"]


def test_same_size_files_are_the_only_candidates_within_the_filters():
    files = {"a": local(path="/a"), "b": local(size=6), "c": local(), "d.log": local()}
    objects = {key: remote(key) for key in ("a", "b", "d.log")}
    steps = steps_of(
        files, objects, "", Filters(((False, "*.log"),)), False, by_content=True
    )
    candidates = {
        step.key: (step.file.path, step.remote)
        for step in steps
        if isinstance(step, backup.Compare)
    }
    assert candidates == {"a": ("/a", objects["a"])}


def test_check_report_sorts_the_plan_into_differences():
    plan = BackupPlan(
        uploads=(
            Upload("p/a", local(), "new"),
            Upload("p/b", local(), "content changed"),
            Upload("p/c", local(), "size changed"),
            Upload("p/unreadable", local(), "no MD5 to compare"),
        ),
        deletes=("p/old",),
        skipped=7,
    )
    report = backup.check_report(plan, frozenset({"p/unreadable"}))
    assert report == backup.CheckReport(
        missing=("p/a",),
        changed=(("p/b", "content changed"), ("p/c", "size changed")),
        extra=("p/old",),
        identical=7,
    )


def test_check_summary_line_and_fields():
    summary = Summary(
        "checked", skipped=3, missing=["p/a"], changed=["p/b", "p/c"], extra=[]
    )
    assert summary.line() == (
        "checked 3 identical, 1 missing, 2 changed, 0 extra, failed 0, in 0.0 s"
    )


def test_restore_plan_marks_only_matching_files_same_content():
    downloads = tuple(
        Download(key, 5, 1.0, "STANDARD", path=Path("/dst", key))
        for key in ("same", "other", "unknown", "absent")
    )
    contents = Contents(
        local={"same": HELLO_MD5, "other": HELLO_MD5, "unknown": HELLO_MD5},
        remote={"same": HELLO_MD5, "other": OTHER_MD5, "unknown": None},
    )
    marked = [
        restore.same_content(
            item, contents.local.get(item.key), contents.remote.get(item.key)
        )
        for item in downloads
    ]
    assert [item.same_content for item in marked] == [
        True,
        False,
        False,
        False,
    ]


# --- Against moto in-process ---------------------------------------------------------


def meta(s3, bucket, key):
    return s3.head_object(Bucket=bucket, Key=key)["Metadata"]


def keys_and_etags(s3, bucket):
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: (item["ETag"], item["LastModified"]) for item in listed}


@pytest.fixture
def src(tmp_path):
    root = make_tree(
        tmp_path / "src",
        {"a.txt": b"hello", "sub/b.txt": b"world", "big.bin": os.urandom(9 * MiB)},
    )
    for path in root.rglob("*"):
        os.utime(path, (1_600_000_000, 1_600_000_000))
    return root


def test_checksum_uploads_a_same_size_edit_with_an_older_mtime(s3, src, capsys):
    assert backup.main([str(src), "vbk1::p"]) == 0
    (src / "a.txt").write_bytes(b"HELLO")
    os.utime(src / "a.txt", (1_500_000_000, 1_500_000_000))
    assert backup.main([str(src), "vbk1::p"]) == 0
    assert s3.get_object(Bucket="vbk1", Key="p/a.txt")["Body"].read() == b"hello"
    capsys.readouterr()
    assert backup.main([str(src), "vbk1::p", "--checksum", "-v"]) == 0
    out = capsys.readouterr().out
    assert "uploaded 1, skipped 2" in out
    assert s3.get_object(Bucket="vbk1", Key="p/a.txt")["Body"].read() == b"HELLO"


def test_checksum_skips_same_bytes_with_a_newer_mtime(s3, src, capsys):
    assert backup.main([str(src), "vbk2::p"]) == 0
    before = keys_and_etags(s3, "vbk2")
    for path in src.rglob("*"):
        os.utime(path, (2_000_000_000, 2_000_000_000))  # newer than every object
    capsys.readouterr()
    assert backup.main([str(src), "vbk2::p", "--checksum"]) == 0
    assert "uploaded 0, skipped 3" in capsys.readouterr().out
    assert keys_and_etags(s3, "vbk2") == before


def test_multipart_object_is_compared_through_md5chksum(s3, src, capsys):
    assert backup.main([str(src), "vbk3::p"]) == 0
    data = (src / "big.bin").read_bytes()
    assert meta(s3, "vbk3", "p/big.bin")["md5chksum"] == b64(
        hashlib.md5(data).hexdigest()
    )
    # The same size, other bytes, an older mtime.
    (src / "big.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    os.utime(src / "big.bin", (1_500_000_000, 1_500_000_000))
    capsys.readouterr()
    assert backup.main([str(src), "vbk3::p", "--checksum"]) == 0
    assert "uploaded 1, skipped 2" in capsys.readouterr().out
    assert backup.main([str(src), "vbk3::p", "--check"]) == 0


def test_sse_kms_objects_get_md5chksum_and_are_checked_by_it(s3, src, capsys):
    assert backup.main([str(src), "vbk4::p", "--sse", "aws:kms"]) == 0
    head = s3.head_object(Bucket="vbk4", Key="p/a.txt")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["Metadata"]["md5chksum"] == b64(HELLO_MD5)
    # On S3 an SSE-KMS object's ETag is not its MD5 (moto's is): a listed ETag
    # that is not the file's MD5 sends one HEAD, which says KMS and gives md5chksum.
    listed = RemoteObject("p/a.txt", 5, 0.0, etag=OTHER_MD5)
    md5s = both_md5s(Store(s3, "vbk4"), "p/a.txt", str(src / "a.txt"), listed)
    assert md5s == (HELLO_MD5, HELLO_MD5)


def test_both_md5s_a_plain_etag_that_differs_is_the_md5(s3, src):
    assert backup.main([str(src), "vbk5::p"]) == 0
    (src / "a.txt").write_bytes(b"HELLO")
    store = Store(s3, "vbk5")
    listed = RemoteObject("p/a.txt", 5, 0.0, etag=HELLO_MD5)
    local, remote = both_md5s(store, "p/a.txt", str(src / "a.txt"), listed)
    assert (local, remote) == (hashlib.md5(b"HELLO").hexdigest(), HELLO_MD5)
    gone = RemoteObject("p/gone", 5, 0.0)
    assert both_md5s(store, "p/gone", str(src / "sub" / "b.txt"), gone)[1] is None
    unreadable = both_md5s(store, "p/x", str(src / "nothing here"), listed)
    assert isinstance(unreadable[0], FileNotFoundError) and unreadable[1] is None


def test_both_md5s_an_sse_c_object_has_no_md5_and_a_denied_head_stops(
    src, failing_proxy
):
    proxy = failing_proxy({}, buckets=("vbk13",))
    assert backup.main([str(src), "vbk13::p", "--endpoint-url", proxy.url]) == 0
    listed = RemoteObject("p/a.txt", 5, 0.0, etag=OTHER_MD5)
    path = str(src / "a.txt")
    client = client_for(proxy.url)
    # S3 answers a HEAD of an SSE-C object without its key with a bare 400.
    proxy.errors["HeadObject"] = ("400", 400)
    store = Store(client, "vbk13")
    assert both_md5s(store, "p/a.txt", path, listed) == (HELLO_MD5, None)
    proxy.errors["HeadObject"] = ("403", 403)
    with pytest.raises(
        CliError, match="cannot read the metadata of s3://vbk13/p/a.txt"
    ):
        both_md5s(store, "p/a.txt", path, listed)


def test_multipart_object_without_md5chksum_counts_as_changed(s3, src, capsys):
    s3.create_bucket(Bucket="vbk6")
    # Another tool's multipart upload, with no md5chksum.
    boto3.client("s3", region_name="us-east-1").upload_file(
        str(src / "big.bin"), "vbk6", "p/big.bin"
    )
    assert backup.main([str(src / "big.bin"), "vbk6::p", "--check"]) == 1
    assert "changed: p/big.bin (no MD5 to compare)" in capsys.readouterr().out


def test_check_identical_then_every_kind_of_difference(s3, src, capsys):
    assert backup.main([str(src), "vbk7::p"]) == 0
    capsys.readouterr()
    assert backup.main([str(src), "vbk7::p", "--check"]) == 0
    out = capsys.readouterr().out
    assert "s3://vbk7/p holds every file exactly" in out
    assert "checked 3 identical, 0 missing, 0 changed, 0 extra" in out

    before = keys_and_etags(s3, "vbk7")
    (src / "a.txt").write_bytes(b"HELLO")
    os.utime(src / "a.txt", (1_500_000_000, 1_500_000_000))
    (src / "sub" / "b.txt").write_bytes(b"longer")
    (src / "new\ttab.txt").write_bytes(b"new")
    s3.put_object(Bucket="vbk7", Key="p/extra.txt", Body=b"x")
    s3.put_object(Bucket="vbk7", Key="p/skip.log", Body=b"x")
    s3.put_object(Bucket="vbk7", Key="other/not-under-p.txt", Body=b"x")
    assert backup.main([str(src), "vbk7::p", "--check", "--exclude", "*.log"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "missing: p/new\\ttab.txt",
        "changed: p/a.txt (content changed)",
        "changed: p/sub/b.txt (size changed)",
        "extra: p/extra.txt",
    ]
    assert lines[4].startswith("checked 1 identical, 1 missing, 2 changed, 1 extra")
    # Nothing changed in the bucket.
    after = keys_and_etags(s3, "vbk7")
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {
        "p/extra.txt",
        "p/skip.log",
        "other/not-under-p.txt",
    }


def test_check_of_a_missing_bucket_creates_nothing(s3, src, capsys):
    assert backup.main([str(src), "vbk8::p", "--check"]) == 1
    assert "the bucket vbk8 does not exist" in capsys.readouterr().err
    assert s3.list_buckets()["Buckets"] == []


def test_check_with_delete_is_a_usage_error(s3, src, capsys):
    assert backup.main([str(src), "vbk10::p", "--check", "--delete"]) == 2
    assert "--check changes nothing" in capsys.readouterr().err


def test_restore_checksum_keeps_matching_files_and_sets_mtime_and_mode(
    s3, src, tmp_path, capsys
):
    (src / "a.txt").chmod(0o640)
    assert backup.main([str(src), "vbk11::p"]) == 0
    target = tmp_path / "dst"
    assert restore.main(["vbk11::p", str(target)]) == 0
    kept, edited = target / "a.txt", target / "sub" / "b.txt"
    inodes = {path: path.stat().st_ino for path in (kept, target / "big.bin")}
    kept.chmod(0o600)
    os.utime(kept, (1_700_000_000, 1_700_000_000))
    edited.write_bytes(b"WORLD")
    capsys.readouterr()
    assert restore.main(["vbk11::p", str(target), "--checksum"]) == 0
    assert "restored 1, skipped 2" in capsys.readouterr().out
    assert {path: path.stat().st_ino for path in inodes} == inodes
    assert kept.stat().st_mtime == 1_600_000_000
    assert kept.stat().st_mode & 0o777 == 0o640
    assert edited.read_bytes() == b"world"


def test_restore_checksum_never_keeps_a_symlink(s3, src, tmp_path):
    assert backup.main([str(src), "vbk12::p"]) == 0
    target = tmp_path / "dst"
    target.mkdir()
    elsewhere = make_tree(tmp_path / "elsewhere", {"a.txt": b"hello"})
    (target / "a.txt").symlink_to(elsewhere / "a.txt")
    os.chmod(elsewhere / "a.txt", 0o600)
    assert restore.main(["vbk12::p", str(target), "--checksum"]) == 0
    assert not (target / "a.txt").is_symlink()
    assert (elsewhere / "a.txt").stat().st_mode & 0o777 == 0o600
