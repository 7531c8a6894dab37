"""The direct path for small objects: what it sends, and how it gives way to botocore.

The end-to-end tests run the scripts with --workers 1 through a FaultProxy in front of
the test server (moto's, or Ceph RGW with S3_TEST_SERVER=rgw), so that the order of requests is fixed: botocore sends the first GET or
PUT (nothing is learned before it), the direct path the rest.
"""

from __future__ import annotations

import calendar
import os
import random
import socket
import time
import zlib
from datetime import datetime
from urllib.parse import quote, urlsplit

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.utils import percent_encode_sequence
from conftest import make_tree, run_script
from faultproxy import FaultProxy, TlsPassThrough
from test_e2e import AWKWARD_TREE, MiB, snapshot
from test_history import restore_point_in, wait_after

import backup
import restore
from s3common import (
    MAX_ROUTE_CHANGES,
    UNSIGNED_PAYLOAD,
    SigV4,
    crc32_header,
    host_header,
    response_md5,
    version_query,
)


@pytest.fixture
def small_tree(tmp_path):
    root = make_tree(tmp_path / "src", AWKWARD_TREE)
    os.chmod(root / "plain.txt", 0o600)
    os.utime(root / "plain.txt", ns=(1_234_567_890_123_456_789,) * 2)
    return root


def object_requests(proxy: FaultProxy, method: str) -> list[bool]:
    """For each GET or PUT of an object (not a bucket), whether it went direct."""
    return [
        direct
        for seen_method, path, direct in proxy.requests
        if seen_method == method and path.count("/") >= 2
    ]


@pytest.mark.parametrize(
    "method, base_url, region, key, headers, body, token, version_id",
    [
        (
            "GET", "http://127.0.0.1:5000/bucket/", "us-east-1",
            "backup/d00/f000001.bin", {"x-amz-checksum-mode": "ENABLED"}, b"", None,
            None,
        ),
        (
            "GET", "http://127.0.0.1:5000/bucket/", "us-east-1",
            "backup/d00/f000001.bin", {"x-amz-checksum-mode": "ENABLED"}, b"", None,
            "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo",
        ),
        (
            "GET", "https://my-bucket.s3.eu-west-1.amazonaws.com/", "eu-west-1",
            "ünïcödé/naïve café.txt", {"x-amz-checksum-mode": "ENABLED"}, b"",
            "a-session-token", "null",
        ),
        (
            "GET", "http://127.0.0.1:5000/b/", "us-east-1", "k", {}, b"", None,
            "a/b=c&d?e f~g_h.i-j%k",
        ),
        (
            "PUT", "https://my-bucket.s3.eu-west-1.amazonaws.com/", "eu-west-1",
            "ünïcödé/naïve café.txt",
            {
                "Content-Type": "text/plain",
                "x-amz-meta-mtime": "1234567890.123456789",
                "x-amz-meta-mode": "100644",
                "x-amz-storage-class": "STANDARD_IA",
                "x-amz-server-side-encryption": "aws:kms",
                "x-amz-server-side-encryption-aws-kms-key-id": "alias/my key",
                "x-amz-sdk-checksum-algorithm": "CRC32",
                "x-amz-checksum-crc32": "NhCmhg==",
            },
            b"hello", "a-session-token", None,
        ),
        (
            "PUT", "http://[::1]:9000/b/", "ap-south-1",
            "chars/+plus%percent#hash?question&amp=equals  ~.txt",
            {"Content-Type": "text/plain;  charset=utf-8 "}, b"", None, None,
        ),
        (
            "GET", "https://S3.Example.COM:443/bucket/", "us-west-2", "a b/c",
            {}, b"", "token", None,
        ),
    ],
)  # fmt: skip
def test_sigv4_signs_exactly_as_botocore_does(
    monkeypatch, method, base_url, region, key, headers, body, token, version_id
):
    now = datetime(2026, 11, 23, 11, 33, 48)  # UTC, without a zone as botocore has it
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now)
    credentials = Credentials(
        "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token
    )
    # botocore's own serialization of GetObject's VersionId into the URL.
    query = percent_encode_sequence({"versionId": version_id}) if version_id else ""
    assert query == version_query(version_id)
    url = base_url + quote(key, safe="/~") + (f"?{query}" if query else "")
    request = AWSRequest(method, url, data=body, headers=headers)
    botocore.auth.S3SigV4Auth(credentials, "s3", region).add_auth(request)

    parts = urlsplit(url)
    ours = SigV4(region, "s3").sign(
        credentials, method, host_header(parts), parts.path, headers, body,
        time.gmtime(calendar.timegm(now.timetuple())), parts.query,
    )  # fmt: skip
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]
    assert ours["x-amz-content-sha256"] == request.headers["X-Amz-Content-SHA256"]
    assert ours.get("x-amz-security-token") == request.headers.get(
        "X-Amz-Security-Token"
    )


