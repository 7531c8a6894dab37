"""SSE-C (--sse-c-key-file): the key file's rules and the endpoint's, on literals;
end to end on the test server: every request path carries the key, what other
tools wrote or read back, a missing key told from another one, and no output of
any run that shows the key.

moto accepts the SSE-C headers and ignores them (it keeps objects in the clear
and answers a HEAD without the key): there, the tests of what the server
refuses are skipped, and the round trips show only that the requests go out."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets

import botocore.exceptions
import pytest
from botocore.stub import Stubber
from conftest import TEST_SERVER, client_for, make_tree, run_script

import s3common
from s3common import (
    ANOTHER_KEY,
    CliError,
    CustomerKey,
    CustomerKeyError,
    Store,
    cleartext_problem,
    read_customer_key,
)

MiB = 1024 * 1024
ENFORCES = pytest.mark.skipif(
    TEST_SERVER == "moto",
    reason="moto accepts the SSE-C headers and ignores them: it answers without the key",
)


# --- The key file and the endpoint, on literals -------------------------------------


@pytest.mark.parametrize(
    "content, key",
    [
        (b"k" * 32, b"k" * 32),
        (b" \n\t" + b"r" * 29, b" \n\t" + b"r" * 29),  # whitespace bytes are the key's
        (base64.b64encode(b"b" * 32), b"b" * 32),
        (b"\n  " + base64.b64encode(b"c" * 32) + b"\n\n", b"c" * 32),
    ],
    ids=["raw", "raw-whitespace", "base64", "base64-lines"],
)
def test_a_key_file_holds_32_bytes_or_their_base64(tmp_path, content, key):
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(0o600)
    assert read_customer_key(str(path)) == (CustomerKey(key), None)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"k" * 31,
        b"k" * 33,
        base64.b64encode(b"s" * 31),
        base64.b64encode(b"s" * 33),
        b"not base64 at all, but not 32 bytes long",
        b"\xff" * 44,
    ],
    ids=["empty", "31-bytes", "33-bytes", "base64-31", "base64-33", "text", "binary"],
)
def test_anything_else_is_a_usage_error_that_shows_none_of_it(tmp_path, content):
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(CliError, match="holds no SSE-C key") as raised:
        read_customer_key(str(path))
    assert raised.value.code == 2
    assert content.decode("latin-1") not in str(raised.value) or not content


def test_a_missing_or_unreadable_key_file_is_a_usage_error(tmp_path):
    for path in (tmp_path / "missing", tmp_path):  # nothing there; a folder
        with pytest.raises(CliError, match="cannot read --sse-c-key-file") as raised:
            read_customer_key(str(path))
        assert raised.value.code == 2


def test_a_key_file_others_may_read_gets_a_warning(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"k" * 32)
    path.chmod(0o644)
    _, warning = read_customer_key(str(path))
    assert "may be read by other users (mode 644)" in warning
    assert f"chmod 600 {path}" in warning


def test_a_key_never_shows_in_its_repr():
    key = CustomerKey(b"0123456789abcdef0123456789abcdef")
    for form in forms_of(key.secret):
        assert form not in repr(key) and form not in str(key)
    params = key.params
    assert params["SSECustomerKey"] == base64.b64encode(key.secret).decode()
    md5 = hashlib.md5(key.secret).digest()
    assert params["SSECustomerKeyMD5"] == base64.b64encode(md5).decode()


@pytest.mark.parametrize(
    "url, refused",
    [
        (None, False),  # AWS itself: https
        ("https://s3.example.com", False),
        ("http://127.0.0.1:9000", False),
        ("http://127.8.0.1:9000", False),
        ("http://localhost:9000", False),
        ("http://[::1]:9000", False),
        ("http://s3.example.com", True),
        ("http://10.0.0.5:9000", True),
    ],
)
def test_the_key_goes_over_plain_http_only_to_loopback(url, refused):
    assert (cleartext_problem(url) is not None) is refused


# --- Which objects need the key: the Store's reads, on a stub ---------------------


def refusal(status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": str(status)},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "HeadObject",
    )


def test_an_object_without_a_key_is_read_again_without_it(s3):
    """AWS refuses the key's headers on an object that has none (400)."""
    store = Store(s3, "b", key=CustomerKey(b"k" * 32))
    calls = []

    def head(**params):
        calls.append("SSECustomerKey" in params)
        if "SSECustomerKey" in params:
            raise refusal(400)
        return {"ContentLength": 1}

    assert store._read(head, Bucket="b", Key="k") == {"ContentLength": 1}
    assert calls == [True, False]


