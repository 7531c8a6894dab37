"""The Store's verbs against moto's in-process mock: what each does, and exactly
the requests it makes (the same as the scripts made before the Store was their
one door to S3). End-to-end tests show the direct path, which an in-process
mock never takes."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

import s3common
from s3common import (
    MULTIPART_CHUNKSIZE,
    Cancelled,
    FileChanged,
    RemoteObject,
    Store,
    TokenBucket,
    both_md5s,
    run_collecting_failures,
)

MiB = 1024 * 1024
UTC = timezone.utc  # noqa: UP017 (datetime.UTC is Python 3.11+)


class Requests:
    """The operations a client sends, in order, with their parameters."""

    def __init__(self, client):
        self.sent: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        client.meta.events.register("before-parameter-build.s3", self._record)

    def _record(self, model, params, **kwargs):
        with self._lock:
            self.sent.append((model.name, params))

    def names(self) -> list[str]:
        names = [name for name, _ in self.sent]
        self.sent.clear()
        return names


@pytest.fixture
def store(s3):
    s3.create_bucket(Bucket="bkt")
    yield Store(s3, "bkt", put_options={"StorageClass": "STANDARD_IA"})


@pytest.fixture
def requests(s3, store):
    return Requests(s3)


def body_of(s3, key: str) -> bytes:
    return s3.get_object(Bucket="bkt", Key=key)["Body"].read()


def test_put_sends_one_put_object_with_the_options_and_a_crc32(s3, store, requests):
    store.put("k", b"data", {"Metadata": {"mtime": "1"}, "ContentType": "text/plain"})
    [(name, params)] = requests.sent
    assert name == "PutObject"
    assert params["StorageClass"] == "STANDARD_IA"
    assert params["ChecksumAlgorithm"] == "CRC32"
    assert params["ChecksumCRC32"] == "rfPzYw=="  # CRC32 of b"data"
    head = s3.head_object(Bucket="bkt", Key="k")
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["Metadata"] == {"mtime": "1"}
    assert body_of(s3, "k") == b"data"


def test_a_plain_put_carries_no_upload_options(store, requests):
    store.put("state", b"{}", {"ContentType": "application/json"}, plain=True)
    [(name, params)] = requests.sent
    assert name == "PutObject"
    assert "StorageClass" not in params


def test_a_put_larger_than_a_direct_request_goes_through_botocore(s3, store, requests):
    data = b"x" * (2 * MiB)
    store.put("big", data, {})
    assert requests.names() == ["PutObject"]
    assert body_of(s3, "big") == data


def test_upload_file_sends_its_parts_with_the_options(s3, store, requests, tmp_path):
    path = tmp_path / "large"
    data = bytes(range(256)) * (MULTIPART_CHUNKSIZE // 256 + 4096)
    path.write_bytes(data)
    progress = []
    store.upload_file(str(path), "large", len(data), {}, progress.append, lambda: None)
    store.close()
    assert requests.names() == [
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
    ]
    assert sum(progress) == len(data)
    assert s3.head_object(Bucket="bkt", Key="large")["StorageClass"] == "STANDARD_IA"
    assert body_of(s3, "large") == data


def test_upload_file_whose_check_fails_aborts_the_upload(s3, store, tmp_path):
    path = tmp_path / "large"
    path.write_bytes(b"x" * (9 * MiB))

    def changed():
        raise FileChanged()

    with pytest.raises(FileChanged):
        store.upload_file(str(path), "k", 9 * MiB, {}, lambda n: None, changed)
    store.close()
    assert "Contents" not in s3.list_objects_v2(Bucket="bkt")
    assert "Uploads" not in s3.list_multipart_uploads(Bucket="bkt")


def test_close_after_cancel_does_not_wait_for_an_upload_handed_over_meanwhile(
    s3, store, tmp_path
):
    path = tmp_path / "large"
    path.write_bytes(b"x" * (9 * MiB))
    store.upload_file(str(path), "first", 9 * MiB, {}, lambda n: None, lambda: None)
    store.cancel()
    # A worker that had not yet seen the cancel hands over one more upload: the
    # manager refuses it, but keeps it registered as a transfer to wait for.
    with pytest.raises(RuntimeError):
        store.upload_file(str(path), "late", 9 * MiB, {}, lambda n: None, lambda: None)
    closing = threading.Thread(target=store.close, daemon=True)
    closing.start()
    closing.join(timeout=60)  # a bound on a hang, not a timing: it returns at once
    assert not closing.is_alive(), "close() waits for an upload that never runs"
    assert "Uploads" not in s3.list_multipart_uploads(Bucket="bkt")


class Lock:
    """A LockPolicy's part that the Store uses."""

    mode = "GOVERNANCE"

    def upload_args(self, now: float) -> dict:
        until = datetime.fromtimestamp(now, UTC) + timedelta(days=2)
        return {
            "ObjectLockMode": self.mode,
            "ObjectLockRetainUntilDate": until.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def test_with_a_lock_every_upload_is_locked_and_multipart_ones_set_again(
    s3, requests, tmp_path
):
    s3.create_bucket(Bucket="locked", ObjectLockEnabledForBucket=True)
    store = Store(s3, "locked")
    store.lock = Lock()
    requests.names()
    store.put("small", b"x", {})
    path = tmp_path / "large"
    path.write_bytes(b"y" * (9 * MiB))
    store.upload_file(str(path), "large", 9 * MiB, {}, lambda n: None, lambda: None)
    store.close()
    sent = dict(requests.sent)  # the last of each name
    assert [name for name, _ in requests.sent] == [
        "PutObject",
        "CreateMultipartUpload",
        "UploadPart",
        "CompleteMultipartUpload",
        "PutObjectRetention",
    ]
    assert sent["PutObject"]["ObjectLockMode"] == "GOVERNANCE"
    assert sent["CreateMultipartUpload"]["ChecksumAlgorithm"] == "CRC32"
    for key in ("small", "large"):
        assert store.lock_of(key)[0] == "GOVERNANCE"


def test_get_hands_the_object_over_in_chunks(s3, store, requests):
    s3.put_object(Bucket="bkt", Key="k", Body=b"hello", Metadata={"mtime": "5"})
    requests.names()
    fetched = store.get("k", lambda f: (f.metadata, b"".join(f.chunks)), size=5)
    assert fetched == ({"mtime": "5"}, b"hello")
    assert requests.names() == ["GetObject"]


def test_get_of_one_version(s3, store, requests):
    s3.put_bucket_versioning(
        Bucket="bkt", VersioningConfiguration={"Status": "Enabled"}
    )
    first = s3.put_object(Bucket="bkt", Key="k", Body=b"old")["VersionId"]
    s3.put_object(Bucket="bkt", Key="k", Body=b"new")
    requests.names()
    assert store.get("k", lambda f: b"".join(f.chunks), first, size=3) == b"old"
    [(name, params)] = requests.sent
    assert (name, params["VersionId"]) == ("GetObject", first)


def test_get_parts_writes_each_range_in_place(
    s3, store, requests, tmp_path, monkeypatch
):
    monkeypatch.setattr(s3common, "DOWNLOAD_PART", MiB)
    data = bytes(range(256)) * (10 * 1024 + 7)  # 2.5 MiB and a little
    s3.put_object(Bucket="bkt", Key="k", Body=data)
    head = store.head("k")
    requests.names()
    progress = []
    with open(tmp_path / "out", "wb") as out:
        store.get_parts("k", head, out.fileno(), progress.append)
    store.close()
    assert (tmp_path / "out").read_bytes() == data
    assert sum(progress) == len(data)
    ranges = sorted(params["Range"] for _, params in requests.sent)
    assert ranges == [
        "bytes=0-1048575",
        "bytes=1048576-2097151",
        f"bytes=2097152-{len(data) - 1}",
    ]
    assert {name for name, _ in requests.sent} == {"GetObject"}
    assert {params["IfMatch"] for _, params in requests.sent} == {head["ETag"]}


def test_get_parts_stops_when_the_run_is_cancelled(s3, store, tmp_path):
    s3.put_object(Bucket="bkt", Key="k", Body=b"x" * 100)
    head = store.head("k")
    store.cancel()
    with open(tmp_path / "out", "wb") as out, pytest.raises(Cancelled):
        store.get_parts("k", head, out.fileno(), lambda n: None)
    store.close()


def test_head_md5_and_metadata(s3, store, requests):
    s3.put_object(Bucket="bkt", Key="k", Body=b"hello", Metadata={"mode": "100600"})
    requests.names()
    assert store.head("k")["ContentLength"] == 5
    assert store.md5("k") == "5d41402abc4b2a76b9719d911017c592"
    assert store.md5("missing") is None
    assert requests.names() == ["HeadObject"] * 3
    # A small object's metadata comes from a GET, a large one's from a HEAD.
    assert store.metadata("k", size=5)[0] == {"mode": "100600"}
    assert store.metadata("k", size=None)[0] == {"mode": "100600"}
    assert requests.names() == ["GetObject", "HeadObject"]


def test_both_md5s_hashes_the_file_and_heads_the_object(s3, store, tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    s3.put_object(Bucket="bkt", Key="a", Body=b"hello")
    listed = RemoteObject("a", 5, 0.0, etag="0" * 32)  # not its MD5: one HEAD
    md5 = "5d41402abc4b2a76b9719d911017c592"
    assert both_md5s(store, "a", str(tmp_path / "a"), listed) == (md5, md5)


def test_list_in_ranges_sends_one_request_a_range(s3, store, requests, monkeypatch):
    monkeypatch.setattr(s3common, "LIST_PAGE", 2)
    keys = [f"p/{n:02}" for n in range(6)]
    for key in keys:
        s3.put_object(Bucket="bkt", Key=key, Body=b"")
    requests.names()
    listed = [obj.key for obj in store.list("p/", ["p/01", "p/03"], workers=3)]
    assert listed == keys
    assert requests.names() == ["ListObjectsV2"] * 3


def test_version_pages_list_versions_and_markers(s3, store, requests):
    s3.put_bucket_versioning(
        Bucket="bkt", VersioningConfiguration={"Status": "Enabled"}
    )
    s3.put_object(Bucket="bkt", Key="p/a", Body=b"1")
    s3.delete_object(Bucket="bkt", Key="p/a")
    requests.names()
    [page] = store.version_pages("p/")
    assert sorted(v.size is None for v in page) == [False, True]
    assert requests.names() == ["ListObjectVersions"]


def test_delete_sends_a_thousand_keys_a_request(s3, store, requests):
    keys = [f"k{n:04}" for n in range(1001)]
    for key in keys[:3]:
        s3.put_object(Bucket="bkt", Key=key, Body=b"")
    requests.names()
    results = list(store.delete(keys))
    assert [key for key, _ in results] == keys
    assert all(error is None for _, error in results)
    assert requests.names() == ["DeleteObjects", "DeleteObjects"]
    assert "Contents" not in s3.list_objects_v2(Bucket="bkt")


def test_incomplete_uploads_and_abort_upload(s3, store, requests):
    upload = s3.create_multipart_upload(Bucket="bkt", Key="p/k")["UploadId"]
    requests.names()
    [(key, upload_id, initiated)] = store.incomplete_uploads("p/")
    assert (key, upload_id) == ("p/k", upload)
    assert initiated > 0
    store.abort_upload("p/k", upload)
    assert requests.names() == ["ListMultipartUploads", "AbortMultipartUpload"]
    assert "Uploads" not in s3.list_multipart_uploads(Bucket="bkt")


def test_put_retention_and_lock_of(s3, requests):
    s3.create_bucket(Bucket="locked", ObjectLockEnabledForBucket=True)
    s3.put_object(Bucket="locked", Key="k", Body=b"x")
    store = Store(s3, "locked")
    requests.names()
    until = datetime.now(UTC).timestamp() + 86_400
    store.put_retention("k", "GOVERNANCE", until)
    mode, locked_until = store.lock_of("k")
    assert (mode, round(locked_until)) == ("GOVERNANCE", round(until))
    assert requests.names() == ["PutObjectRetention", "HeadObject"]


def test_the_bucket_verbs(s3, requests):
    store = Store(s3, "new-bucket", region="eu-west-1")
    assert not store.bucket_exists()
    store.create_bucket()
    assert store.bucket_exists()
    assert store.versioning() == ""
    store.enable_versioning()
    assert store.versioning() == "Enabled"
    assert store.lifecycle() == ([], {})
    rule = {"ID": "r", "Filter": {"Prefix": ""}, "Status": "Enabled"}
    store.set_lifecycle([{**rule, "Expiration": {"Days": 3}}], {})
    assert store.lifecycle()[0][0]["ID"] == "r"
    assert store.lock_configuration() == {}
    assert requests.names() == [
        "HeadBucket",
        "CreateBucket",
        "HeadBucket",  # the waiter
        "HeadBucket",
        "GetBucketVersioning",
        "PutBucketVersioning",
        "GetBucketVersioning",
        "GetBucketLifecycleConfiguration",
        "PutBucketLifecycleConfiguration",
        "GetBucketLifecycleConfiguration",
        "GetObjectLockConfiguration",
    ]
    location = s3.get_bucket_location(Bucket="new-bucket")["LocationConstraint"]
    assert location == "eu-west-1"


def test_a_lock_bucket_is_created_with_object_lock(s3):
    store = Store(s3, "locked-new")
    store.create_bucket(lock=True)
    assert store.lock_configuration()["ObjectLockEnabled"] == "Enabled"


def test_a_paced_store_waits_for_the_bucket_and_a_cancel_stops_it(s3, store):
    s3.put_object(Bucket="bkt", Key="k", Body=b"x" * 1000)

    class Recorder(TokenBucket):
        def __init__(self):
            super().__init__(10**9)
            self.paced = []

        def pace(self, nbytes, cancel):
            self.paced.append(nbytes)
            if cancel.is_set():
                raise Cancelled()

    store.bandwidth = Recorder()
    assert store.get("k", lambda f: b"".join(f.chunks), size=1000) == b"x" * 1000
    store.put("p", b"y" * 10, {})
    assert store.bandwidth.paced == [1000, 10]
    failures, _ = run_collecting_failures(
        [1], lambda item, cancel: store.cancel(), workers=1, store=store
    )
    assert failures == [] and store.cancelled.is_set()
    with pytest.raises(Cancelled):
        store.put("q", b"z", {})