def test_a_streamed_body_over_tls_is_signed_unsigned_as_botocore_signs_it(
    monkeypatch,
):
    """botocore leaves a streamed body with a checksum header out of the
    signature over TLS; the direct path signs a FileBody so over https."""
    now = datetime(2026, 12, 7, 15, 0, 0)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now)
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    url = "https://my-bucket.s3.eu-west-1.amazonaws.com/backup/photo.jpg"
    headers = {"x-amz-checksum-crc32": "NhCmhg==", "Content-Type": "image/jpeg"}
    request = AWSRequest("PUT", url, data=b"hello", headers=headers)
    request.context["has_streaming_input"] = True
    request.context["checksum"] = {
        "request_algorithm": {"in": "header", "name": "x-amz-checksum-crc32"}
    }
    botocore.auth.S3SigV4Auth(credentials, "s3", "eu-west-1").add_auth(request)
    assert request.headers["X-Amz-Content-SHA256"] == UNSIGNED_PAYLOAD

    parts = urlsplit(url)
    ours = SigV4("eu-west-1", "s3").sign(
        credentials, "PUT", host_header(parts), parts.path, headers, b"",
        time.gmtime(calendar.timegm(now.timetuple())), "", UNSIGNED_PAYLOAD,
    )  # fmt: skip
    assert ours["x-amz-content-sha256"] == UNSIGNED_PAYLOAD
    assert ours["authorization"] == request.headers["Authorization"]