@pytest.mark.parametrize("status", [400, 403])
def test_an_object_of_another_key_is_said_to_be(s3, status):
    store = Store(s3, "b", key=CustomerKey(b"k" * 32))

    def head(**params):
        raise refusal(status if "SSECustomerKey" in params else 400)

    with pytest.raises(CustomerKeyError, match="another key"):
        store._read(head, Bucket="b", Key="k")


def test_a_refusal_of_another_cause_is_not_blamed_on_the_key(s3):
    store = Store(s3, "b", key=CustomerKey(b"k" * 32))

    def head(**params):
        raise refusal(403)  # with the key and without: access denied

    with pytest.raises(botocore.exceptions.ClientError) as raised:
        store._read(head, Bucket="b", Key="k")
    assert not isinstance(raised.value, CliError)


def test_a_bucket_that_blocks_customer_keys_is_found_out(s3):
    s3.create_bucket(Bucket="blocks")
    store = Store(s3, "blocks")
    assert not store.customer_keys_blocked()  # none set
    answer = {
        "ServerSideEncryptionConfiguration": {
            "Rules": [
                {
                    "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                    "BlockedEncryptionTypes": {"EncryptionType": ["SSE-C"]},
                }
            ]
        }
    }
    with Stubber(s3) as stubber:
        stubber.add_response("get_bucket_encryption", answer, {"Bucket": "blocks"})
        assert store.customer_keys_blocked()


def test_backup_to_a_bucket_that_blocks_customer_keys_says_how_to_allow_them(
    s3, tmp_path, monkeypatch, capsys
):
    import backup

    tree = make_tree(tmp_path / "src", {"a.txt": b"a"})
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    monkeypatch.setattr(s3common.Store, "customer_keys_blocked", lambda store: True)
    code = backup.main([str(tree), "blocking::p", "--sse-c-key-file", str(key)])
    assert code == 1
    assert "refuses uploads encrypted with a customer key" in capsys.readouterr().err
    assert "Contents" not in s3.list_objects_v2(Bucket="blocking")


# --- End to end ---------------------------------------------------------------------


def forms_of(secret: bytes) -> list[str]:
    """The key as text in every form a leak could take."""
    forms = [
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        base64.b64encode(secret).decode().rstrip("="),
        secret.hex(),
        secret.hex().upper(),
    ]
    if secret.isascii() and secret.decode().isprintable():
        forms.append(secret.decode())
    return forms


@pytest.fixture
def ssec(s3_server, cli_env, tmp_path):
    """Run a script against the test server with a key file of its own; every
    output of every run is kept in `ssec.outputs`, for the leak test."""

    class Runner:
        key = secrets.token_hex(16).encode()  # 32 bytes, printable: leaks show
        path = tmp_path / "backup.key"
        other = tmp_path / "other.key"

        def __init__(self):
            self.outputs: list[str] = []

        def __call__(self, script, *args, key=None, endpoint=s3_server):
            options = ["--endpoint-url", endpoint]
            if key is not False:
                options += ["--sse-c-key-file", str(key or self.path)]
            result = run_script(script, *args, *options, env=cli_env)
            self.outputs += [result.stdout, result.stderr]
            return result

    runner = Runner()
    runner.path.write_bytes(runner.key)
    runner.path.chmod(0o600)
    runner.other.write_bytes(base64.b64encode(os.urandom(32)))
    runner.other.chmod(0o600)
    return runner