def test_sigv4_signs_the_example_of_the_s3_documentation():
    # "Example: GET Object" of Amazon S3's "Signature Calculations for the
    # Authorization Header": a fixed signature of a fixed request, not botocore's.
    credentials = Credentials(
        "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    )
    headers = SigV4("us-east-1", "s3").sign(
        credentials, "GET", "examplebucket.s3.amazonaws.com", "/test.txt",
        {"Range": "bytes=0-9"}, b"", time.gmtime(calendar.timegm((2013, 5, 24, 0, 0, 0))),
    )  # fmt: skip
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/"
        "aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert headers["x-amz-content-sha256"] == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_crc32_header_is_base64_of_the_big_endian_checksum():
    assert crc32_header(zlib.crc32(b"hello")) == "NhCmhg=="
    assert crc32_header(0) == "AAAAAA=="


class Headers(dict):
    """Response headers, as http.client.HTTPResponse.getheader reads them."""

    def getheader(self, name, default=None):
        return self.get(name, default)


MD5 = "5d41402abc4b2a76b9719d911017c592"


@pytest.mark.parametrize(
    ("headers", "md5"),
    [
        ({"ETag": f'"{MD5}"'}, MD5),
        ({"ETag": f'"{MD5.upper()}"'}, MD5),
        ({"ETag": f'"{MD5}-2"'}, None),  # multipart
        (
            {"ETag": f'"{MD5}-2"', "x-amz-meta-md5chksum": "XUFAKrxLKna5cZ2REBfFkg=="},
            MD5,
        ),
        ({"ETag": f'"{MD5}"', "x-amz-server-side-encryption": "aws:kms"}, None),
        ({"ETag": f'"{MD5}"', "x-amz-server-side-encryption": "AES256"}, MD5),
        (
            {
                "ETag": f'"{MD5}"',
                "x-amz-server-side-encryption-customer-algorithm": "AES256",
            },
            None,
        ),
        ({"ETag": '"not-an-md5"'}, None),
        ({}, None),
    ],
)
def test_a_direct_get_checks_the_md5_its_etag_or_md5chksum_states(headers, md5):
    """What a server without additional checksums (Ceph RGW 16) is checked against."""
    assert response_md5(Headers(headers)) == md5


def test_after_botocores_first_request_small_objects_go_direct_and_round_trip(
    start_proxy, server_client, cli_env, small_tree, tmp_path, bucket_name
):
    proxy = start_proxy()
    location = f"{bucket_name}::p"
    common = ["--endpoint-url", proxy.url, "--workers", "1"]

    result = run_script("backup.py", str(small_tree), location, *common, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert object_requests(proxy, "PUT") == [False] + [True] * (len(AWKWARD_TREE) - 1)

    for relative, data in AWKWARD_TREE.items():
        head = server_client.head_object(
            Bucket=bucket_name, Key=f"p/{relative}", ChecksumMode="ENABLED"
        )
        assert head["ContentLength"] == len(data)
        info = os.stat(small_tree / relative)
        assert head["Metadata"]["mode"] == format(info.st_mode, "o")
        assert head["Metadata"]["mtime"].startswith(str(int(info.st_mtime)))
    plain = server_client.head_object(Bucket=bucket_name, Key="p/plain.txt")
    assert plain["ContentType"] == "text/plain"
    assert plain["Metadata"]["mtime"] == "1234567890.123456789"

    target = tmp_path / "restored"
    result = run_script("restore.py", location, str(target), *common, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert object_requests(proxy, "GET") == [False] + [True] * (len(AWKWARD_TREE) - 1)
    assert snapshot(target) == snapshot(small_tree)


def round_trip_over_tls(
    proxy: FaultProxy, cli_env, source, bucket: str, tmp_path, *options: str
):
    """Back source up to bucket and restore it, both over HTTPS (TLS in front of
    the proxy, trusted through AWS_CA_BUNDLE); the folder it was restored into."""
    tls = TlsPassThrough(proxy.url, tmp_path)
    tls.start()
    env = {**cli_env, "AWS_CA_BUNDLE": str(tls.cert_path)}
    common = ["--endpoint-url", tls.url, *options]
    target = tmp_path / "restored"
    try:
        result = run_script("backup.py", str(source), bucket, *common, env=env)
        assert result.returncode == 0, result.stderr
        result = run_script("restore.py", bucket, str(target), *common, env=env)
        assert result.returncode == 0, result.stderr
    finally:
        tls.close()
    return target


def test_small_objects_go_direct_over_https_too(
    start_proxy, cli_env, small_tree, tmp_path, bucket_name
):
    proxy = start_proxy()
    target = round_trip_over_tls(
        proxy, cli_env, small_tree, bucket_name, tmp_path, "--workers", "1"
    )
    direct_count = len(AWKWARD_TREE) - 1
    assert object_requests(proxy, "PUT") == [False] + [True] * direct_count
    assert object_requests(proxy, "GET") == [False] + [True] * direct_count
    assert snapshot(target) == snapshot(small_tree)


def test_streamed_bodies_go_direct_over_https_unsigned(
    start_proxy, cli_env, tmp_path, bucket_name
):
    """Files over a CHUNK stream from their file, direct after botocore's first
    PUT; over TLS their payload is left out of the signature, as botocore leaves
    it (Ceph RGW checks every signature)."""
    rng = random.Random(4)
    files = {"a-first.txt": b"sent by botocore"}
    files.update({f"s{n}.bin": rng.randbytes(200 * 1024 + n) for n in range(2)})
    source = make_tree(tmp_path / "src", files)
    proxy = start_proxy()
    target = round_trip_over_tls(
        proxy, cli_env, source, bucket_name, tmp_path, "--workers", "1"
    )
    assert object_requests(proxy, "PUT") == [False, True, True]
    assert {path.name: path.read_bytes() for path in target.iterdir()} == files


def test_files_over_the_direct_size_go_up_and_down_over_https(
    start_proxy, cli_env, tmp_path, bucket_name
):
    """botocore's own uploads, one PUT and multipart, with TLS in front of the server
    (Ceph RGW 16 refuses botocore's default aws-chunked bodies with a trailing checksum)."""
    rng = random.Random(3)
    files = {"two.bin": rng.randbytes(2 * MiB), "nine.bin": rng.randbytes(9 * MiB)}
    source = make_tree(tmp_path / "src", files)
    target = round_trip_over_tls(start_proxy(), cli_env, source, bucket_name, tmp_path)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == files


def test_direct_puts_carry_checksum_storage_class_and_encryption(
    start_proxy, moto_server, server_client, cli_env, small_tree, bucket_name
):
    """On moto: Ceph RGW 16 keeps no CRC32, knows only the STANDARD storage class
    unless configured, and takes SSE only over TLS with a key server."""
    proxy = start_proxy(moto_server)
    result = run_script(
        "backup.py",
        str(small_tree),
        bucket_name,
        "--endpoint-url",
        proxy.url,
        "--workers",
        "1",
        "--storage-class",
        "STANDARD_IA",
        "--sse",
        "AES256",
        env=cli_env,
    )
    assert result.returncode == 0, result.stderr
    assert object_requests(proxy, "PUT").count(True) == len(AWKWARD_TREE) - 1
    for relative, data in AWKWARD_TREE.items():
        head = server_client.head_object(
            Bucket=bucket_name, Key=relative, ChecksumMode="ENABLED"
        )
        assert head["ChecksumCRC32"] == crc32_header(zlib.crc32(data)), relative
        assert head["StorageClass"] == "STANDARD_IA", relative
        assert head["ServerSideEncryption"] == "AES256", relative


def test_refused_direct_requests_fall_back_to_botocore_and_soon_stop(
    start_proxy, server_client, cli_env, tmp_path, bucket_name
):
    files = {f"f{n:02d}.txt": f"file {n}".encode() for n in range(20)}
    source = make_tree(tmp_path / "src", files)
    proxy = start_proxy(refuse_direct=True)
    common = ["--endpoint-url", proxy.url, "--workers", "1"]

    result = run_script("backup.py", str(source), bucket_name, *common, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr
    assert object_requests(proxy, "PUT").count(True) == MAX_ROUTE_CHANGES
    for name, data in files.items():
        body = server_client.get_object(Bucket=bucket_name, Key=name)["Body"].read()
        assert body == data

    target = tmp_path / "restored"
    result = run_script("restore.py", bucket_name, str(target), *common, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert object_requests(proxy, "GET").count(True) == MAX_ROUTE_CHANGES
    assert {path.name: path.read_bytes() for path in target.iterdir()} == files


def test_a_streamed_put_cut_off_midway_is_sent_again_whole_from_its_file(
    start_proxy, server_client, cli_env, tmp_path, bucket_name
):
    """Bodies over a CHUNK stream from their file. The first three such PUTs are
    cut off halfway through their body: the direct one, then botocore's in its
    place and botocore's own retry of that. Each is sent again from the start of
    the file (its checksum, from the read before, checked as it goes), and what
    is stored is the file, whole."""
    rng = random.Random(28)
    files = {"a-first.txt": b"sent by botocore"}
    files.update({f"s{n}.bin": rng.randbytes(300 * 1024 + n) for n in range(3)})
    source = make_tree(tmp_path / "src", files)
    proxy = start_proxy(cut_puts=3)
    result = run_script(
        "backup.py", str(source), bucket_name, "--endpoint-url", proxy.url,
        "--workers", "1", env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert proxy.faults["cut put"] == 3
    assert object_requests(proxy, "PUT") == [
        False,
        True,
        False,
        False,
        False,
        True,
        True,
    ]
    for name, data in files.items():
        body = server_client.get_object(Bucket=bucket_name, Key=name)["Body"].read()
        assert body == data, name


@pytest.fixture
def first_small_then_large(server_client, bucket_name) -> dict[str, bytes]:
    """A small object, which botocore fetches first, and one of two parts after it;
    the bucket holds them under their names."""
    files = {
        "a-first.txt": b"fetched by botocore",
        "big.bin": random.Random(8).randbytes(40 * MiB + 5),
    }
    server_client.create_bucket(Bucket=bucket_name)
    for name, data in files.items():
        server_client.put_object(Bucket=bucket_name, Key=name, Body=data)
    return files


@pytest.mark.parametrize("over_tls", [False, True], ids=["http", "https"])
def test_the_parts_of_a_large_object_go_direct(
    start_proxy, cli_env, first_small_then_large, tmp_path, bucket_name, over_tls
):
    proxy = start_proxy()
    endpoint, env = proxy.url, cli_env
    tls = TlsPassThrough(proxy.url, tmp_path) if over_tls else None
    if tls:  # trusted through AWS_CA_BUNDLE
        tls.start()
        endpoint, env = tls.url, {**cli_env, "AWS_CA_BUNDLE": str(tls.cert_path)}
    target = tmp_path / "restored"
    try:
        result = run_script(
            "restore.py", bucket_name, str(target), "--endpoint-url", endpoint,
            "--workers", "1", env=env,
        )  # fmt: skip
    finally:
        if tls:
            tls.close()
    assert result.returncode == 0, result.stderr
    assert object_requests(proxy, "GET") == [False, True, True]
    assert {path.name: path.read_bytes() for path in target.iterdir()} == (
        first_small_then_large
    )


def restore_through(proxy, bucket_name: str, target, cli_env) -> None:
    """restore.py of the whole bucket through the proxy, one worker: it succeeds with no error line."""
    result = run_script(
        "restore.py", bucket_name, str(target), "--endpoint-url", proxy.url,
        "--workers", "1", env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr


def test_a_refused_direct_part_is_fetched_through_botocore(
    start_proxy, cli_env, first_small_then_large, tmp_path, bucket_name
):
    proxy = start_proxy(refuse_direct=True)
    target = tmp_path / "restored"
    restore_through(proxy, bucket_name, target, cli_env)
    gets = object_requests(proxy, "GET")
    # A part refused direct came through botocore, as did the other part (which
    # found the route forgotten if it started after that refusal).
    assert gets.count(False) == 3
    assert 1 <= gets.count(True) == proxy.faults["AccessDenied"] <= 2
    assert {path.name: path.read_bytes() for path in target.iterdir()} == (
        first_small_then_large
    )


def test_parts_whose_bodies_break_off_are_fetched_again(
    start_proxy, cli_env, first_small_then_large, tmp_path, bucket_name
):
    """Both parts break off direct, and one again through botocore, which retries
    a request until its answer starts, not while its body comes: asked for again."""
    proxy = start_proxy(cut_ranges=3)
    target = tmp_path / "restored"
    restore_through(proxy, bucket_name, target, cli_env)
    assert proxy.faults["cut"] == 3
    assert object_requests(proxy, "GET").count(False) == 1 + 3
    assert {path.name: path.read_bytes() for path in target.iterdir()} == (
        first_small_then_large
    )


def test_a_corrupted_direct_download_is_caught_and_fetched_again(
    start_proxy, s3_server, cli_env, small_tree, tmp_path, bucket_name
):
    result = run_script(
        "backup.py", str(small_tree), bucket_name, "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    proxy = start_proxy(corrupt_direct=True)

    target = tmp_path / "restored"
    result = run_script(
        "restore.py", bucket_name, str(target), "--endpoint-url", proxy.url,
        "--workers", "1", env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Every non-empty file but the first came direct, corrupted, and was fetched again.
    assert proxy.faults["corrupted"] == len(AWKWARD_TREE) - 2
    assert snapshot(target) == snapshot(small_tree)
    assert not [name for name in os.listdir(target) if name.startswith(".s3restore")]


def test_under_an_in_process_mock_nothing_goes_to_the_network(
    s3, monkeypatch, tmp_path
):
    files = {f"d/f{n}.txt": f"file {n}".encode() for n in range(10)}
    source = make_tree(tmp_path / "src", files)
    network = []

    def refuse(*args, **kwargs):
        network.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert backup.main([str(source), "mocked::p", "--workers", "1", "-q"]) == 0
    target = tmp_path / "restored"
    assert restore.main(["mocked::p", str(target), "--workers", "1", "-q"]) == 0
    assert network == []
    assert {
        path.relative_to(target).as_posix(): path.read_bytes()
        for path in target.rglob("*")
        if path.is_file()
    } == files


def test_versioned_gets_of_restore_at_go_direct_with_the_version_signed(
    start_proxy, s3_server, cli_env, small_tree, tmp_path, bucket_name
):
    location = f"{bucket_name}::p"
    result = run_script(
        "backup.py", str(small_tree), location, "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    point = restore_point_in(result.stdout)
    wait_after(point)
    (small_tree / "plain.txt").write_bytes(b"changed later")
    result = run_script(
        "backup.py", str(small_tree), location, "--endpoint-url", s3_server,
        env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    proxy = start_proxy()
    target = tmp_path / "restored"
    result = run_script(
        "restore.py", location, str(target), "--endpoint-url", proxy.url,
        "--workers", "1", "--at", point, env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # plain.txt is not the first: its old bytes came direct, by version.
    assert object_requests(proxy, "GET") == [False] + [True] * (len(AWKWARD_TREE) - 1)
    restored = snapshot(target)
    assert restored["plain.txt"][0] == AWKWARD_TREE["plain.txt"]
    assert {name: data for name, (data, _, _) in restored.items()} == AWKWARD_TREE