FILES = {
    "a.txt": b"hello",
    "sub/b.txt": b"b" * 1000,
    "medium.bin": b"m" * (2 * MiB),  # over the direct size: botocore's GET
    "big.bin": bytes(range(256)) * (9 * MiB // 256),  # multipart, ranged restore
}


def customer_key_params(secret: bytes) -> dict:
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": secret}


@ENFORCES
def test_every_object_is_encrypted_and_other_tools_read_it_with_the_key(
    tmp_path, ssec, s3_server, bucket_name
):
    tree = make_tree(tmp_path / "src", FILES)
    first = ssec("backup.py", str(tree), f"{bucket_name}::p")
    assert first.returncode == 0, first.stderr
    client = client_for(s3_server)
    for name, data in FILES.items():
        key = f"p/{name}"
        with pytest.raises(botocore.exceptions.ClientError):
            client.head_object(Bucket=bucket_name, Key=key)  # no key: refused
        answer = client.get_object(
            Bucket=bucket_name, Key=key, **customer_key_params(ssec.key)
        )
        assert answer["Body"].read() == data, name
        assert answer["SSECustomerAlgorithm"] == "AES256"
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        assert answer["Metadata"]["md5chksum"] == md5, name  # an SSE-C ETag is no MD5


def test_round_trip_no_change_checksum_and_check(tmp_path, ssec, bucket_name):
    tree = make_tree(tmp_path / "src", FILES)
    location = f"{bucket_name}::p"
    assert ssec("backup.py", str(tree), location).returncode == 0
    again = ssec("backup.py", str(tree), location, "--json")
    assert json.loads(again.stdout)["transferred"] == 0, again.stderr
    checked = ssec("backup.py", str(tree), location, "--checksum", "--json")
    assert json.loads(checked.stdout)["transferred"] == 0, checked.stderr
    check = ssec("backup.py", "--check", str(tree), location)
    assert check.returncode == 0, check.stdout + check.stderr
    restored = tmp_path / "restored"
    result = ssec("restore.py", location, str(restored))
    assert result.returncode == 0, result.stderr
    for name, data in FILES.items():
        assert (restored / name).read_bytes() == data, name
    kept = ssec("restore.py", location, str(restored), "--checksum", "--json")
    assert json.loads(kept.stdout)["skipped"] == len(FILES), kept.stderr


@ENFORCES
def test_a_restore_without_the_key_or_with_another_writes_nothing(
    tmp_path, ssec, bucket_name
):
    tree = make_tree(tmp_path / "src", FILES)
    assert ssec("backup.py", str(tree), f"{bucket_name}::p").returncode == 0
    for key, cause in [(False, "needs --sse-c-key-file"), (ssec.other, ANOTHER_KEY)]:
        target = tmp_path / f"restored-{bool(key)}"
        result = ssec("restore.py", f"{bucket_name}::p", str(target), key=key)
        assert result.returncode == 1
        errors = result.stderr.splitlines()
        for name in FILES:
            line = f"error: restore failed: s3://{bucket_name}/p/{name}: "
            assert any(e.startswith(line) and cause in e for e in errors), errors
        assert not [path for path in target.rglob("*") if path.is_file()]
        assert "Traceback" not in result.stderr


@ENFORCES
def test_check_with_another_key_says_so(tmp_path, ssec, bucket_name):
    tree = make_tree(tmp_path / "src", {"big.bin": FILES["big.bin"]})
    assert ssec("backup.py", str(tree), f"{bucket_name}::p").returncode == 0
    result = ssec(
        "backup.py", "--check", str(tree), f"{bucket_name}::p", key=ssec.other
    )
    assert result.returncode == 1
    assert "encrypted with another key" in result.stderr


def test_what_boto3_wrote_with_a_key_and_no_metadata_comes_back(
    tmp_path, ssec, s3_server, bucket_name
):
    client = client_for(s3_server)
    client.create_bucket(Bucket=bucket_name)
    theirs = {"theirs.txt": b"t" * 100, "theirs.bin": b"T" * (9 * MiB)}
    for name, data in theirs.items():
        client.put_object(
            Bucket=bucket_name,
            Key=f"p/{name}",
            Body=data,
            **customer_key_params(ssec.key),
        )
    # and beside them, an object with no customer key at all
    client.put_object(Bucket=bucket_name, Key="p/plain.txt", Body=b"plain")
    restored = tmp_path / "restored"
    result = ssec("restore.py", f"{bucket_name}::p", str(restored))
    assert result.returncode == 0, result.stderr
    for name, data in {**theirs, "plain.txt": b"plain"}.items():
        assert (restored / name).read_bytes() == data, name


@ENFORCES  # and moto's HEAD does not say the object has a key: no key on its parts
def test_every_path_carries_the_key(tmp_path, ssec, start_proxy, bucket_name):
    """Small files go direct, larger ones through botocore, the large ones in
    parts; then again with every direct request refused (botocore's fallback) and
    ranged bodies cut off (asked again)."""
    tree = make_tree(tmp_path / "src", {f"f{n}.txt": b"x" * n for n in range(1, 40)})
    make_tree(tree, {"medium.bin": FILES["medium.bin"], "big.bin": FILES["big.bin"]})
    proxy = start_proxy()
    assert (
        ssec("backup.py", str(tree), f"{bucket_name}::p", endpoint=proxy.url).returncode
        == 0
    )
    restored = tmp_path / "restored"
    result = ssec("restore.py", f"{bucket_name}::p", str(restored), endpoint=proxy.url)
    assert result.returncode == 0, result.stderr
    key_header = "x-amz-server-side-encryption-customer-key"
    object_requests = [
        (method, direct, key_header in names)
        for (method, path, direct), names in zip(proxy.requests, proxy.header_names)
        if path.count("/") >= 2 and method in ("PUT", "GET", "HEAD", "POST")
    ]
    assert any(direct for _, direct, _ in object_requests)  # the direct path ran
    unkeyed = [r for r in object_requests if not r[2] and r[0] != "POST"]
    assert not unkeyed
    for path in tree.rglob("*"):
        if path.is_file():
            assert (restored / path.relative_to(tree)).read_bytes() == path.read_bytes()

    refusing = start_proxy(refuse_direct=True, cut_ranges=2)
    again = tmp_path / "again"
    result = ssec("restore.py", f"{bucket_name}::p", str(again), endpoint=refusing.url)
    assert result.returncode == 0, result.stderr
    assert (again / "big.bin").read_bytes() == FILES["big.bin"]
    assert refusing.faults["cut"] >= 1


def test_the_usage_errors_of_the_key(tmp_path, ssec):
    tree = make_tree(tmp_path / "src", {"a.txt": b"a"})
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"short")
    for args, key, line in [
        (["--sse", "AES256"], None, "--sse-c-key-file does not go with --sse"),
        ([], bad, "holds no SSE-C key"),
        ([], tmp_path / "none", "cannot read --sse-c-key-file"),
    ]:
        result = ssec("backup.py", str(tree), "never-made::p", *args, key=key)
        assert result.returncode == 2, (args, result.stderr)
        assert line in result.stderr and "Traceback" not in result.stderr
    for script, args in [
        ("backup.py", [str(tree), "never-made::p"]),
        ("restore.py", ["never-made::p", str(tmp_path / "out")]),
    ]:
        # Refused before any request: nothing listens there.
        result = ssec(script, *args, endpoint="http://192.0.2.1:9")
        assert result.returncode == 2, result.stderr
        assert "plain http: give an https:// endpoint" in result.stderr


def test_no_output_of_any_run_shows_the_key(tmp_path, ssec, bucket_name):
    tree = make_tree(tmp_path / "src", FILES)
    location = f"{bucket_name}::p"
    ssec("backup.py", str(tree), location, "-v")
    ssec("backup.py", str(tree), location, "--json", "--checksum")
    ssec("backup.py", "--check", str(tree), location, "--json")
    ssec("backup.py", str(tree), location, "--sse", "AES256", "--json")
    ssec("restore.py", location, str(tmp_path / "r1"), "-v", "--json")
    ssec("restore.py", location, str(tmp_path / "r2"), key=ssec.other)
    ssec("restore.py", location, str(tmp_path / "r3"), key=False)
    ssec("restore.py", location, "--history", "--json")
    ssec("backup.py", str(tree), location, endpoint="http://192.0.2.1:9")
    ssec.path.chmod(0o644)
    ssec("backup.py", str(tree), location, "--dry-run", "-v")
    everything = "\n".join(ssec.outputs)
    assert "may be read by other users" in everything  # the runs did run
    for form in forms_of(ssec.key):
        assert form not in everything
